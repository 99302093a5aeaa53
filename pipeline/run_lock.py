"""One `aigc` at a time per run directory: an exclusive lock on `<run_dir>/.lock`.

The lock is a non-blocking `fcntl.flock`, so the kernel drops it when its holder
exits or is killed (no stale lock to clean up); the file holds the holder's PID
for the message the second process prints. Stage processes the holder starts do
not inherit it (Python opens files close-on-exec).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


class RunDirLocked(RuntimeError):
    """Another process holds the lock of the run directory."""


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the lock of `run_dir` (created where missing) for the body of the `with`.

    Raises RunDirLocked, naming the holder's PID, where another process holds it.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunDirLocked(f"run directory {run_dir} is in use by another aigc (pid {holder}); "
                               "wait for it to finish, or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
