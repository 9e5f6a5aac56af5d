"""One process at a time per run directory: an advisory ``flock`` on the directory itself.

The kernel releases the lock when its holder exits for any reason (SIGKILL and power loss
included), so a stale lock never blocks a rerun. Locking the directory (not a file in it)
means the lock survives ``--force`` and fresh starts, which empty the directory but never
remove it (:meth:`fedmem.runs.rundir.RunDir.clear`). Works on local file systems; on a
network file system two machines running the same config are not kept apart.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from fedmem.errors import InputError


class RunLocked(InputError):
    """Another process holds the run directory (exit code 2)."""


class RunLock:
    """``with RunLock(run_path, wait=...)``: hold the run directory or raise :class:`RunLocked`.

    Creates the directory if needed. ``wait``: seconds to wait for another holder (0: fail at
    once; None: as long as it takes).
    """

    def __init__(self, run_path: Path, wait: float | None = 0.0, poll_s: float = 0.2):
        self.path = Path(run_path)
        self.wait, self.poll_s = wait, poll_s
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunLocked(
                        f"{self.path}: in use by another fedmem process running the same "
                        "config; wait for it to finish (or pass --wait) and rerun"
                    ) from None
                time.sleep(self.poll_s)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
