"""Reading and checking ``<prep.out>/manifest.json`` (written last by the prep stage)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep import h5check
from data_prep.cli import UserError
from data_prep.config import SHARD_FORMAT
from data_prep.flow import valid as flow_valid
from data_prep.fsutil import sha256_file

MANIFEST = "manifest.json"
FORMAT = SHARD_FORMAT
_KEYS = ("format", "config_hash", "task", "classes", "image_size", "splits", "mean", "std", "skipped", "converted")
SPLITS = ("train", "val", "test")


class ManifestError(UserError, RuntimeError):
    """Missing, incomplete or inconsistent prep output."""


def load_manifest(prep_out) -> dict:
    """The manifest as a dict; ``ManifestError`` naming the problem if prep has not finished,
    the file is broken, or a listed shard is missing."""
    prep_out = Path(prep_out)
    path = prep_out / MANIFEST
    if not path.is_file():
        hint = " (shards are there: prep did not finish; rerun it to resume)" if any(
            (prep_out / s).is_dir() for s in SPLITS) else ""
        raise ManifestError(f"no {MANIFEST} in {prep_out}{hint}: run `python -m data_prep --config ...` first")
    try:
        m = json.loads(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in _KEYS if k not in m]
    if missing:
        raise ManifestError(f"{path}: incomplete manifest, missing {', '.join(missing)}")
    if m["format"] != FORMAT:
        raise ManifestError(f"{path}: shard format {m['format']}, this code reads format {FORMAT} "
                            f"({changes_since(m['format'])}); rerun prep with --overwrite")
    if "flow" in m and not flow_valid(m["flow"]):  # optional: manifests of older preps have none
        raise ManifestError(f"{path}: its flow of images and patients is malformed; rerun prep")
    for name in SPLITS:
        if name not in m["splits"]:
            raise ManifestError(f"{path}: no split {name!r}")
        for sh in m["splits"][name]["shards"]:
            shard_file(prep_out, sh, path)
    return m


FORMAT_NOTES = {3: "shards checksummed with HDF5's Fletcher-32 filter",
                4: "images known by their path below data.images, string patient ids, label masks"}
def changes_since(old) -> str:
    """What the formats after ``old`` changed (FORMAT_NOTES), for the one-line refusal of older prep output."""
    notes = [FORMAT_NOTES[f] for f in sorted(FORMAT_NOTES) if not isinstance(old, int) or f > old]
    return "; ".join(notes) if notes else "a newer layout"


FIX = ("rerun prep with --overwrite (prep.overwrite=true), or `python -m data_prep verify --config C` "
       "to list every damaged shard")


def shard_file(prep_out: Path, entry: dict, where="manifest") -> Path:
    """The path of a manifest's shard entry: relative, inside ``prep_out`` (no '..', no symlink out), existing."""
    rel = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ManifestError(f"{where}: shard path {rel!r} is not a relative path inside {prep_out}; rerun prep")
    p = prep_out / rel
    if not p.is_file():
        raise ManifestError(f"{where}: shard {rel} is missing in {prep_out}")
    if not p.resolve().is_relative_to(prep_out.resolve()):
        raise ManifestError(f"{where}: shard {rel} leads outside {prep_out} (a symlink); refused")
    if not isinstance(entry.get("count"), int) or entry["count"] < 0:
        raise ManifestError(f"{where}: shard {rel} has no valid count; rerun prep")
    return p


_COLUMNS = {"label": "int64", "targets": "uint8", "mask": "uint8", "patient_id": None, "age": "int16",
            "image_index": None, "view": None, "sex": None, "findings": None}


_STRINGS = ("image_index", "view", "sex", "findings")
_OPTIONAL = ("mask", "findings")  # absent: every label known, no findings text (readers default them)


def check_shard(h, entry: dict, manifest: dict, path) -> None:
    """An open shard (``h5py.File``, opened by :func:`open_shard_read`, which checked its structure)
    against its manifest entry, before any data is read: no dataset but the shard's, every one present,
    of the right dtype and shape, images (count, S, S) uint8 in (1, S, S) chunks with the Fletcher-32
    filter (so a damaged chunk fails when read). ``ManifestError`` naming the shard and the fix
    otherwise; a lying header is caught here, before anything is allocated."""
    n, S = int(entry["count"]), int(manifest["image_size"])
    problems = []
    extra = sorted(set(h) - {"images", *_COLUMNS})
    if extra:
        problems.append(f"unexpected dataset {extra[0]}")
    if "images" not in h:
        problems.append("no images dataset")
    else:
        im = h["images"]
        if im.dtype.str != "|u1" or im.shape != (n, S, S):
            problems.append(f"images are {im.dtype} {im.shape}, the manifest says uint8 ({n}, {S}, {S})")
        elif n and im.chunks != (1, S, S):
            problems.append(f"images are chunked {im.chunks}, expected (1, {S}, {S})")
        elif n and not im.fletcher32:
            problems.append("images carry no Fletcher-32 checksums (an older shard format)")
    for name, dtype in _COLUMNS.items():
        if name not in h:
            if name not in _OPTIONAL:
                problems.append(f"no {name} dataset")
            continue
        ds = h[name]
        rows = len(ds.shape) == (2 if name in ("targets", "mask") else 1) and ds.shape[0] == n
        if not rows or (dtype and ds.dtype.name != dtype):
            problems.append(f"{name} is {ds.dtype} {ds.shape}, expected {n} rows" + (f" of {dtype}" if dtype else ""))
        elif name in ("targets", "mask") and ds.shape[1] > 1000:
            problems.append(f"targets are {ds.shape}, expected ({n}, classes)")
        elif name in _STRINGS and h5py_string(ds) is None:
            problems.append(f"{name} is {ds.dtype}, expected strings")
        elif name == "patient_id" and h5py_string(ds) is None and ds.dtype.kind not in "iu":
            problems.append(f"patient_id is {ds.dtype}, expected strings or integers")
    if problems:
        raise ManifestError(f"shard {path} does not match the manifest: {problems[0]}; {FIX}")


def h5py_string(ds):
    import h5py

    return h5py.check_string_dtype(ds.dtype)


_LOCKING_KW: bool | None = None  # h5py/HDF5 take locking=False (None: not tried yet)


def open_shard_read(path):
    """:func:`_open_read`, then the file's structure checked (``data_prep.h5check.walk``: no external
    storage, virtual datasets or links, no dataset larger than the file can hold) before anything is
    read; ``ManifestError`` naming the shard and the dataset otherwise."""
    h = _open_read(path)
    try:
        h5check.walk(h, f"shard {path}", error=ManifestError, fix=FIX)
    except BaseException:
        h.close()
        raise
    return h


def _open_read(path):
    """``h5py.File(path, "r")`` without HDF5's file locking: every read-only open of a shard goes
    through here. HDF5 (1.10+) locks a file it opens, and on a shared file system without working
    locks (Lustre mounted noflock, NFS without lockd) that open fails (``unable to lock file``,
    ENOSYS/ENOLCK); shards are never written once the manifest exists, so readers need no lock.
    ``locking=False`` where h5py and HDF5 support it (h5py 3.5+ with HDF5 1.12.1+ or 1.10.7+),
    else ``HDF5_USE_FILE_LOCKING=FALSE`` in the environment for the one open. Writes keep locking."""
    import h5py  # here only: load_manifest is plain JSON, for processes that must not load numpy yet

    global _LOCKING_KW
    if _LOCKING_KW is not False:
        try:
            h = h5py.File(path, "r", locking=False)
            _LOCKING_KW = True
            return h
        except (TypeError, ValueError):  # h5py without the keyword, or HDF5 without the property
            if _LOCKING_KW:
                raise
            _LOCKING_KW = False
    before = os.environ.get("HDF5_USE_FILE_LOCKING")
    os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"  # read by HDF5 at every open
    try:
        return h5py.File(path, "r")
    finally:
        if before is None:
            os.environ.pop("HDF5_USE_FILE_LOCKING", None)
        else:
            os.environ["HDF5_USE_FILE_LOCKING"] = before


def damaged(path, e: BaseException) -> ManifestError:
    """The one line for a shard whose data cannot be read (a Fletcher-32 mismatch, a cut file)."""
    why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    return ManifestError(f"shard {path} is damaged ({why}); {FIX}")


def shard_paths(prep_out, split: str, manifest: dict | None = None) -> list[Path]:
    """Absolute paths of one split's shards, in manifest order."""
    m = manifest or load_manifest(prep_out)
    return [Path(prep_out) / sh["file"] for sh in m["splits"][split]["shards"]]


def verify_manifest(prep_out, files=None) -> dict:
    """Recompute every shard's sha256, Fletcher-32 checksums and count (and label counts, image size,
    config hash) against the manifest; ``files``: only these shard files (one rank's share, the split
    totals then not compared). Returns a summary; raises ``ManifestError`` listing every mismatch."""
    prep_out = Path(prep_out)
    m = load_manifest(prep_out)
    problems, n_shards, n_images = [], 0, 0
    every = [sh["file"] for name in SPLITS for sh in m["splits"][name]["shards"]]
    mine = set(every if files is None else files)
    partial = mine != set(every)
    for name in SPLITS:
        s = m["splits"][name]
        total, lc, broken = 0, {}, False
        for sh in s["shards"]:
            p = prep_out / sh["file"]
            if sh["file"] not in mine:
                continue
            n_shards += 1
            if sha256_file(p) != sh["sha256"]:
                problems.append(f"{sh['file']}: sha256 differs from the manifest")
            try:
                with open_shard_read(p) as h:
                    check_shard(h, sh, m, sh["file"])
                    for ds in h.values():  # every chunk read: Fletcher-32 checked
                        for i in range(0, max(1, ds.shape[0] if ds.shape else 1), 256):
                            ds[i:i + 256] if ds.shape else ds[()]
            except (OSError, ManifestError) as e:
                problems.append(f"{sh['file']}: {str(e).splitlines()[0][:200]}")
                broken = True
                continue
            with open_shard_read(p) as h:
                n = h["images"].shape[0]
                if n != sh["count"]:
                    problems.append(f"{sh['file']}: {n} images, manifest says {sh['count']}")
                for ds in ("label", "targets", "mask", "image_index", "patient_id", "findings", "view", "age", "sex"):
                    if (ds not in h and ds not in _OPTIONAL) or (ds in h and h[ds].shape[0] != n):
                        problems.append(f"{sh['file']}: dataset {ds} missing or of the wrong length")
                if h["images"].shape[1:] != (m["image_size"], m["image_size"]):
                    problems.append(f"{sh['file']}: images are {h['images'].shape[1:]}, "
                                    f"manifest says {m['image_size']}")
                hh = h.attrs.get("config_hash")
                hh = hh.decode() if isinstance(hh, bytes) else hh
                if hh != m["config_hash"]:
                    problems.append(f"{sh['file']}: config hash {hh}, manifest {m['config_hash']}")
                for k, v in json.loads(h.attrs["label_counts"]).items():
                    lc[k] = lc.get(k, 0) + v
            total += n
        n_images += total
        if partial or broken:
            continue  # a share of the shards: the split totals are not this rank's to compare
        if total != s["count"]:
            problems.append(f"{name}: shards hold {total} images, manifest says {s['count']}")
        if s["shards"] and lc != s["label_counts"]:
            problems.append(f"{name}: label counts {lc}, manifest says {s['label_counts']}")
    if problems:
        raise ManifestError(f"{prep_out}: {len(problems)} problem(s): " + "; ".join(problems))
    return {"shards": n_shards, "images": n_images, "ok": True}


def conversion_counts(converted: list[dict]) -> dict[str, int]:
    """{kind: entries} of a manifest's ``converted`` list (kinds of ``data_prep.imaging.conversions``)."""
    out: dict[str, int] = {}
    for c in converted:
        kind = c.get("kind", "mode")
        out[kind] = out.get(kind, 0) + 1
    from data_prep.imaging import CONVERSION_KINDS  # here: reading a manifest needs neither numpy nor PIL

    order = {k: i for i, k in enumerate(CONVERSION_KINDS)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))
