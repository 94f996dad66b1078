"""Moving a client's live TCP connection, and the NBD session on it, to another socket.

The building blocks the switchover calls, one job each:

* :mod:`ferry.handoff.tcp_repair` -- checkpoint a socket's TCP state and
  restore it on a new socket (``TCP_REPAIR``), and the state's wire format;
* :mod:`ferry.handoff.freeze` -- drop one connection's incoming packets while
  it moves, so the kernel neither ACKs bytes nobody will read nor answers
  with a reset;
* :mod:`ferry.handoff.address` -- the client-facing service address: add,
  remove, announce (gratuitous ARP);
* :mod:`ferry.handoff.fdpass` -- hand live descriptors and a versioned state
  message to another process on the same host (``SCM_RIGHTS``);
* :mod:`ferry.handoff.capability` -- whether this host can move connections
  at all, and if not, why.

The facts they rest on (the order of the steps, the pitfalls) were measured
on this kind of machine and are written up in the design notes
(``HANDOFF.md``); each module repeats the ones it depends on.  Every error
these modules raise for a connection that cannot be moved is a
:class:`~ferry.handoff.errors.HandoffError`: the caller disconnects that
client, as it did before connections could move, and the image's handoff
goes on.
"""
