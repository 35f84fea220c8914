"""``prep.stage_to``: copies of the shards on node-local disk, made once per node, checked, reused.

On a cluster ``prep.out`` usually lies on a shared file system (Lustre, GPFS, NFS), where every rank
of every node reading every shard at random offsets is slow and loads the metadata servers. With
``prep.stage_to: DIR`` (e.g. ``$TMPDIR``; ``~`` and ``$VARS`` expanded on each node) every training
and evaluation process copies the shards of the splits it loads into
``DIR/cxr-<config hash>-<manifest digest>/<split>/`` and reads those copies instead (:func:`stage`):

* Once per node: the processes of one node take turns under an ``flock`` on ``.stage-lock`` in that
  folder (node-local disks have it; where they do not, each copies on its own, still correctly). The
  first copies, the others find the copies made and reuse them.
* Atomic: a copy is written to a temporary name in the same folder, fsynced and renamed into place,
  so no reader sees half a shard.
* Checked: every copy's sha256 is compared with the manifest's. A copy that differs (found damaged
  from an earlier run, or just made) is made again once; when it still differs (a damaged source or
  disk) the process stops with one line naming the file. ``.staged.json`` records (size, mtime, ctime,
  inode, sha256) of every verified copy: a copy that still has them is reused without reading it again;
  any other (changed, replaced) is hashed again, and copied again when it differs. The shards'
  Fletcher-32 checksums still guard every read.
* One line (rank 0): ``train: staged N shards (X MB) to DIR in T s (M reused)``.

The folder name changes with the prep output, so a new prep output is staged beside an old one;
nothing here removes old ones (Slurm's per-job ``$TMPDIR`` is removed with the job).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from data_prep import testhooks
from data_prep.cli import UserError
from data_prep.fsutil import atomic_write_json, sha256_file
from data_prep.log import get_logger
from data_prep.manifest import shard_file

RECORD = ".staged.json"
LOCK = ".stage-lock"
_SHA = re.compile(r"^[0-9a-f]{64}$")


class StageError(UserError, RuntimeError):
    """Staging the shards failed; the message names the file or the setting."""


def stage_root(stage_to: str) -> Path:
    """``prep.stage_to`` with ``~`` and ``$VARS`` expanded; a variable unset on this node is an error."""
    raw = os.path.expanduser(os.path.expandvars(str(stage_to)))
    left = re.findall(r"\$\{?(\w+)", raw)
    if left:
        raise StageError(f"prep.stage_to {stage_to!r}: ${left[0]} is not set on {socket.gethostname()}; "
                         f"set it or name a folder")
    return Path(raw)


def stage_folder(stage_to: str, manifest: dict) -> Path:
    """``<stage_to>/cxr-<config hash>-<digest of the manifest>``: one folder per prep output."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[:12]
    tag = re.sub(r"[^0-9A-Za-z]", "", str(manifest.get("config_hash", "")))[:16] or "prep"
    return stage_root(stage_to) / f"cxr-{tag}-{digest}"


@contextmanager
def _node_lock(folder: Path):
    """The processes of one node in turn (an flock on the node-local folder); without flock: none."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP):
                raise
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the flock


def _record(folder: Path) -> dict:
    try:
        rec = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _stamp(path: Path, sha: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino,
            "sha256": sha}


def _copy(src: Path, dst: Path) -> None:
    """``src`` to ``dst`` through a temporary name beside it, fsynced, then renamed."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{socket.gethostname()}-{os.getpid()}.tmp"
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 8 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def stage(prep_out, entries: list[dict], manifest: dict, stage_to: str, label: str = "") -> tuple[list[Path], dict]:
    """Local copies of the shards ``entries`` (manifest entries of ``prep_out``) under ``stage_to``:
    (their paths, in order; counts ``{"shards", "bytes", "copied", "reused", "recopied", "seconds",
    "folder"}`` of this process). See the module for what is checked."""
    t0 = time.monotonic()
    prep_out = Path(prep_out)
    folder = stage_folder(stage_to, manifest)
    for e in entries:
        if not _SHA.match(str(e.get("sha256", ""))):
            raise StageError(f"prep.stage_to: the manifest of {prep_out} has no sha256 for shard {e.get('file')}; "
                             f"rerun prep")
    sources = [shard_file(prep_out, e) for e in entries]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StageError(f"prep.stage_to: cannot create {folder}: {e.strerror or e}") from None
    log = get_logger()
    n = {"shards": len(entries), "bytes": 0, "copied": 0, "reused": 0, "recopied": 0, "folder": str(folder)}
    out = []
    with _node_lock(folder) as locked:
        rec = _record(folder)
        files = rec.setdefault("files", {})
        before = dict(files)
        if locked:  # leftovers of a copy that was killed: no one else copies now
            for tmp in folder.glob("*/.*.tmp"):
                tmp.unlink(missing_ok=True)
        todo = []
        for e, src in zip(entries, sources):
            dst = folder / e["file"]
            known, tries = files.get(e["file"]), 2
            try:
                if known and known == _stamp(dst, e["sha256"]):
                    n["reused"] += 1  # verified before and untouched since
                    continue
                if dst.exists():
                    if sha256_file(dst) == e["sha256"]:
                        files[e["file"]] = _stamp(dst, e["sha256"])
                        n["reused"] += 1
                        continue
                    log.warning("staged copy %s differs from the manifest (sha256): copying it again", dst)
                    n["recopied"] += 1
                    tries = 1  # a damaged copy is made again once
            except OSError:
                pass  # missing or unreadable: copy it
            todo.append((e, src, dst, tries))
        need = sum(src.stat().st_size for _, src, _, _ in todo)
        free = shutil.disk_usage(folder).free
        if need > free:
            raise StageError(f"prep.stage_to: {folder} has {free / 2**20:.0f} MB free, the shards to stage need "
                             f"{need / 2**20:.0f} MB; free space, or leave prep.stage_to empty")
        throttle = testhooks.stage_throttle_s()  # tests only
        for e, src, dst, tries in todo:
            for attempt in range(1, tries + 1):
                time.sleep(throttle)
                _copy(src, dst)
                if sha256_file(dst) == e["sha256"]:
                    break
                if attempt == tries:
                    dst.unlink(missing_ok=True)
                    files.pop(e["file"], None)
                    atomic_write_json(folder / RECORD, rec)
                    raise StageError(f"staged copy {dst} of shard {e['file']} differs from the manifest's sha256 "
                                     f"{'again' if tries == 1 else 'twice'} (copied from {src}): the source or this "
                                     f"disk is damaged; `python -m data_prep verify --config C` checks the source")
                log.warning("staged copy %s differs from the manifest (sha256) after copying: copying it again", dst)
            files[e["file"]] = _stamp(dst, e["sha256"])
            n["copied"] += 1
        if files != before:
            atomic_write_json(folder / RECORD, rec)
    for e in entries:
        dst = folder / e["file"]
        n["bytes"] += dst.stat().st_size
        out.append(dst)
    n["seconds"] = time.monotonic() - t0
    log.info("%sstaged %d shards (%.0f MB) to %s in %.1f s (%d reused%s)", f"{label}: " if label else "",
             n["shards"], n["bytes"] / 2**20, folder, n["seconds"], n["reused"],
             f", {n['recopied']} damaged copies made again" if n["recopied"] else "")
    return out, n
