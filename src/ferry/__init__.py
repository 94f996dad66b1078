"""ferry: an NBD server that moves a live disk image to another host.

The package is laid out by architectural layer (see DESIGN.md): ``nbd`` is
the protocol without I/O, ``storage`` is the image file, ``serve`` and
``control`` are the Twisted data and control planes, and ``statecharts`` /
``trace`` hold the state machines that every control-plane change goes
through.
"""

__version__ = "0.1.0"
