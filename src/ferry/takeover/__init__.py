"""``ferry serve --takeover SOCK``: a new process takes a running export over, on this host.

The point is an upgrade with no disconnect.  The new process (the *taker*)
asks the old one (the *giver*) on its control socket, and gets, by
SCM_RIGHTS (:mod:`ferry.handoff.fdpass`), the very descriptors the giver
serves with: its listening sockets (NBD, control, metrics), the image,
the lease's lock file (for a local lockspace) and every client connection
-- the same kernel sockets, queues and sequence numbers, so no TCP_REPAIR
is needed and a client sees a pause, never a disconnect.  Beside them
travels the state (:mod:`ferry.takeover.state`): the options the export is
served with, the lease's grant, and each connection's NBD session with the
requests it had received but not performed, which the taker performs.

The exchange, on the control connection (the ``takeover`` request makes
it raw: :meth:`ferry.control.commands.Commands.upgrades`)::

    taker                                           giver
    {"method": "takeover"}              ---->       holds client requests (role
                                                    passing_on), stops accepting,
                                                    waits for FLUSH/FUA in flight,
                                                    suspends every client, takes
                                                    its session; lease: passing
                                        <----       offer: format, fd count, size
    accept (or refuse: an unknown       ---->
    format; nothing moved)
                                        <----       state + descriptors
    receipt                             ---->
    checks everything, prepares
    (touches no socket)
    note "ready" (or "no: why")         ---->
                                        <----       note "yours"  (giver: committed)
    note "serving"                      ---->       lease passed on, every socket
    adopts the sockets, the lease,                  let go without a packet; exit 0
    and serves

Who may touch what, and when: the taker touches no socket, writes nothing
and renews nothing before it has said "serving", and it says it only after
"yours"; the giver performs nothing from the moment it holds requests,
and after "yours" it never serves again -- unless the taker's end comes
before "serving" (the connection closes: it touched nothing), when it
takes everything back.  Any failure or refusal before "yours" is a resume:
the lease kept, every client resumed where it stopped, the ports accept
again; nothing was lost, since nothing was performed.  The lockspace sees
one holder throughout (:class:`~ferry.lease.backend.PassingBackend`).  The
giver's steps are ``statecharts/takeover.yaml``; see its comments for
each.

The taker's options: everything that says what is served and where (file,
name, addresses and ports, control socket, ACL, lease) is the giver's; a
taker given one of those must give the giver's value, or it refuses the
takeover before it holds anything (it asks ``served`` first).  What the
taker records (``--trace``, ``--log``, verbosity) is its own.
"""
