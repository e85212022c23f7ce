"""The text chunks of streamed inputs (and big sub-task results), kept beside the SQLite
journal in one file per job.

Why not BLOBs in SQLite: a chunk stored in the database is written to the WAL page by page,
copied again into the database file at the checkpoint, and at the job's end its pages are
freed, vacuumed and checkpointed once more: about 13 ms of the server's CPU per MB of input
(measured), several times everything else the byte path costs. Appended to a file, a chunk
costs one ``write`` (and the ``fsync`` the commit needs anyway), and the job's end one
``unlink``. The database row keeps a reference, ``@<offset>:<length>``, that no JSON text can
be mistaken for (JSON never starts with ``@``). A sub-task result whose JSON is big (a word
count's dict) goes the same way, for the same reason.

Order makes it crash-safe: a batch appends its chunks, fsyncs the files (``sync=full``), and
only then commits the rows that name them; a crash before the commit leaves unnamed bytes at a
file's end, which nothing reads. Files are removed after the commit that ends their job; one
left behind by a crash in between is removed at the next start (:meth:`InputFiles.sweep`).
Used only on the journal's writer thread, and at start before it runs.
"""

from __future__ import annotations

import os
import re

__all__ = ["InputFiles", "REF", "MAX_OPEN"]

MAX_OPEN = 64  # input files held open at once (reopened when needed)
REF = "@"  # an inputs row whose text starts with it names bytes in its job's input file
_JOB = re.compile(r"[A-Za-z0-9_-]{1,100}")
_REF = re.compile(r"@(\d{1,18}):(\d{1,18})")


class InputFiles:
    """One append-only file per streamed job, ``<journal>-inputs/<job>.txt``."""

    def __init__(self, journal_path: str, sync: bool = True) -> None:
        self.dir = journal_path + "-inputs"
        self.sync = sync
        self._fds: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._dir_dirty = False
        self.ended: set[str] = set()  # jobs ended in the batch being written: drop after it

    def path(self, job: str) -> str:
        """The file of ``job`` (job ids are the server's own; anything else is refused)."""
        if not _JOB.fullmatch(job):
            raise ValueError(f"job id {job!r} cannot name an input file")
        return os.path.join(self.dir, job + ".txt")

    def append(self, job: str, data: bytes) -> str:
        """Append ``data`` to ``job``'s file; the reference its row keeps. Durable only after
        :meth:`flush`."""
        fd = self._fd(job)
        offset = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self._dirty.add(job)
        return f"{REF}{offset}:{len(data)}"

    def _fd(self, job: str) -> int:
        """``job``'s open file, most recently used last. At most MAX_OPEN stay open: many jobs
        streaming at once must not use up the server's descriptors, which its connections
        need; the least recently used one is made durable (if written) and closed."""
        fd = self._fds.pop(job, None)
        if fd is None:
            if not os.path.isdir(self.dir):
                os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(self.path(job), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._dir_dirty = True
        self._fds[job] = fd
        while len(self._fds) > MAX_OPEN:
            old = next(iter(self._fds))
            old_fd = self._fds.pop(old)
            if old in self._dirty:
                self._dirty.discard(old)
                if self.sync:
                    os.fsync(old_fd)
            os.close(old_fd)
        return fd

    def flush(self) -> None:
        """Make what was appended durable: before the commit whose rows name it."""
        dirty, self._dirty = self._dirty, set()
        if not self.sync:
            return
        for job in dirty:
            os.fsync(self._fds[job])
        if self._dir_dirty:
            self._dir_dirty = False
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def committed(self) -> None:
        """The batch committed: the files of the jobs it ended go."""
        ended, self.ended = self.ended, set()
        for job in ended:
            self.drop(job)

    def drop(self, job: str) -> None:
        """Close and remove ``job``'s file (gone already is fine)."""
        fd = self._fds.pop(job, None)
        self._dirty.discard(job)
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.path(job))
        except (FileNotFoundError, ValueError):
            pass

    def read(self, job: str, ref: str) -> bytes | None:
        """The bytes ``ref`` names in ``job``'s file; None if they are not there."""
        m = _REF.fullmatch(ref)
        if m is None:
            return None
        offset, length = int(m.group(1)), int(m.group(2))
        try:
            with open(self.path(job), "rb") as fh:
                fh.seek(offset)
                data = fh.read(length)
        except (OSError, ValueError):
            return None
        return data if len(data) == length else None

    def sweep(self, keep: set[str]) -> None:
        """At start: remove the files of jobs that are not unfinished (a crash came between a
        job's end and its file's removal)."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            job = name.removesuffix(".txt")
            if name.endswith(".txt") and job not in keep and _JOB.fullmatch(job):
                self.drop(job)

    def close(self) -> None:
        """Close every open file."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
