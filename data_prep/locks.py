"""One writer per run directory and per prep folder: an advisory ``fcntl.flock`` on ``<folder>/.cxr-lock``,
or a lock file where the file system has no ``flock``.

Rank 0 of prep, training and evaluation takes it before writing anything else there and holds it until
the process ends. A second run on the same folder fails at once with one line naming the holder's pid,
host and start (written into the lock file by the holder). The lock is advisory: only this project's
stages honour it.

Two kinds, :func:`kind` says which one a process holds:

* ``flock`` (where it works): the kernel releases it when the process dies (a kill, a crash), so there
  are no stale locks.
* ``lock file (flock unavailable: ENOSYS)`` (or ``ENOLCK``, ``EOPNOTSUPP``): what a Lustre client mounted
  ``noflock`` (ENOSYS), NFS without lockd (ENOLCK) and some other file systems answer. Then
  ``<folder>/.cxr-lock.excl`` is created with ``O_CREAT|O_EXCL`` and holds JSON: ``what``, ``pid``,
  ``host``, ``since``, a ``token`` and ``heartbeat`` (seconds since the epoch), which a daemon thread
  rewrites in place every :data:`HEARTBEAT_S` seconds. It is refused while its holder lives, and taken
  over with a one-line warning when the holder is gone: on this host (``socket.gethostname()``) its pid
  no longer exists; on any host its heartbeat is older than :data:`STALE_S` seconds (the hosts' clocks
  must agree to well within that; a holder stopped for longer, e.g. a suspended job, loses the folder).
  A takeover first claims the stale token with ``O_EXCL`` (``.cxr-lock.excl.takeover-<token>``, one
  winner), then renames the stale file away, checks that it renamed the file it judged, and creates its
  own with ``O_EXCL`` again. ``release()`` and the process's exit remove the file; a killed holder
  leaves it for the next run to take over. Every node must see the folder through the same kind of
  mount: a process holding the ``flock`` and one holding the lock file do not see each other.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from data_prep.cli import UserError

LOCK_NAME = ".cxr-lock"
EXCL_NAME = ".cxr-lock.excl"  # the lock file where flock is unavailable
NO_FLOCK = {errno.ENOSYS: "ENOSYS", errno.ENOLCK: "ENOLCK", errno.EOPNOTSUPP: "EOPNOTSUPP"}  # Lustre noflock,
# NFS without lockd, others (EOPNOTSUPP is ENOTSUP on Linux: one number)
HEARTBEAT_S = 15.0   # the lock file's heartbeat period
STALE_S = 120.0      # a lock file of another host whose heartbeat is older than this is taken over
SETTLE_S = 0.5       # how long a reader waits for the record of a lock file just created
_HELD: dict[str, "_Held"] = {}  # folder -> what this process holds, for the life of the process


class FolderBusy(UserError, RuntimeError):
    """Another process writes into the folder."""


class _Held:
    """One held lock: the flock's descriptor, or the lock file with its heartbeat thread."""

    def __init__(self, kind: str, fd: int, path: Path | None = None, info: dict | None = None,
                 claim: Path | None = None):
        self.kind, self.fd, self.path, self.info, self.claim = kind, fd, path, info, claim
        self.pid = os.getpid()
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start_heartbeat(self):
        self.thread = threading.Thread(target=self._beat, name="cxr-lock-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self):
        warned = False
        while not self.stop.wait(HEARTBEAT_S):
            try:
                _write_info(self.fd, self.info)
                if not warned and os.stat(self.path).st_ino != os.fstat(self.fd).st_ino:
                    warned = True  # another process judged this holder gone: say so once
                    _notice(f"{self.path} was taken over by another process while this one held it")
            except OSError:
                pass

    def close(self):
        self.stop.set()
        if self.path is not None and os.getpid() == self.pid:  # a forked child removes nothing
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    os.unlink(self.path)
            except OSError:
                pass
            if self.claim is not None:
                try:
                    os.unlink(self.claim)
                except OSError:
                    pass
        try:
            os.close(self.fd)
        except OSError:
            pass


def _notice(msg: str) -> None:
    from data_prep.log import get_logger  # here: the lock module stays importable without logging set up

    get_logger().warning("%s", msg)


def _write_info(fd: int, info: dict) -> None:
    """The holder record, rewritten in place: the heartbeat has a fixed width, so every rewrite has
    the same length and a reader never sees a shorter, cut record."""
    info["heartbeat"] = f"{time.time():.3f}"
    data = (json.dumps(info) + "\n").encode()
    os.pwrite(fd, data, 0)


def _read_info(path: Path) -> tuple[dict, os.stat_result | None]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}, None
    try:
        st = os.fstat(fd)
        raw = os.pread(fd, 65536, 0)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw or b"{}")
    except ValueError:  # being written (or cut): judged by the file's time below
        info = {}
    return (info if isinstance(info, dict) else {}), st


def _read_settled(path: Path) -> tuple[dict, os.stat_result | None]:
    """``_read_info``, waiting up to SETTLE_S while the file is there without a record: its creator
    made it with O_EXCL and writes the record next, so a reader that came between sees it empty."""
    deadline = time.monotonic() + SETTLE_S
    info, st = _read_info(path)
    while st is not None and "what" not in info and time.monotonic() < deadline:
        time.sleep(0.02)
        info, st = _read_info(path)
    return info, st


def _who(holder: dict) -> str:
    return (f"{holder.get('what', 'another run')} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')})")


def _busy(folder: Path, holder: dict, extra: str = "") -> FolderBusy:
    return FolderBusy(f"{folder} is in use by {_who(holder)}{extra}; wait for it to end, or choose another folder "
                      f"(run.dir / prep.out)")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's live process, or no pid to judge by: not gone
    return True


def _gone(holder: dict, st: os.stat_result) -> str | None:
    """Why the holder of a lock file is gone, or None while it may live: on this host its pid no longer
    runs (or is this very process, which does not hold it: a restarted container's pid); on any host
    its heartbeat stopped more than STALE_S ago (a live pid on this host with a stopped heartbeat is
    another process that got the number after a reboot)."""
    if holder.get("host") == socket.gethostname() and "pid" in holder:
        if str(holder["pid"]) == str(os.getpid()):
            return f"its pid {holder['pid']} is this process's own (a leftover)"
        if not _pid_alive(holder["pid"]):
            return f"its pid {holder['pid']} no longer runs on this host"
    try:
        beat = float(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
        beat = st.st_mtime  # no readable record: the file's own time
    age = time.time() - beat
    return f"its heartbeat is {age:.0f} s old (over {STALE_S:.0f} s)" if age > STALE_S else None


def _create(path: Path, info: dict) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        _write_info(fd, info)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return fd


def _lock_file(folder: Path, info: dict) -> tuple[int, Path | None]:
    """Create ``<folder>/.cxr-lock.excl`` (taking over a gone holder's); (descriptor, takeover claim)."""
    path = folder / EXCL_NAME
    for _ in range(3):
        try:
            return _create(path, info), None
        except FileExistsError:
            pass
        holder, st = _read_settled(path)
        if st is None:
            continue  # removed meanwhile: try again
        why = _gone(holder, st)
        if why is None:
            raise _busy(folder, holder)
        token = str(holder.get("token") or f"ino{st.st_ino}-{st.st_mtime_ns}")
        claim = folder / f"{EXCL_NAME}.takeover-{''.join(c for c in token if c.isalnum() or c in '-_')[:64]}"
        try:  # one process takes over one stale lock: the others are refused
            os.close(os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644))
        except FileExistsError:
            raise _busy(folder, holder, ", which another process is taking over") from None
        aside = folder / f"{EXCL_NAME}.stale-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            os.unlink(claim)
            continue
        moved, mst = _read_info(aside)
        if moved.get("token", token) != token or (mst and "token" not in holder and mst.st_ino != st.st_ino):
            try:  # not the file judged (a new holder's): put it back
                os.link(aside, path)
            except OSError:
                pass
            os.unlink(aside)
            os.unlink(claim)
            raise _busy(folder, moved)
        os.unlink(aside)
        try:
            fd = _create(path, info)
        except FileExistsError:  # another process created one in between: it holds the folder
            os.unlink(claim)
            raise _busy(folder, _read_settled(path)[0]) from None
        _notice(f"{folder}: took over the lock file of {_who(holder)}: {why}")
        _clean_claims(folder, keep=claim)
        return fd, claim
    raise _busy(folder, _read_settled(path)[0])


def _clean_claims(folder: Path, keep: Path) -> None:
    """Takeover claims left by holders that died: old enough to matter to no one."""
    for p in folder.glob(f"{EXCL_NAME}.takeover-*"):
        try:
            if p != keep and time.time() - p.stat().st_mtime > STALE_S:
                p.unlink()
        except OSError:
            pass


def acquire(folder, what: str) -> Path:
    """Hold ``folder``'s lock for the rest of this process (again in this process: a no-op);
    ``FolderBusy`` naming the holder when another process has it. Returns the lock's path
    (``.cxr-lock``, or ``.cxr-lock.excl`` where flock is unavailable)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    path = folder / LOCK_NAME
    if key in _HELD:
        return _HELD[key].path or path
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise FolderBusy(f"{path} is a symlink; refused (the lock must be a plain file: remove the link and "
                         f"run again)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        raise _busy(folder, holder) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in NO_FLOCK:
            raise
        return _acquire_file(folder, key, what, NO_FLOCK[e.errno])
    info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:1]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = _Held("flock", fd)
    return path


def _acquire_file(folder: Path, key: str, what: str, code: str) -> Path:
    info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:1],
            "token": uuid.uuid4().hex, "kind": f"lock file (flock unavailable: {code})"}
    fd, claim = _lock_file(folder, info)
    held = _HELD[key] = _Held(info["kind"], fd, folder / EXCL_NAME, info, claim)
    held.start_heartbeat()
    return held.path


def kind(folder) -> str | None:
    """Which lock this process holds on ``folder``: ``"flock"``, ``"lock file (flock unavailable:
    ENOSYS)"`` (or ENOLCK, EOPNOTSUPP), or None when it holds none."""
    held = _HELD.get(str(Path(folder).resolve()))
    return held.kind if held else None


def release(folder) -> None:
    """Let go of ``folder``'s lock early (tests, a command that runs several stages in one process)."""
    held = _HELD.pop(str(Path(folder).resolve()), None)
    if held is not None:
        held.close()


@atexit.register
def _release_all() -> None:
    for key in list(_HELD):
        _HELD.pop(key).close()
