"""Evaluate a trained run on the test split: ``cxr-eval`` / ``python -m distributed.evaluate``.

    python -m distributed.evaluate --config C [--set eval.tta_rounds=3 ...]
    horovodrun -np 4 python -m distributed.evaluate --config C      # or mpirun -np 4 ...

Alone or under a launcher: the test split is divided over the ranks
(``distributed.data.shard_indices``: rank r takes images r, r+size, ...), every rank predicts
its share (and its test-time-augmented copies), and rank 0 gathers the (global index,
probability) pairs, checks that every test image came back exactly once, and writes into
``run.dir``:

* ``predictions.csv``: one row per test image, in split order (image, patient, view, sex, age,
  label, probability, tta_probability; per finding for multi-label runs);
* ``val_predictions.csv``: the same for the validation split, predicted the same way: the operating
  point (``eval.operating_point``) and the calibration (``eval.calibrate``, ``eval.prior_correction``)
  are fitted on it and applied to the test split, never fitted on the test set;
* ``metrics.json``: every number (plain, the primary result, and TTA) with patient-bootstrap
  intervals (BCa), the operating point, calibration, ``tta_minus_plain`` (paired bootstrap and DeLong's
  test clustered by patient),
  ``selected_checkpoint`` (phase, epoch, val_loss) and the console tables: a ``distributed.results.EvalResult``
  (its keys: docs/metrics-reference.md);
* ``calibration.json`` (with ``eval.calibrate``/``eval.prior_correction``): the probability transform
  that ``cxr-predict`` applies to the model files it lists;
* ``plots/``: ROC with the patient-bootstrap band, precision-recall, reliability diagram, confusion matrix,
  decision curve, training curves (per-finding ROC for multi-label runs);
* ``decision_curve.csv`` (binary): net benefit of the model, treat-all and treat-none at threshold
  probabilities 0.01-0.99 (``distributed.decision``), from the test probabilities as written;
* ``gradcam/``: Grad-CAM grids of the most confident true positives, false positives and
  false negatives;
* ``report.md`` and ``eval_config.yaml``;
* ``operating_point.json`` (binary): the threshold chosen on validation with the sha256 of the model
  files it belongs to, which ``cxr-predict`` decides with.

Every probability is written with ``%.9g`` (the float32 round trip) and every number is computed from
the values as written (``metrics.as_written``): the CSVs alone reproduce ``metrics.json`` exactly.

The prep read is compared with the one the run trained on (``distributed.provenance``): another prep
is an external evaluation, refused when its patients overlap the training patients (unless
``eval.allow_overlap``), and written into ``eval.out`` (default ``run.dir/eval-<prep hash>``) instead
of the run directory.

Test-time augmentation draws ``eval.tta_rounds`` transforms per image with the training
augmentation (``distributed.data.augment_images``, ``train.augment``) from a stateless seed of
(train.seed, round, global image index): the result does not depend on the number of ranks or
the batch size. The TTA probability is the mean of 1 + ``eval.tta_rounds`` predictions: the plain
image's and the augmented copies' (``distributed.report.TTA_NOTE``, in report.md): the plain image
is kept among them so that the average stays anchored to the prediction the primary result reports.

This module is imported before TensorFlow: :func:`main` sets the rank's threads first
(``distributed.runtime.apply``), so the modules that import TensorFlow (``distributed.data``,
``distributed.model``, ``distributed.gradcam``) are imported inside the functions that use them.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from data_prep import flow as fl
from data_prep import locks
from data_prep.cli import command, note_output
from data_prep.config import ConfigError, add_config_args, config_from_args, dump_yaml, save_resolved
from data_prep.fsutil import atomic_write_json, atomic_write_text, sha256_file
from data_prep.log import get_logger
from data_prep.manifest import load_manifest
from data_prep.textsafe import console, csv_row
from distributed import decision, hvd, labelpolicy, plots, provenance, results, runtime, tracking
from distributed import metrics as M
from distributed import rundir as R
from distributed.metrics import format_auc_line, format_auc_table, format_class_table, format_side_by_side
from distributed.report import resample_warning, write_report
from distributed.results import BinaryResult, EvalResult, MultilabelResult, OperatingPoint
from distributed.rundir import RunDirError, checkpoint_path, select_checkpoint  # noqa: F401 - evaluate's names

_SEED_MIX = 1_000_003
STALE_OUTPUTS = tuple(f"plots/{n}.png" for n in ("roc", "pr", "calibration", "confusion", "history",
                                                                  "roc_per_finding", "decision_curve")) + \
    tuple(f"gradcam/{n}.png" for n in ("true_positives", "false_positives", "false_negatives")) + \
    (R.OPERATING_POINT, R.DECISION_CURVE)


EvalError = RunDirError  # a problem with the run directory or the data that the user has to fix


def _clean_float(x):
    return float(x) if x is not None and np.isfinite(x) else None


def check_operating_point(rule: str) -> None:
    """``eval.operating_point`` parses, else a one-line config error (exit code 2)."""
    try:
        M.parse_operating_point(rule)
    except ValueError as e:
        raise ConfigError(f"eval.operating_point: {e}") from None


# --------------------------------------------------------------------------- prediction (every rank)

class Predictor:
    """Plain and test-time-augmented class probabilities for batches of uint8 images."""

    def __init__(self, model, augment=None, tta_rounds: int = 0, seed: int = 0):
        import tensorflow as tf  # after runtime.apply (module docstring)

        from distributed.data import augment_images  # imports TensorFlow: after runtime.apply

        self.model = model
        self.rounds = int(tta_rounds) if augment is not None else 0
        self.seed = int(seed)

        @tf.function(reduce_retracing=True)
        def plain(x):
            return model(x, training=False)

        @tf.function(reduce_retracing=True)
        def augmented(x, seeds):
            # one transform per image from its own stateless seed: independent of batch and rank
            xa = tf.map_fn(lambda a: augment_images(a[0], augment, seed=a[1]), (x, seeds),
                           fn_output_signature=tf.TensorSpec(x.shape[1:], tf.float32))
            return model(xa, training=False)

        self._plain, self._augmented = plain, augmented

    def seeds(self, gidx: np.ndarray, r: int) -> np.ndarray:
        s = np.empty((len(gidx), 2), np.int64)
        s[:, 0] = self.seed * _SEED_MIX + r
        s[:, 1] = gidx
        return s

    def __call__(self, images: np.ndarray, gidx: np.ndarray):
        x = images.astype(np.float32)[..., None]
        p = self._plain(x).numpy()
        if not self.rounds:
            return p, None
        acc = p.astype(np.float64)  # the plain image is one of the TTA predictions (module docstring)
        for r in range(self.rounds):
            acc += self._augmented(x, self.seeds(gidx, r)).numpy()
        return p, (acc / (self.rounds + 1)).astype(np.float32)


def predict_indices(predictor: Predictor, data, indices: np.ndarray, batch_size: int, log=None):
    """Probabilities (n, K) (and TTA (n, K) or None) for ``indices`` of ``data``, in that order."""
    out, out_t = [], []
    t0, last = time.time(), time.time()
    for b in range(0, len(indices), batch_size):
        sel = indices[b:b + batch_size]
        p, pt = predictor(data.read(sel), sel)
        out.append(p)
        if pt is not None:
            out_t.append(pt)
        if log is not None and time.time() - last > 30:
            last = time.time()
            log.info("predicted %d/%d images of this rank (%.1f img/s)", b + len(sel), len(indices),
                     (b + len(sel)) / (time.time() - t0))
    k = predictor.model.output_shape[-1]
    probs = np.concatenate(out) if out else np.zeros((0, k), np.float32)
    tta = (np.concatenate(out_t) if out_t else np.zeros((0, k), np.float32)) if predictor.rounds else None
    return probs.astype(np.float32), (tta.astype(np.float32) if tta is not None else None)


def gather_predictions(indices, probs, tta, n: int, split: str = "test"):
    """All ranks' (index, probabilities) in split order; checks each image came back once."""
    gidx = hvd.allgather(np.asarray(indices, np.int64), name=f"eval_index_{split}")
    gp = hvd.allgather(np.asarray(probs, np.float32), name=f"eval_probs_{split}")
    gt = hvd.allgather(np.asarray(tta, np.float32), name=f"eval_tta_{split}") if tta is not None else None
    order = np.argsort(gidx, kind="stable")
    if len(gidx) != n or not np.array_equal(gidx[order], np.arange(n)):
        counts = np.bincount(gidx, minlength=n) if len(gidx) else np.zeros(n, int)
        raise EvalError(f"gathered {len(gidx)} predictions for {n} {split} images: "
                        f"{int((counts == 0).sum())} missing, {int((counts > 1).sum())} duplicated")
    return gp[order], (gt[order] if gt is not None else None)


# --------------------------------------------------------------------------- rank 0: outputs

def _col(name: str) -> str:
    return name.replace(" ", "_")


def predictions_csv(meta: dict, classes, multilabel: bool, probs, tta, targets=None, findings=None,
                    calibrated=None) -> str:
    """One row per image in split order. Binary: ``findings`` (the CSV's Finding Labels, when the CSV
    was readable) and ``calibrated_probability`` (``eval.calibrate``/``eval.prior_correction``)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    base = ["index", "image", "patient", "view", "sex", "age", "label"]
    if multilabel:
        head = base + [f"label_{_col(c)}" for c in classes] + [f"probability_{_col(c)}" for c in classes]
        if tta is not None:
            head += [f"tta_probability_{_col(c)}" for c in classes]
    else:
        head = base + (["findings"] if findings is not None else []) + ["probability"] + \
            (["tta_probability"] if tta is not None else []) + \
            (["calibrated_probability"] if calibrated is not None else [])
    w.writerow(csv_row(head))
    for i in range(len(probs)):
        row = [i, meta["image_index"][i], str(meta["patient_id"][i]), meta["view"][i], meta["sex"][i],
               int(meta["age"][i])]
        if multilabel:
            t = targets[i]
            row.append("|".join(c for c, v in zip(classes, t) if v) or "No Finding")
            row += [int(v) for v in t] + [f"{v:.9g}" for v in probs[i]]
            if tta is not None:
                row += [f"{v:.9g}" for v in tta[i]]
        else:
            row.append(int(meta["label"][i]))
            if findings is not None:
                row.append(findings[i])
            row.append(f"{probs[i, 1]:.9g}")
            if tta is not None:
                row.append(f"{tta[i, 1]:.9g}")
            if calibrated is not None:
                row.append(f"{calibrated[i]:.9g}")
        w.writerow(csv_row(row))  # text cells (image, view, sex, findings) neutralised for spreadsheets
    return buf.getvalue()


def _rel(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
    except ValueError:
        return str(path)


def gradcam_groups(y, p, threshold: float, k: int) -> dict:
    """Indices of the ``k`` most confident true positives, false positives, false negatives."""
    y, p = np.asarray(y), np.asarray(p)
    pos = p >= threshold
    tp = np.flatnonzero((y == 1) & pos)
    fp = np.flatnonzero((y == 0) & pos)
    fn = np.flatnonzero((y == 1) & ~pos)
    return {"true_positives": tp[np.argsort(-p[tp], kind="stable")][:k],
            "false_positives": fp[np.argsort(-p[fp], kind="stable")][:k],
            "false_negatives": fn[np.argsort(p[fn], kind="stable")][:k]}


def make_gradcam(run_dir: Path, model, data, meta, classes, multilabel, Y, P, threshold, per_group,
                 log) -> tuple[dict, str]:
    from distributed.gradcam import GradCAM, overlay, save_grid  # imports TensorFlow: after runtime.apply

    cam = GradCAM(model)
    out = {}
    if multilabel:  # (image, finding) pairs, the CAM of that finding
        flat_y, flat_p = np.asarray(Y).ravel(), np.asarray(P).ravel()
        groups = gradcam_groups(flat_y, flat_p, threshold, per_group)
        groups = {g: [(int(f // P.shape[1]), int(f % P.shape[1])) for f in v] for g, v in groups.items()}
    else:
        groups = {g: [(int(i), 1) for i in v] for g, v in gradcam_groups(Y, P[:, 1], threshold, per_group).items()}
    titles = {"true_positives": "Most confident true positives", "false_positives": "Most confident false positives",
              "false_negatives": "Most confident false negatives"}
    for g, pairs in groups.items():
        if not pairs:
            log.info("Grad-CAM: no %s", g.replace("_", " "))
            continue
        idx = np.array([i for i, _ in pairs])
        cls = np.array([c for _, c in pairs])
        imgs = data.read(idx)
        heats = cam(imgs, cls)
        tiles = [overlay(im, h) for im, h in zip(imgs, heats)]
        caps = []
        for (i, c) in pairs:
            name = f"{classes[c]} " if multilabel else ""
            caps.append(f"{meta['image_index'][i]} {meta['view'][i]}\n{name}p={P[i, c]:.3f}")
        label = classes[1] if not multilabel else "finding"
        rel = f"gradcam/{g}.png"
        save_grid(run_dir / rel, tiles, caps, title=f"{titles[g]} ({label}, threshold {threshold:g}, "
                                                       f"layer {cam.layer_name})")
        out[g] = rel
    return out, cam.layer_name


def console_text(result: EvalResult) -> str:
    """The tables printed on the console (and kept in metrics.json ``console``)."""
    plain, tta = result.plain, result.tta
    lines = [f"Test split: {result.n} images, {plain.patients} patients; model {console(result.model)} "
             f"({result.checkpoint}); {result.ranks} rank(s)", ""]
    prov = result.provenance
    if prov is not None and prov.evaluation in ("external", "unverified"):
        sh, ev = prov.shared, prov.evaluated_on
        lines[-1:] = [f"{prov.evaluation.capitalize()} evaluation on {console(ev.prep_out)} (prep.seed "
                      f"{ev.prep_seed}): " + (f"{sh.train_test} of {sh.patients['test']} test and "
                                              f"{sh.train_val} of {sh.patients['val']} validation "
                                              "patients were in the model's training split" if sh else
                                              "overlap with the training patients not checked"), ""]
    # the text tables of distributed.metrics read the JSON form
    pj, tj = plain.to_json(), (tta.to_json() if tta is not None else None)
    if result.task == "binary":
        left = format_class_table(pj["report"], title="without test-time augmentation")
        if tta:
            right = format_class_table(tj["report"], title="with test-time augmentation "
                                       f"(plain + {result.tta_rounds} augmented)")
            lines.append(format_side_by_side(left, right))
        else:
            lines.append(left)
        lines += ["", "plain: " + format_auc_line(pj)]
        if tta:
            lines.append("TTA:   " + format_auc_line(tj))
        for g, vals in (plain.subgroups or {}).items():
            parts = []
            for k, v in vals.items():
                t = (tta.subgroups or {})[g][k] if tta and g in (tta.subgroups or {}) and k in tta.subgroups[g] \
                    else None
                a = f"{v.auc:.3f}" if v.auc is not None else "n/a (one class)"
                if t is not None and t.auc is not None:
                    a += f" (TTA {t.auc:.3f})"
                parts.append(f"{console(k)} {a}, n={v.n}")
            lines.append(f"AUC by {g}: " + "; ".join(parts))
    else:
        lines.append(format_auc_table(pj, tj))
        lines += ["", format_class_table(pj["report"], title=f"per finding at threshold {plain.threshold:g}")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command

@dataclass(frozen=True)
class Gathered:
    """What rank 0 holds once every rank's predictions are gathered: the input of the outputs."""
    model: object                 # the Keras model (Grad-CAM)
    model_path: Path
    manifest: dict
    data: object                  # distributed.data.SplitData of the test split, open
    probs: np.ndarray             # (n, K) in split order
    tta: np.ndarray | None        # (n, K) with test-time augmentation, or None
    val: object                   # SplitData of the validation split (open), or None when it is empty
    val_probs: np.ndarray | None  # (n_val, K): the operating point and calibration are fitted on these
    val_tta: np.ndarray | None
    checkpoint: dict              # select_checkpoint's {file, rule, phase, epoch, val_loss}
    tta_rounds: int
    ranks: int
    predict_seconds: np.ndarray   # per rank
    started: float                # time.time() when the evaluation began
    out_dir: Path = None          # where the outputs go: run.dir, or eval.out / run.dir/eval-<prep> (external)
    provenance: dict = None       # distributed.provenance.check: internal or external, patients shared


def evaluate(cfg, precision: str = "float32") -> EvalResult | None:
    """Run the evaluation described by ``cfg``; returns the metrics on rank 0, None elsewhere.
    Thread settings (``distributed.runtime.apply``) must be in place before TensorFlow starts.
    ``precision``: the compute precision the model is converted to (``runtime.configure_precision``);
    probabilities are float32 either way."""
    from distributed.data import SplitData, shard_indices  # imports TensorFlow: after runtime.apply

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    run_dir = Path(cfg.run.dir)
    check_operating_point(cfg.eval.operating_point)
    # the prep read against the one the run trained on (every rank: the same files, the same answer);
    # an external evaluation with patients the model trained on stops here, before any output
    prov = provenance.check(cfg, run_dir)
    out_dir = Path(prov.pop("out_dir"))
    if rank == 0:  # one writer per run directory: not while a training or evaluation writes there (data_prep.locks)
        locks.acquire(run_dir, "evaluation")
        if not _inside(out_dir, run_dir):
            locks.acquire(out_dir, "evaluation")
    log = get_logger(logfile=str(out_dir / "eval.log") if rank == 0 else None)
    log.info("%s: one writer by %s", run_dir, locks.kind(run_dir))  # rank 0 holds it, the others log no INFO
    if prov["evaluation"] == "external":
        sh = prov.get("shared") or {}
        log.warning("external evaluation: %s is not the prep %s trained on; %s; outputs in %s", cfg.prep.out, run_dir,
                    f"{sh.get('train_test')} test and {sh.get('train_val')} validation patients shared with the "
                    "training split" if sh else "overlap not checked", out_dir)
    if prov.get("note"):
        log.warning("%s", prov["note"])
    t_start = time.time()
    model_path, ckpt, manifest, data, model = _load_checked(cfg, run_dir, precision)
    if data.n < size:
        log.warning("%d test images for %d ranks: some ranks predict nothing", data.n, size)
    tta_rounds = cfg.eval.tta_rounds if cfg.eval.tta else 0
    if tta_rounds and not cfg.train.augment.enabled:
        log.warning("train.augment.enabled is false: TTA still uses the train.augment transform ranges")
    log.info("evaluating %s on %d test images over %d rank(s), batch %d per rank, TTA %s, precision %s",
             model_path, data.n, size, cfg.eval.batch_size, f"{tta_rounds} rounds" if tta_rounds else "off",
             precision)

    predictor = Predictor(model, cfg.train.augment if tta_rounds else None, tta_rounds, cfg.train.seed)
    mine = shard_indices(data.n, rank, size)  # Horovod: rank r predicts images r, r+size, ...
    t0 = time.time()
    probs, tta = predict_indices(predictor, data, mine, cfg.eval.batch_size, log)
    # The validation split too, the same way: the operating point and the calibration are chosen on it,
    # never on the test set.
    val = SplitData(cfg.prep.out, "val", manifest=manifest, stage_to=cfg.prep.stage_to) \
        if manifest["splits"].get("val", {}).get("count") else None
    val_mine = shard_indices(val.n, rank, size) if val is not None else None
    val_probs, val_tta = predict_indices(predictor, val, val_mine, cfg.eval.batch_size, log) if val else (None, None)
    t_pred = time.time() - t0
    # Horovod: rank 0 gets every rank's predictions (and their times), in split order.
    probs, tta = gather_predictions(mine, probs, tta, data.n)
    if val is not None:
        val_probs, val_tta = gather_predictions(val_mine, val_probs, val_tta, val.n, split="val")
    secs = hvd.allgather(np.array([t_pred], np.float64), name="eval_seconds")
    if rank != 0:  # Horovod: one writer per file
        data.close()
        if val is not None:
            val.close()
        return None
    log.info("predictions gathered: %d images (slowest rank %.1f s, %.1f img/s overall)", data.n,
             float(secs.max()), data.n * (1 + tta_rounds) / max(float(secs.max()), 1e-9))
    try:
        return _write_outputs(cfg, Gathered(model, model_path, manifest, data, probs, tta, val, val_probs, val_tta,
                                            ckpt, tta_rounds, size, secs, t_start, out_dir, prov), log)
    finally:
        data.close()
        if val is not None:
            val.close()


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def _load_checked(cfg, run_dir: Path, precision: str = "float32"):
    """The model ``eval.checkpoint`` names and the test split, checked against each other:
    (model path, select_checkpoint's info, manifest, open SplitData, model)."""
    from distributed.data import SplitData  # imports TensorFlow: after runtime.apply
    from distributed.model import load_model  # imports TensorFlow: after runtime.apply

    model_path, ckpt = select_checkpoint(run_dir, cfg.eval.checkpoint, cfg.eval.checkpoint_phase)
    manifest = load_manifest(cfg.prep.out)
    data = SplitData(cfg.prep.out, "test", manifest=manifest, stage_to=cfg.prep.stage_to)
    if data.n == 0:
        raise EvalError(f"{cfg.prep.out}: the test split is empty")
    model = load_model(model_path, precision=precision, trust=cfg.eval.trust_model)
    in_size = model.input_shape[1]
    if in_size is not None and in_size != data.image_size:
        raise EvalError(f"{model_path} takes {in_size} px images, "
                        f"the shards in {cfg.prep.out} are {data.image_size} px")
    n_out = int(model.output_shape[-1])
    if n_out != data.num_classes:
        raise EvalError(f"{model_path} has {n_out} outputs, the test split has {data.num_classes} classes")
    return model_path, ckpt, manifest, data, model


def _training_precision(run_dir: Path) -> str:
    """The precision the run trained in, from its checkpoint state ("unknown" for older runs)."""
    try:
        return json.loads((run_dir / R.STATE).read_text()).get("precision", "unknown")
    except (OSError, ValueError):
        return "unknown"


def prevalences(manifest: Mapping) -> dict:
    """Share of positives (binary) per split as prepared, and the natural one: all images of the task
    that prep kept before any cap or balancing (``available`` of every split)."""
    classes = list(manifest.get("classes") or [])
    splits = manifest.get("splits") or {}
    if manifest.get("task") != "binary" or len(classes) != 2:
        return {}
    out = {}
    for name, sp in splits.items():
        lc = sp.get("label_counts") or {}
        tot = sum(int(v) for v in lc.values())
        out[name] = int(lc.get(classes[1], 0)) / tot if tot else None
    def natural(names):
        pos = sum(int((splits[n].get("available") or {}).get(classes[1], 0)) for n in names)
        tot = sum(sum(int(v) for v in (splits[n].get("available") or {}).values()) for n in names)
        return pos / tot if tot else None
    out["natural"] = natural(list(splits))
    out["natural_train_val"] = natural([n for n in splits if n in ("train", "val")])
    return out


def correction_prevalence(prev: Mapping, deployment: float = 0.0) -> tuple[float | None, str]:
    """The target of the prior correction and where it comes from: ``eval.prevalence`` when set, else the
    natural prevalence of the train and validation splits (``natural_train_val``). Never the test labels:
    the pooled ``natural`` includes them and stays descriptive only."""
    if deployment and 0.0 < deployment < 1.0:
        return float(deployment), "eval.prevalence"
    return prev.get("natural_train_val"), "train+val (natural, before caps)"


def evaluated_flow(manifest: Mapping, meta: dict, data) -> dict | None:
    """The manifest's flow of images and patients with the test images evaluated added (``data_prep.flow``);
    None when the prep recorded none."""
    cls = fl.label_classes(meta["label"], data.targets, manifest.get("task"), manifest.get("classes") or [])
    return fl.with_evaluated(manifest.get("flow"), meta["image_index"], meta["patient_id"], cls)


def finding_labels(meta: dict | None) -> list[str] | None:
    """Each image's findings as its shard records them (``|``-joined; 'No Finding' when none), or None."""
    if meta is None or "findings" not in meta:
        return None
    return [str(f) or "No Finding" for f in meta["findings"]]


def co_findings(cfg, findings: list[str] | None, y) -> np.ndarray | None:
    """Per image: does it carry a finding besides ``data.positive_label`` (and 'No Finding')?"""
    if findings is None:
        return None
    pos = cfg.data.positive_label
    return np.array([any(f and f not in (pos, "No Finding") for f in str(x).split("|")) for x in findings])


def calibration_plan(cfg, manifest, y_val, p_val, log) -> dict | None:
    """``eval.calibrate`` and ``eval.prior_correction`` as one transform of the positive-class
    probability, ``metrics.adjust(p, temperature, shift)``, fitted on VALIDATION only; None when both off.

    The temperature scales the log-odds around the training prior, ``center`` = logit(pi_train):
    sigmoid((logit p - logit pi_train) / T + logit pi_target) (``metrics.adjust``), so that T changes the
    spread and not the base rate. The prior shift moves the odds from the training split's class proportions to
    ``eval.prevalence`` or else the natural prevalence of train+val (:func:`correction_prevalence`; never the test
    labels); the temperature is fitted on validation with the validation split's own shift, so it corrects the
    spread and not the base rate."""
    if cfg.eval.calibrate == "none" and not cfg.eval.prior_correction:
        return None
    prev = prevalences(manifest)
    plan = {"method": cfg.eval.calibrate, "prior_correction": bool(cfg.eval.prior_correction), "temperature": 1.0,
            "shift": 0.0, "train_prevalence": prev.get("train"), "target_prevalence": None,
            "fitted_on": "validation", "formula": "sigmoid((logit(p) - center) / temperature + center + shift)",
            "center": float(M.logit(prev["train"])) if prev.get("train") and 0 < prev["train"] < 1 else 0.0}
    if cfg.eval.prior_correction:
        target, source = correction_prevalence(prev, cfg.eval.prevalence)
        if prev.get("train") and target and 0 < prev["train"] < 1 and 0 < target < 1:
            plan["target_prevalence"], plan["target_source"] = target, source
            plan["shift"] = M.prior_shift(prev["train"], target)
        else:
            log.warning("eval.prior_correction: no usable training or train+val prevalence (manifest) or "
                        "eval.prevalence; not applied")
            plan["prior_correction"] = False
    if cfg.eval.calibrate == "temperature":
        if p_val is None or not M.both_classes(y_val):
            log.warning("eval.calibrate: the validation split is empty or has one class: no temperature fitted")
            plan["method"] = "none"
        else:
            val_shift = M.prior_shift(prev["train"], prev["val"]) if plan["prior_correction"] and prev.get("val") \
                and 0 < prev["val"] < 1 else 0.0
            plan["temperature"] = M.fit_temperature(y_val, p_val, shift=val_shift, center=plan["center"])
            plan["validation_shift"] = val_shift
            if M.temperature_at_bound(plan["temperature"]):
                plan["warning"] = (f"eval.calibrate: the temperature {plan['temperature']:.4g} stopped at the search "
                                   f"bound (|log T| = {M.LOG_T_BOUND:g}): the validation split is (nearly) separable "
                                   "or too small, and T is not a fitted optimum")
                log.warning(plan["warning"])
    if plan["method"] == "none" and not plan["prior_correction"]:
        return None
    return plan


def model_files(run_dir: Path, model_path: Path, ckpt: dict) -> dict:
    """{path relative to run.dir: sha256} of the model files an evaluation's outputs belong to: the
    evaluated one, and model.keras too when it holds the same epoch."""
    files = {_rel(model_path, run_dir): sha256_file(model_path)}
    final = run_dir / R.FINAL
    if final.is_file() and final.resolve() != Path(model_path).resolve():
        _, fin = select_checkpoint(run_dir, "final")
        if (fin.get("phase"), fin.get("epoch")) == (ckpt.get("phase"), ckpt.get("epoch")) and ckpt.get("epoch"):
            files[R.FINAL] = sha256_file(final)
    return files


def write_calibration(out_dir: Path, plan: dict | None, files: dict, ckpt: dict) -> None:
    """``calibration.json`` for cxr-predict: the transform, and the sha256 of every model file it belongs
    to (:func:`model_files`). Removed when off."""
    out = out_dir / R.CALIBRATION
    if plan is None:
        out.unlink(missing_ok=True)
        return
    atomic_write_json(out, {**plan, "models": files, "checkpoint": ckpt})


def write_operating_point(out_dir: Path, op: OperatingPoint | None, files: dict, ckpt: dict) -> None:
    """``operating_point.json`` for cxr-predict: the report's threshold (rule, where it was chosen), compared
    with the network's probability as the CSVs hold it, and the model files it belongs to."""
    out = out_dir / R.OPERATING_POINT
    if op is None or op.threshold is None:
        out.unlink(missing_ok=True)
        return
    atomic_write_json(out, {"threshold": op.threshold, "rule": op.rule, "source": op.source,
                            "probability": "raw", "compare": "probability as written (%.9g) >= threshold",
                            "sensitivity": op.sensitivity.value if op.sensitivity is not None else None,
                            "specificity": op.specificity.value if op.specificity is not None else None,
                            "models": files, "checkpoint": ckpt})


def _write_outputs(cfg, g: Gathered, log) -> EvalResult:
    """Rank 0: predictions.csv, val_predictions.csv, metrics, plots, Grad-CAM, metrics.json, report.md,
    eval_config.yaml, calibration.json."""
    run_dir, out_dir, data = Path(cfg.run.dir), g.out_dir, g.data
    multilabel, classes = data.multilabel, data.classes
    # every number from the probabilities as the CSVs hold them (%.9g): the CSVs reproduce them exactly
    g = dataclasses.replace(g, **{k: (M.as_written(getattr(g, k)) if getattr(g, k) is not None else None)
                                  for k in ("probs", "tta", "val_probs", "val_tta")})
    meta = data.metadata()
    vmeta = g.val.metadata() if g.val is not None else None
    findings = vfindings = None
    plan = None
    if not multilabel:
        findings, vfindings = finding_labels(meta), finding_labels(vmeta)  # from the shards, never data.csv
        yv = np.asarray(vmeta["label"]).astype(int) if vmeta is not None else None
        plan = calibration_plan(cfg, g.manifest, yv, g.val_probs[:, 1] if g.val_probs is not None else None, log)
    cal = (lambda P: M.as_written(M.adjust(P[:, 1], plan["temperature"], plan["shift"], plan["center"]))) if plan else \
        (lambda P: None)
    atomic_write_text(out_dir / R.PREDICTIONS,
                      predictions_csv(meta, classes, multilabel, g.probs, g.tta, data.targets if multilabel else None,
                                      findings, cal(g.probs)))
    if g.val is not None:
        atomic_write_text(out_dir / R.VAL_PREDICTIONS,
                          predictions_csv(vmeta, classes, multilabel, g.val_probs, g.val_tta,
                                          g.val.targets if multilabel else None, vfindings, cal(g.val_probs)))
    else:
        (out_dir / R.VAL_PREDICTIONS).unlink(missing_ok=True)
    files = model_files(run_dir, g.model_path, g.checkpoint)
    write_calibration(out_dir, plan, files, g.checkpoint)
    t0 = time.time()
    Y, plain, tta_m, extra = _compute_metrics(cfg, data, meta, g, vmeta, findings, plan, log)
    kind = MultilabelResult if multilabel else BinaryResult
    plain, tta_m = kind.from_json(plain), kind.from_json(tta_m)
    t_metrics = time.time() - t0
    # files of an earlier evaluation that this one would not rewrite are removed first
    for rel in STALE_OUTPUTS:
        (out_dir / rel).unlink(missing_ok=True)
    dcurve = None
    if not multilabel:
        write_operating_point(out_dir, plain.operating_point, files, g.checkpoint)
        dcurve = decision.curve(Y, g.probs[:, 1])
        atomic_write_text(out_dir / R.DECISION_CURVE, decision.curve_csv(dcurve))
    plot_files = _write_plots(cfg, g, Y, plain, tta_m, log, dcurve)
    from distributed.model import precision_of  # imports TensorFlow: after runtime.apply

    cam_files, cam_layer = {}, None
    cam_threshold = getattr(plain.operating_point, "threshold", None) if not multilabel else None
    cam_threshold = cfg.eval.threshold if cam_threshold is None else cam_threshold
    if cfg.eval.gradcam_per_group > 0:
        try:
            cam_files, cam_layer = make_gradcam(out_dir, g.model, data, meta, classes, multilabel, Y, g.probs,
                                                cam_threshold, cfg.eval.gradcam_per_group, log)
        except Exception as e:  # noqa: BLE001
            log.warning("Grad-CAM skipped: %s: %s", type(e).__name__, e)

    from distributed.learning_check import history_chance_warning  # TensorFlow is loaded by now

    # the trainer's not-learning check, again from history.csv: this log and report.md say it too
    learning = None if multilabel else history_chance_warning(R.read_history(run_dir / R.HISTORY), len(classes))
    warnings = [learning] if learning else []
    if g.checkpoint.get("note"):
        warnings.append(g.checkpoint["note"])
    for w in warnings:
        log.warning(w)
    result = EvalResult(
        format=results.FORMAT, task="multilabel" if multilabel else "binary", classes=classes,
        positive_class=None if multilabel else classes[1], model=_rel(g.model_path, run_dir),
        run_dir=str(run_dir), provenance=results.Provenance.from_json(g.provenance),
        checkpoint=cfg.eval.checkpoint, selected_checkpoint=results.SelectedCheckpoint.from_json(g.checkpoint),
        image_size=data.image_size, n=data.n, n_val=g.val.n if g.val is not None else 0, ranks=g.ranks,
        threshold=cfg.eval.threshold, tta_rounds=g.tta_rounds, bootstrap=cfg.eval.bootstrap,
        bootstrap_by="patient", bootstrap_interval="bca", primary="plain",
        seconds=time.time() - g.started,
        timings=results.Timings(predict_per_rank=g.predict_seconds.tolist(), metrics=t_metrics),
        warnings=warnings, split_method=g.manifest.get("split_method", "seeded"),
        trained_layers=results.trained_layers(R.read_trained_layers(run_dir)),  # per phase, as the trainer recorded it
        # the positive class as the prep resolved it (a one-label csv's default: its label column's name)
        task_definition=results.TaskDefinition(task=cfg.data.task,
                                               positive_label=None if multilabel else classes[1],
                                               negative_rule=None if multilabel else cfg.data.negative_rule),
        prevalence=results.Prevalence.from_json({**prevalences(g.manifest), "deployment": cfg.eval.prevalence or None}),
        flow=results.Flow.from_json(evaluated_flow(g.manifest, meta, data)),
        labels=results.Labels.from_json(labelpolicy.summary(g.manifest, data.mask if data.multilabel else None)),
        decision_curve=results.DecisionCurve.from_json(decision.summary(dcurve, float(Y.mean())) if dcurve else None),
        operating_point=plain.operating_point if not multilabel else None,  # of the primary (plain) evaluation
        tta_minus_plain=results.AucDifference.from_json(extra.get("tta_minus_plain")),
        co_findings=results.CoFindings.from_json(extra.get("co_findings")),
        plain=plain, tta=tta_m, plots=plot_files, gradcam=cam_files, gradcam_layer=cam_layer,
        gradcam_threshold=cam_threshold,
        precision=results.PrecisionUsed(evaluation=precision_of(g.model), training=_training_precision(run_dir)))
    short = resample_warning(result)
    if short:  # report.md says it too (report.resample_warning)
        log.warning(short)
    text = console_text(result)
    result = dataclasses.replace(result, console=text)
    results.write(out_dir / R.METRICS, result)
    print(text, flush=True)
    ev = (g.provenance or {}).get("evaluated_on") or {}
    save_resolved(cfg, out_dir, R.EVAL_CONFIG,
                  note=f"prep.out {cfg.prep.out} was made with prep.seed {ev.get('prep_seed')} (its manifest.json, "
                       f"sha256 {str(ev.get('manifest_sha256'))[:12]}); the prep.* values below are this command's "
                       "config, not necessarily the shards'")
    write_report(out_dir, cfg=cfg, manifest=g.manifest, metrics=result, plots=plot_files, gradcam=cam_files,
                 config_yaml=dump_yaml(cfg), console=text)
    log.info("wrote predictions.csv, val_predictions.csv, metrics.json, plots/, gradcam/, report.md in %s (%.1f s)",
             out_dir, time.time() - g.started)
    return result


def _compute_metrics(cfg, data, meta: dict, g: Gathered, vmeta, findings, plan, log):
    """(targets, metrics without TTA, metrics with TTA or None, top-level extras), patient-bootstrapped.
    The operating point of each is chosen on its own validation predictions and applied to test."""
    groups = labelpolicy.bootstrap_groups(meta["patient_id"])
    subgroups = {"view": meta["view"], "sex": meta["sex"]}
    threshold, n_boot, seed = cfg.eval.threshold, cfg.eval.bootstrap, cfg.train.seed
    extra: dict = {}
    if data.multilabel:
        Y = data.targets.astype(int)

        def one(P, _):
            return M.multilabel_metrics(Y, P, class_names=data.classes, threshold=threshold, groups=groups,
                                        n_boot=n_boot, seed=seed, subgroups=subgroups,
                                        mask=data.mask if data.masked else None)
        if g.tta is not None:
            extra["tta_minus_plain"] = M.paired_mean_auc_difference(Y, g.probs, g.tta, groups, n_boot, seed)
        return Y, one(g.probs, None), (one(g.tta, None) if g.tta is not None else None), extra
    Y = np.asarray(meta["label"]).astype(int)
    if not set(np.unique(Y)).issubset({0, 1}):
        raise EvalError(f"binary test labels must be 0/1, found {sorted(set(np.unique(Y)))}")
    yv = np.asarray(vmeta["label"]).astype(int) if vmeta is not None else None
    rule = cfg.eval.operating_point

    def one(P, PV):
        op = operating_spec(rule, yv, PV[:, 1] if PV is not None else None, threshold, log)
        return M.binary_metrics(Y, P[:, 1], class_names=data.classes, threshold=threshold, groups=groups,
                                subgroups=subgroups, n_boot=n_boot, seed=seed, operating=op,
                                prevalence=cfg.eval.prevalence)
    plain = one(g.probs, g.val_probs)
    tta_m = one(g.tta, g.val_tta) if g.tta is not None else None
    if tta_m is not None:
        extra["tta_minus_plain"] = M.paired_auc_difference(Y, g.probs[:, 1], g.tta[:, 1], groups, n_boot, seed)
    if plan is not None:
        pc = M.as_written(M.adjust(g.probs[:, 1], plan["temperature"], plan["shift"], plan["center"]))  # as the CSV
        plain["calibrated"] = {**M.calibration_metrics(Y, pc, groups, n_boot, seed),
                               **{k: plan[k] for k in ("method", "prior_correction", "temperature", "shift",
                                                       "target_prevalence", "center")},
                               "target_source": plan.get("target_source"), "warning": plan.get("warning")}
        if vmeta is not None:
            pv = g.val_probs[:, 1]
            pa = M.as_written(M.adjust(pv, plan["temperature"], plan.get("validation_shift", 0.0), plan["center"]))
            plain["calibrated"]["validation"] = {"before": {"brier": M.brier(yv, pv), "ece": M.ece(yv, pv)},
                                                 "after": {"brier": M.brier(yv, pa), "ece": M.ece(yv, pa)},
                                                 "in_sample": plan["method"] == "temperature"}
    co = co_findings(cfg, findings, Y)
    if co is not None:
        extra["co_findings"] = {
            "positives": int(Y.sum()), "positives_with_co_findings": int((co & (Y == 1)).sum()),
            "auc_with": M.split_auc(Y, g.probs[:, 1], co, groups, n_boot, seed),
            "auc_without": M.split_auc(Y, g.probs[:, 1], ~co, groups, n_boot, seed),
            "negatives_with_findings": int((co & (Y == 0)).sum())}
    return Y, plain, tta_m, extra


def operating_spec(rule: str, y_val, p_val, threshold: float, log) -> dict:
    """The operating point's ``{source, rule, threshold}``: ``fixed:T`` is stated (source ``fixed``, even with a
    validation split); any other rule is chosen on the validation predictions, or without them falls back to
    ``eval.threshold`` and says so."""
    if rule.startswith("fixed:"):
        return {"source": "fixed", "rule": rule, "threshold": M.choose_threshold(rule, None, None)}
    if p_val is not None:
        return {"source": "validation", "rule": rule, "threshold": M.choose_threshold(rule, y_val, p_val)}
    log.warning("no validation split: the operating point is eval.threshold (%g), not %s", threshold, rule)
    return {"source": "eval.threshold (no validation split)", "rule": f"fixed:{threshold:g}",
            "threshold": float(threshold)}


def _write_plots(cfg, g: Gathered, Y, plain: BinaryResult | MultilabelResult, tta_m, log,
                 dcurve: dict | None = None) -> dict:
    """The evaluation's plots under ``plots/``; {name: relative path} of those written. ``dcurve``: the decision
    curve (binary)."""
    run_dir, classes = Path(cfg.run.dir), g.data.classes
    pdir = g.out_dir / R.PLOTS
    plot_files = {}
    try:
        if g.data.multilabel:
            plots.plot_multilabel_roc(pdir / "roc_per_finding.png", plain)
            plot_files["roc_per_finding"] = "plots/roc_per_finding.png"
        else:
            curves = [("plain", plain)] + ([(f"TTA x{g.tta_rounds}", tta_m)] if tta_m else [])
            if plain.curves is not None:
                plots.plot_roc(pdir / "roc.png", curves, title=f"ROC: {classes[1]} vs {classes[0]}")
                plots.plot_pr(pdir / "pr.png", curves, prevalence=float(Y.mean()))
                plot_files.update(roc="plots/roc.png", pr="plots/pr.png")
            rel = [("plain", plain.reliability)] + ([(f"TTA x{g.tta_rounds}", tta_m.reliability)] if tta_m else [])
            if plain.calibrated:
                c = plain.calibrated
                rel.append((f"plain, calibrated (T {c.temperature:.2f}, shift {c.shift:+.2f})", c.reliability))
            plots.plot_calibration(pdir / "calibration.png", rel, title=f"Reliability: {classes[1]} (test)")
            plot_files["calibration"] = "plots/calibration.png"
            plots.plot_confusion(pdir / "confusion.png", plain.confusion_matrix, classes,
                                 title=f"Confusion matrix (threshold {cfg.eval.threshold:g})")
            plot_files["confusion"] = "plots/confusion.png"
            if dcurve:
                plots.plot_decision_curve(pdir / "decision_curve.png", dcurve, float(Y.mean()),
                                          title=f"Decision curve: {classes[1]}")
                plot_files["decision_curve"] = "plots/decision_curve.png"
        if plots.plot_history(pdir / "history.png", run_dir / R.HISTORY, cfg.train.warmup.epochs):
            plot_files["history"] = "plots/history.png"
        else:
            log.warning("no %s: no training curves", run_dir / R.HISTORY)
    except Exception as e:  # noqa: BLE001 - a plot never costs the evaluation
        log.warning("plots incomplete: %s: %s", type(e).__name__, e)
    return plot_files


@command("cxr-eval")  # config errors exit 2, EvalError/ManifestError/missing files 1: one line each
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="cxr-eval", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    note_output(cfg.run.dir)  # a full disk's one line names the run directory (data_prep.cli)
    tracking.require(cfg)  # tracking.backend mlflow without MLflow: one line now, not after the evaluation
    plan = runtime.apply(cfg.runtime)  # this rank's threads: BEFORE TensorFlow starts (module docstring)
    runtime.configure_tensorflow(plan)
    try:
        hvd.init()  # Horovod: rank 0's auto-precision figures are broadcast, one precision for all ranks
        plan = runtime.settle_precision(plan, cfg, share=hvd.broadcast_object, root=hvd.is_root())
        metrics = evaluate(cfg, precision=runtime.configure_precision(plan))
        tracking.log_evaluation(cfg, metrics)  # rank 0, into the training's MLflow run (tracking.backend)
    finally:
        hvd.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
