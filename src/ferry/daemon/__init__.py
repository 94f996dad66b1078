"""``ferry daemon``: one process serving many exports, described in a file, changed while it runs.

A storage host serves hundreds of images; one ``ferry serve`` per image
would mean as many processes, ports, control sockets and metrics ports.
The daemon is one :class:`~ferry.node.Node` for all of them: one NBD port
(each export reached by its name), one control socket (whose commands take
an ``export``, and which adds and removes exports: ``export.add``,
``export.remove``, ``export.list``), one /metrics labelled by export, one
trace and one event stream.

* :mod:`ferry.daemon.config` -- the file (TOML), read and checked whole;
* :mod:`ferry.daemon.reload` -- what a reload changes, decided from the
  file as it was and as it is;
* :mod:`ferry.daemon.notify` -- systemd's readiness notices;
* :mod:`ferry.daemon.service` -- the running daemon: start, reload (SIGHUP,
  ``config.reload``), shutdown.
"""
