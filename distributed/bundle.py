"""An exported model bundle's ``model.json``: its schema, written by :mod:`distributed.export`, read here.

A bundle is input from someone else. :func:`read_bundle` reads ``model.json`` as JSON (bounded in size),
refuses another ``format`` or ``format_version`` in one line, checks every field ``cxr-predict`` uses
(types, ranges, the file names inside the bundle) and that ``model.keras`` has the sha256 listed. Nothing
in the bundle runs: ``cxr-predict --model BUNDLE`` loads ``model.keras`` as data (:mod:`distributed.safeload`)
and never loads the SavedModel, whose graph is for servers.

No TensorFlow here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from data_prep.cli import UserError
from data_prep.fsutil import sha256_file
from distributed import rundir

__all__ = ["FORMAT", "FORMAT_VERSION", "BundleError", "Bundle", "is_bundle", "read_bundle", "MODEL_JSON"]

FORMAT = "cxr-transfer-bundle"
FORMAT_VERSION = 1
MODEL_JSON = "model.json"
MODEL_FILE = rundir.FINAL  # the run's model file, copied under the same name
MAX_JSON_BYTES = 1 << 20  # a model.json is ~5 KB


class BundleError(UserError):
    """A bundle whose model.json is missing, of another format, or out of range: one line, exit code 1."""


def is_bundle(path) -> bool:
    """``path`` is a folder holding a ``model.json`` (a bundle, valid or not)."""
    p = Path(path)
    return p.is_dir() and (p / MODEL_JSON).is_file()


def _num(doc: dict, key: str, where: str, lo: float | None = None, hi: float | None = None,
         open_lo: bool = False) -> float:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BundleError(f"{where}.{key}: expected a finite number, got {v!r}")
    if lo is not None and (v < lo or (open_lo and v == lo)):
        raise BundleError(f"{where}.{key}: {v!r} out of range")
    if hi is not None and v > hi:
        raise BundleError(f"{where}.{key}: {v!r} out of range")
    return float(v)


def _str(doc: dict, key: str, where: str, choices=None) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or not v or len(v) > 200:
        raise BundleError(f"{where}.{key}: expected a short string, got {type(v).__name__}")
    if choices is not None and v not in choices:
        raise BundleError(f"{where}.{key}: {v!r} is not one of {', '.join(choices)}")
    return v


def _obj(doc: dict, key: str, where: str, optional: bool = False) -> dict | None:
    v = doc.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, dict):
        raise BundleError(f"{where}.{key}: expected an object")
    return v


@dataclass(frozen=True)
class Bundle:
    """What ``cxr-predict`` takes from a bundle (fields checked by :func:`read_bundle`)."""
    folder: Path
    model_file: Path
    sha256: str
    classes: tuple[str, ...]
    positive_class: str
    image_size: int
    threshold: float
    threshold_on: str           # "raw_probability" (a validated operating point) or "probability"
    rule: str | None
    chosen_on: str | None
    calibration: dict | None    # {"temperature", "shift", "center", ...} when the run's calibration applies
    doc: dict


def read_bundle(path) -> Bundle:
    """The bundle at ``path``, checked (module doc); :class:`BundleError` for anything wrong."""
    folder = Path(path)
    f = folder / MODEL_JSON
    if f.stat().st_size > MAX_JSON_BYTES:
        raise BundleError(f"{f}: larger than {MAX_JSON_BYTES} bytes, not a model.json")
    try:
        doc = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{f}: not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise BundleError(f"{f}: not a JSON object")
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{f}: format {doc.get('format')!r} version {doc.get('format_version')!r} is not "
                          f"{FORMAT!r} version {FORMAT_VERSION}; this cxr-predict reads only that")
    w = "model.json"
    task = _str(doc, "task", w, ("binary",))
    classes = doc.get("classes")
    if not (isinstance(classes, list) and len(classes) == 2 and all(isinstance(c, str) and 0 < len(c) <= 200
                                                                    for c in classes) and classes[0] != classes[1]):
        raise BundleError(f"{w}.classes: expected two different class names")
    positive = _str(doc, "positive_class", w, classes)
    if positive != classes[1]:
        raise BundleError(f"{w}.positive_class: {positive!r} is not the second class")
    inp = _obj(doc, "input", w)
    size = inp.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise BundleError(f"{w}.input.image_size: expected an integer in [1, 4096], got {size!r}")
    dec = _obj(doc, "decision", w)
    threshold = _num(dec, "threshold", f"{w}.decision", 0.0, 1.0)
    on = _str(dec, "applied_to", f"{w}.decision", ("raw_probability", "probability"))
    rule = dec.get("rule") if isinstance(dec.get("rule"), str) else None
    chosen_on = dec.get("chosen_on") if isinstance(dec.get("chosen_on"), str) else None
    cal = _obj(doc, "calibration", w, optional=True)
    calibration = None
    if cal is not None and cal.get("applied"):
        wc = f"{w}.calibration"
        calibration = {"temperature": _num(cal, "temperature", wc, 0.0, None, open_lo=True),
                       "shift": _num(cal, "shift", wc), "center": _num(cal, "center", wc),
                       "method": cal.get("method") if isinstance(cal.get("method"), str) else None,
                       "prior_correction": bool(cal.get("prior_correction")),
                       "target_prevalence": (_num(cal, "target_prevalence", wc, 0.0, 1.0)
                                             if cal.get("target_prevalence") is not None else None)}
    files = _obj(doc, "files", w)
    digest = files.get(MODEL_FILE)
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise BundleError(f"{w}.files: no sha256 for {MODEL_FILE}")
    model_file = folder / MODEL_FILE
    if not model_file.is_file():
        raise BundleError(f"{folder}: no {MODEL_FILE} in the bundle")
    if sha256_file(model_file) != digest:
        raise BundleError(f"{model_file}: sha256 differs from the one model.json lists; the bundle was changed")
    del task
    return Bundle(folder, model_file, digest, tuple(classes), positive, size, threshold, on, rule, chosen_on,
                  calibration, doc)
