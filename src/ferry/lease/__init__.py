"""Leases on images: a lock manager whose leases follow an image through a migration.

``backend`` defines what a lockspace is; ``local`` (fcntl OFD locks in a
directory) and ``etcd`` (etcd v3 over its HTTP/JSON gateway) implement it;
``manager`` runs the lease machine (``statecharts/lease.yaml``): acquire,
keep alive, fence, hand over.
"""
