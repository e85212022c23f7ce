"""Real disk faults for tests: a small tmpfs that fills up, and an ext4 image that goes read-only.

Use the fixtures by importing them into a test module (``from diskfaults import small_tmpfs,
ext4_image``). Both need ``mount`` (root, as on CI); a test is skipped, with the kernel's own
words, only when the kernel refuses the mount. Anything else that goes wrong is an error. Every
mount is unmounted in teardown, lazily if a process still holds a file on it.

Going read-only: ``mount -o remount,ro`` works only while no file on the file system is open
for writing (the kernel answers EBUSY otherwise), which is never the case under a running
server. :meth:`Ext4Image.fail_read_only` therefore does what a failing disk does: the image is
mounted ``errors=remount-ro``, and an ext4 error (``/sys/fs/ext4/<dev>/trigger_fs_error``)
makes the kernel turn it read-only at once, open files or not; every later write gets EROFS.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["Ext4Image", "Tmpfs", "ext4_image", "small_tmpfs"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _mount_or_skip(*args: str) -> None:
    """Mount, or skip the test if the kernel (or our lack of privilege) refuses it."""
    proc = _run("mount", *args)
    if proc.returncode != 0:
        pytest.skip(f"the kernel refused to mount ({' '.join(args)}): {proc.stderr.strip()}")


def _unmount(directory: Path) -> None:
    if _run("umount", str(directory)).returncode != 0:
        # A process (a server under test that would not stop) still holds a file there.
        subprocess.run(["umount", "-l", str(directory)], check=True, timeout=60)


class Tmpfs:
    """A tmpfs of ``size`` bytes at ``path``: writes past it fail with ENOSPC."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def resize(self, size: int) -> None:
        """Give the file system more (or less) room, as an operator freeing space would."""
        subprocess.run(
            ["mount", "-o", f"remount,size={size}", str(self.path)], check=True, timeout=60
        )
        self.size = size


class Ext4Image:
    """An ext4 image loop-mounted at ``path`` with ``errors=remount-ro``."""

    def __init__(self, path: Path, image: Path) -> None:
        self.path = path
        self.image = image

    def _device(self) -> str:
        proc = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE", str(self.path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return os.path.basename(proc.stdout.strip())

    def remount_read_only(self) -> None:
        """Make it read-only cleanly (only possible while no file on it is open for writing)."""
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True, timeout=60)

    def remount_read_write(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True, timeout=60)

    def fail_read_only(self) -> None:
        """An ext4 error: the kernel turns the file system read-only now, open files or not."""
        Path(f"/sys/fs/ext4/{self._device()}/trigger_fs_error").write_text("clusterd test\n")
        # Newer kernels mark it "emergency_ro" (statvfs still says rw): ask a write instead.
        try:
            (self.path / ".probe").write_bytes(b"x")
        except OSError as e:
            if e.errno == errno.EROFS:
                return
            raise
        raise AssertionError(f"{self.path} did not go read-only after an ext4 error")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Tmpfs]:
    """A 2 MiB tmpfs, unmounted afterwards."""
    directory = tmp_path / "tmpfs"
    directory.mkdir()
    size = 2 << 20
    _mount_or_skip("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory))
    try:
        yield Tmpfs(directory, size)
    finally:
        _unmount(directory)


@pytest.fixture
def ext4_image(tmp_path: Path) -> Iterator[Ext4Image]:
    """A 16 MiB ext4 image, loop-mounted ``errors=remount-ro``; unmounted and removed after."""
    image = tmp_path / "disk.ext4"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True, timeout=60
    )
    directory = tmp_path / "ext4"
    directory.mkdir()
    _mount_or_skip("-o", "loop,errors=remount-ro", str(image), str(directory))
    try:
        yield Ext4Image(directory, image)
    finally:
        _unmount(directory)  # a loop device mounted with -o loop is detached with it
        image.unlink()
