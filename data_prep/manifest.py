"""Reading and checking ``<prep.out>/manifest.json`` (written last by the prep stage)."""
from __future__ import annotations

import json
from pathlib import Path

from data_prep.cli import UserError
from data_prep.config import SHARD_FORMAT
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
        raise ManifestError(f"{path}: format {m['format']}, this code reads format {FORMAT}; rerun prep")
    for name in SPLITS:
        if name not in m["splits"]:
            raise ManifestError(f"{path}: no split {name!r}")
        for sh in m["splits"][name]["shards"]:
            if not (prep_out / sh["file"]).is_file():
                raise ManifestError(f"{path}: shard {sh['file']} is missing in {prep_out}")
    return m


def shard_paths(prep_out, split: str, manifest: dict | None = None) -> list[Path]:
    """Absolute paths of one split's shards, in manifest order."""
    m = manifest or load_manifest(prep_out)
    return [Path(prep_out) / sh["file"] for sh in m["splits"][split]["shards"]]


def verify_manifest(prep_out) -> dict:
    """Recompute every shard's sha256 and count (and label counts, image size, config hash)
    against the manifest. Returns a summary; raises ``ManifestError`` listing every mismatch."""
    import h5py  # here only: load_manifest is plain JSON, for processes that must not load numpy yet

    prep_out = Path(prep_out)
    m = load_manifest(prep_out)
    problems, n_shards, n_images = [], 0, 0
    for name in SPLITS:
        s = m["splits"][name]
        total, lc = 0, {}
        for sh in s["shards"]:
            p = prep_out / sh["file"]
            n_shards += 1
            if sha256_file(p) != sh["sha256"]:
                problems.append(f"{sh['file']}: sha256 differs from the manifest")
            with h5py.File(p, "r") as h:
                n = h["images"].shape[0]
                if n != sh["count"]:
                    problems.append(f"{sh['file']}: {n} images, manifest says {sh['count']}")
                for ds in ("label", "targets", "image_index", "patient_id", "view", "age", "sex"):
                    if ds not in h or h[ds].shape[0] != n:
                        problems.append(f"{sh['file']}: dataset {ds} missing or of the wrong length")
                if h["images"].shape[1:] != (m["image_size"], m["image_size"]):
                    problems.append(f"{sh['file']}: images are {h['images'].shape[1:]}, manifest says {m['image_size']}")
                hh = h.attrs.get("config_hash")
                hh = hh.decode() if isinstance(hh, bytes) else hh
                if hh != m["config_hash"]:
                    problems.append(f"{sh['file']}: config hash {hh}, manifest {m['config_hash']}")
                for k, v in json.loads(h.attrs["label_counts"]).items():
                    lc[k] = lc.get(k, 0) + v
            total += n
        if total != s["count"]:
            problems.append(f"{name}: shards hold {total} images, manifest says {s['count']}")
        if s["shards"] and lc != s["label_counts"]:
            problems.append(f"{name}: label counts {lc}, manifest says {s['label_counts']}")
        n_images += total
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
