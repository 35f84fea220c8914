"""One writer per folder where ``flock`` does not work (data_prep.locks' lock file).

``fcntl.flock`` is patched to raise ``OSError(ENOSYS)``: it stands for a Lustre client mounted
``noflock``; ``ENOLCK`` for NFS without lockd; ``EOPNOTSUPP`` for other file systems without it. Every
test runs with each of the three. Holders in other processes are real subprocesses with the same patch.
"""
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import locks

ROOT = Path(__file__).resolve().parents[2]
ERRNOS = [errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP]
HOLDER = """
import fcntl, sys, time
def no_flock(*a):
    raise OSError({err}, "flock unavailable")
fcntl.flock = no_flock
from data_prep import locks
locks.HEARTBEAT_S = 0.2
go = float(sys.argv[3])
time.sleep(max(0.0, go - time.time()))
try:
    locks.acquire(sys.argv[1], "training")
except locks.FolderBusy as e:
    print("busy", e, flush=True)
    sys.exit(3)
print("held", locks.kind(sys.argv[1]), flush=True)
time.sleep(float(sys.argv[2]))
"""


@pytest.fixture(params=ERRNOS, ids=["ENOSYS", "ENOLCK", "EOPNOTSUPP"])
def noflock(request, monkeypatch):
    """flock raising what a file system without it raises; yields the errno."""
    err = request.param

    def no_flock(*a):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(locks.fcntl, "flock", no_flock)
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    yield err
    for key in list(locks._HELD):
        locks.release(key)


@pytest.fixture()
def notices(cxr_log):
    """Warnings of the 'cxr' logger (the takeover notice), as strings."""
    return cxr_log(logging.WARNING)


def _holder(folder, err, hold_s=30.0, go=0.0):
    return subprocess.Popen([sys.executable, "-c", HOLDER.format(err=err), str(folder), str(hold_s), str(go)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _record(folder, **kw):
    """A lock file as another holder left it."""
    info = {"what": "training", "pid": 1, "host": socket.gethostname(), "since": "2024-01-01T00:00:00+0000",
            "token": "0123abcd", "heartbeat": f"{time.time():.3f}", **kw}
    (folder / locks.EXCL_NAME).write_text(json.dumps(info) + "\n")
    return info


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid runs nothing now
    return p.pid


def test_lock_file_is_held_with_a_heartbeat_and_removed_on_release(tmp_path, noflock):
    path = locks.acquire(tmp_path, "prep")
    assert path == tmp_path / locks.EXCL_NAME
    assert locks.kind(tmp_path) == f"lock file (flock unavailable: {locks.NO_FLOCK[noflock]})"
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["since"]
    first = float(info["heartbeat"])
    time.sleep(0.3)
    assert float(json.loads(path.read_text())["heartbeat"]) > first  # the daemon thread refreshes it
    assert locks.acquire(tmp_path, "prep") == path  # again in this process: a no-op
    locks.release(tmp_path)
    assert not path.exists() and locks.kind(tmp_path) is None


def test_a_second_writer_is_refused_naming_the_holder_and_exit_removes_the_file(tmp_path, noflock):
    holder = _holder(tmp_path, noflock, hold_s=1.5)
    try:
        line = holder.stdout.readline()
        assert line.startswith("held lock file (flock unavailable"), line + holder.stderr.read()
        with pytest.raises(locks.FolderBusy) as e:
            locks.acquire(tmp_path, "evaluation")
        msg = str(e.value)
        assert f"in use by training (pid {holder.pid} on {socket.gethostname()}, since " in msg and "\n" not in msg
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    assert not (tmp_path / locks.EXCL_NAME).exists()  # atexit removed it
    locks.acquire(tmp_path, "evaluation")
    assert locks.kind(tmp_path).startswith("lock file")


def test_a_killed_holders_lock_is_taken_over_with_a_notice(tmp_path, noflock, notices):
    holder = _holder(tmp_path, noflock)
    try:
        assert holder.stdout.readline().startswith("held")
        holder.kill()
        holder.wait()
    finally:
        holder.kill()
    assert json.loads((tmp_path / locks.EXCL_NAME).read_text())["pid"] == holder.pid  # left behind
    locks.acquire(tmp_path, "training")
    assert json.loads((tmp_path / locks.EXCL_NAME).read_text())["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {holder.pid} no longer runs on this host" in notices[0], notices
    assert "took over the lock file of training" in notices[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".cxr-lock", locks.EXCL_NAME] + [p.name for p in tmp_path.glob(f"{locks.EXCL_NAME}.takeover-*")])


def test_a_dead_pid_on_this_host_is_taken_over(tmp_path, noflock, notices):
    dead = _dead_pid()
    _record(tmp_path, pid=dead)
    locks.acquire(tmp_path, "training")
    assert json.loads((tmp_path / locks.EXCL_NAME).read_text())["pid"] == os.getpid()
    assert len(notices) == 1 and f"pid {dead} no longer runs" in notices[0]
    locks.release(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".cxr-lock"]  # the takeover claim went with it


def test_a_live_pid_on_this_host_is_refused(tmp_path, noflock):
    parent = os.getppid()
    _record(tmp_path, pid=parent, heartbeat=f"{time.time() - 5:.3f}")
    with pytest.raises(locks.FolderBusy, match=f"pid {parent} on {socket.gethostname()}"):
        locks.acquire(tmp_path, "training")
    assert json.loads((tmp_path / locks.EXCL_NAME).read_text())["pid"] == parent  # untouched


def test_another_hosts_fresh_heartbeat_is_refused_and_a_stale_one_taken_over(tmp_path, noflock, notices, monkeypatch):
    monkeypatch.setattr(locks, "STALE_S", 2.0)
    _record(tmp_path, host="node-b17", pid=4242, heartbeat=f"{time.time() - 1:.3f}")
    with pytest.raises(locks.FolderBusy, match=r"in use by training \(pid 4242 on node-b17, since 2024-01-01"):
        locks.acquire(tmp_path, "training")
    assert not notices
    _record(tmp_path, host="node-b17", pid=4242, heartbeat=f"{time.time() - 3:.3f}")
    locks.acquire(tmp_path, "training")
    assert (len(notices) == 1 and "pid 4242 on node-b17" in notices[0]
            and "heartbeat is 3 s old (over 2 s)" in notices[0])
    assert json.loads((tmp_path / locks.EXCL_NAME).read_text())["host"] == socket.gethostname()


def test_an_unreadable_record_is_judged_by_the_files_time(tmp_path, noflock, monkeypatch):
    monkeypatch.setattr(locks, "STALE_S", 2.0)
    (tmp_path / locks.EXCL_NAME).write_text("{\"what\": \"trai")  # a holder between create and write
    with pytest.raises(locks.FolderBusy, match=r"pid \? on \?"):
        locks.acquire(tmp_path, "training")
    old = time.time() - 10
    os.utime(tmp_path / locks.EXCL_NAME, (old, old))
    locks.acquire(tmp_path, "training")
    assert json.loads((tmp_path / locks.EXCL_NAME).read_text())["pid"] == os.getpid()


def test_a_lock_file_caught_before_its_record_is_written_names_the_holder(tmp_path, noflock):
    """Stands for two runs starting together: the first has created the file (O_EXCL) and not yet
    written its record when the second reads it."""
    (tmp_path / locks.EXCL_NAME).write_text("")
    import threading

    threading.Timer(0.15, _record, args=(tmp_path,), kwargs={"pid": os.getppid()}).start()
    with pytest.raises(locks.FolderBusy, match=f"in use by training \\(pid {os.getppid()} on "):
        locks.acquire(tmp_path, "training")


def test_concurrent_takeovers_of_one_stale_lock_leave_one_holder(tmp_path, noflock):
    _record(tmp_path, pid=_dead_pid())
    go = time.time() + 1.5  # every process tries at the same moment
    procs = [_holder(tmp_path, noflock, hold_s=2.0, go=go) for _ in range(4)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        outs.append((p.returncode, out.strip(), err))
    held = [o for o in outs if o[0] == 0]
    assert len(held) == 1 and all(o[0] == 3 and "in use by training" in o[1] for o in outs if o[0] != 0), outs


def test_where_flock_works_it_is_used_as_before(tmp_path):
    path = locks.acquire(tmp_path, "training")
    try:
        assert path == tmp_path / ".cxr-lock" and locks.kind(tmp_path) == "flock"
        assert not (tmp_path / locks.EXCL_NAME).exists()
    finally:
        locks.release(tmp_path)


def test_other_flock_errors_are_not_hidden(tmp_path, monkeypatch):
    def broken(*a):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(locks.fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"):
        locks.acquire(tmp_path, "training")
    assert locks.kind(tmp_path) is None and not (tmp_path / locks.EXCL_NAME).exists()
