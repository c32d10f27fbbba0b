"""Whether a process lives, by its PID (for files and directories named after one); the
supervisor's count of workers that died, kept beside the workers' metrics."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["alive", "note_worker_death", "worker_deaths"]

_DEATHS = "pglayer-worker-deaths"


def note_worker_death(directory: Path) -> None:
    """Count one more worker death in `directory` (written by the supervisor alone)."""
    path = directory / _DEATHS
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):  # a count lost is better than a supervisor stopped
        tmp.write_text(str(worker_deaths(directory) + 1))
        tmp.replace(path)


def worker_deaths(directory: Path) -> int:
    try:
        return int((directory / _DEATHS).read_text())
    except (OSError, ValueError):
        return 0


def alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts)."""
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
