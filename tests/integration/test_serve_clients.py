"""Real NBD clients (libnbd's tools, QEMU's) against a real ``ferry serve``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from support import (
    FerryProcess,
    nbdsh,
    random_file,
    run,
    serve,
    sha256,
    sparse_file,
)

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture
def sparse_image(tmp_path: Path) -> Path:
    return sparse_file(
        tmp_path / "sparse.img", 64 * MiB, data_at=[(0, MiB), (8 * MiB, 2 * MiB), (63 * MiB, MiB)]
    )


@pytest.fixture
def server(sparse_image: Path):  # type: ignore[no-untyped-def]
    proc = serve(sparse_image, "--name", "disk")
    yield proc
    assert proc.stop() == 0, proc.stderr_text()


def test_nbdinfo_reports_size_name_and_flags(server: FerryProcess) -> None:
    info = json.loads(run(["nbdinfo", "--json", server.uri("disk")]).stdout)
    export = info["exports"][0]
    assert export["export-name"] == "disk"
    assert export["export-size"] == 64 * MiB
    assert info["protocol"] == "newstyle-fixed"
    assert export["is_read_only"] is False
    for flag in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_multi_conn",
        "can_df",
    ):
        assert export[flag] is True, flag
    assert export["block_size_maximum"] == 32 * MiB
    contexts = export.get("contexts", [])
    assert "base:allocation" in contexts


def test_default_export_reaches_the_named_one(server: FerryProcess) -> None:
    info = json.loads(run(["nbdinfo", "--json", server.uri("")]).stdout)
    assert info["exports"][0]["export-size"] == 64 * MiB


def test_nbdinfo_map_shows_the_sparse_extents(server: FerryProcess) -> None:
    out = json.loads(run(["nbdinfo", "--map", "--json", server.uri("disk")]).stdout)
    data = [(e["offset"], e["length"]) for e in out if e["type"] == 0]
    holes = [(e["offset"], e["length"]) for e in out if e["type"] == 3]
    assert data == [(0, MiB), (8 * MiB, 2 * MiB), (63 * MiB, MiB)]
    assert holes == [(MiB, 7 * MiB), (10 * MiB, 53 * MiB)]


def test_nbdinfo_list(server: FerryProcess) -> None:
    out = json.loads(run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{server.port}"]).stdout)
    assert [e["export-name"] for e in out["exports"]] == ["disk"]


def test_unknown_export_is_refused_clearly(server: FerryProcess) -> None:
    result = run(["nbdinfo", server.uri("nope")], check=False)
    assert result.returncode != 0
    assert b"nope" in result.stderr


def test_nbdcopy_both_ways_256mib(tmp_path: Path) -> None:
    source = random_file(tmp_path / "source.raw", 256 * MiB, seed=7)
    image = sparse_file(tmp_path / "served.img", 256 * MiB)
    proc = serve(image)
    try:
        run(["nbdcopy", str(source), proc.uri()])
        back = tmp_path / "back.raw"
        run(["nbdcopy", proc.uri(), str(back)])
    finally:
        assert proc.stop() == 0
    assert sha256(image) == sha256(source)
    assert sha256(back) == sha256(source)


def test_qemu_io_writes_a_pattern_and_reads_it_back(server: FerryProcess) -> None:
    result = run(
        [
            "qemu-io",
            "-f",
            "raw",
            server.uri("disk"),
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "write -P 0x5c 5000 70000",
            "-c",
            "read -P 0x5c 5000 70000",
            "-c",
            "write -z 8M 1M",
            "-c",
            "read -P 0 8M 1M",
            "-c",
            "discard 63M 1M",
            "-c",
            "read -P 0 63M 1M",
            "-c",
            "flush",
        ]
    )
    assert b"Pattern verification failed" not in result.stdout
    assert result.stdout.count(b"read ") == 4


def test_qemu_img_convert_and_compare(tmp_path: Path) -> None:
    source = random_file(tmp_path / "source.raw", 32 * MiB, seed=3)
    image = sparse_file(tmp_path / "served.img", 32 * MiB)
    proc = serve(image)
    try:
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), proc.uri()])
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), proc.uri()])
        out = tmp_path / "out.qcow2"
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", proc.uri(), str(out)])
        run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(source), str(out)])
    finally:
        assert proc.stop() == 0


def test_four_connections_at_once(server: FerryProcess, sparse_image: Path) -> None:
    procs = [
        subprocess.Popen(
            [
                "qemu-io",
                "-f",
                "raw",
                server.uri("disk"),
                "-c",
                f"write -P 0x{i + 1:02x} {(16 + 4 * i) * MiB} 4M",
                "-c",
                f"read -P 0x{i + 1:02x} {(16 + 4 * i) * MiB} 4M",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(4)
    ]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert b"verification failed" not in out
    data = sparse_image.read_bytes()
    for i in range(4):
        chunk = data[(16 + 4 * i) * MiB : (20 + 4 * i) * MiB]
        assert chunk == bytes([i + 1]) * (4 * MiB)


def test_read_past_the_end_is_einval_and_the_connection_goes_on(server: FerryProcess) -> None:
    script = """
import errno
h.set_strict_mode(0)
try:
    h.pread(512, h.get_size() - 256)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"x" * 512, h.get_size() - 256)
    raise SystemExit("write past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
h.pwrite(b"still here", 4096)
assert h.pread(10, 4096) == b"still here"
print("ok")
"""
    assert nbdsh(server.uri("disk"), script).stdout.strip() == b"ok"


def test_write_to_a_read_only_export_is_eperm(sparse_image: Path) -> None:
    proc = serve(sparse_image, "--read-only")
    try:
        script = """
import errno
assert h.is_read_only()
h.set_strict_mode(0)
for call in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
    try:
        call()
        raise SystemExit("write succeeded on a read-only export")
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e
assert h.pread(4, 0) == b"\\xa5" * 4
print("ok")
"""
        assert nbdsh(proc.uri(), script).stdout.strip() == b"ok"
    finally:
        assert proc.stop() == 0
    assert sparse_image.read_bytes()[:512] == b"\xa5" * 512


def test_fast_zero_and_block_status_req_one(server: FerryProcess) -> None:
    script = """
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 0) == bytes(65536)
seen = []
h.block_status(16 << 20, 0, lambda ctx, off, ents, err: seen.append(ents), nbd.CMD_FLAG_REQ_ONE)
assert len(seen[0]) == 2, seen
print("ok")
"""
    assert nbdsh(server.uri("disk"), script, base_allocation=True).stdout.strip() == b"ok"


@pytest.fixture
def tiny_filesystem(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs: the disk that fills up under a sparse 8 MiB image."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=1m", "ferry-test", str(mount_point)])
    yield mount_point
    run(["umount", "--lazy", str(mount_point)])


def test_a_full_disk_is_enospc_and_loses_nothing(tiny_filesystem: Path) -> None:
    image = sparse_file(tiny_filesystem / "disk.img", 8 * MiB)
    proc = serve(image)
    try:
        script = """
import errno
h.pwrite(b"\\x42" * 262144, 0)
try:
    h.pwrite(b"\\x17" * (4 << 20), 1 << 20)
    raise SystemExit("a 4 MiB write fitted on a 1 MiB file system")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
assert h.pread(262144, 0) == b"\\x42" * 262144
h.flush()
print("ok")
"""
        assert nbdsh(proc.uri(), script).stdout.strip() == b"ok"
        assert nbdsh(proc.uri(), "print(h.pread(4, 0).hex())").stdout.strip() == b"42424242"
    finally:
        assert proc.stop() == 0
