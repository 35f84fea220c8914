"""One writer per run directory and per prep folder: an advisory ``fcntl.flock`` on ``<folder>/.cxr-lock``.

Rank 0 of prep and of training takes it before writing anything else there and holds it until the
process ends; the kernel releases it when the process dies (a kill, a crash), so there are no stale
locks. A second run on the same folder fails at once with one line naming the holder's pid and host
(written into the lock file by the holder). The lock is advisory: only this project's stages honour it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from data_prep.cli import UserError

LOCK_NAME = ".cxr-lock"
_HELD: dict[str, int] = {}  # folder -> open descriptor, for the life of the process


class FolderBusy(UserError, RuntimeError):
    """Another process writes into the folder."""


def acquire(folder, what: str) -> Path:
    """Hold ``folder``'s lock for the rest of this process (again in this process: a no-op);
    ``FolderBusy`` naming the holder when another process has it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    path = folder / LOCK_NAME
    if key in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        who = (f"{holder.get('what', 'another run')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
               f"since {holder.get('since', '?')})")
        raise FolderBusy(f"{folder} is in use by {who}; wait for it to end, or choose another folder "
                         f"(run.dir / prep.out)") from None
    info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:1]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = fd
    return path


def release(folder) -> None:
    """Let go of ``folder``'s lock early (tests, a command that runs several stages in one process)."""
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)
