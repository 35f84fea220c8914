"""The run directory: the name of every file training and evaluation keep there, the training state
(``checkpoints/state.json``), the history (``history.csv``) and batch record (``batches.csv``): read,
appended, cut back on a resume; and which model file an evaluation reads.

Pure Python (pathlib, csv, json, math): ``launch`` imports it without TensorFlow. Other modules
spell no run-directory file name; they join ``run_dir / rundir.NAME``. What each file holds is in
docs/results-guide.md.

Training (``distributed.checkpoints``, ``distributed.trainer``) writes ``history.csv`` and
``checkpoints/``: ``last.keras`` every epoch, ``best.keras`` at the best val_loss of all phases,
``best-finetune.keras`` at the best of the fine-tune phase, ``state.json`` (:class:`RunState`) after
them, and ``step-<epoch>-<step>/`` inside an epoch; at the end ``model.keras`` and ``saved_model/``.
:func:`select_checkpoint` is the one rule for which of them ``eval.checkpoint`` means.

Which run a run directory holds: ``run.json`` records its definition.

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

import csv
import json
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_prep import config as cfgmod
from data_prep.cli import UsageError, UserError
from data_prep.fsutil import atomic_write_json, atomic_write_text
from data_prep.textsafe import csv_row

# training
CHECKPOINTS = "checkpoints"
STATE_FILE, LAST_FILE, BEST_FILE = "state.json", "last.keras", "best.keras"  # also inside a step checkpoint
OPTIMIZER_FILE = "last-optimizer.npz"  # the optimizer's slots beside last.keras (and in a step checkpoint)
PHASE_BEST_FILE = "best-finetune.keras"
STATE = f"{CHECKPOINTS}/{STATE_FILE}"
LAST = f"{CHECKPOINTS}/{LAST_FILE}"
BEST = f"{CHECKPOINTS}/{BEST_FILE}"
PHASE_BEST = f"{CHECKPOINTS}/{PHASE_BEST_FILE}"  # the best val_loss of the fine-tune phase (the article's)
STEP_PREFIX = "step-"
STEP_GLOB = "step-[0-9]*-[0-9]*"  # checkpoints/step-<epoch>-<step>/: a checkpoint inside an epoch
FINAL = "model.keras"
SAVED_MODEL = "saved_model"
HISTORY = "history.csv"
BATCHES = "batches.csv"
CONFIG = "config.yaml"
RUN_JSON = "run.json"
TRAINING_PREP = "training_prep.json"  # the prep it trained on (distributed.provenance)
TRAINED_LAYERS = "trained_layers.json"  # per phase: frozen and trained layers, parameters
TB = "tb"
TRACKING = "tracking.json"  # the MLflow run training and evaluation log into (distributed.tracking)
# evaluation
EVAL_CONFIG = "eval_config.yaml"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
VAL_PREDICTIONS = "val_predictions.csv"
CALIBRATION = "calibration.json"
OPERATING_POINT = "operating_point.json"
DECISION_CURVE = "decision_curve.csv"
REPORT = "report.md"
PLOTS = "plots"
GRADCAM = "gradcam"

MODEL_FILES = {"best": BEST, "last": LAST, "final": FINAL}  # eval.checkpoint -> file
HISTORY_COLUMNS = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "lr",
                   "seconds", "images_per_s", "ranks")
BATCH_COLUMNS = ("phase", "epoch", "step", "rank", "indices_sha1")  # batches.csv (train.record_batches)
_LOCKS = (".cxr-lock",)  # data_prep.locks' files (.cxr-lock, .cxr-lock.excl, its claims) stay where they are


class RunMismatch(UsageError, RuntimeError):
    """The run directory (or the prepared data) belongs to another definition of the run."""


class RunDirError(UserError, RuntimeError):
    """A run directory without the file asked for: one line naming what it has, exit code 1."""


@dataclass
class RunState:
    """What ``checkpoints/state.json`` records; enough to resume exactly."""
    phase: str = "warmup"          # phase of the last completed epoch (or the next one to run)
    phase_epoch: int = 0           # epochs completed in ``phase``
    epoch: int = 0                 # epochs completed in the whole run (the history's rows)
    best_val_loss: float = math.inf
    best_epoch: int = 0
    early_stopping: dict = field(default_factory=lambda: {"best": math.inf, "wait": 0, "stopped": False})
    complete: bool = False
    size: int = 1
    writer_rank: int = 0
    precision: str = "float32"     # compute precision of the epochs so far (runtime.precision)
    phase_best: dict = field(default_factory=dict)  # {phase: {"epoch", "val_loss"}}: best.keras of a phase
    step: int = 0                  # steps done in epoch ``epoch + 1`` (a step checkpoint; 0 at an epoch's end)

    def to_json(self) -> dict:
        d = asdict(self)
        d["best_val_loss"] = _num(d["best_val_loss"])
        d["early_stopping"] = {**d["early_stopping"], "best": _num(d["early_stopping"]["best"])}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RunState":
        d = dict(d)
        d["best_val_loss"] = _unnum(d.get("best_val_loss"))
        es = dict(d.get("early_stopping") or {})
        es["best"] = _unnum(es.get("best"))
        es.setdefault("wait", 0)
        es.setdefault("stopped", False)
        d["early_stopping"] = es
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def _unnum(x):
    return math.inf if x is None else float(x)


def read_state(run_dir) -> RunState | None:
    """``checkpoints/state.json`` of ``run_dir``; None when there is none."""
    p = Path(run_dir) / STATE
    if not p.is_file():
        return None
    return RunState.from_json(json.loads(p.read_text()))


def read_history(path) -> list[dict]:
    """The rows of a ``history.csv`` (column -> text); [] when the file does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_history(path, row: dict) -> None:
    """Rank 0, at an epoch's end: ``row``'s values under ``history.csv``'s columns, flushed to disk."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    columns = HISTORY_COLUMNS
    if not new:  # a history begun by an older version keeps its columns
        with open(path, newline="") as f:
            columns = tuple(next(csv.reader(f), HISTORY_COLUMNS))
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(columns)
        w.writerow(csv_row([_fmt(row.get(k)) for k in columns]))  # numbers stay numbers (data_prep.textsafe)
        f.flush()
        os.fsync(f.fileno())


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):  # float, numpy floats
        return "nan" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return str(v)


def truncate_history(path, epochs: int) -> int:
    """Keep the header and the first ``epochs`` rows (a resumed run drops uncommitted rows)."""
    path = Path(path)
    rows = read_history(path)
    if len(rows) <= epochs:
        return len(rows)
    lines = [",".join(HISTORY_COLUMNS)] + [",".join(r.get(k, "") or "" for k in HISTORY_COLUMNS) for r in rows[:epochs]]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return epochs


def append_batches(path, rows) -> None:
    """Rank 0, after a step: every rank's ``batches.csv`` row (``train.record_batches``)."""
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(BATCH_COLUMNS)
        w.writerows(csv_row(r) for r in rows)  # text cells neutralised for spreadsheets (data_prep.textsafe)


def truncate_batches(path, epochs: int, step: int) -> None:
    """Keep the rows of steps a checkpoint covers (epochs 1..``epochs`` and ``step`` steps of the next)."""
    path = Path(path)
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if int(r["epoch"]) <= epochs or (int(r["epoch"]) == epochs + 1 and int(r["step"]) <= step)]
    if len(keep) != len(rows):
        atomic_write_text(path, ",".join(BATCH_COLUMNS) + "\n" +
                          "".join(",".join(r[k] for k in BATCH_COLUMNS) + "\n" for r in keep))


def record_phase_layers(run_dir, phase: str, summary: dict) -> Path:
    """Add ``phase``'s :func:`distributed.model.trainable_summary` to ``trained_layers.json``."""
    path = Path(run_dir) / TRAINED_LAYERS
    return atomic_write_json(path, {**(read_trained_layers(run_dir) or {}), phase: summary})


def read_trained_layers(run_dir) -> dict | None:
    """``{phase: summary}`` of the phases trained in ``run_dir``; None for a run without the record."""
    try:
        doc = json.loads((Path(run_dir) / TRAINED_LAYERS).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def holds_run(run_dir) -> bool:
    """Whether ``run_dir`` holds (part of) a trained run: its history, final model or checkpoints."""
    run = Path(run_dir)
    ckpt = run / CHECKPOINTS
    return (run / HISTORY).exists() or (run / FINAL).exists() or (ckpt.is_dir() and any(ckpt.iterdir()))


def run_folder_of(model_path) -> Path:
    """The run directory a model file belongs to (the folder above ``checkpoints/`` for a checkpoint)."""
    model_path = Path(model_path)
    return model_path.parent.parent if model_path.parent.name == CHECKPOINTS else model_path.parent


def model_in(run_dir) -> Path | None:
    """The model a run directory offers for prediction: ``model.keras``, else the best, else the last checkpoint."""
    for rel in (FINAL, BEST, LAST):
        if (Path(run_dir) / rel).is_file():
            return Path(run_dir) / rel
    return None


def _history_rows(run_dir: Path) -> list[dict]:
    try:
        rows = read_history(run_dir / HISTORY)
    except OSError:
        return []
    out = []
    for r in rows:
        try:
            vl = float(r.get("val_loss"))
        except (TypeError, ValueError):
            vl = float("nan")
        out.append({"phase": r.get("phase"), "epoch": int(float(r.get("epoch") or 0)), "val_loss": vl})
    return out


def _best_row(rows: list[dict], phase: str | None = None) -> dict | None:
    """The first row with the lowest finite val_loss (of ``phase``), as the trainer's strict '<' keeps it."""
    cand = [r for r in rows if (phase is None or r["phase"] == phase) and math.isfinite(r["val_loss"])]
    return min(cand, key=lambda r: r["val_loss"]) if cand else None


def checkpoint_path(run_dir, which: str) -> Path:
    """The model file ``eval.checkpoint`` names in ``run_dir`` (best, last or final)."""
    run_dir = Path(run_dir)
    if which not in MODEL_FILES:
        raise RunDirError(f"eval.checkpoint: {which!r} is not one of {', '.join(MODEL_FILES)}")
    p = run_dir / MODEL_FILES[which]
    if not p.exists():
        have = [k for k, v in MODEL_FILES.items() if (run_dir / v).exists()]
        hint = (f"; this run has: {', '.join(have)} (--set eval.checkpoint={have[0]})" if have
                else "; train first (python -m distributed.train --config ...)")
        raise RunDirError(f"eval.checkpoint={which}: {p} does not exist{hint}")
    return p


def evaluated_file(run_dir, which: str, phase: str = "finetune") -> Path:
    """The model file ``eval.checkpoint`` (+ ``eval.checkpoint_phase``) names, without reading the history."""
    run_dir = Path(run_dir)
    if which == "best" and phase == "finetune" and (run_dir / PHASE_BEST).is_file():
        return run_dir / PHASE_BEST
    return run_dir / MODEL_FILES[which]


def select_checkpoint(run_dir, which: str, phase: str = "finetune") -> tuple[Path, dict]:
    """The model file ``eval.checkpoint`` (+ ``eval.checkpoint_phase``) names, and which epoch it
    holds, from ``history.csv``: ``{file, rule, phase, epoch, val_loss}`` (``note`` on a fallback).

    best + finetune: ``checkpoints/best-finetune.keras``, the best val_loss of the fine-tune phase (the
    article); best + any: ``checkpoints/best.keras`` over both phases; last: the last epoch; final:
    ``model.keras``, which the trainer makes from the fine-tune best when there is one."""
    run_dir = Path(run_dir)
    rows = _history_rows(run_dir)
    has_ft = (run_dir / PHASE_BEST).is_file()
    note = None
    if which == "best" and phase == "finetune" and has_ft:
        path, row, rule = run_dir / PHASE_BEST, _best_row(rows, "finetune"), "best val_loss of the fine-tune phase"
    elif which == "best":
        path, row, rule = checkpoint_path(run_dir, "best"), _best_row(rows), "best val_loss of all phases"
        if phase == "finetune":
            note = (f"no {PHASE_BEST} in {run_dir} (trained before it existed, or no fine-tune epoch): "
                    f"evaluated {BEST}, the best of all phases")
    elif which == "last":
        path, row, rule = checkpoint_path(run_dir, "last"), (rows[-1] if rows else None), "last epoch"
    else:
        path = checkpoint_path(run_dir, which)
        row = _best_row(rows, "finetune") if has_ft else _best_row(rows)
        rule = "final model: the best val_loss of the fine-tune phase" if has_ft else \
            "final model: the best val_loss of all phases"
    info = {"file": MODEL_FILES.get(which) if path.name != PHASE_BEST_FILE else PHASE_BEST, "rule": rule,
            "phase": row["phase"] if row else None, "epoch": row["epoch"] if row else None,
            "val_loss": row["val_loss"] if row and math.isfinite(row["val_loss"]) else None}
    if note:
        info["note"] = note
    if row is None:
        info["note"] = (note + "; " if note else "") + f"no {HISTORY} rows: epoch unknown"
    return path, info


# --------------------------------------------------------------------------- the run's definition: run.json

SHOWN = 6  # differing keys named in the message


def recorded_definition(run_dir) -> dict | None:
    """The definition recorded in ``run_dir``: ``run.json``'s, else from the ``config.yaml`` training
    saved there (runs older than ``run.json``); None when neither can be read."""
    run = Path(run_dir)
    try:
        data = json.loads((run / RUN_JSON).read_text())
        if isinstance(data, dict) and isinstance(data.get("definition"), dict):
            return data["definition"]
    except (OSError, ValueError):
        pass
    try:
        return cfgmod.run_definition(cfgmod.load_config(run / CONFIG))
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
    atomic_write_json(run / RUN_JSON, {"run_hash": cfgmod.run_hash(cfg), "definition": cfgmod.run_definition(cfg),
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
