"""Migration between two ferry nodes over mutually authenticated TLS, and senders refused.

The listener runs ``--tls require --tls-verify-peer --tls-allowed-subjects``:
only a sender with a certificate from its CA whose subject it lists may hand
it an image.  A live migration under libnbd clients writing over TLS moves
the image and the lease (a local lockspace) and keeps every acknowledged
write.  Senders without a certificate, with another CA's, with a subject
not listed, or without TLS at all are refused before a byte lands; the
listener's image is unchanged after each, and the real source still
migrates after them.
"""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import pytest

from fakes.forged_sender import ForgedSender
from ferry.nbd.constants import OptionReply
from support import (
    FERRY,
    FerryProcess,
    check_acked,
    mirror_command,
    random_file,
    run,
    serve,
    sha256,
    sparse_file,
    start_peer,
    status,
    stop_peer,
    wait_until,
)
from tls_support import PKI, pki_fixture
from workload import BLOCK, decode

pytestmark = pytest.mark.integration

__all__ = ["pki_fixture"]

MiB = 1 << 20
SIZE = 64 * MiB
WORKLOAD = Path(__file__).resolve().parents[1] / "workload.py"


def listener(tmp_path: Path, pki: PKI, image: Path, lockspace: str) -> FerryProcess:
    senders = tmp_path / "senders"
    senders.write_text(f"# the sources that may hand this node an image\n{pki.node_subject}\n")
    return serve(
        image,
        "--name",
        "disk",
        "--sock",
        str(tmp_path / "listen.sock"),
        "--lockspace",
        lockspace,
        "--tls",
        "require",
        "--tls-certificates",
        str(pki.node),
        "--tls-verify-peer",
        "--tls-allowed-subjects",
        str(senders),
        mode="listen",
    )


def source(tmp_path: Path, image: Path, lockspace: str, sock: str, *tls: str) -> FerryProcess:
    return serve(
        image,
        "--name",
        "disk",
        "--sock",
        str(tmp_path / sock),
        "--lockspace",
        lockspace,
        "--resource",
        "vm1",
        *tls,
    )


def test_a_live_migration_over_mutual_tls_hands_over_image_and_lease(
    tmp_path: Path, pki: PKI
) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    space = f"local:{locks}"
    source_image = random_file(tmp_path / "source.img", SIZE, seed=31)
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    tls = ["--tls", "require", "--tls-certificates", str(pki.node), "--tls-verify-peer"]
    src = source(tmp_path, source_image, space, "serve.sock", *tls)
    dest = listener(tmp_path, pki, dest_image, space)
    before = status(tmp_path / "serve.sock")
    stop_file = tmp_path / "stop"
    uri = f"nbds://127.0.0.1:{src.port}/disk?tls-certificates={pki.node}"
    blocks = str(SIZE // BLOCK)
    clients = [
        subprocess.Popen(
            ["/usr/bin/python3", str(WORKLOAD), uri, str(k), "2", blocks, str(stop_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k in range(2)
    ]
    try:
        mirror = run(
            mirror_command(dest.port, tmp_path / "serve.sock", "--action", "nothing", "--wait"),
            timeout=300,
        )
        out = mirror.stdout.decode()
        assert out.rstrip().endswith("has control of the image"), out
    finally:
        stop_file.touch()
        reports = []
        for client in clients:
            stdout, stderr = client.communicate(timeout=60)
            assert client.returncode == 0, stderr.decode()
            reports.append(json.loads(stdout))
    try:
        # The sender was known by its certificate, and the stream was TLS.
        dest.wait_for_log("receiving disk from")
        assert "TLS with 127.0.0.1: CN=source,O=ferry tests" in "".join(dest.log)
        assert "negotiated (ferry listener, TLS, background)" in src.wait_for_log("negotiated")

        src_status, dest_status = status(tmp_path / "serve.sock"), status(tmp_path / "listen.sock")
        assert (src_status["state"], src_status["lease_state"]) == ("handed_off", "released")
        assert (dest_status["state"], dest_status["lease_state"]) == ("serving", "held")
        assert int(dest_status["lease_token"]) > int(before["lease_token"])
        holders = run([*FERRY, "lock", "status", "--lockspace", space, "--resource", "vm1"])
        assert f":{dest.proc.pid}:disk (exclusive, token " in holders.stdout.decode()

        assert sum(report["writes"] for report in reports) > 0
        dest_bytes = dest_image.read_bytes()
        assert dest_bytes == source_image.read_bytes()
        for report in reports:
            for offset_text, counter in report["acked"].items():
                offset = int(offset_text)
                found = decode(dest_bytes[offset : offset + BLOCK])
                assert found is not None, f"block {offset} lost its write"
                ceiling = max(counter, report["unanswered"].get(offset_text, counter))
                assert counter <= found[2] <= ceiling, (offset, counter, found)

        # The destination serves TLS clients on the same port now.
        secure = f"nbds://127.0.0.1:{dest.port}/disk?tls-certificates={pki.node}"
        info = json.loads(run(["nbdinfo", "--json", secure]).stdout)
        assert info["TLS"] is True and info["exports"][0]["export-size"] == SIZE
    finally:
        assert dest.stop() == 0
        assert src.stop() == 0


def differs(a: Path, b: Path) -> bool:
    """Some block of ``a`` is not ``b``'s."""
    with a.open("rb") as first, b.open("rb") as second:
        while chunk := first.read(16 * MiB):
            if chunk != second.read(len(chunk)):
                return True
    return False


def test_a_tls_client_is_disconnected_at_the_handoff_while_a_plaintext_one_moves(
    tmp_path: Path, pki: PKI
) -> None:
    """Under ``--tls on`` two libnbd clients write, one over TLS and one in the clear.

    At the handoff the plaintext connection moves with the image (TCP_REPAIR,
    one host) and writes on at the destination; the TLS one cannot (its
    session lives in the source's OpenSSL): it is disconnected and counted
    in ``connections_aborted``, and the migration completes all the same.
    Every write either client had acknowledged is on the destination, and
    every block neither wrote is the source's.
    """
    source_image = random_file(tmp_path / "source.img", SIZE, seed=37)
    original = source_image.read_bytes()
    dest_image = sparse_file(tmp_path / "dest.img", SIZE)
    tls_on = ["--tls", "on", "--tls-certificates", str(pki.node)]
    src = source(tmp_path, source_image, "none", "serve.sock", *tls_on)
    senders = tmp_path / "senders"
    senders.write_text(f"{pki.node_subject}\n")
    dest = serve(
        dest_image,
        "--name",
        "disk",
        "--sock",
        str(tmp_path / "listen.sock"),
        "--lockspace",
        "none",
        *tls_on,
        "--tls-verify-peer",
        "--tls-allowed-subjects",
        str(senders),
        mode="listen",
    )
    stop_file = tmp_path / "stop"
    uris = [src.uri("disk"), f"nbds://127.0.0.1:{src.port}/disk?tls-certificates={pki.node}"]
    blocks = str(SIZE // BLOCK)
    clients = [
        subprocess.Popen(
            ["/usr/bin/python3", str(WORKLOAD), uri, str(k), "2", blocks, str(stop_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for k, uri in enumerate(uris)
    ]
    try:
        serving = tmp_path / "serve.sock"
        wait_until("both clients are connected", lambda: status(serving)["num_clients"] == "2")
        mirror = run(
            mirror_command(dest.port, tmp_path / "serve.sock", "--action", "nothing", "--wait"),
            timeout=300,
        )
        out = mirror.stdout.decode()
        assert out.rstrip().endswith("has control of the image"), out
        # The moved client writes on, now to the destination.
        wait_until("a write after the handoff", lambda: differs(dest_image, source_image))
    finally:
        stop_file.touch()
        reports = []
        for client in clients:
            stdout, stderr = client.communicate(timeout=60)
            assert client.returncode == 0, stderr.decode()
            reports.append(json.loads(stdout))
    try:
        why = src.wait_for_log("cannot move")
        assert why.rstrip().endswith("cannot move: its TLS session cannot move"), why
        # the sender's own TLS
        assert "negotiated (ferry listener, TLS, background)" in "".join(src.log)
        plain, secure = reports
        assert (plain["ended"], plain["error"]) == ("stopped", ""), plain
        assert plain["local_start"] == plain["local_end"]  # one TCP connection throughout
        assert secure["ended"] == "error", secure  # disconnected at the handoff
        src_status = status(tmp_path / "serve.sock")
        dest_status = status(tmp_path / "listen.sock")
        assert src_status["state"] == "handed_off" and dest_status["state"] == "serving"
        assert (src_status["connections_moved"], src_status["connections_aborted"]) == ("1", "1")
        assert (dest_status["connections_moved"], dest_status["connections_aborted"]) == ("1", "0")
    finally:
        assert dest.stop() == 0
        assert src.stop() == 0
    moved = dest_image.read_bytes()
    written = set()
    for report in reports:
        check_acked(report, moved)
        written |= {int(o) for part in ("acked", "unanswered") for o in report[part]}
    for offset in range(0, SIZE, BLOCK):
        if offset not in written:
            assert moved[offset : offset + BLOCK] == original[offset : offset + BLOCK], offset


def test_senders_the_listener_cannot_authenticate_are_refused_and_change_nothing(
    tmp_path: Path, pki: PKI
) -> None:
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o700)
    space = f"local:{locks}"
    source_image = random_file(tmp_path / "source.img", 8 * MiB, seed=32)
    dest_image = random_file(tmp_path / "dest.img", 8 * MiB, seed=33)
    untouched = sha256(dest_image)
    dest = listener(tmp_path, pki, dest_image, space)
    listen_sock = tmp_path / "listen.sock"

    def unchanged() -> None:
        assert sha256(dest_image) == untouched
        now = status(listen_sock)
        assert (now["state"], now["has_control"]) == ("listening", "false")

    def refused_mirror(sock: str, *tls: str) -> tuple[FerryProcess, str]:
        proc = source(tmp_path, source_image, space, sock, *tls)
        try:
            result = run(mirror_command(dest.port, tmp_path / sock), check=False)
            said = result.stderr.decode()
            assert result.returncode == 1 and said.startswith("ferry: Mirror was rejected: "), said
            why = proc.wait_for_log("attempt 1 failed")
            # The command says why, as the log does.
            assert said.removeprefix("ferry: Mirror was rejected: ").rstrip() in why, (said, why)
            served = status(tmp_path / sock)
            assert (served["state"], served["lease_state"]) == ("serving", "held")
        finally:
            proc.stop()
        unchanged()
        return proc, why

    try:
        # No certificate at all (the CA only): the TLS handshake fails.
        _, why = refused_mirror("no-cert.sock", "--tls-certificates", str(pki.ca_only))
        assert "connection lost: tlsv13 alert certificate required" in why, why
        assert "peer did not return a certificate" in dest.wait_for_log("TLS handshake failed")

        # A certificate from the CA, for a subject the listener does not list.
        _, why = refused_mirror("intruder.sock", "--tls-certificates", str(pki.other_node))
        assert "ERR_POLICY" in why
        assert "certificate subject CN=intruder,O=ferry tests is not an allowed sender" in why

        # No TLS: under --tls require the listener answers nothing but TLS_REQD.
        _, why = refused_mirror("plain.sock")
        assert "ERR_TLS_REQD" in why and "STARTTLS" in why

        # Hand-forged senders: in the clear, and with another CA's certificate.
        plain = ForgedSender(dest.port, 8 * MiB, resource="vm1")
        assert plain.refused is not None and plain.refused.error == OptionReply.ERR_TLS_REQD
        plain.close()
        rogue = ssl.create_default_context(cafile=str(pki.rogue / "ca-cert.pem"))
        rogue.load_cert_chain(pki.rogue / "client-cert.pem", pki.rogue / "client-key.pem")
        with pytest.raises(OSError):
            ForgedSender(dest.port, 8 * MiB, resource="vm1", tls=rogue)
        assert "certificate verify failed" in dest.wait_for_log("TLS handshake failed")
        unchanged()

        # The real source, with the listed certificate, still migrates.
        real = source(
            tmp_path, source_image, space, "real.sock", "--tls-certificates", str(pki.node)
        )
        try:
            out = run(
                mirror_command(dest.port, tmp_path / "real.sock", "--action", "nothing", "--wait")
            ).stdout.decode()
            assert out.rstrip().endswith("has control of the image"), out
        finally:
            real.stop()
        assert sha256(dest_image) == sha256(source_image)
    finally:
        dest.stop()


def test_a_mirror_over_tls_into_nbdkit_is_byte_identical(tmp_path: Path, pki: PKI) -> None:
    image = random_file(tmp_path / "source.img", 8 * MiB, seed=34)
    target = sparse_file(tmp_path / "target.img", 8 * MiB)
    nbdkit, port = start_peer(
        lambda port: [
            "nbdkit",
            "-f",
            "-p",
            str(port),
            "--tls=require",
            f"--tls-certificates={pki.node}",
            "--tls-verify-peer",
            "file",
            str(target),
        ],
        tmp_path / "nbdkit.log",
    )
    src = source(tmp_path, image, "none", "serve.sock", "--tls-certificates", str(pki.node))
    try:
        out = run(
            mirror_command(port, tmp_path / "serve.sock", "--action", "nothing", "--wait")
        ).stdout.decode()
        assert out.rstrip().endswith("holds a flushed copy"), out
        assert "negotiated (plain NBD target, TLS, background)" in src.wait_for_log("negotiated")
    finally:
        src.stop()
        stop_peer(nbdkit)
    assert sha256(target) == sha256(image)


def test_a_source_with_certificates_never_falls_back_to_plaintext(tmp_path: Path, pki: PKI) -> None:
    image = random_file(tmp_path / "source.img", 8 * MiB, seed=35)
    plain_image = random_file(tmp_path / "plain.img", 8 * MiB, seed=36)
    untouched = sha256(plain_image)
    plain_sock = str(tmp_path / "plain.sock")
    plain = serve(plain_image, "--lockspace", "none", "--sock", plain_sock, mode="listen")
    src = source(tmp_path, image, "none", "serve.sock", "--tls-certificates", str(pki.node))
    try:
        refused = run(mirror_command(plain.port, tmp_path / "serve.sock"), check=False)
        said = refused.stderr.decode()
        assert refused.returncode == 1 and said.startswith("ferry: Mirror was rejected: "), said
        why = src.wait_for_log("attempt 1 failed")
        for text in (said, why):
            assert "the server refused TLS, which is required: TLS is off on this server" in text
    finally:
        src.stop()
        plain.stop()
    assert sha256(plain_image) == untouched
