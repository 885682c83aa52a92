"""One writer per cache: an exclusive lock file ``.softcache.lock`` held for a writer's lifetime.

On a local filesystem the lock is an ``fcntl`` lock on that file, so it is exact: a second writer (any process on this
machine) fails at once naming the holder, and the lock of a process that died (``kill -9``) is released by the kernel
and taken over with a warning. The file records host, pid and start time for the messages.

On other fsspec filesystems (object stores, ``memory://``) there is no atomic create-if-absent: the lock file is
checked and then written, which stops a second writer started after the first, but two writers started in the same
instant can both pass. A lock left by a killed writer is taken over when it names a process of this machine that is
gone; one left by another machine stays until it is deleted by hand (the message says so).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings

from fsspec.implementations.local import LocalFileSystem

from ..errors import CacheLockedError
from .fs import LOCK_NAME, join

_HELD: set[tuple[int, str]] = set()
"""(filesystem id, lock path) of the locks this process holds on filesystems without fcntl."""


class CacheLock:
    """The lock of the cache at ``root``; :meth:`acquire` once, :meth:`release` when the writer closes."""

    def __init__(self, fs, root: str, url: str) -> None:
        self.fs, self.url = fs, url
        self.path = join(root, LOCK_NAME)
        self._fd: int | None = None
        self._held = False

    def _info(self) -> bytes:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        return json.dumps(info).encode()

    def _is_stale(self, raw: bytes) -> bool:
        """Whether a lock file names a writer of this machine that no longer holds it (its process is gone, or it is
        this process and no writer of it holds the lock: an object dropped without close)."""
        try:
            info = json.loads(raw)
            pid, host = int(info["pid"]), info["host"]
        except (ValueError, KeyError, TypeError):
            return False
        if host != socket.gethostname():
            return False
        if pid == os.getpid():
            return (id(self.fs), self.path) not in _HELD
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _holder(self, raw: bytes) -> str:
        try:
            info = json.loads(raw)
            return f"pid {info['pid']} on {info['host']}, since {info['started']}"
        except (ValueError, KeyError, TypeError):
            return "an unknown writer"

    def acquire(self) -> None:
        if isinstance(self.fs, LocalFileSystem):
            self._acquire_local(self.fs._strip_protocol(self.path))
        else:
            if self.fs.exists(self.path):
                raw = self.fs.cat_file(self.path)
                if not self._is_stale(raw):
                    raise CacheLockedError(
                        f"{self.url} is being written by {self._holder(raw)} (lock file {self.path}); wait for it to "
                        "finish. If no writer is running (it was killed on another machine), delete that file"
                    )
                self._warn_stale(raw)
            self.fs.pipe_file(self.path, self._info())
            _HELD.add((id(self.fs), self.path))
        self._held = True

    def _acquire_local(self, path: str) -> None:
        import fcntl

        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(os.pread(fd, 4096, 0))
                os.close(fd)
                raise CacheLockedError(
                    f"{self.url} is being written by {holder}; one writer per cache: wait for it to finish, or write "
                    "to another path"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:  # else the holder removed it between our open and flock: try again on the new file
                break
            os.close(fd)
        stale = os.pread(fd, 4096, 0)
        if stale:
            self._warn_stale(stale)
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._info(), 0)
        self._fd = fd

    def _warn_stale(self, raw: bytes) -> None:
        message = f"{self.url}: taking over the lock of {self._holder(raw)}, which is no longer running"
        warnings.warn(message, stacklevel=5)

    def __del__(self) -> None:
        # A writer dropped without close() lets go of the lock as its process would on exit; the file stays, and
        # the next writer takes it over (with a warning), as after a kill.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._held and _HELD is not None:  # module globals are None at interpreter exit
            _HELD.discard((id(self.fs), self.path))

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            if self.fs.exists(self.path):
                self.fs.rm(self.path)  # removed while still locked, so no other writer locks a file being deleted
        finally:
            _HELD.discard((id(self.fs), self.path))
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
