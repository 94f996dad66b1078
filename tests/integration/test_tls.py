"""TLS on NBD with real peers: libnbd's nbdinfo and nbdcopy, qemu-img and qemu-io, ferry's own.

Certificates come from ``tls_support`` (made for this module, never
committed).  A server under ``--tls require`` serves only clients that
upgrade; ``--tls-verify-peer`` serves only clients whose certificate the CA
issued; a client trusts only a server whose certificate the CA issued for
the address it dialled.  Every refusal is checked for what the client sees
and what ferry logs, and every copy byte for byte.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from ferry.remote import RemoteExport
from support import (
    DEADLINE,
    FERRY,
    FerryProcess,
    random_file,
    run,
    serve,
    serve_args,
    sha256,
    sparse_file,
    start_peer,
    stop_peer,
)
from tls_support import PKI, copy_directory, pki_fixture, write_certificate, write_key

pytestmark = pytest.mark.integration

__all__ = ["pki_fixture"]  # the module's certificates: pytest finds the fixture by its name

MiB = 1 << 20
SIZE = 16 * MiB


def nbds(proc: FerryProcess, certificates: Path, name: str = "disk") -> str:
    return f"nbds://127.0.0.1:{proc.port}/{name}?tls-certificates={certificates}"


def tls_serve(image: Path, certificates: Path, *extra: str, mode: str = "require") -> FerryProcess:
    return serve(
        image,
        "--name",
        "disk",
        "--lockspace",
        "none",
        "--tls",
        mode,
        "--tls-certificates",
        str(certificates),
        *extra,
    )


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return random_file(tmp_path / "disk.img", SIZE, seed=13)


@pytest.fixture
def verified(image: Path, pki: PKI) -> Iterator[FerryProcess]:
    """``ferry serve --tls require --tls-verify-peer`` of ``image``."""
    proc = tls_serve(image, pki.node, "--tls-verify-peer", "-v")
    try:
        yield proc
    finally:
        proc.stop()


# -- real clients over TLS -------------------------------------------------------------------


def test_nbdinfo_sees_the_export_over_tls(verified: FerryProcess, pki: PKI) -> None:
    info = json.loads(run(["nbdinfo", "--json", nbds(verified, pki.node)]).stdout)
    assert info["TLS"] is True
    [export] = info["exports"]
    assert export["export-size"] == SIZE
    assert "TLS with 127.0.0.1: CN=source,O=ferry tests" in verified.wait_for_log("TLS with")


def test_nbdcopy_over_tls_is_byte_identical_both_ways(
    verified: FerryProcess, image: Path, pki: PKI, tmp_path: Path
) -> None:
    out = tmp_path / "out.img"
    run(["nbdcopy", nbds(verified, pki.node), str(out)])
    assert sha256(out) == sha256(image)
    incoming = random_file(tmp_path / "incoming.img", SIZE, seed=14)
    run(["nbdcopy", "--flush", str(incoming), nbds(verified, pki.node)])
    assert sha256(image) == sha256(incoming)


def test_qemu_img_and_qemu_io_over_tls_with_a_verified_client(
    verified: FerryProcess, image: Path, pki: PKI, tmp_path: Path
) -> None:
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki.node}"
    where = f"driver=nbd,host=127.0.0.1,port={verified.port},export=disk,tls-creds=tls0"
    info = json.loads(
        run(["qemu-img", "info", "--output=json", "--object", creds, "--image-opts", where]).stdout
    )
    assert info["virtual-size"] == SIZE
    copy = tmp_path / "copy.img"
    run(["qemu-img", "convert", "-O", "raw", "--object", creds, "--image-opts", where, str(copy)])
    assert sha256(copy) == sha256(image)
    run(
        [
            "qemu-io",
            "--object",
            creds,
            "--image-opts",
            where,
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
        ]
    )
    with open(image, "rb") as disk:
        disk.seek(MiB)
        assert disk.read(64 * 1024) == b"\x5a" * 64 * 1024


def test_ferry_read_and_write_over_tls(verified: FerryProcess, image: Path, pki: PKI) -> None:
    where = ["--addr", "127.0.0.1", "--port", str(verified.port), "--name", "disk"]
    tls = ["--tls-certificates", str(pki.node)]
    run([*FERRY, "write", *where, *tls, "--from", "4096", "--size", "5"], input=b"hello")
    read = run([*FERRY, "read", *where, *tls, "--from", "4096", "--size", "5"])
    assert read.stdout == b"hello"
    with open(image, "rb") as disk:
        disk.seek(4096)
        assert disk.read(5) == b"hello"


def test_tls_on_serves_plain_and_tls_clients_alike(image: Path, pki: PKI) -> None:
    proc = tls_serve(image, pki.node, mode="on")
    try:
        plain = json.loads(run(["nbdinfo", "--json", proc.uri("disk")]).stdout)
        secure = json.loads(run(["nbdinfo", "--json", nbds(proc, pki.node)]).stdout)
        assert (plain["TLS"], secure["TLS"]) == (False, True)
    finally:
        proc.stop()


# -- refusals --------------------------------------------------------------------------------


def test_a_plain_client_under_require_is_told_tls_is_required(
    verified: FerryProcess, pki: PKI, tmp_path: Path
) -> None:
    # nbdkit under --tls=require, on the same certificates: nbdinfo must say
    # the same about ferry as about it.
    nbdkit, nbdkit_port = start_peer(
        lambda port: [
            "nbdkit",
            "-f",
            "-p",
            str(port),
            "--tls=require",
            f"--tls-certificates={pki.node}",
            "memory",
            "1M",
        ],
        tmp_path / "nbdkit.log",
    )
    try:
        theirs = run(["nbdinfo", f"nbd://127.0.0.1:{nbdkit_port}/"], check=False)
    finally:
        stop_peer(nbdkit)
    env = {**os.environ, "LIBNBD_DEBUG": "1"}
    ours = run(["nbdinfo", verified.uri("disk")], check=False, env=env)
    said = ours.stderr.decode()
    assert ours.returncode == theirs.returncode == 1
    last = "server replied with error to opt_go request: Operation not supported"
    assert last in theirs.stderr.decode() and last in said
    assert "server error message: NBD_OPT_GO: TLS is required: send NBD_OPT_STARTTLS first" in said
    # ferry's own client names the reply.
    where = ["--addr", "127.0.0.1", "--port", str(verified.port)]
    refused = run([*FERRY, "read", *where, "--from", "0", "--size", "1"], check=False)
    assert refused.returncode == 1
    assert refused.stderr.decode().startswith(f"ferry: 127.0.0.1:{verified.port}: ERR_TLS_REQD: ")


@pytest.mark.parametrize("directory", ["rogue", "ca_only"])
def test_verify_peer_refuses_a_client_without_a_certificate_from_its_ca(
    verified: FerryProcess, pki: PKI, directory: str
) -> None:
    certificates: Path = getattr(pki, directory)
    refused = run(["nbdinfo", nbds(verified, certificates)], check=False)
    assert refused.returncode == 1
    assert "TLS" in refused.stderr.decode() or "tls" in refused.stderr.decode()
    line = verified.wait_for_log("TLS handshake failed")
    # GnuTLS offers no certificate the server's CA did not issue.
    assert "closing 127.0.0.1: TLS handshake failed: peer did not return a certificate" in line
    # OpenSSL offers whatever it has: the other CA's certificate is refused for itself.
    context = ssl.create_default_context(cafile=str(certificates / "ca-cert.pem"))
    if directory == "rogue":
        context.load_cert_chain(certificates / "client-cert.pem", certificates / "client-key.pem")
    with pytest.raises(ConnectionError):
        RemoteExport.connect(
            "127.0.0.1", verified.port, export_name="disk", tls=context, timeout=DEADLINE
        ).close()
    why = verified.wait_for_log("TLS handshake failed")
    expected = "certificate verify failed" if directory == "rogue" else "did not return"
    assert expected in why, why


def test_ferry_refuses_a_client_certificate_its_own_ca_did_not_issue(
    verified: FerryProcess, pki: PKI
) -> None:
    where = ["--addr", "127.0.0.1", "--port", str(verified.port), "--name", "disk"]
    tls = ["--tls-certificates", str(pki.rogue)]
    ours = run([*FERRY, "read", *where, *tls, "--from", "0", "--size", "1"], check=False)
    assert ours.returncode == 1 and ours.stdout == b""
    assert ours.stderr.decode() == (
        f"ferry: {pki.rogue}/client-cert.pem: not issued by ca-cert.pem "
        "(issuer CN=someone else's CA,O=ferry tests)\n"
    )


def test_a_client_refuses_a_server_its_ca_did_not_certify(
    verified: FerryProcess, pki: PKI
) -> None:
    refused = run(["nbdinfo", nbds(verified, pki.stranger)], check=False)
    assert refused.returncode == 1
    where = ["--addr", "127.0.0.1", "--port", str(verified.port), "--name", "disk"]
    tls = ["--tls-certificates", str(pki.stranger)]
    ours = run([*FERRY, "read", *where, *tls, "--from", "0", "--size", "1"], check=False)
    assert ours.returncode == 1
    assert "certificate verify failed" in ours.stderr.decode()


def test_a_client_checks_the_name_it_dialled(image: Path, pki: PKI, tmp_path: Path) -> None:
    # A server certificate from the right CA, for another host.
    other_host = copy_directory(pki.node, tmp_path / "other-host")
    cert, key = pki.authority.issue("elsewhere.example", server=True, san=False)
    write_certificate(other_host / "server-cert.pem", cert)
    write_key(other_host / "server-key.pem", key)
    proc = tls_serve(image, other_host)
    try:
        where = ["--addr", "127.0.0.1", "--port", str(proc.port), "--name", "disk"]
        tls = ["--tls-certificates", str(pki.node)]
        ours = run([*FERRY, "read", *where, *tls, "--from", "0", "--size", "1"], check=False)
        assert ours.returncode == 1
        assert "127.0.0.1" in ours.stderr.decode()
        assert "certificate verify failed" in ours.stderr.decode()
    finally:
        proc.stop()


# -- refused at start, one line per problem ---------------------------------------------------


def start_refused(tmp_path: Path, *args: str, mode: str = "serve") -> list[str]:
    image = sparse_file(tmp_path / "start.img", MiB)
    refused = run(
        [*FERRY, *serve_args(image, "--lockspace", "none", *args, mode=mode)],
        check=False,
        timeout=60,
    )
    assert refused.returncode == 1, refused
    assert refused.stdout == b""
    return refused.stderr.decode().splitlines()


def test_oldstyle_cannot_be_combined_with_tls(tmp_path: Path, pki: PKI) -> None:
    lines = start_refused(
        tmp_path, "--oldstyle", "--tls", "on", "--tls-certificates", str(pki.node)
    )
    assert lines == [
        "ferry: --oldstyle cannot be combined with --tls on: "
        "oldstyle negotiation has no NBD_OPT_STARTTLS"
    ]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["--tls", "require"],
            "ferry: --tls require needs --tls-certificates DIR "
            "(with ca-cert.pem, server-cert.pem and server-key.pem)",
        ),
        (["--tls-verify-peer"], "ferry: --tls-verify-peer needs --tls on or --tls require"),
    ],
    ids=["no-certificates", "verify-without-tls"],
)
def test_tls_options_that_do_not_fit_together(
    tmp_path: Path, args: list[str], line: str
) -> None:
    assert start_refused(tmp_path, *args) == [line]


def test_allowed_subjects_need_verified_peers(tmp_path: Path, pki: PKI) -> None:
    subjects = tmp_path / "senders"
    subjects.write_text(pki.node_subject + "\n")
    lines = start_refused(
        tmp_path,
        "--tls",
        "require",
        "--tls-certificates",
        str(pki.node),
        "--tls-allowed-subjects",
        str(subjects),
        mode="listen",
    )
    assert lines == [
        "ferry: --tls-allowed-subjects needs --tls-verify-peer: without it no subject is verified"
    ]


def test_a_bad_allowed_subjects_file_names_every_bad_line(tmp_path: Path, pki: PKI) -> None:
    subjects = tmp_path / "senders"
    subjects.write_text("# who may send\nCN=source,O=ferry tests\nnot a name\n\nCN=x,,=\n")
    lines = start_refused(
        tmp_path,
        "--tls",
        "require",
        "--tls-certificates",
        str(pki.node),
        "--tls-verify-peer",
        "--tls-allowed-subjects",
        str(subjects),
        mode="listen",
    )
    assert [line.split(": not a subject")[0] for line in lines] == [
        f"ferry: {subjects}:3",
        f"ferry: {subjects}:5",
    ]


def _break(directory: Path, how: str, pki: PKI) -> None:
    """Spoil ``directory`` as ``how`` says (see the parametrisation below)."""
    if how == "no-ca":
        (directory / "ca-cert.pem").unlink()
    elif how == "no-server-pair":
        (directory / "server-cert.pem").unlink()
        (directory / "server-key.pem").unlink()
    elif how == "unreadable-key":
        (directory / "server-key.pem").unlink()
        (directory / "server-key.pem").mkdir()  # unreadable even for root
    elif how == "not-pem":
        (directory / "server-cert.pem").write_text("hello\n")
    elif how == "mismatched-key":
        (directory / "server-key.pem").write_bytes((directory / "client-key.pem").read_bytes())
    elif how == "encrypted-key":
        path = directory / "server-key.pem"
        key = serialization.load_pem_private_key(path.read_bytes(), None)
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
    elif how == "other-ca":
        (directory / "ca-cert.pem").write_bytes((pki.stranger / "ca-cert.pem").read_bytes())
    elif how == "expired":
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        cert, key = pki.authority.issue("localhost", server=True, not_after=past)
        write_certificate(directory / "server-cert.pem", cert)
        write_key(directory / "server-key.pem", key)
    elif how == "half-client-pair":
        (directory / "client-key.pem").unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("no-ca", ["ca-cert.pem: missing"]),
        ("no-server-pair", ["server-cert.pem: missing", "server-key.pem: missing"]),
        ("unreadable-key", ["server-key.pem: cannot read it: Is a directory"]),
        ("not-pem", ["server-cert.pem: holds no PEM certificate"]),
        (
            "mismatched-key",
            ["server-key.pem: not the key of {dir}/server-cert.pem (the public keys differ)"],
        ),
        (
            "encrypted-key",
            ["server-key.pem: the key is encrypted; ferry needs it unencrypted (mode 0600)"],
        ),
        (
            "other-ca",
            [
                f"{name}: not issued by ca-cert.pem (issuer CN=ferry test CA,O=ferry tests)"
                for name in ("server-cert.pem", "client-cert.pem")
            ],
        ),
        ("expired", ["server-cert.pem: expired on "]),
        ("half-client-pair", ["client-key.pem: missing (client-cert.pem needs it)"]),
    ],
)
def test_every_problem_with_the_certificates_is_one_line_at_start(
    tmp_path: Path, pki: PKI, how: str, expected: list[str]
) -> None:
    directory = copy_directory(pki.node, tmp_path / "certs")
    _break(directory, how, pki)
    lines = start_refused(tmp_path, "--tls", "require", "--tls-certificates", str(directory))
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(f"ferry: {directory}/" + want.format(dir=directory)), line


def test_a_missing_certificate_directory_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    lines = start_refused(tmp_path, "--tls", "on", "--tls-certificates", str(missing))
    assert lines == [f"ferry: --tls-certificates {missing} does not exist"]


def test_a_client_side_only_directory_needs_no_server_pair(tmp_path: Path, pki: PKI) -> None:
    # --tls off with certificates: the node's migrations use TLS, its clients do not.
    proc = serve(
        sparse_file(tmp_path / "disk.img", MiB),
        "--lockspace",
        "none",
        "--tls-certificates",
        str(pki.ca_only),
    )
    try:
        info = json.loads(run(["nbdinfo", "--json", proc.uri()]).stdout)
        assert info["TLS"] is False
    finally:
        proc.stop()

