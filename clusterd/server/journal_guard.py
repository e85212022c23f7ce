"""The SQLite journal's file guard: the exclusive lock file, the check that the files written
are still the ones opened, and the operating system's reason a write failed.

Why a lock file and ``flock`` rather than SQLite's ``locking_mode=EXCLUSIVE``: the kernel drops
a ``flock`` when its holder dies, even by SIGKILL; ``flock`` locks belong to an open file, so a
second journal object in the same process is refused too (POSIX ``fcntl`` locks, which SQLite
uses, would not see it); the lock file carries the holder's pid for the refusal message; and
readers such as a backup can still open the journal.

Plain file-system calls only: no SQLite statements, no threads, no reactor. May import
:mod:`clusterd.core.journal` only.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import BinaryIO

from clusterd.core.journal import JournalError

__all__ = ["FileGuard", "Lost"]


class Lost(Exception):
    """The journal file, its WAL or its lock file is no longer the one this journal opened."""


class FileGuard:
    """One journal file's lock and identity, held from open to close."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self.lock: BinaryIO | None = None
        self.files: dict[str, tuple[int, int]] = {}  # path -> (st_dev, st_ino) as opened

    # -- the lock file -------------------------------------------------------------------------

    def take_lock(self) -> None:
        """Hold ``<path>.lock`` exclusively for this journal's life: one journal, one server."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise JournalError(
                f"journal {self.path} cannot be written: cannot open its lock file "
                f"{self.lock_path}: {e.strerror}"
            ) from None
        lock = os.fdopen(fd, "r+b", buffering=0)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read(64).decode("ascii", "replace").strip()
            lock.close()
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise JournalError(
                f"journal {self.path} is in use by another server{pid}, which holds its lock "
                f"file {self.lock_path}; a journal serves one server at a time"
            ) from None
        except OSError as e:
            lock.close()
            raise JournalError(
                f"cannot lock journal {self.path} (lock file {self.lock_path}): {e.strerror}"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            lock.close()
            raise JournalError(
                f"journal {self.path} cannot be written: cannot write its lock file "
                f"{self.lock_path}: {e.strerror}"
            ) from None
        self.lock = lock

    def release_lock(self) -> None:
        """Close the lock file, which drops the flock, if it is held."""
        if self.lock is not None:
            self.lock.close()  # closing the file drops the flock
            self.lock = None

    # -- identity ------------------------------------------------------------------------------

    def identify(self) -> None:
        """Remember the journal file and its WAL as opened, to notice them deleted or replaced."""
        files = {}
        for p in (self.path, self.path + "-wal"):
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue  # no WAL: SQLite fell back to a rollback journal on this file system
            files[p] = (st.st_dev, st.st_ino)
        self.files = files

    def verify(self) -> os.stat_result | None:
        """Raise :class:`Lost` if the journal, its WAL or its lock file was deleted or replaced
        since it was opened (commits would go to a file no restart reads); the WAL's stat."""
        wal = None
        for p, ident in self.files.items():
            try:
                st = os.stat(p)
            except FileNotFoundError:
                raise Lost(f"{p} was deleted while the server ran") from None
            if (st.st_dev, st.st_ino) != ident:
                raise Lost(f"{p} was replaced by another file while the server ran")
            if p.endswith("-wal"):
                wal = st
        if self.lock is not None:
            held = os.fstat(self.lock.fileno())
            try:
                st = os.stat(self.lock_path)
            except FileNotFoundError:
                raise Lost(
                    f"its lock file {self.lock_path} was deleted while the server ran"
                ) from None
            if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
                raise Lost(f"its lock file {self.lock_path} was replaced while the server ran")
        return wal

    # -- reasons -------------------------------------------------------------------------------

    def reason(self, error: BaseException) -> str:
        """The operating system's reason a write failed, with SQLite's words for it: SQLite
        reports "disk I/O error" or "database or disk is full", never the errno behind it."""
        if isinstance(error, Lost):
            return str(error)
        sqlite_says = str(error)
        name = getattr(error, "sqlite_errorname", None)
        if name:
            sqlite_says = f"{sqlite_says}, {name}"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        os_says = self.os_reason()
        if os_says is None:
            return f"SQLite: {sqlite_says}"
        return f"{os_says} (SQLite: {sqlite_says})"

    def os_reason(self) -> str | None:
        """Ask the file system directly: read-only, not writable, or full (a page-sized write
        beside the journal, into its lock file, undone at once)."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            vfs = os.statvfs(directory)
        except OSError as e:
            return e.strerror
        if vfs.f_flag & os.ST_RDONLY:
            return os.strerror(errno.EROFS)
        for p in (self.path, self.path + "-wal"):
            if os.path.exists(p) and not os.access(p, os.W_OK):
                return f"{p}: {os.strerror(errno.EACCES)}"
        if self.lock is not None:
            fd = self.lock.fileno()
            try:
                size = os.fstat(fd).st_size
                try:
                    written = os.pwrite(fd, b"\0" * 65536, 4096)
                    os.fsync(fd)
                finally:
                    os.ftruncate(fd, size)
            except OSError as e:
                return e.strerror
            if written < 65536:
                return os.strerror(errno.ENOSPC)
        if vfs.f_bfree == 0:
            return os.strerror(errno.ENOSPC)
        return None
