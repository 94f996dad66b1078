"""A simulated etcd: its key-value store, leases, transactions and watches, over HTTP.

ferry's etcd lockspace (:class:`~ferry.lease.etcd.EtcdLockspace`) runs
unchanged in the simulator: its ``Agent`` reaches this server across the
simulated network (:mod:`ferry.sim.reactor`), so its gateway code -- the
pooled and fresh connections, the deadline, the retry of a replayable call,
"outcome unknown" and the revoke after it, the watch stream -- meets every
network fault a migration's connection does.

The server is a ``twisted.web`` site in a process of its own, answering the
JSON gateway's paths ferry uses, as etcd 3.4 does:

* ``/v3/lease/grant``, ``/v3/lease/keepalive``, ``/v3/lease/revoke``: leases
  with a TTL counted from the last keep-alive that *arrived*; an expired or
  revoked lease deletes its keys (one revision), and an unknown one is
  gRPC's NotFound (5);
* ``/v3/kv/range`` and ``/v3/kv/txn``: one global revision, moved once by
  each transaction that writes; ``mod_revision`` and ``create_revision``
  compares (over a range, or an absent key whose revisions are 0); puts
  under a lease, deletes, ranges;
* ``/v3/watch``: a stream of JSON objects, the events from
  ``start_revision`` on replayed from the history (never compacted here).

int64 fields are JSON strings and zero values are left out, as the gateway
does.  :meth:`EtcdServer.holder` is what the invariants ask.

A fault of its own: *lost answers* (:attr:`EtcdServer.lost_answers`, per
client host): the request is applied, then the connection is aborted
instead of answered -- the outcome a client cannot know.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet.address import IPv4Address
from twisted.web import server
from twisted.web.resource import Resource

from ferry.lease.backend import Holder, LeaseMode
from ferry.lease.etcd import DEFAULT_PREFIX
from ferry.sim.network import Network
from ferry.sim.process import ProcessTime
from ferry.sim.world import World

__all__ = ["ETCD_ADDRESS", "ETCD_PORT", "EtcdServer"]

ETCD_ADDRESS: Final = "10.0.0.50"
ETCD_PORT: Final = 2379
_NOT_FOUND: Final = 5
_INVALID: Final = 3
#: etcd's first lease ID here (any 64-bit number would do).
_FIRST_LEASE: Final = 0x7A5E0000_00000001


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


class _Error(Exception):
    """An etcd error answer: gRPC ``code``, HTTP status, message."""

    def __init__(self, code: int, status: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class _KV:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def as_json(self, key: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": _b64(key),
            "create_revision": str(self.create_revision),
            "mod_revision": str(self.mod_revision),
            "version": str(self.version),
        }
        if self.value:
            out["value"] = _b64(self.value)
        if self.lease:
            out["lease"] = str(self.lease)
        return out


@dataclass
class _Lease:
    ttl: int
    keys: set[bytes] = field(default_factory=set)
    timer: Any = None


@dataclass
class _Watcher:
    key: bytes
    end: bytes | None
    request: server.Request


class EtcdServer:
    """One etcd member, on the simulated network; see the module doc."""

    def __init__(self, world: World, network: Network) -> None:
        self.world = world
        self.process = ProcessTime(world, "etcd")
        self.rng = world.stream("etcd")
        self.revision = 1
        self.kvs: dict[bytes, _KV] = {}
        self.leases: dict[int, _Lease] = {}
        self._next_lease = _FIRST_LEASE
        self.history: list[tuple[int, dict[str, Any]]] = []  # (revision, event)
        self.watchers: list[_Watcher] = []
        #: client host -> chance that an applied request's answer is lost.
        self.lost_answers: dict[str, float] = {}
        self._known: tuple[_KV, Holder] | None = None  # the invariants ask at every step
        # twisted.web is not annotated: Site is a Factory all the same.
        site: Any = server.Site(  # type: ignore[no-untyped-call]
            _Gateway(self), reactor=self.process, timeout=None
        )
        network.listen(ETCD_ADDRESS, self.process, site)

    # -- what the invariants ask ------------------------------------------------------

    def holder(self, resource: str, prefix: str = DEFAULT_PREFIX) -> Holder | None:
        """The exclusive holder etcd has for ``resource`` now (ferry's key layout)."""
        digest = hashlib.sha256(resource.encode()).hexdigest()
        kv = self.kvs.get(f"{prefix}{digest}/exclusive".encode())
        if kv is None:
            return None
        known = self._known
        if known is not None and known[0] is kv:  # a put makes a new _KV
            return known[1]
        record = json.loads(kv.value)
        holder = Holder(
            str(record["owner"]), LeaseMode.EXCLUSIVE, kv.mod_revision, bool(record["offered"])
        )
        self._known = (kv, holder)
        return holder

    # -- leases ------------------------------------------------------------------------

    def grant(self, body: dict[str, Any]) -> dict[str, Any]:
        ttl = int(body.get("TTL", 0))
        if ttl <= 0:
            raise _Error(_INVALID, 400, "etcdserver: TTL must be positive")
        lease_id = self._next_lease
        self._next_lease += 1
        lease = self.leases[lease_id] = _Lease(ttl)
        lease.timer = self.process.callLater(ttl, self._expire, lease_id)
        return {"header": self._header(), "ID": str(lease_id), "TTL": str(ttl)}

    def keepalive(self, body: dict[str, Any]) -> dict[str, Any]:
        lease_id = int(body.get("ID", 0))
        lease = self.leases.get(lease_id)
        if lease is None:
            return {"result": {"header": self._header(), "ID": str(lease_id)}}  # TTL 0: gone
        lease.timer.reset(lease.ttl)
        return {"result": {"header": self._header(), "ID": str(lease_id), "TTL": str(lease.ttl)}}

    def revoke(self, body: dict[str, Any]) -> dict[str, Any]:
        lease_id = int(body.get("ID", 0))
        if lease_id not in self.leases:
            raise _Error(_NOT_FOUND, 404, "etcdserver: requested lease not found")
        self._end_lease(lease_id)
        return {"header": self._header()}

    def _expire(self, lease_id: int) -> None:
        if lease_id in self.leases:
            self.world.log("etcd", f"lease {lease_id:x} expired")
            self._end_lease(lease_id)

    def _end_lease(self, lease_id: int) -> None:
        lease = self.leases.pop(lease_id)
        if lease.timer.active():
            lease.timer.cancel()
        doomed = sorted(k for k in lease.keys if k in self.kvs)
        if doomed:
            self.revision += 1
            for key in doomed:
                self._delete(key)

    # -- keys ----------------------------------------------------------------------------

    def range(self, body: dict[str, Any]) -> dict[str, Any]:
        kvs = [kv.as_json(key) for key, kv in self._in_range(body)]
        answer: dict[str, Any] = {"header": self._header()}
        if kvs:
            answer["kvs"] = kvs
            answer["count"] = str(len(kvs))
        return answer

    def txn(self, body: dict[str, Any]) -> dict[str, Any]:
        succeeded = all(self._holds(compare) for compare in body.get("compare", []))
        ops = body.get("success" if succeeded else "failure", [])
        for op in ops:  # nothing is applied unless all of it can be
            put = op.get("request_put")
            if put is not None and int(put.get("lease", 0)) not in (0, *self.leases):
                raise _Error(_NOT_FOUND, 404, "etcdserver: requested lease not found")
        writes = any("request_put" in op or self._deletes(op) for op in ops)
        if writes:
            self.revision += 1
        responses = []
        for op in ops:
            if "request_range" in op:
                responses.append({"response_range": self.range(op["request_range"])})
            elif "request_put" in op:
                self._put(op["request_put"])
                responses.append({"response_put": {"header": self._header()}})
            elif "request_delete_range" in op:
                deleted = [key for key, _ in self._in_range(op["request_delete_range"])]
                for key in deleted:
                    self._delete(key)
                response: dict[str, Any] = {"header": self._header()}
                if deleted:
                    response["deleted"] = str(len(deleted))
                responses.append({"response_delete_range": response})
        answer: dict[str, Any] = {"header": self._header(), "responses": responses}
        if succeeded:
            answer["succeeded"] = True
        return answer

    def _holds(self, compare: dict[str, Any]) -> bool:
        target = compare.get("target", "VERSION")
        if compare.get("result", "EQUAL") != "EQUAL" or target not in ("CREATE", "MOD"):
            raise _Error(_INVALID, 400, f"the simulated etcd compares no {target}")
        name = "create_revision" if target == "CREATE" else "mod_revision"
        wanted = int(compare.get(name, 0))
        found = [kv for _, kv in self._in_range(compare)]
        if not found:
            return wanted == 0  # an absent key's revisions are 0
        return all(getattr(kv, name) == wanted for kv in found)

    def _deletes(self, op: dict[str, Any]) -> bool:
        request = op.get("request_delete_range")
        return request is not None and bool(self._in_range(request))

    def _put(self, put: dict[str, Any]) -> None:
        key = _unb64(put["key"])
        lease_id = int(put.get("lease", 0))
        old = self.kvs.get(key)
        if old is not None and old.lease and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        kv = _KV(
            _unb64(put.get("value", "")),
            old.create_revision if old is not None else self.revision,
            self.revision,
            old.version + 1 if old is not None else 1,
            lease_id,
        )
        self.kvs[key] = kv
        if lease_id:
            self.leases[lease_id].keys.add(key)
        self._event(key, {"kv": kv.as_json(key)})

    def _delete(self, key: bytes) -> None:
        kv = self.kvs.pop(key)
        if kv.lease and kv.lease in self.leases:
            self.leases[kv.lease].keys.discard(key)
        gone = {"key": _b64(key), "mod_revision": str(self.revision)}
        self._event(key, {"type": "DELETE", "kv": gone})

    def _in_range(self, request: dict[str, Any]) -> list[tuple[bytes, _KV]]:
        key = _unb64(request.get("key", ""))
        end = _unb64(request["range_end"]) if "range_end" in request else None
        if end is None:
            kv = self.kvs.get(key)
            return [] if kv is None else [(key, kv)]
        return sorted(
            (k, kv) for k, kv in self.kvs.items() if k >= key and (end == b"\0" or k < end)
        )

    def _header(self) -> dict[str, str]:
        return {"revision": str(self.revision)}

    # -- watches -----------------------------------------------------------------------------

    def watch(self, body: dict[str, Any], request: server.Request) -> None:
        create = body.get("create_request", {})
        key = _unb64(create.get("key", ""))
        end = _unb64(create["range_end"]) if "range_end" in create else None
        start = int(create.get("start_revision", 0)) or self.revision + 1
        watcher = _Watcher(key, end, request)
        self.watchers.append(watcher)
        request.notifyFinish().addBoth(self._unwatch, watcher)
        self._send(watcher, {"header": self._header(), "created": True})
        for revision, event in self.history:
            if revision >= start and self._watches(watcher, event):
                self._send(watcher, {"header": self._header(), "events": [event]})

    def _event(self, key: bytes, event: dict[str, Any]) -> None:
        self.history.append((self.revision, event))
        for watcher in list(self.watchers):
            if self._watches(watcher, event):
                self._send(watcher, {"header": self._header(), "events": [event]})

    @staticmethod
    def _watches(watcher: _Watcher, event: dict[str, Any]) -> bool:
        key = _unb64(event["kv"]["key"])
        if watcher.end is None:
            return key == watcher.key
        return key >= watcher.key and (watcher.end == b"\0" or key < watcher.end)

    def _send(self, watcher: _Watcher, result: dict[str, Any]) -> None:
        if watcher in self.watchers:
            watcher.request.write(json.dumps({"result": result}).encode() + b"\n")  # type: ignore[no-untyped-call]

    def _unwatch(self, _: object, watcher: _Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)


class _Gateway(Resource):
    """etcd's JSON gateway: ``POST /v3/...``, one method per path."""

    isLeaf = True

    def __init__(self, etcd: EtcdServer) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.etcd = etcd

    def render_POST(self, request: server.Request) -> bytes | int:
        etcd = self.etcd
        path = request.path.decode("ascii", errors="replace")
        try:
            assert request.content is not None
            body = json.loads(request.content.read() or b"{}")
            if path == "/v3/watch":
                request.setHeader(b"content-type", b"application/json")  # type: ignore[no-untyped-call]
                etcd.watch(body, request)
                return server.NOT_DONE_YET
            method = {
                "/v3/lease/grant": etcd.grant,
                "/v3/lease/keepalive": etcd.keepalive,
                "/v3/lease/revoke": etcd.revoke,
                "/v3/kv/range": etcd.range,
                "/v3/kv/txn": etcd.txn,
            }.get(path)
            if method is None:
                raise _Error(12, 404, f"the simulated etcd has no {path}")  # Unimplemented
            answer = method(body)
        except _Error as error:
            request.setResponseCode(error.status)
            answer = {"error": str(error), "code": error.code, "message": str(error)}
        peer = request.getClientAddress()  # type: ignore[no-untyped-call]
        host = peer.host if isinstance(peer, IPv4Address) else ""
        chance = etcd.lost_answers.get(host, 0.0)
        if chance and etcd.rng.random() < chance:
            etcd.world.log("etcd", f"answer to {host}'s {path} lost")
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return server.NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")  # type: ignore[no-untyped-call]
        return json.dumps(answer).encode()

    def render_GET(self, request: server.Request) -> bytes:
        request.setResponseCode(405)
        return b'{"error": "POST only", "code": 12}'
