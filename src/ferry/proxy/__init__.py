"""``ferry proxy``: a stable local NBD endpoint that follows its image across servers.

A client (a VM's disk, nbdcopy, the kernel's nbd-client) connects to the
proxy on its own host; the proxy connects to the server, one upstream
connection per client, and passes requests and replies through, as many in
flight as the client sends.  When the server goes away -- it handed the
image off to another host, crashed, or the network broke -- the proxy holds
the client's requests, finds the image again (the same address, where the
old server says it went, or where the lockspace says its lease is held),
negotiates the same export, and sends again every request that had no
answer.  The client sees a pause, not an error, for up to ``--max-wait``.

The modules, one job each:

* :mod:`~ferry.proxy.book` -- one client's requests until answered, and the
  order overlapping ones may reach a server in (sans-IO);
* :mod:`~ferry.proxy.features` -- what the client was promised, and whether
  a new server keeps that promise (sans-IO);
* :mod:`~ferry.proxy.finder` -- where to look for the image;
* :mod:`~ferry.proxy.upstream` -- one attempt to reach it: connect, ask where
  the image is, negotiate;
* :mod:`~ferry.proxy.session` -- one client connection and its machine
  (``statecharts/proxy.yaml``);
* :mod:`~ferry.proxy.listener` -- the listening side: sessions and their counters;
* :mod:`~ferry.proxy.status` -- the status line and the Prometheus series;
* :mod:`~ferry.proxy.runner` -- wires a running proxy together.
"""
