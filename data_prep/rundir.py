"""Which run a run directory holds: ``run.json`` records the definition of the run trained there.

The definition is :func:`data_prep.config.run_definition`: the keys of ``data``, ``prep`` (not where or
how prep runs), ``model`` and ``train`` (not how training runs or how long: epochs and patience may
grow on a resume) with their values; ``run_hash`` their hash. Rank 0 of training, holding the folder's
lock (``data_prep.locks``) and before it writes anything there (:func:`prepare`):

* a folder that holds a run (``history.csv``, ``model.keras`` or checkpoints) of another definition
  is refused, with ``--resume`` or without, in one line listing the keys that differ; the recorded
  definition is ``run.json``'s, or for runs older than it the ``config.yaml`` training saved there;
* ``--restart`` moves whatever the folder holds (but the lock) into ``<run.dir>.replaced-<time>``
  beside it, so the new run starts in an empty folder and nothing of the two runs is mixed;
* then ``run.json`` is written for this run.

``launch pipeline`` / ``launch train`` stop before starting anything the same way
(:func:`mismatch`, from ``launch.pipeline.check_inputs``). :func:`check_prep` compares the
prepared data's manifest with the config (task, classes, image size): training on a ``prep.out``
made for another label or size stops naming the key. Nothing here imports TensorFlow or numpy (``launch`` uses it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from data_prep import config as cfgmod
from data_prep.cli import UsageError
from data_prep.fsutil import atomic_write_json

RECORD = "run.json"
_LOCKS = (".cxr-lock",)  # data_prep.locks' files (.cxr-lock, .cxr-lock.excl, its claims) stay where they are
SHOWN = 6  # differing keys named in the message


class RunMismatch(UsageError, RuntimeError):
    """The run directory (or the prepared data) belongs to another definition of the run."""


def holds_run(run_dir) -> bool:
    """``run_dir`` holds (part of) a trained run: a history, a final model or checkpoints."""
    run = Path(run_dir)
    ckpt = run / "checkpoints"
    return (run / "history.csv").exists() or (run / "model.keras").exists() or \
        (ckpt.is_dir() and any(ckpt.iterdir()))


def recorded_definition(run_dir) -> dict | None:
    """The definition recorded in ``run_dir``: ``run.json``'s, else from the ``config.yaml`` training
    saved there (runs older than ``run.json``); None when neither can be read."""
    run = Path(run_dir)
    try:
        data = json.loads((run / RECORD).read_text())
        if isinstance(data, dict) and isinstance(data.get("definition"), dict):
            return data["definition"]
    except (OSError, ValueError):
        pass
    try:
        return cfgmod.run_definition(cfgmod.load_config(run / "config.yaml"))
    except (OSError, ValueError, cfgmod.ConfigError):
        return None


def _show(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def differences(recorded: dict, cfg) -> list[str]:
    """``key old -> new`` for every key of the definition whose recorded value differs from ``cfg``'s
    (a key the record lacks, added to the project since, counts with its default)."""
    now, default = cfgmod.run_definition(cfg), cfgmod.run_definition(cfgmod.Config())
    out = []
    for key, value in now.items():
        old = recorded.get(key, default.get(key))
        if old != value and not (isinstance(old, (int, float)) and isinstance(value, (int, float))
                                 and not isinstance(old, bool) and float(old) == float(value)):
            out.append(f"{key} {_show(old)} -> {_show(value)}")
    return out


def mismatch(cfg) -> list[str]:
    """The differing keys when ``cfg.run.dir`` holds a run of another definition, else []."""
    run = Path(cfg.run.dir)
    if not holds_run(run):
        return []
    recorded = recorded_definition(run)
    return differences(recorded, cfg) if recorded is not None else []


def listing(diff: list[str]) -> str:
    more = f"; and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    return "; ".join(diff[:SHOWN]) + more


def prepare(cfg, restart: bool = False) -> Path | None:
    """Rank 0, holding the folder's lock, before writing there: refuse a folder of another run
    (RunMismatch listing the keys), or with ``restart`` move what it holds aside (returns where to);
    then record this run's definition."""
    run = Path(cfg.run.dir)
    moved = None
    if restart:
        moved = move_aside(run)
    else:
        diff = mismatch(cfg)
        if diff:
            raise RunMismatch(f"{run} holds a run of another definition ({listing(diff)}); start over there with "
                              f"--restart (the old run is moved aside, not mixed), or set another run.dir")
    atomic_write_json(run / RECORD, {"run_hash": cfgmod.run_hash(cfg), "definition": cfgmod.run_definition(cfg),
                                     "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return moved


def move_aside(run_dir) -> Path | None:
    """Move every entry of ``run_dir`` but its lock into a new sibling ``<name>.replaced-<time>``;
    None when there was nothing to move."""
    run = Path(run_dir)
    entries = [e for e in sorted(os.listdir(run)) if not e.startswith(_LOCKS)] if run.is_dir() else []
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for k in range(1, 1000):
        aside = run.parent / (f"{run.name}.replaced-{stamp}" + ("" if k == 1 else f"-{k}"))
        try:
            os.mkdir(aside, 0o755)
            break
        except FileExistsError:
            continue
    else:
        raise RunMismatch(f"--restart: cannot make a folder beside {run} to move the old run into")
    for e in entries:
        os.rename(run / e, aside / e)  # the same file system: a rename, nothing copied
    return aside


def check_prep(cfg, manifest: dict, prep_out) -> None:
    """The prepared data must be what the config asks for: task, classes (positive label, negatives)
    and image size (the shard format is checked when the manifest is read). RunMismatch naming the key."""
    d = cfg.data
    where = f"prep.out {prep_out} was prepared for"
    fix = "; rerun prep for this config (`python -m data_prep --config ...`) or point prep.out at data prepared for it"
    if manifest.get("task") != d.task:
        raise RunMismatch(f"{where} data.task {manifest.get('task')!r}, the config says {d.task!r}{fix}")
    size = manifest.get("image_size")
    if size != d.image_size:
        raise RunMismatch(f"{where} data.image_size {size!r}, the config says {d.image_size}{fix}")
    classes = manifest.get("classes")
    if d.task == "binary" and isinstance(classes, list) and len(classes) == 2:
        if classes[1] != d.positive_label:
            raise RunMismatch(f"{where} data.positive_label {classes[1]!r}, the config says {d.positive_label!r}{fix}")
        negative = "No Finding" if d.negative_rule == "no_finding" else f"Not {d.positive_label}"
        if classes[0] != negative:
            raise RunMismatch(f"{where} negatives {classes[0]!r} (data.negative_rule), the config says "
                              f"{d.negative_rule!r}{fix}")
