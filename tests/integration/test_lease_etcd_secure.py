"""The etcd lockspace against a real etcd with TLS (client certificates) and with users.

Three etcd members, started for this module: ``secure`` serves only
``https://`` and requires a client certificate from the test CA;
``guarded`` has authentication enabled, with a user ``ferry`` that may read
and write ferry's prefix only; ``both`` has both.  Without what each
demands, ferry is refused with one line; with it, leases are taken,
renewed, watched, released and handed over by ``ferry serve``, ``ferry
listen`` and ``ferry lock`` given nothing but the ``--lockspace`` text.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred

from etcd_support import EtcdServer
from ferry.lease.backend import LeaseMode, LockspaceUnavailable
from ferry.lease.etcd import EtcdLockspace
from ferry.tls import ClientTLS, load_client_tls
from support import FERRY, mirror_command, random_file, run, serve, sparse_file
from tls_support import Authority, certificate_directory, make_pki

pytestmark = pytest.mark.integration

reactor: Any = _reactor
DEADLINE = 10.0
EXCLUSIVE = LeaseMode.EXCLUSIVE
PASSWORD = "ferry's etcd password"


class Etcds:
    """The module's members and the files a client needs for them."""

    def __init__(self, root: Path) -> None:
        pki = make_pki(root / "pki")
        self.authority: Authority = pki.authority
        self.stranger = pki.stranger
        member = certificate_directory(
            root / "member",
            pki.authority,
            server=pki.authority.issue("localhost", server=True, also_client=True),
            client=pki.authority.issue(None, server=False),
        )
        # No CN: etcd 3.4's gateway refuses a client certificate with one when
        # auth is on (it would stand for a user the gateway cannot pass on).
        self.client = certificate_directory(
            root / "client", pki.authority, client=pki.authority.issue(None, server=False)
        )
        self.password_file = root / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.secure = EtcdServer(root / "secure", tls=member)
        self.guarded = EtcdServer(root / "guarded")
        self.both = EtcdServer(root / "both", tls=member)
        self.members = [self.secure, self.guarded, self.both]

    def start(self) -> None:
        for member in self.members:
            member.root.mkdir()
            member.start()
        self.guarded.enable_auth("ferry", PASSWORD)
        self.both.enable_auth("ferry", PASSWORD)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def tls(self) -> ClientTLS:
        return load_client_tls(*self.client_files())

    def client_files(self) -> tuple[str, str, str]:
        return (
            str(self.client / "ca-cert.pem"),
            str(self.client / "client-cert.pem"),
            str(self.client / "client-key.pem"),
        )

    def spec(self, member: EtcdServer, *, user: bool) -> str:
        """The ``--lockspace`` text for ``member``, with everything it demands."""
        options = []
        if member.tls is not None:
            ca, cert, key = self.client_files()
            options += [f"cacert={ca}", f"cert={cert}", f"key={key}"]
        if user:
            options += ["user=ferry", f"password-file={self.password_file}"]
        return f"etcd:{member.url}" + ("?" + "&".join(options) if options else "")


@pytest.fixture(scope="module")
def etcds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Etcds]:
    servers = Etcds(tmp_path_factory.mktemp("etcds"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def lockspaces() -> Iterator[list[EtcdLockspace]]:
    made: list[EtcdLockspace] = []
    yield made
    for lockspace in made:
        pytest_twisted.blockon(lockspace.close())


def make(made: list[EtcdLockspace], member: EtcdServer, **options: Any) -> EtcdLockspace:
    lockspace = EtcdLockspace([member.url], reactor=reactor, request_timeout=3.0, **options)
    made.append(lockspace)
    return lockspace


def within(d: Deferred[Any]) -> Deferred[Any]:
    return d.addTimeout(DEADLINE, reactor)


async def failure_of(d: Deferred[Any]) -> Exception:
    try:
        result = await within(d)
    except Exception as exc:
        return exc
    raise AssertionError(f"expected a failure, got {result!r}")


# -- TLS -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_lockspace_over_tls_takes_renews_watches_and_releases(
    etcds: Etcds, lockspaces: list[EtcdLockspace], request: pytest.FixtureRequest
) -> None:
    resource = request.node.name
    lockspace = make(lockspaces, etcds.secure, tls=etcds.tls())
    grant = await within(lockspace.acquire(resource, "node-a", EXCLUSIVE))
    await within(lockspace.renew(grant))
    [holder] = await within(lockspace.inquire(resource))
    assert (holder.owner, holder.token) == ("node-a", grant.token)
    lost: Deferred[str] = Deferred()
    cancel = lockspace.watch(grant, lost.callback)
    try:
        # Someone else's take-over by the token, over its own TLS connection: seen at once.
        other = make(lockspaces, etcds.secure, tls=etcds.tls())
        await within(other.take_over(resource, "node-b", grant.token))
        assert "taken by node-b" in await within(lost)
    finally:
        cancel()


@pytest_twisted.ensureDeferred
async def test_etcd_refuses_a_lockspace_without_a_client_certificate(
    etcds: Etcds, lockspaces: list[EtcdLockspace]
) -> None:
    ca = str(etcds.client / "ca-cert.pem")
    lockspace = make(lockspaces, etcds.secure, tls=load_client_tls(ca))
    error = await failure_of(lockspace.acquire("no-cert", "node-a", EXCLUSIVE))
    assert isinstance(error, LockspaceUnavailable)
    assert etcds.secure.url in str(error)


@pytest_twisted.ensureDeferred
async def test_a_lockspace_refuses_an_etcd_its_ca_did_not_certify(
    etcds: Etcds, lockspaces: list[EtcdLockspace]
) -> None:
    stranger = load_client_tls(
        str(etcds.stranger / "ca-cert.pem"),
        str(etcds.stranger / "client-cert.pem"),
        str(etcds.stranger / "client-key.pem"),
    )
    lockspace = make(lockspaces, etcds.secure, tls=stranger)
    error = await failure_of(lockspace.acquire("stranger", "node-a", EXCLUSIVE))
    assert isinstance(error, LockspaceUnavailable)
    assert "certificate verify failed" in str(error)


# -- users -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_user_logs_in_once_and_works_within_its_prefix(
    etcds: Etcds, lockspaces: list[EtcdLockspace], request: pytest.FixtureRequest
) -> None:
    resource = request.node.name
    lockspace = make(lockspaces, etcds.guarded, user="ferry", password=PASSWORD)
    grant = await within(lockspace.acquire(resource, "node-a", EXCLUSIVE))
    token = lockspace._gateway.token
    assert token is not None
    offered = await within(lockspace.offer(grant))
    await within(lockspace.renew(offered))
    held = await within(lockspace.inquire_all())
    assert held[resource][0].owner == "node-a"
    await within(lockspace.release(offered))
    assert await within(lockspace.inquire(resource)) == ()
    assert lockspace._gateway.token == token  # one login served every request


@pytest_twisted.ensureDeferred
async def test_a_refused_token_means_a_new_login_and_the_request_again(
    etcds: Etcds, lockspaces: list[EtcdLockspace], request: pytest.FixtureRequest
) -> None:
    resource = request.node.name
    lockspace = make(lockspaces, etcds.guarded, user="ferry", password=PASSWORD)
    grant = await within(lockspace.acquire(resource, "node-a", EXCLUSIVE))
    first = lockspace._gateway.token
    # A password set (to the same one) makes etcd forget every token of the user.
    etcds.guarded.change_password("ferry", PASSWORD)
    offered = await within(lockspace.offer(grant))  # a txn: refused, logged in, sent again
    assert offered.token > grant.token
    assert lockspace._gateway.token not in (None, first)
    await within(lockspace.release(offered))


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"user": "ferry", "password": "wrong"}, "authentication failed"),
        ({}, "user name is empty"),
        ({"user": "ferry", "password": PASSWORD, "prefix": "/elsewhere/"}, "permission denied"),
    ],
    ids=["wrong-password", "no-user", "outside-its-prefix"],
)
@pytest_twisted.ensureDeferred
async def test_etcd_with_auth_refuses_in_one_line(
    etcds: Etcds, lockspaces: list[EtcdLockspace], options: dict[str, str], said: str
) -> None:
    lockspace = make(lockspaces, etcds.guarded, **options)
    error = await failure_of(lockspace.acquire("refused", "node-a", EXCLUSIVE))
    assert isinstance(error, LockspaceUnavailable)
    assert said in str(error) and "\n" not in str(error)


# -- ferry serve, listen and lock, given only the --lockspace text ----------------------------


def test_serve_lock_and_a_migration_on_etcd_with_tls_and_a_user(
    etcds: Etcds, tmp_path: Path
) -> None:
    space = etcds.spec(etcds.both, user=True)
    resource = f"vm-{tmp_path.name}"
    lease = ["--lockspace", space, "--resource", resource]
    source_image = random_file(tmp_path / "source.img", 8 << 20, seed=41)
    dest_image = sparse_file(tmp_path / "dest.img", 8 << 20)
    source = serve(source_image, "--sock", str(tmp_path / "serve.sock"), *lease)
    dest = serve(
        dest_image,
        "--sock",
        str(tmp_path / "listen.sock"),
        "--lockspace",
        space,
        mode="listen",
    )
    try:
        held = run([*FERRY, "lock", "status", *lease]).stdout.decode()
        assert f"{resource}: " in held and f":{source.proc.pid}:" in held
        second = run(
            [*FERRY, "serve", "-l", "127.0.0.1", "-p", "0", "-f", str(source_image), *lease],
            check=False,
        )
        assert second.returncode == 1
        assert "is held by " in second.stderr.decode() and str(source.proc.pid) in (
            second.stderr.decode()
        )
        out = run(
            mirror_command(dest.port, tmp_path / "serve.sock", "--action", "nothing", "--wait")
        ).stdout.decode()
        assert out.rstrip().endswith("has control of the image"), out
        assert dest_image.read_bytes() == source_image.read_bytes()
        held = run([*FERRY, "lock", "status", *lease]).stdout.decode()
        assert f":{dest.proc.pid}:" in held and f":{source.proc.pid}:" not in held
    finally:
        dest.stop()
        source.stop()


@pytest.mark.parametrize("spoil", ["no-password-file", "wrong-password", "no-cert"])
def test_serve_refuses_to_start_without_what_etcd_demands(
    etcds: Etcds, tmp_path: Path, spoil: str
) -> None:
    space = etcds.spec(etcds.both, user=True)
    if spoil == "no-password-file":
        space = space.replace(str(etcds.password_file), str(tmp_path / "missing"))
        said = f"password-file {tmp_path / 'missing'}: No such file or directory"
    elif spoil == "wrong-password":
        wrong = tmp_path / "wrong"
        wrong.write_text("not it\n")
        space = space.replace(str(etcds.password_file), str(wrong))
        said = "authentication failed"
    else:
        ca = etcds.client / "ca-cert.pem"
        space = f"etcd:{etcds.both.url}?cacert={ca}&user=ferry&password-file={etcds.password_file}"
        said = etcds.both.url
    image = sparse_file(tmp_path / "disk.img", 1 << 20)
    refused = run(
        [*FERRY, "serve", "-l", "127.0.0.1", "-p", "0", "-f", str(image), "--lockspace", space],
        check=False,
    )
    # The log says what it did (info lines); the refusal is one line of its own.
    lines = [line for line in refused.stderr.decode().splitlines() if line.startswith("ferry:")]
    assert refused.returncode == 1 and len(lines) == 1, refused.stderr
    assert said in lines[0], lines
