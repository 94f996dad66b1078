"""The ``etcd:`` lockspace: leases as etcd v3 keys bound to etcd leases.

ferry talks to etcd through its HTTP/JSON gateway (``POST /v3/...``, keys
and values base64, 64-bit integers as JSON strings) with Twisted's own
``Agent``, so every call is a ``Deferred`` on the reactor and ferry needs no
gRPC stack.  Paths used, all present in etcd 3.4: ``/v3/lease/grant``,
``/v3/lease/keepalive`` (a stream; one request in, one answer out),
``/v3/lease/revoke``, ``/v3/kv/range``, ``/v3/kv/txn`` and ``/v3/watch``
(a stream of newline-separated JSON objects).

Key layout, per resource (its name hashed, so any path is a safe key)::

    <prefix><sha256(resource)>/exclusive
    <prefix><sha256(resource)>/shared/<percent-encoded owner>

Each value is JSON ``{resource, owner, mode, offered}`` and each key is
attached to an etcd lease of the holder's TTL: if the holder stops renewing,
etcd deletes the key and the resource is free again.  Every write is one
``txn`` whose compare makes the exclusion rule atomic:

* exclusive acquire: no key at all under the resource (one compare over the
  whole range -- for an empty range etcd compares against an absent key,
  whose ``create_revision`` is 0, so the compare holds);
* shared or read-only acquire: no exclusive key, and no shared key of the
  same owner (acquiring twice is a conflict, not a silent replacement);
* offer, take-over, release: the key's ``mod_revision`` is still the token.

**Fencing tokens** are etcd revisions: the token of a grant is the revision
of the write that made it (the key's ``mod_revision``).  Revisions are global
and strictly increase, so every acquire, offer and take-over yields a token
larger than any before it.  :meth:`EtcdLockspace.offer` therefore answers with
a *new* grant (new token, same etcd lease) that supersedes the old one:
renewing the pre-offer grant reports :class:`LeaseLost`.

**Ownership** is the pair (key revision, etcd lease).  A take-over writes the
key under the *taker's* new etcd lease, so the previous holder's lease no
longer carries it: revoking that lease (its ``release``) cannot delete the
taker's key, and its ``renew`` sees a revision that is not its token.

**A takeover on one host** (``ferry serve --takeover``) passes the grant
as it is: its etcd lease ID and token (:meth:`EtcdLockspace.pass_on`).  The
new process renews the same etcd lease and its key keeps its revision, so
etcd sees one holder throughout; the old process forgets the grant without
revoking anything (:meth:`~EtcdLockspace.let_go`).

**TLS and users.**  ``https://`` endpoints are reached over TLS
(:class:`~ferry.tls.ClientTLS`: etcd's certificate checked against the given
CA, or the system's, and the address dialled; ferry's own certificate for
``--client-cert-auth``).  With a ``user``, ferry logs in at
``/v3/auth/authenticate`` before its first request and sends the token it
gets in the ``Authorization`` header of every request and watch; a request
etcd refuses for its token (expired, or the auth store moved on) logs in
again and is sent once more -- etcd refused it before applying it, so this
holds for a ``txn`` too.  Concurrent requests share one login.

**Endpoints and time-outs.**  Each HTTP request has ``request_timeout``
seconds, shared by all endpoints it tries.  A request that could not have
reached etcd (connection refused, not sent) moves on to the next endpoint; a
request that may have been applied (sent, then no answer) is retried
elsewhere only if it is harmless to repeat (reads, keep-alives, revokes,
lease grants), never a ``txn``: its outcome is unknown, so the caller gets
:class:`LockspaceUnavailable` and decides.  The endpoint that answered last
is tried first next time; one that timed out goes to the back.  An
operation makes one to three requests (acquire: lease grant, txn, and a
revoke when it fails), so it answers within a few ``request_timeout`` at
most; :meth:`~EtcdLockspace.renew` makes two (keep-alive, read).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import ipaddress
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeout
from twisted.internet.interfaces import IConsumer, IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent  # twisted.web.client re-exports it, untyped
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ferry.clock import DelayedCall, ReactorClock
from ferry.lease.backend import (
    Grant,
    Holder,
    LeaseBackend,
    LeaseConflict,
    LeaseError,
    LeaseLost,
    LeaseMode,
    LockspaceUnavailable,
    PassedGrant,
    in_holder_order,
)
from ferry.tls import ClientTLS, describe_error

__all__ = ["EtcdLockspace"]

_log = Logger()
_T = TypeVar("_T")

DEFAULT_PREFIX = "/ferry/leases/"
# Where holders publish the address they serve a resource at (publish, where):
# beside the leases, not under them, so a record is never taken for a holder.
DEFAULT_SERVING_PREFIX = "/ferry/serving/"
# A watch stream that breaks (etcd restarted, endpoint gone) is reopened
# after this long, from the revision after the last event it saw.
WATCH_RETRY_DELAY = 1.0
# The most a watch stream may buffer without completing one JSON object, and
# the longest answer read: caps on what a broken or hostile endpoint can make
# ferry hold in memory.
MAX_STREAM_BUFFER = 4 * 1024 * 1024
MAX_ANSWER = 16 * 1024 * 1024
# gRPC status code etcd answers for an unknown lease (revoke of a lease
# that expired or was revoked already).
_GRPC_NOT_FOUND = 5
# ... and for a member that cannot serve now ("no leader", shutting down).
_GRPC_UNAVAILABLE = 14
# ... for a request without a valid token (expired, or never given).
_GRPC_UNAUTHENTICATED = 16
_AUTHENTICATE = "/v3/auth/authenticate"

# Failures that prove the request never reached etcd: safe to send elsewhere.
_NOT_SENT: tuple[type[Exception], ...] = (
    ConnectError,
    ConnectTimeout,
    DNSLookupError,
    RequestNotSent,
    RequestTransmissionFailed,
)
# Failures after the request was sent: etcd may or may not have applied it.
_BROKEN: tuple[type[Exception], ...] = (
    ResponseFailed,
    ConnectionLost,
    ConnectionDone,
)


# -- keys and values -----------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _range_end(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with ``prefix`` (etcd's ``WithPrefix``)."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1])


@dataclass(frozen=True)
class _Keys:
    """Where one resource's holders live in etcd."""

    base: bytes

    @classmethod
    def of(cls, prefix: str, resource: str) -> _Keys:
        digest = hashlib.sha256(resource.encode()).hexdigest()
        return cls(f"{prefix}{digest}/".encode())

    @property
    def end(self) -> bytes:
        return _range_end(self.base)

    @property
    def exclusive(self) -> bytes:
        return self.base + b"exclusive"

    def shared(self, owner: str) -> bytes:
        return self.base + b"shared/" + quote(owner, safe="").encode()

    def of_holder(self, owner: str, mode: LeaseMode) -> bytes:
        return self.exclusive if mode is LeaseMode.EXCLUSIVE else self.shared(owner)


def _value(resource: str, owner: str, mode: LeaseMode, *, offered: bool = False) -> str:
    record = {"resource": resource, "owner": owner, "mode": mode.value, "offered": offered}
    return _b64(json.dumps(record, sort_keys=True).encode())


def _record(kv: dict[str, Any]) -> dict[str, Any]:
    """The JSON value of a key; an unreadable one is described by its key instead."""
    try:
        record = json.loads(_unb64(kv.get("value", "")))
    except (ValueError, binascii.Error):
        record = None
    if not isinstance(record, dict):
        return {"owner": f"unreadable value at {_unb64(kv['key'])!r}"}
    return record


def _holder(kv: dict[str, Any]) -> Holder:
    """A :class:`Holder` from a range or watch ``kv``; its mode follows the key."""
    record = _record(kv)
    exclusive = _unb64(kv["key"]).endswith(b"/exclusive")
    try:
        mode = LeaseMode(record.get("mode", "shared"))
    except ValueError:
        mode = LeaseMode.SHARED
    if exclusive:
        mode = LeaseMode.EXCLUSIVE
    return Holder(
        owner=str(record.get("owner", "")),
        mode=mode,
        token=int(kv.get("mod_revision", 0)),
        offered=bool(record.get("offered", False)),
    )


def _holders(kvs: list[dict[str, Any]]) -> tuple[Holder, ...]:
    """Holders in a stable order: the exclusive one first, then by owner."""
    return in_holder_order(_holder(kv) for kv in kvs)


def _resource_of(digest: bytes, kvs: list[dict[str, Any]]) -> str:
    """The resource name the values of one resource's keys record (else its key's hash)."""
    for kv in kvs:
        name = _record(kv).get("resource")
        if isinstance(name, str) and name:
            return name
    return digest.decode("ascii", errors="replace")


def _range_kvs(txn_answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The kvs of the range requests in a txn's answer (its failure branch)."""
    kvs: list[dict[str, Any]] = []
    for response in txn_answer.get("responses", []):
        kvs.extend(response.get("response_range", {}).get("kvs", []))
    return kvs


def _compare(key: bytes, target: str, revision: int, end: bytes | None = None) -> dict[str, Any]:
    """An etcd ``Compare`` that ``key`` (or every key up to ``end``) has this revision."""
    field = {"CREATE": "create_revision", "MOD": "mod_revision"}[target]
    compare: dict[str, Any] = {
        "key": _b64(key),
        "target": target,
        "result": "EQUAL",
        field: str(revision),
    }
    if end is not None:
        compare["range_end"] = _b64(end)
    return compare


def _range_op(key: bytes, end: bytes | None = None) -> dict[str, Any]:
    request = {"key": _b64(key)}
    if end is not None:
        request["range_end"] = _b64(end)
    return {"request_range": request}


def _put_op(key: bytes, value: str, lease: int) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": value, "lease": str(lease)}}


def _first_object(body: bytes) -> dict[str, Any]:
    """The first JSON object of a body (stream endpoints append more, or a newline)."""
    text = body.decode("utf-8", errors="replace").lstrip()
    obj, _ = json.JSONDecoder().raw_decode(text)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


# -- HTTP ------------------------------------------------------------------------


class _EtcdError(LockspaceUnavailable):
    """etcd answered, with an error (``code`` is its gRPC status code)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        super().__init__(message)


class _Expired(Exception):
    """A request ran out of its time (internal: becomes LockspaceUnavailable)."""


@implementer(IBodyProducer)
class _Body:
    """A request body that is already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Gateway:
    """POSTs JSON to etcd's gateway, over the endpoints in turn, each call within a deadline.

    Replayable calls (keep-alives, reads: the frequent ones) share a pool of
    persistent connections.  A pooled connection can be stale -- etcd closed
    it, and the reactor has not noticed yet -- so a replayable call that
    breaks off is tried once more, on a new connection.  A ``txn`` cannot be
    sent twice, so each one goes over a new connection of its own: if that
    breaks off, etcd really may have applied it.  Watch streams get their
    own connections too, never one that a renewal might wait for.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        reactor: Any,
        clock: ReactorClock,
        timeout: float,
        *,
        tls: ClientTLS | None = None,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self._clock = clock
        self._timeout = timeout
        self._reactor = reactor
        self._pool, self._agent = _agent(reactor, persistent=True, timeout=timeout, tls=tls)
        self._fresh_pool, self._fresh_agent = _agent(
            reactor, persistent=False, timeout=timeout, tls=tls
        )
        self._preferred = 0
        self._login = login  # (user, password), kept for logging in again
        self._token: str | None = None
        self._waiting: list[Deferred[str]] = []  # requests waiting for the login in flight

    def call(
        self, path: str, payload: dict[str, Any], *, replayable: bool
    ) -> Deferred[dict[str, Any]]:
        """POST ``payload`` to ``path``; the answer's JSON, or LockspaceUnavailable.

        ``replayable``: the request may be sent again after an attempt whose
        outcome is unknown (true for reads and other idempotent calls).
        """
        return Deferred.fromCoroutine(self._call(path, payload, replayable))

    async def _call(self, path: str, payload: dict[str, Any], replayable: bool) -> dict[str, Any]:
        if self._login is None:
            return await self._call_with(path, payload, replayable, None)
        token = await self._token_now()
        try:
            return await self._call_with(path, payload, replayable, token)
        except _EtcdError as exc:
            if not _token_refused(exc):
                raise
        self.forget_token(token)
        return await self._call_with(path, payload, replayable, await self._token_now())

    def forget_token(self, token: str | None) -> None:
        """etcd refused ``token``: the next request logs in again."""
        if token is not None and token == self._token:
            self._token = None

    async def _token_now(self) -> str:
        """The token to send: the one we have, or a new login (shared by concurrent calls)."""
        if self._token is not None:
            return self._token
        waiter: Deferred[str] = Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            Deferred.fromCoroutine(self._log_in()).addBoth(self._logged_in)
        return await waiter

    async def _log_in(self) -> str:
        assert self._login is not None
        user, password = self._login
        answer = await self._call_with(
            _AUTHENTICATE, {"name": user, "password": password}, True, None
        )
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise LockspaceUnavailable(f"etcd answered {_AUTHENTICATE} without a token")
        self._token = token
        return token

    def _logged_in(self, result: str | Failure) -> None:
        """Hand the login's token (or its failure) to every request that waited for it."""
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if waiter.called:  # given up on (a watch stopped meanwhile)
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    async def _call_with(
        self, path: str, payload: dict[str, Any], replayable: bool, token: str | None
    ) -> dict[str, Any]:
        body = json.dumps(payload).encode()
        deadline = self._clock.seconds() + self._timeout
        failures: list[str] = []
        for index in self._order():
            outcome = await self._attempt(index, path, body, deadline, replayable, token)
            if isinstance(outcome, str):
                failures.append(outcome)
                continue
            self._preferred = index
            return outcome
        raise LockspaceUnavailable(f"no etcd endpoint answered {path}: {'; '.join(failures)}")

    async def _attempt(
        self,
        index: int,
        path: str,
        body: bytes,
        deadline: float,
        replayable: bool,
        token: str | None,
    ) -> dict[str, Any] | str:
        """One endpoint's answer, or why to ask the next; raises when no other may be asked."""
        endpoint = self.endpoints[index]
        agent = self._agent if replayable else self._fresh_agent
        why = ""
        for _ in range(2 if replayable else 1):  # again: a pooled connection may be stale
            try:
                code, data = await self._post(agent, endpoint + path, body, deadline, token)
            except _Expired:
                self._demote(index)
                raise LockspaceUnavailable(
                    f"etcd at {endpoint} did not answer {path} within {self._timeout:g} s"
                ) from None
            except _NOT_SENT as exc:
                return f"{endpoint}: {_why(exc)}"
            except _BROKEN as exc:
                if not replayable:
                    raise LockspaceUnavailable(
                        f"etcd at {endpoint} broke off {path}, outcome unknown: {_why(exc)}"
                    ) from None
                why = f"{endpoint}: {_why(exc)}"
                continue
            try:
                return _answer(endpoint, path, code, data)
            except _EtcdError as exc:
                if replayable and exc.code == _GRPC_UNAVAILABLE:
                    return str(exc)  # this member cannot serve (no leader): ask another
                raise
        return why

    def open_stream(self, path: str, payload: dict[str, Any]) -> Deferred[IResponse]:
        """Start a streaming POST on the preferred endpoint; its response, body unread.

        The deadline covers the answer's headers only: the body goes on for
        as long as the stream lives.  With a user, the login comes first.
        """
        return Deferred.fromCoroutine(self._open_stream(path, payload))

    async def _open_stream(self, path: str, payload: dict[str, Any]) -> IResponse:
        token = None if self._login is None else await self._token_now()
        index = self._preferred
        url = (self.endpoints[index] + path).encode()
        body = _Body(json.dumps(payload).encode())
        d = self._fresh_agent.request(b"POST", url, _headers(token), body)
        try:
            response: IResponse = await d.addTimeout(self._timeout, self._reactor)
        except Exception:
            self._demote(index)
            raise
        return response

    @property
    def token(self) -> str | None:
        """The login token requests carry now (None: none yet, or no user)."""
        return self._token

    async def _post(
        self, agent: Agent, url: str, body: bytes, deadline: float, token: str | None
    ) -> tuple[int, bytes]:
        response = await self._within(
            agent.request(b"POST", url.encode(), _headers(token), _Body(body)), deadline
        )
        data = await self._within(_read_body(response), deadline)
        return response.code, data

    async def _within(self, d: Deferred[_T], deadline: float) -> _T:
        """Await ``d``, cancelling it at ``deadline`` (then :class:`_Expired`).

        Not ``Deferred.addTimeout``: cancelling a connection attempt fails
        with ``ConnectingCancelledError``, which addTimeout passes through
        untranslated; a flag tells an expiry from a real failure.
        """
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            d.cancel()

        timer = self._clock.call_later(max(0.0, deadline - self._clock.seconds()), expire)
        try:
            return await d
        except Exception:
            if expired:
                raise _Expired() from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._preferred + step) % n for step in range(n)]

    def _demote(self, index: int) -> None:
        """Try another endpoint first next time, if ``index`` was the first choice."""
        if index == self._preferred:
            self._preferred = (index + 1) % len(self.endpoints)

    def close(self) -> Deferred[None]:
        closing: list[Deferred[None]] = [
            self._pool.closeCachedConnections(),  # type: ignore[no-untyped-call]
            self._fresh_pool.closeCachedConnections(),  # type: ignore[no-untyped-call]
        ]
        return gatherResults(closing).addCallback(lambda _: None)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """TCP endpoints for etcd's URLs; an IP address is connected to directly.

    Agent's default, ``HostnameEndpoint``, reports a refused connection only
    at its next happy-eyeballs tick, 0.3 s later: every fail-over past a dead
    endpoint would wait that long.
    """

    def __init__(self, reactor: Any, timeout: float, tls: ClientTLS | None = None) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._tls = tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            endpoint = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        else:
            tcp = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = tcp(self._reactor, str(address), uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            tls = self._tls or ClientTLS()
            endpoint = wrapClientTLS(tls.creator(host), endpoint)
        return endpoint


def _agent(
    reactor: Any, *, persistent: bool, timeout: float, tls: ClientTLS | None = None
) -> tuple[HTTPConnectionPool, Agent]:
    """An HTTP client with its own connection pool (``twisted.web.client`` is not annotated)."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)  # type: ignore[no-untyped-call]
    endpoints = _Endpoints(reactor, timeout, tls)
    agent = Agent.usingEndpointFactory(reactor, endpoints, pool)  # type: ignore[no-untyped-call]
    return pool, agent


class _Collect(Protocol):
    """Reads a whole (bounded) response body into ``done``.

    Twisted's ``readBody`` would do, but it warns when the body arrived
    before it was asked for (its transport is then a proxy without
    ``abortConnection``), and it has no size cap.
    """

    def __init__(self, done: Deferred[bytes]) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER:
            self._finish(LockspaceUnavailable(f"etcd answered with over {MAX_ANSWER} bytes"))
            _stop_transport(self)
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if isinstance(reason.value, ResponseDone | PotentialDataLoss):
            self._finish(b"".join(self._parts))
        else:
            self._finish(reason)

    def _finish(self, result: bytes | Exception | Failure) -> None:
        if self._done.called:
            return
        if isinstance(result, bytes):
            self._done.callback(result)
        else:
            self._done.errback(result)


def _read_body(response: IResponse) -> Deferred[bytes]:
    """The body of ``response``; cancelling the answer closes the connection."""
    done: Deferred[bytes] = Deferred(lambda _: _stop_transport(collector))
    collector = _Collect(done)
    response.deliverBody(collector)  # type: ignore[no-untyped-call]
    return done


def _stop_transport(protocol: Protocol) -> None:
    """Close the connection under a response body (its transport is a producer proxy)."""
    transport = protocol.transport
    if transport is not None and IPushProducer.providedBy(transport):
        IPushProducer(transport).stopProducing()


def _headers(token: str | None) -> Headers:
    headers = Headers({b"content-type": [b"application/json"]})
    if token is not None:
        headers.setRawHeaders(b"authorization", [token.encode("ascii", "replace")])
    return headers


def _token_refused(error: _EtcdError) -> bool:
    """Whether etcd refused a request for its login token (log in again and resend)."""
    message = str(error)
    return error.code == _GRPC_UNAUTHENTICATED or (
        "auth token" in message or "revision of auth store is old" in message
    )


def _why(exc: BaseException) -> str:
    """One line for a Twisted client failure (they often wrap the real reason)."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(describe_error(r.value) for r in reasons)
    return describe_error(exc)


def _answer(endpoint: str, path: str, code: int, data: bytes) -> dict[str, Any]:
    """The JSON answer of a gateway call, or _EtcdError (etcd said no) / LockspaceUnavailable."""
    try:
        obj = _first_object(data)
    except ValueError:
        raise LockspaceUnavailable(
            f"etcd at {endpoint} answered {path} with HTTP {code} and no JSON: {data[:200]!r}"
        ) from None
    # Streaming endpoints wrap each message as {"result": ...} or {"error": ...}.
    error = obj.get("error")
    if code != 200 or error is not None:
        if isinstance(error, dict):
            obj = error
        message = obj.get("message") or obj.get("error") or f"HTTP {code}"
        code = int(obj.get("code", obj.get("grpc_code", 0)))  # the latter inside streams
        raise _EtcdError(code, f"etcd at {endpoint}: {path}: {message}")
    result = obj.get("result", obj)
    if not isinstance(result, dict):
        raise LockspaceUnavailable(f"etcd at {endpoint} answered {path} with {obj!r}")
    return result


# -- watches -----------------------------------------------------------------------


class _StreamProtocol(Protocol):
    """The body of one ``/v3/watch`` response: JSON objects, one after another."""

    def __init__(
        self, on_message: Callable[[dict[str, Any]], None], on_end: Callable[[Failure], None]
    ) -> None:
        self._on_message = on_message
        self._on_end = on_end
        self._buffer = ""
        self._decoder = json.JSONDecoder()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data.decode("utf-8", errors="replace")
        while True:
            self._buffer = self._buffer.lstrip()
            try:
                obj, used = self._decoder.raw_decode(self._buffer)
            except ValueError:
                break  # incomplete: wait for more
            self._buffer = self._buffer[used:]
            if isinstance(obj, dict):
                self._on_message(obj)
        if len(self._buffer) > MAX_STREAM_BUFFER:
            _log.warn(
                "etcd watch stream sent {n} bytes without a whole object", n=len(self._buffer)
            )
            self.stop()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._on_end(reason)

    def stop(self) -> None:
        _stop_transport(self)


class _Watch:
    """One grant's watch: a ``/v3/watch`` stream on its key, reopened when it breaks.

    It fires ``on_lost`` once, when the key is deleted or written by anyone
    but the grant's own etcd lease and owner (an offer rewrites the key under
    the same lease: that is still ours).  A broken stream is not a loss --
    :meth:`EtcdLockspace.renew` decides that -- so it is reopened from the
    revision after the last event seen, and etcd replays what was missed.
    """

    def __init__(
        self,
        gateway: _Gateway,
        clock: ReactorClock,
        grant: Grant,
        key: bytes,
        on_lost: Callable[[str], None],
    ) -> None:
        self._gateway = gateway
        self._clock = clock
        self._grant = grant
        self._key = key
        self._on_lost = on_lost
        self._next_revision = grant.token + 1
        self._stopped = False
        self._pending: Deferred[IResponse] | None = None
        self._stream: _StreamProtocol | None = None
        self._retry: DelayedCall | None = None
        self._closing: str | None = None  # why we closed the stream ourselves

    def start(self) -> None:
        self._retry = None
        if self._stopped:
            return
        request = {
            "create_request": {"key": _b64(self._key), "start_revision": str(self._next_revision)}
        }
        self._pending = self._gateway.open_stream("/v3/watch", request)
        self._pending.addCallbacks(self._connected, self._broken)

    def stop(self) -> None:
        """Stop for good: no more callbacks, the stream closed."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._pending is not None:
            self._pending.cancel()
        if self._stream is not None:
            self._stream.stop()

    def _connected(self, response: IResponse) -> None:
        self._pending = None
        if self._stopped:
            discard = _StreamProtocol(lambda _: None, lambda _: None)
            response.deliverBody(discard)  # type: ignore[no-untyped-call]
            discard.stop()
            return
        if response.code != 200:
            _log.warn("etcd watch answered HTTP {code}", code=response.code)
        self._stream = _StreamProtocol(self._message, self._broken)
        response.deliverBody(self._stream)  # type: ignore[no-untyped-call]

    def _broken(self, reason: Failure) -> None:
        """The stream ended or never started: reopen it later unless stopped."""
        self._pending = None
        self._stream = None
        why, self._closing = self._closing or reason.getErrorMessage(), None
        if self._stopped or isinstance(reason.value, CancelledError):
            return
        _log.info("reopening the etcd watch on {r}: {why}", r=self._grant.resource, why=why)
        self._retry = self._clock.call_later(WATCH_RETRY_DELAY, self.start)

    def _reopen(self, why: str) -> None:
        """Close the stream on purpose; :meth:`_broken` then opens a new one."""
        if self._stream is not None:
            self._closing = why
            self._stream.stop()

    def _message(self, message: dict[str, Any]) -> None:
        if self._stopped:
            return
        result = message.get("result", {})
        if "error" in message or not isinstance(result, dict):
            error = message.get("error")
            detail = error.get("message") if isinstance(error, dict) else None
            if "auth token" in str(detail):
                self._gateway.forget_token(self._gateway.token)  # log in again to reopen
            self._reopen(f"etcd said {detail or message}")
            return
        if int(result.get("compact_revision", 0)):
            self._compacted()
            return
        if result.get("canceled"):
            self._reopen(f"etcd cancelled it ({result.get('cancel_reason', 'no reason given')})")
            return
        for event in result.get("events", []):
            self._event(event)
            if self._stopped:
                return

    def _event(self, event: dict[str, Any]) -> None:
        kv = event.get("kv", {})
        self._next_revision = int(kv.get("mod_revision", 0)) + 1
        if event.get("type") == "DELETE":
            self._lose(f"the lease on {self._grant.resource} was deleted (expired or removed)")
        elif not self._ours(kv):
            taker = _holder(kv)
            self._lose(f"the lease on {self._grant.resource} was taken by {taker.describe()}")

    def _ours(self, kv: dict[str, Any]) -> bool:
        record = _record(kv)
        return (
            int(kv.get("lease", 0)) == self._grant.handle
            and record.get("owner") == self._grant.holder.owner
        )

    def _compacted(self) -> None:
        """etcd forgot the history the watch needs: look at the key as it is now.

        If it is still ours, the reopened stream starts at the revision it
        was read at; if the check fails, the stream is reopened from the
        same revision, is refused again, and the check runs again.
        """
        self._reopen("etcd compacted the history it would have replayed")
        lookup = self._gateway.call(
            "/v3/kv/range", _range_op(self._key)["request_range"], replayable=True
        )

        def check(answer: dict[str, Any]) -> None:
            kvs = answer.get("kvs", [])
            if not kvs:
                self._lose(f"the lease on {self._grant.resource} is gone")
            elif not self._ours(kvs[0]):
                self._lose(
                    f"the lease on {self._grant.resource} is held by {_holder(kvs[0]).describe()}"
                )
            else:
                self._next_revision = int(answer["header"]["revision"]) + 1

        lookup.addCallbacks(check, lambda _: None)

    def _lose(self, reason: str) -> None:
        if self._stopped:
            return
        self.stop()
        self._on_lost(reason)


# -- the lockspace -------------------------------------------------------------------


class EtcdLockspace:
    """A :class:`~ferry.lease.backend.LeaseBackend` on an etcd v3 cluster.

    ``endpoints`` are ``http://host:port`` (or all ``https://``) client URLs
    of the cluster's members; ``tls`` is how an https endpoint is trusted and
    who ferry is to it (default: the system's CAs, no client certificate);
    ``user`` and ``password`` log in to an etcd with auth enabled.  ``ttl``
    (seconds, rounded up to whole seconds; etcd may raise it to its minimum)
    is how long a grant outlives its last renewal.  The
    ``reactor`` must provide ``IReactorTCP`` and ``IReactorTime``.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        reactor: Any,
        ttl: float = 10.0,
        prefix: str = DEFAULT_PREFIX,
        serving_prefix: str = DEFAULT_SERVING_PREFIX,
        request_timeout: float = 5.0,
        clock: ReactorClock | None = None,
        tls: ClientTLS | None = None,
        user: str | None = None,
        password: str = "",
    ) -> None:
        if not endpoints:
            raise ValueError("an etcd lockspace needs at least one endpoint")
        scheme = "https://" if endpoints[0].startswith("https://") else "http://"
        for endpoint in endpoints:
            if not endpoint.startswith(scheme):
                raise ValueError(f"etcd endpoint {endpoint!r} is not a {scheme}host:port URL")
        if tls is not None and scheme == "http://":
            raise ValueError("TLS settings for http:// etcd endpoints: use https://")
        self._endpoints = tuple(endpoints)
        # The node's clock, so its shutdown cancels this lockspace's timers too.
        self._clock = clock if clock is not None else ReactorClock(reactor)
        self._gateway = _Gateway(
            endpoints,
            reactor,
            self._clock,
            request_timeout,
            tls=tls,
            login=None if user is None else (user, password),
        )
        self._ttl = max(1, math.ceil(ttl))
        self._prefix = prefix
        self._serving_prefix = serving_prefix
        self._watches: set[_Watch] = set()

    @property
    def spec(self) -> str:
        return "etcd:" + ",".join(self._endpoints)

    # -- LeaseBackend --------------------------------------------------------------

    def acquire(self, resource: str, owner: str, mode: LeaseMode) -> Deferred[Grant]:
        return Deferred.fromCoroutine(self._acquire(resource, owner, mode))

    def renew(self, grant: Grant) -> Deferred[None]:
        return Deferred.fromCoroutine(self._renew(grant))

    def release(self, grant: Grant) -> Deferred[None]:
        return Deferred.fromCoroutine(self._release(grant))

    def inquire(self, resource: str) -> Deferred[tuple[Holder, ...]]:
        return Deferred.fromCoroutine(self._inquire(resource))

    def inquire_all(self) -> Deferred[dict[str, tuple[Holder, ...]]]:
        """Every held resource under the prefix, with its holders (``ferry lock status``).

        One range read over the prefix.  Keys carry only a hash of the
        resource; its name comes from the values (a key whose value cannot
        be read is listed under its hash).
        """
        return Deferred.fromCoroutine(self._inquire_all())

    def offer(self, grant: Grant) -> Deferred[Grant]:
        """Mark the grant offered; the answer has a new, larger token and the same etcd lease."""
        return Deferred.fromCoroutine(self._offer(grant))

    def take_over(self, resource: str, owner: str, token: int) -> Deferred[Grant]:
        return Deferred.fromCoroutine(self._take_over(resource, owner, token))

    def publish(self, grant: Grant, address: str) -> Deferred[None]:
        """Record ``address`` for the resource, if ``grant`` is still its exclusive grant.

        The record (``<serving prefix><sha256>``: resource, owner, address,
        token) is attached to the grant's etcd lease, so it goes with it.  It
        counts only while its token is the exclusive key's revision: a
        holder that offered, lost or handed the lease over is never named.
        """
        return Deferred.fromCoroutine(self._publish(grant, address))

    def where(self, resource: str) -> Deferred[list[str]]:
        """The current exclusive holder's published address, read with its key in one txn."""
        return Deferred.fromCoroutine(self._where(resource))

    def watch(self, grant: Grant, on_lost: Callable[[str], None]) -> Callable[[], None]:
        keys = _Keys.of(self._prefix, grant.resource)
        key = keys.of_holder(grant.holder.owner, grant.holder.mode)

        def lost(reason: str) -> None:
            self._watches.discard(watch)
            on_lost(reason)

        watch = _Watch(self._gateway, self._clock, grant, key, lost)
        self._watches.add(watch)
        watch.start()

        def cancel() -> None:
            self._watches.discard(watch)
            watch.stop()

        return cancel

    def close(self) -> Deferred[None]:
        """Stop watches and drop connections.  Grants are left to expire with their TTL."""
        for watch in list(self._watches):
            watch.stop()
        self._watches.clear()
        return self._gateway.close()

    # -- a takeover on this host (PassingBackend) ------------------------------------

    def pass_on(self, grant: Grant) -> PassedGrant:
        """The grant as it is: its etcd lease ID and token are all a successor needs."""
        return PassedGrant(grant)

    def let_go(self, grant: Grant) -> None:
        """Nothing to revoke: the successor renews the same etcd lease from now on."""

    def adopt(self, passed: PassedGrant) -> Grant:
        """The same grant, renewed from here on; its first renewal says whether etcd agrees."""
        if passed.fd is not None:
            raise LeaseError("an etcd grant is not held by a descriptor")
        if passed.grant.ttl is None:
            raise LeaseError("an etcd grant has a TTL")
        return passed.grant

    # -- the operations, one coroutine each ------------------------------------------

    async def _acquire(self, resource: str, owner: str, mode: LeaseMode) -> Grant:
        keys = _Keys.of(self._prefix, resource)
        key = keys.of_holder(owner, mode)
        if mode is LeaseMode.EXCLUSIVE:
            compare = [_compare(keys.base, "CREATE", 0, keys.end)]
        else:
            compare = [_compare(keys.exclusive, "CREATE", 0), _compare(key, "CREATE", 0)]
        lease, ttl = await self._grant_lease()
        answer = await self._txn_or_revoke(
            lease,
            compare=compare,
            success=[_put_op(key, _value(resource, owner, mode), lease)],
            failure=[_range_op(keys.base, keys.end)],
        )
        if not answer.get("succeeded"):
            await self._revoke(lease)
            raise LeaseConflict(resource, _holders(_range_kvs(answer)))
        token = int(answer["header"]["revision"])
        return Grant(resource, Holder(owner, mode, token), ttl=ttl, handle=lease)

    async def _renew(self, grant: Grant) -> None:
        answer = await self._gateway.call(
            "/v3/lease/keepalive", {"ID": str(grant.handle)}, replayable=True
        )
        if int(answer.get("TTL", 0)) <= 0:
            raise LeaseLost(f"the etcd lease for {grant.resource} has expired")
        kv = await self._get(self._key_of(grant))
        if kv is None:
            raise LeaseLost(f"the lease on {grant.resource} is gone")
        if int(kv["mod_revision"]) != grant.token:
            current = _holder(kv)
            raise LeaseLost(
                f"the lease on {grant.resource} under token {grant.token} is gone: "
                f"now {current.describe()}"
            )

    async def _release(self, grant: Grant) -> None:
        key = self._key_of(grant)
        # Delete the key only while it is still this grant's; a key someone
        # took over belongs to their etcd lease, not to the one revoked below.
        await self._txn(
            compare=[_compare(key, "MOD", grant.token)],
            success=[{"request_delete_range": {"key": _b64(key)}}],
            failure=[],
        )
        await self._revoke(grant.handle)

    async def _inquire(self, resource: str) -> tuple[Holder, ...]:
        keys = _Keys.of(self._prefix, resource)
        request = _range_op(keys.base, keys.end)["request_range"]
        answer = await self._gateway.call("/v3/kv/range", request, replayable=True)
        return _holders(answer.get("kvs", []))

    async def _inquire_all(self) -> dict[str, tuple[Holder, ...]]:
        prefix = self._prefix.encode()
        request = _range_op(prefix, _range_end(prefix))["request_range"]
        answer = await self._gateway.call("/v3/kv/range", request, replayable=True)
        by_digest: dict[bytes, list[dict[str, Any]]] = {}
        for kv in answer.get("kvs", []):
            digest = _unb64(kv["key"])[len(prefix) :].split(b"/", 1)[0]
            by_digest.setdefault(digest, []).append(kv)
        held = {_resource_of(digest, kvs): _holders(kvs) for digest, kvs in by_digest.items()}
        return dict(sorted(held.items()))

    async def _offer(self, grant: Grant) -> Grant:
        holder = grant.holder
        if holder.mode is not LeaseMode.EXCLUSIVE:
            raise LeaseError(
                f"only an exclusive lease can be offered, not a {holder.mode.value} one"
            )
        key = _Keys.of(self._prefix, grant.resource).exclusive
        value = _value(grant.resource, holder.owner, holder.mode, offered=True)
        answer = await self._txn(
            compare=[_compare(key, "MOD", grant.token)],
            success=[_put_op(key, value, grant.handle)],
            failure=[_range_op(key)],
        )
        if not answer.get("succeeded"):
            current = _holders(_range_kvs(answer))
            named = ", ".join(h.describe() for h in current) or "nobody"
            raise LeaseLost(f"cannot offer {grant.resource}: no longer held (held by {named})")
        token = int(answer["header"]["revision"])
        offered = Holder(holder.owner, holder.mode, token, offered=True)
        return Grant(grant.resource, offered, ttl=grant.ttl, handle=grant.handle)

    async def _take_over(self, resource: str, owner: str, token: int) -> Grant:
        keys = _Keys.of(self._prefix, resource)
        value = _value(resource, owner, LeaseMode.EXCLUSIVE)
        lease, ttl = await self._grant_lease()
        answer = await self._txn_or_revoke(
            lease,
            compare=[_compare(keys.exclusive, "MOD", token)],
            success=[_put_op(keys.exclusive, value, lease)],
            failure=[_range_op(keys.base, keys.end)],
        )
        if not answer.get("succeeded"):
            await self._revoke(lease)
            holders = _holders(_range_kvs(answer))
            named = ", ".join(h.describe() for h in holders) or "nobody"
            raise LeaseConflict(
                resource,
                holders,
                f"lease on {resource} is not held under token {token}: held by {named}",
            )
        new_token = int(answer["header"]["revision"])
        return Grant(resource, Holder(owner, LeaseMode.EXCLUSIVE, new_token), ttl=ttl, handle=lease)

    async def _publish(self, grant: Grant, address: str) -> None:
        exclusive = _Keys.of(self._prefix, grant.resource).exclusive
        record = {
            "resource": grant.resource,
            "owner": grant.holder.owner,
            "address": address,
            "token": grant.token,
        }
        value = _b64(json.dumps(record, sort_keys=True).encode())
        answer = await self._txn(
            compare=[_compare(exclusive, "MOD", grant.token)],
            success=[_put_op(self._serving_key(grant.resource), value, grant.handle)],
            failure=[],
        )
        if not answer.get("succeeded"):
            raise LeaseLost(f"cannot publish where {grant.resource} is served: no longer held")

    async def _where(self, resource: str) -> list[str]:
        exclusive = _Keys.of(self._prefix, resource).exclusive
        # Read-only, so safe to send again; one txn, so the two reads agree.
        answer = await self._gateway.call(
            "/v3/kv/txn",
            {"success": [_range_op(exclusive), _range_op(self._serving_key(resource))]},
            replayable=True,
        )
        found = [r.get("response_range", {}).get("kvs", []) for r in answer.get("responses", [])]
        if len(found) != 2 or not found[0] or not found[1]:
            return []
        held, serving = found
        record = _record(serving[0])
        address = record.get("address")
        if record.get("token") != int(held[0]["mod_revision"]) or not isinstance(address, str):
            return []  # the record of an earlier holder, or of an offered grant
        return [address]

    def _serving_key(self, resource: str) -> bytes:
        return (self._serving_prefix + hashlib.sha256(resource.encode()).hexdigest()).encode()

    # -- etcd primitives -------------------------------------------------------------------

    def _key_of(self, grant: Grant) -> bytes:
        keys = _Keys.of(self._prefix, grant.resource)
        return keys.of_holder(grant.holder.owner, grant.holder.mode)

    async def _grant_lease(self) -> tuple[int, float]:
        """A new etcd lease of the lockspace's TTL: its ID and the TTL etcd granted."""
        # Replayable: a lease granted by an attempt whose answer was lost
        # carries no key and simply expires.
        answer = await self._gateway.call("/v3/lease/grant", {"TTL": self._ttl}, replayable=True)
        return int(answer["ID"]), float(answer["TTL"])

    async def _revoke(self, lease: int) -> None:
        """Revoke an etcd lease (and the keys it still carries); an unknown lease is fine."""
        try:
            await self._gateway.call("/v3/lease/revoke", {"ID": str(lease)}, replayable=True)
        except _EtcdError as exc:
            if exc.code != _GRPC_NOT_FOUND:
                raise

    async def _txn(self, **branches: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._gateway.call("/v3/kv/txn", branches, replayable=False)

    async def _txn_or_revoke(self, lease: int, **branches: list[dict[str, Any]]) -> dict[str, Any]:
        """A txn that writes under a fresh ``lease``; the lease is revoked if it fails to answer.

        The txn's outcome is then unknown: revoking removes its key if it
        was written, so the resource is not left held by nobody's grant.
        """
        try:
            return await self._txn(**branches)
        except LockspaceUnavailable:
            with contextlib.suppress(LockspaceUnavailable):  # else it expires with its TTL
                await self._revoke(lease)
            raise

    async def _get(self, key: bytes) -> dict[str, Any] | None:
        request = _range_op(key)["request_range"]
        answer = await self._gateway.call("/v3/kv/range", request, replayable=True)
        kvs: list[dict[str, Any]] = answer.get("kvs", [])
        return kvs[0] if kvs else None


if TYPE_CHECKING:

    def _is_a_backend(lockspace: EtcdLockspace) -> LeaseBackend:
        return lockspace
