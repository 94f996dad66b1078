"""Leases on images: a lock manager whose leases follow an image through a migration.

``backend`` defines what a lockspace is; ``local`` (fcntl OFD locks in a
directory) and ``etcd`` (etcd v3 over its HTTP/JSON gateway) implement it;
``manager`` runs the lease machine (``statecharts/lease.yaml``): acquire,
keep alive, fence, hand over; ``spec`` reads ``--lockspace`` and opens the
backend it names.
"""

from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseBackend,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    LockspaceUnavailable,
)
from ferry.lease.local import LocalLockspace
from ferry.lease.manager import InDoubtOutcome, LeaseManager, LeaseStateError
from ferry.lease.spec import (
    LockspaceSpec,
    default_lockspace,
    default_resource,
    open_lockspace,
    parse_lockspace,
)

__all__ = [
    "Grant",
    "Holder",
    "InDoubtOutcome",
    "LeaseBackend",
    "LeaseConflict",
    "LeaseError",
    "LeaseLost",
    "LeaseManager",
    "LeaseMode",
    "LeaseStateError",
    "LocalLockspace",
    "LockspaceSpec",
    "LockspaceUnavailable",
    "default_lockspace",
    "default_resource",
    "open_lockspace",
    "parse_lockspace",
]
