"""Atomic file writes: a reader never sees half a file, a crash never leaves one."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def _tmp_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def atomic_write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def walk_tree(root, exclude=(), refused: list | None = None):
    """``os.walk(root, followlinks=True)`` made safe for folders from others: yields ``(dirpath,
    sorted file names)`` in sorted order; a directory reached twice (a symlink loop, or two links to
    one folder: visited ``(st_dev, st_ino)``) is walked once, and a symlink (to a folder or a file)
    whose target lies outside ``root`` is not followed. Both are appended to ``refused`` as
    ``{"image": relative path, "reason": ...}``. Hidden folders and ``exclude`` are left out."""
    root_real = os.path.realpath(root)
    excl = {os.path.realpath(e) for e in exclude}
    refused = [] if refused is None else refused
    seen: set[tuple[int, int]] = set()

    def inside(p: str) -> bool:
        real = os.path.realpath(p)
        return real == root_real or real.startswith(root_real + os.sep)

    def note(path: str, reason: str):
        refused.append({"image": os.path.relpath(path, root), "reason": reason})

    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            note(d, "symlink loop or second link to a folder below data.images: walked once")
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            continue
        files, dirs = [], []
        for e in entries:
            if e.is_symlink() and not inside(e.path):
                note(e.path, "symlink leading outside data.images: not followed")
                continue
            try:
                is_dir = e.is_dir(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                if not e.name.startswith(".") and os.path.realpath(e.path) not in excl:
                    dirs.append(e.path)
            else:
                files.append(e.name)
        yield d, files
        stack.extend(reversed(dirs))  # depth first, in sorted order, as os.walk
