"""Live migration: the source's job and its Twisted driver, and the destination's commit.

:mod:`ferry.migrate.core` decides (passes, convergence, rate, retries) without
I/O; the other modules move the bytes on Twisted and keep the export's role
in step with the migration (see each module's docstring).
"""
