"""One way to take turns between processes: an exclusive lock on a file (flock; one machine or a shared
POSIX file system). Used by the training-job cache, the generation-stage cache and local Ray starts."""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Callable


@contextlib.contextmanager
def file_lock(path: str | Path, on_wait: Callable[[], None] | None = None):
    """Hold an exclusive lock on `path` (created if missing) for the block; on_wait() runs once if another
    process holds it, before waiting for it."""
    with open(path, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
