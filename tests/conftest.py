"""What every test gets, however the suite was started."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """SIGINT as a terminal has it, not as a background job inherits it.

    A shell without job control starts its background commands with SIGINT
    ignored, and an ignored signal stays ignored across ``exec``: every
    process the tests start would then shrug off the SIGINT a test sends
    (``sh`` may not even trap it).  A handler here is reset to the default
    in each child instead.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def xfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a fresh XFS file system, loop-mounted for the test and unmounted after.

    XFS takes buffered writes with ``RWF_NOWAIT`` (ext4 and tmpfs refuse
    them), so this is where the data plane's writes on the event loop run.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a file system")
    mkfs = shutil.which("mkfs.xfs")
    if mkfs is None:
        pytest.fail("no mkfs.xfs: `bash scripts/install-deps.sh --test` installs xfsprogs")
    backing = tmp_path / "xfs.img"
    with backing.open("wb") as f:
        f.truncate(512 << 20)  # sparse; mkfs.xfs wants 300 MiB at least
    subprocess.run([mkfs, "-q", str(backing)], check=True, capture_output=True, timeout=60)
    mountpoint = tmp_path / "xfs"
    mountpoint.mkdir()
    subprocess.run(
        ["mount", "-o", "loop", str(backing), str(mountpoint)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield mountpoint
    finally:
        # The loop device was made by mount, so it goes with the unmount (autoclear).  A
        # test that failed may have left a process with a file open there (the
        # integration tests' reaper kills it after this): then the mount is detached
        # now and goes, with its loop device, once that process has.
        unmounted = subprocess.run(["umount", str(mountpoint)], capture_output=True, timeout=60)
        if unmounted.returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True, timeout=60)
