"""Which prepared data a run trained on, and which patients an evaluation shares with it.

When training ends, rank 0 records in ``run.dir/training_prep.json`` (``distributed.train``) the
identity of the prep folder the run trained on: the sha256 of its ``manifest.json``, the manifest's
config hash and the ``prep.seed`` the shards were made with (from the manifest, not from the command's
config), and per split the sorted patient ids, their count and their sha256.

``cxr-eval`` compares the prep it reads with that record (:func:`check`):

* the same manifest: the run's own evaluation, written into ``run.dir``;
* a run folder with neither the record nor a readable ``config.yaml`` (copied checkpoints): evaluated
  in place, the overlap reported as not checked;
* another prep: an **external evaluation**. Its evaluated patients (test and validation splits) are
  compared with the model's training patients; any overlap stops the evaluation with one line
  naming the counts, unless ``eval.allow_overlap: true``, which reports it in the report's header and
  ``metrics.json``. It writes into ``eval.out`` (default ``run.dir/eval-<prep hash>``), never over the
  run's own report.

Every leakage sentence of ``report.md`` is computed from these patient sets (:func:`shared`), never
a constant. No TensorFlow: h5py reads the ``patient_id`` column of each shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from data_prep.cli import UserError
from data_prep.fsutil import atomic_write_json, sha256_file
from data_prep.manifest import load_manifest, open_shard_read, shard_paths
from distributed import rundir

RECORD = rundir.TRAINING_PREP
SPLITS = ("train", "val", "test")


class LeakageError(UserError):
    """An evaluation whose patients the model trained on: one line, exit code 1."""


def patient_ids(prep_out, split: str, manifest: dict) -> np.ndarray:
    """The distinct patient ids (str) of ``split`` (read from the shards' ``patient_id`` column), sorted by
    number when all are numbers (NIH's), else as strings."""
    ids = []
    for path in shard_paths(prep_out, split, manifest):
        with open_shard_read(path) as h:
            ids += [x.decode() if isinstance(x, bytes) else str(x) for x in h["patient_id"][:].tolist()]
    return _ordered(set(ids))


def _ordered(ids) -> np.ndarray:
    ids = sorted(str(i) for i in ids)
    if ids and all(i.isdigit() for i in ids):
        ids = sorted(ids, key=int)
    return np.asarray(ids, dtype=object)


def ids_digest(ids) -> str:
    return hashlib.sha256(",".join(str(int(i)) if str(i).isdigit() else str(i)
                                   for i in _ordered(np.asarray(ids).tolist())).encode()).hexdigest()


def identity(prep_out, manifest: dict | None = None, splits=SPLITS) -> dict:
    """The prep folder's identity and its patient ids per split (``ids``: sorted lists)."""
    prep_out = Path(prep_out)
    manifest = manifest if manifest is not None else load_manifest(prep_out)
    out = {"prep_out": str(prep_out), "manifest_sha256": sha256_file(prep_out / "manifest.json"),
           "config_hash": manifest.get("config_hash"),
           "prep_seed": ((manifest.get("config") or {}).get("prep") or {}).get("seed"),
           "created": manifest.get("created"), "splits": {}}
    for s in splits:
        if s not in (manifest.get("splits") or {}):
            continue
        ids = patient_ids(prep_out, s, manifest)
        out["splits"][s] = {"patients": int(len(ids)), "patients_sha256": ids_digest(ids), "ids": ids.tolist()}
    return out


def summary(ident: dict | None) -> dict | None:
    """``identity`` without the id lists (for metrics.json and the report)."""
    if ident is None:
        return None
    return {**{k: v for k, v in ident.items() if k != "splits"},
            "splits": {s: {k: v for k, v in d.items() if k != "ids"} for s, d in ident.get("splits", {}).items()}}


def prep_tag(ident: dict) -> str:
    """A short name of a prep for a folder name: its config hash, else its manifest's sha256."""
    return str(ident.get("config_hash") or ident["manifest_sha256"])[:12]


def record_training(run_dir, prep_out) -> Path:
    """``run.dir/training_prep.json`` (0600, patient ids): the prep this run trained on."""
    return atomic_write_json(Path(run_dir) / RECORD, {"format": 1, **identity(prep_out, splits=("train", "val"))})


def read_record(run_dir) -> dict | None:
    f = Path(run_dir) / RECORD
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or "train" not in (doc.get("splits") or {}):
        return None
    return doc


def _ids(ident: dict | None, split: str) -> set:
    return set(((ident or {}).get("splits") or {}).get(split, {}).get("ids") or [])


def shared(trained: dict | None, current: dict) -> dict:
    """Patients in two splits: the model's training patients against the evaluated prep's validation and
    test patients, and validation against test; with the size of each set."""
    tr, va, te = _ids(trained, "train"), _ids(current, "val"), _ids(current, "test")
    return {"patients": {"train": len(tr), "val": len(va), "test": len(te)},
            "train_val": len(tr & va), "train_test": len(tr & te), "val_test": len(va & te)}


def _run_config_prep(run_dir: Path) -> str | None:
    """``prep.out`` of the run's own config.yaml (what a run trained before the record existed read)."""
    from data_prep.config import ConfigError, load_config

    try:
        return load_config(run_dir / rundir.CONFIG).prep.out
    except (ConfigError, OSError):
        return None


def check(cfg, run_dir, manifest: dict | None = None) -> dict:
    """Compare the prep ``cfg.prep.out`` with what the run trained on; ``{"evaluation": "internal" |
    "external", "trained_on", "evaluated_on", "shared", "out_dir", "note"}``. An external evaluation whose
    patients overlap the training patients raises :class:`LeakageError` unless ``eval.allow_overlap``."""
    run_dir = Path(run_dir)
    current = identity(cfg.prep.out, manifest)
    trained, note = read_record(run_dir), None
    if trained is None:
        own = _run_config_prep(run_dir)
        same_folder = own is not None and os.path.realpath(own) == os.path.realpath(cfg.prep.out)
        if same_folder:
            trained = current
            note = (f"{run_dir} records no training prep ({RECORD}: trained before it existed); its config.yaml "
                    f"names this prep.out, taken as the prep it trained on")
        elif own is not None and (Path(own) / "manifest.json").is_file():
            trained = identity(own, splits=("train", "val"))
            note = f"{run_dir} records no training prep ({RECORD}); its config.yaml's prep.out {own} was read instead"
    internal = trained is not None and trained["manifest_sha256"] == current["manifest_sha256"]
    out = {"evaluation": "internal" if internal else "external", "trained_on": summary(trained),
           "evaluated_on": summary(current), "note": note, "allow_overlap": bool(cfg.eval.allow_overlap)}
    if trained is None:  # a run folder without its record or config.yaml (copied checkpoints): nothing to compare
        out.update(evaluation="unverified", shared=None,
                   note=f"{run_dir} records no training prep ({RECORD}) and has no readable config.yaml: which "
                        "patients the model trained on is unknown, the overlap is not checked (the report says so)")
    else:
        out["shared"] = shared(trained, current)
    sh = out["shared"]
    if not internal and sh and (sh["train_test"] or sh["train_val"]) and not cfg.eval.allow_overlap:
        raise LeakageError(
            f"{cfg.prep.out} is not the prep {run_dir} trained on (manifest {current['manifest_sha256'][:12]}, "
            f"prep.seed {current['prep_seed']}; trained on {trained['manifest_sha256'][:12]}, prep.seed "
            f"{trained['prep_seed']}): {sh['train_test']} of its {sh['patients']['test']} test patients and "
            f"{sh['train_val']} of its {sh['patients']['val']} validation patients were in the model's training "
            "split; refused (eval.allow_overlap: true evaluates anyway and reports the overlap)")
    if internal or trained is None:
        out["out_dir"] = str(Path(cfg.eval.out) if cfg.eval.out else run_dir)
    else:
        out["out_dir"] = str(Path(cfg.eval.out) if cfg.eval.out else run_dir / f"eval-{prep_tag(current)}")
    return out


def leakage_sentence(prov: dict | None) -> str:
    """The report's sentence on patients in two splits, from the sets :func:`shared` counted."""
    sh = (prov or {}).get("shared")
    if not sh:
        return ("Patients in two splits: **not checked** (which patients the model trained on is not recorded in the "
                "run folder).")
    n = sh["patients"]
    counts = (f"{n['train']} training patients of the model, {n['val']} validation and {n['test']} test patients"
              + (" of another prep (external evaluation)" if prov.get("evaluation") == "external" else ""))
    if not (sh["train_val"] or sh["train_test"] or sh["val_test"]):
        return f"No patient is in two splits (checked on the patient ids: {counts})."
    parts = [f"{sh['train_test']} test patient(s) and {sh['train_val']} validation patient(s) were in the model's "
             f"training split"] + ([f"{sh['val_test']} patient(s) are in both validation and test"]
                                   if sh["val_test"] else [])
    return "**Patients in two splits**: " + "; ".join(parts) + f" ({counts}): the results are optimistic."
