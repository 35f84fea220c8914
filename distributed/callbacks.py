"""Keras callbacks and run-state bookkeeping of the trainer.

Every rank runs every callback, in the list's order, so that every rank takes the same
decisions (validation metrics are computed from predictions gathered on all ranks, hence are
identical everywhere); only rank 0 touches files. Collectives go through ``distributed.hvd``.
"""
from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_prep import testhooks
from data_prep.fsutil import atomic_write_json, atomic_write_text
from data_prep.log import get_logger
from data_prep.textsafe import csv_row
from distributed import hvd
from distributed import rundir as R
from distributed.rundir import STEP_GLOB, RunState, read_history, read_state  # noqa: F401 - the trainer's names
from distributed.stopping import Signals, Stopped, parse_stop_signals, stop_signals  # noqa: F401 - the trainer's names

HISTORY_COLUMNS = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "lr",
                   "seconds", "images_per_s", "ranks")
BATCH_COLUMNS = ("phase", "epoch", "step", "rank", "indices_sha1")  # batches.csv (train.record_batches)


# --------------------------------------------------------------------------- run state

# RunState, read_state and read_history live in distributed.rundir (the run directory's one owner).


# --------------------------------------------------------------------------- learning rate

@tf.keras.utils.register_keras_serializable(package="cxr")
class WarmupInverseTimeDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = base * (1 + (size - 1) * min(1, step / warmup_steps)) / (1 + decay * step).

    Horovod's learning-rate warm-up (Goyal et al.) from the one-rank rate to ``size`` times it
    over ``warmup_steps``, and Keras 1's ``decay`` (inverse time) on top, both functions of
    ``optimizer.iterations``, so a restored optimizer continues the curve exactly. With
    ``scale=False`` the rate is ``base`` for any number of ranks (no warm-up)."""

    def __init__(self, base_lr, size=1, warmup_steps=0, decay=0.0, scale=True, name=None):
        super().__init__()
        self.base_lr, self.size, self.warmup_steps = float(base_lr), int(size), int(warmup_steps)
        self.decay, self.scale, self.name = float(decay), bool(scale), name

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        factor = tf.constant(float(self.size) if self.scale else 1.0)
        if self.scale and self.warmup_steps > 0 and self.size > 1:
            factor = 1.0 + (self.size - 1.0) * tf.minimum(1.0, step / float(self.warmup_steps))
        return self.base_lr * factor / (1.0 + self.decay * step)

    def get_config(self):
        return {"base_lr": self.base_lr, "size": self.size, "warmup_steps": self.warmup_steps,
                "decay": self.decay, "scale": self.scale, "name": self.name}


# --------------------------------------------------------------------------- metrics

def auc_score(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum statistic (ties averaged); NaN without both classes."""
    y = np.asarray(y).astype(bool).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(p, kind="mergesort")
    sp = p[order]
    ranks = np.empty(len(p), dtype=np.float64)
    _, first, counts = np.unique(sp, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(y: np.ndarray, p: np.ndarray, multilabel: bool) -> dict:
    """loss, accuracy, auc as Keras computes the first two (clipped at 1e-7). Binary softmax:
    AUC of the second class ("positive"); multilabel: mean AUC over classes with both labels."""
    y = np.asarray(y, dtype=np.float64)
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "auc": float("nan")}
    if multilabel:
        w = y >= 0  # -1: a masked label (data.uncertain: ignore, blank), in neither the loss nor the metrics
        loss = float(np.sum(-(y * np.log(p) + (1 - y) * np.log(1 - p)) * w) / max(1, w.sum()))
        acc = float(np.sum(((p > 0.5) == (y > 0.5)) * w) / max(1, w.sum()))
        aucs = [auc_score(y[w[:, k], k], p[w[:, k], k]) for k in range(y.shape[1])]
        aucs = [a for a in aucs if not math.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    else:
        p = p / p.sum(axis=1, keepdims=True)
        loss = float(np.mean(-np.sum(y * np.log(p), axis=1)))
        acc = float(np.mean(np.argmax(p, 1) == np.argmax(y, 1)))
        auc = auc_score(y[:, -1], p[:, -1]) if y.shape[1] >= 2 else float("nan")
    return {"loss": loss, "accuracy": acc, "auc": auc}


def predict_shard(model, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, targets, indices) of this rank's evaluation dataset (with_index=True)."""
    step = getattr(model, "_cxr_predict_step", None)
    if step is None:  # one trace per model (input batch dimension left free)
        step = tf.function(lambda x: model(x, training=False),
                           input_signature=[tf.TensorSpec((None,) + tuple(model.input_shape[1:]), tf.float32)])
        model._cxr_predict_step = step
    ps, ys, ids = [], [], []
    for x, y, i in dataset:
        ps.append(step(x).numpy())
        ys.append(y.numpy())
        ids.append(i.numpy())
    k = model.output_shape[-1]
    cat = lambda a, shape: np.concatenate(a) if a else np.zeros(shape, np.float32)  # noqa: E731
    return cat(ps, (0, k)).astype(np.float32), cat(ys, (0, k)).astype(np.float32), cat(ids, (0,)).astype(np.int64)


def gathered_predictions(model, dataset):
    """Predictions of every rank's share, gathered on every rank and put in split order."""
    p, y, i = predict_shard(model, dataset)
    p, y, i = hvd.allgather(p), hvd.allgather(y), hvd.allgather(i)  # Horovod: whole split everywhere
    order = np.argsort(i, kind="stable")
    return p[order], y[order], i[order]


# --------------------------------------------------------------------------- callbacks

class EpochTimer(tf.keras.callbacks.Callback):
    """``seconds`` (training part of the epoch) and ``images_per_s`` over all ranks (of the steps
    this process ran: a resumed epoch's remaining steps)."""

    def __init__(self, images_per_epoch: int, steps: int = 1):
        super().__init__()
        self.images_per_step = images_per_epoch / max(1, steps)
        self._t = 0.0
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        dt = time.perf_counter() - self._t
        dt = float(hvd.allreduce(np.float64(dt), op="max", name="epoch_seconds"))  # Horovod: slowest rank's time
        if logs is not None:
            logs["seconds"] = dt
            logs["images_per_s"] = self._steps * self.images_per_step / dt if dt > 0 else float("nan")


def batchnorm_statistics(model) -> list:
    """Moving mean/variance of the model's BatchNormalization layers: updated by each rank from
    its own batches, not by gradients, so they drift apart across ranks unless averaged."""
    out = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            out += [layer.moving_mean, layer.moving_variance]
    return out


class AverageBatchNormStatistics(tf.keras.callbacks.Callback):
    """At each epoch end, before validation and checkpoints: BatchNorm moving statistics averaged
    over ranks (one allreduce), so every rank holds the same model (VGG has no BatchNorm)."""

    def on_epoch_end(self, epoch, logs=None):
        vs = batchnorm_statistics(self.model)
        if not vs or hvd.size() == 1:
            return
        flat = np.concatenate([v.numpy().ravel() for v in vs])
        flat = hvd.allreduce(flat, op="average", name="bn_statistics")  # Horovod: one model on all ranks
        i = 0
        for v in vs:
            n = int(np.prod(v.shape))
            v.assign(flat[i:i + n].reshape(v.shape))
            i += n


class LearningRateLogger(tf.keras.callbacks.Callback):
    """``lr``: the learning rate the last step used (schedules evaluated at the step)."""

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        lr = opt.learning_rate if hasattr(opt, "learning_rate") else opt.lr
        if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
            lr = lr(tf.maximum(opt.iterations - 1, 0))
        if logs is not None:
            logs["lr"] = float(tf.keras.backend.get_value(lr))


class Validation(tf.keras.callbacks.Callback):
    """val_loss, val_accuracy, val_auc on the whole validation split, sharded over ranks: each rank
    predicts its share, the predictions are gathered, every rank computes the same numbers."""

    def __init__(self, dataset_fn, multilabel: bool):
        super().__init__()
        self.dataset_fn = dataset_fn
        self.multilabel = multilabel

    def on_epoch_end(self, epoch, logs=None):
        p, y, _ = gathered_predictions(self.model, self.dataset_fn())
        m = classification_metrics(y, p, self.multilabel)
        if logs is not None:
            logs.update({"val_loss": m["loss"], "val_accuracy": m["accuracy"], "val_auc": m["auc"]})


class EarlyStopping(tf.keras.callbacks.Callback):
    """Keras' EarlyStopping on val_loss (min_delta 0), with its state kept in ``RunState`` so a
    resumed run stops where the uninterrupted one would have."""

    def __init__(self, state: RunState, patience: int, active: bool):
        super().__init__()
        self.state, self.patience, self.active = state, patience, active

    def on_epoch_end(self, epoch, logs=None):
        if not self.active:
            return
        es = self.state.early_stopping
        current = (logs or {}).get("val_loss", float("nan"))
        if current is not None and math.isfinite(current) and current < es["best"]:
            es["best"], es["wait"] = float(current), 0
            return
        es["wait"] += 1
        if es["wait"] >= self.patience and epoch > 0:
            es["stopped"] = True
            self.model.stop_training = True
            get_logger().info("early stopping: val_loss did not improve for %d epoch(s) (best %.4f)",
                              es["wait"], es["best"])


class Checkpointer(tf.keras.callbacks.Callback):
    """Updates ``RunState`` on every rank; rank 0 writes, each atomically (temp file, rename):
    ``history.csv`` row, TensorBoard scalars, ``checkpoints/last.keras`` (+ optimizer state),
    ``best.keras`` on a new best val_loss (``best-finetune.keras``: within the fine-tune phase), and
    ``state.json`` LAST, which commits the epoch."""

    def __init__(self, run_dir: Path, state: RunState, phase: str, save_optimizer, tb_writer=None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.ckpt = self.run_dir / R.CHECKPOINTS
        self.state, self.phase = state, phase
        self.save_optimizer = save_optimizer
        self.tb = tb_writer
        self.root = hvd.is_root()
        self.writes = 0

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        s = self.state
        s.phase, s.phase_epoch, s.epoch, s.step = self.phase, epoch + 1, s.epoch + 1, 0
        vl = logs.get("val_loss", float("nan"))
        improved = vl is not None and math.isfinite(vl) and vl < s.best_val_loss
        if improved:
            s.best_val_loss, s.best_epoch = float(vl), s.epoch
        pb = s.phase_best.get(self.phase)  # the fine-tune phase's own best (the article's checkpoint)
        phase_improved = vl is not None and math.isfinite(vl) and (pb is None or vl < pb["val_loss"])
        if phase_improved:
            s.phase_best[self.phase] = {"epoch": s.epoch, "val_loss": float(vl)}
        log = get_logger()
        log.info("epoch %d (%s %d): loss %.4f acc %.4f | val_loss %.4f val_acc %.4f val_auc %.4f | lr %.3g | "
                 "%.1f s, %.1f img/s%s", s.epoch, self.phase, s.phase_epoch, logs.get("loss", float("nan")),
                 logs.get("accuracy", float("nan")), vl, logs.get("val_accuracy", float("nan")),
                 logs.get("val_auc", float("nan")), logs.get("lr", float("nan")), logs.get("seconds", float("nan")),
                 logs.get("images_per_s", float("nan")), " *best*" if improved else "")
        if not self.root:  # Horovod: only rank 0 writes files; the others keep the same state in memory
            return
        append_history(self.run_dir / R.HISTORY, {**logs, "phase": self.phase, "epoch": s.epoch,
                                                      "ranks": hvd.size()})
        if self.tb is not None:
            with self.tb.as_default():
                for k in HISTORY_COLUMNS[2:]:
                    if k in logs and logs[k] is not None:
                        tf.summary.scalar(k, logs[k], step=s.epoch)
            self.tb.flush()
        self.ckpt.mkdir(parents=True, exist_ok=True)
        save_model_atomic(self.model, self.run_dir / R.LAST)
        self.save_optimizer(self.run_dir / R.CHECKPOINTS / R.OPTIMIZER_FILE)
        if improved:
            save_model_atomic(self.model, self.run_dir / R.BEST)
        if phase_improved and self.phase == "finetune":
            save_model_atomic(self.model, self.run_dir / R.PHASE_BEST)
        s.writer_rank = hvd.rank()
        atomic_write_json(self.run_dir / R.STATE, s.to_json())
        for old in self.ckpt.glob(STEP_GLOB):  # step checkpoints of this epoch: behind state.json now
            shutil.rmtree(old, ignore_errors=True)
        self.writes += 1


class Progress(tf.keras.callbacks.Callback):
    """Rank 0's progress through launchers: a log line every ``every_s`` seconds inside an epoch
    (step, loss, images/s over all ranks, the epoch's ETA); the epoch's own line is the Checkpointer's.
    Keras' live bar arrives through ``horovodrun``/``mpirun`` as one long line of fragments, so it is
    kept for a terminal of a process started without a launcher (:func:`progress`)."""

    def __init__(self, phase: str, steps: int, images_per_step: int, every_s: float = 30.0):
        super().__init__()
        self.phase, self.steps, self.images_per_step, self.every_s = phase, steps, images_per_step, every_s
        self._t0 = self._last = 0.0
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = self._last = time.perf_counter()
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        done = batch + 1
        if now - self._last < self.every_s or done >= self.steps:
            return
        self._last = now
        rate = done / (now - self._t0)
        logs = logs or {}
        get_logger().info("%s epoch %d: step %d/%d, loss %.4f, %.1f img/s, epoch ETA %s", self.phase,
                          self._epoch + 1, done, self.steps, logs.get("loss", float("nan")),
                          rate * self.images_per_step, _duration((self.steps - done) / rate))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def progress(phase: str, steps: int, images_per_step: int, root: bool) -> tuple[int, list]:
    """(Keras ``verbose``, extra callbacks) for this rank: the live bar on a terminal without a
    launcher, else :class:`Progress` lines on rank 0, nothing on the other ranks."""
    if not root:
        return 0, []
    launched = any(k in os.environ for k in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"))
    if sys.stdout.isatty() and not launched:  # mpirun gives ranks a pseudo-terminal: not a person's
        return 1, []
    return 0, [Progress(phase, steps, images_per_step)]


# --------------------------------------------------------------------------- is it learning?

CHANCE_MARGIN = 0.05  # a training loss not below (1 - margin) x ln K is "at chance"


def chance_warning(loss: float, num_classes: int, finetune_epochs: int) -> str | None:
    """The not-learning warning when a single-label model's training loss after the warm-up and
    ``finetune_epochs`` fine-tune epochs is not below (1 - CHANCE_MARGIN) x chance (ln K), else None."""
    if num_classes < 2 or loss is None or not math.isfinite(loss):
        return None
    chance = math.log(num_classes)
    if loss < (1 - CHANCE_MARGIN) * chance:
        return None
    return (f"the model is not learning: training loss {loss:.3f} after the warm-up and {finetune_epochs} fine-tune "
            f"epoch(s) is still at chance level (ln {num_classes} = {chance:.3f}; a model that learns is below "
            f"{(1 - CHANCE_MARGIN) * chance:.3f} by now). Likely causes: "
            "random weights without normalisation (model.weights: none on a backbone without batch normalisation, "
            "such as VGG16: use its ImageNet weights, or the tiny backbone), a learning rate too small or too large "
            "(train.warmup.lr, train.finetune.lr), or data without signal (labels, prep output)")


LEARNING_CHECK_EPOCHS = 2  # fine-tune epochs after which the check looks at the training loss


def history_chance_warning(history: list[dict], num_classes: int) -> str | None:
    """:func:`chance_warning` for a run's ``history.csv`` rows (evaluation and report use it)."""
    ft = [r for r in history if r.get("phase") == "finetune"]
    if len(ft) < LEARNING_CHECK_EPOCHS:
        return None
    try:
        loss = float(ft[LEARNING_CHECK_EPOCHS - 1].get("loss"))
    except (TypeError, ValueError):
        return None
    return chance_warning(loss, num_classes, LEARNING_CHECK_EPOCHS)


class LearningCheck(tf.keras.callbacks.Callback):
    """Once, after the warm-up and LEARNING_CHECK_EPOCHS fine-tune epochs: a WARNING on rank 0 when
    the (rank-averaged) training loss is still at chance (:func:`chance_warning`)."""

    def __init__(self, phase: str, num_classes: int, multilabel: bool):
        super().__init__()
        self.active = phase == "finetune" and not multilabel
        self.num_classes = num_classes

    def on_epoch_end(self, epoch, logs=None):
        if not self.active or epoch + 1 != LEARNING_CHECK_EPOCHS:
            return
        msg = chance_warning((logs or {}).get("loss"), self.num_classes, LEARNING_CHECK_EPOCHS)
        if msg and hvd.is_root():  # the loss is averaged over ranks: rank 0 says it once
            get_logger().warning(msg)


class StopHook(tf.keras.callbacks.Callback):
    """The training test hooks (``data_prep.testhooks``: ``CXR_STOP_AFTER``, ``CXR_STEP_SLEEP_S``); in
    the callback list only when one is set."""

    def __init__(self, phase: str):
        super().__init__()
        self.phase = phase
        self.sleep = testhooks.step_sleep_s()
        self.at = testhooks.stop_after(phase)

    def on_train_batch_end(self, batch, logs=None):
        if self.sleep > 0:
            time.sleep(self.sleep)

    def on_epoch_end(self, epoch, logs=None):
        if self.at is not None and epoch + 1 == self.at:
            hvd.barrier()  # Horovod: rank 0 has committed the checkpoint before anyone exits
            get_logger().warning("%s=%s:%d: stopping here as if killed", testhooks.STOP_AFTER, self.phase, self.at)
            for h in get_logger().handlers:
                h.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(testhooks.STOP_EXIT_CODE)


# --------------------------------------------------------------------------- stopping on a signal

class StepControl(tf.keras.callbacks.Callback):
    """After every training step, on every rank: the batch record (``record``: batches.csv), the
    stop flag, and rank 0's periodic step checkpoint.

    Stop: the flag (the first stop signal this rank received, or 0) is allreduced with max, so all
    ranks learn of a signal at the same step and stop after it. Each allreduce waits for Horovod's
    next cycle (``runtime.horovod_cycle_ms``, 50 ms on CPUs), so it runs every step only with
    ``check_s`` 0, else about every ``check_s`` seconds (every N steps, N from the slowest rank's
    step time, which the same allreduce carries: the same N on every rank). Then rank 0 writes a step
    checkpoint (``save_step``), every rank waits for it, one log line, :class:`Stopped`. A signal
    during an epoch's last step stops after that epoch's own checkpoint instead. ``every_s`` > 0:
    rank 0 writes a step checkpoint when that many seconds passed since its last one (no collective:
    the other ranks hold the same weights)."""

    def __init__(self, state: RunState, phase: str, steps: int, signals: Signals, every_s: float, save_step,
                 record: Path | None = None, check_s: float = 0.0):
        super().__init__()
        self.check_s, self.every_n, self.since, self.t_check = float(check_s), 1, 0, time.perf_counter()
        self.state, self.phase, self.steps, self.signals = state, phase, steps, signals
        self.every_s, self.save_step, self.record = float(every_s or 0), save_step, record
        self.record_slots = {} if record is not None else None  # (epoch, step) -> indices_sha1, by the dataset
        self.offset = 0  # steps of the epoch done before this fit (a resumed epoch)
        self.root = hvd.is_root()
        self.pending = 0
        self.last = time.monotonic()
        self.flag_s, self.flags = 0.0, 0

    def on_train_batch_end(self, batch, logs=None):
        s = self.state
        b = self.offset + batch  # 0-based step of epoch s.epoch + 1 just done
        s.step = b + 1
        if self.record_slots is not None:
            row = (self.phase, s.epoch + 1, b + 1, hvd.rank(), self.record_slots.pop((s.epoch, b), ""))
            rows = hvd.allgather_object(row)  # Horovod: rank 0 writes every rank's row
            if self.root:
                append_batches(self.record, rows)
        flag = self._check() if self.since + 1 >= self.every_n else 0
        self.since = 0 if self.since + 1 >= self.every_n else self.since + 1
        if flag and s.step < self.steps:
            self._stop(flag, f"at epoch {s.epoch + 1} step {s.step} of {self.steps}", mid=True)
        elif flag:
            self.pending = flag  # the epoch's end is one step away: its checkpoint is the stop's
        elif self.every_s and self.root and s.step < self.steps and time.monotonic() - self.last >= self.every_s:
            t = time.perf_counter()
            size = self.save_step()
            get_logger().info("step checkpoint at epoch %d step %d of %d: %.1f MB in %.2f s", s.epoch + 1, s.step,
                              self.steps, size / 2**20, time.perf_counter() - t)
            self.last = time.monotonic()

    def _check(self) -> int:
        """The stop flag's allreduce (max over ranks of [signal, seconds per step since the last
        check]): the agreed signal (0: none), and the steps to the next check, the same on every rank."""
        t = time.perf_counter()
        per_step = (t - self.t_check) / max(1, self.since + 1)
        got, per_step = hvd.allreduce(np.array([self.signals.got, per_step], np.float64), op="max",
                                      name="cxr_stop")  # Horovod: one decision for all ranks
        self.t_check = time.perf_counter()
        self.flag_s, self.flags = self.flag_s + self.t_check - t, self.flags + 1
        self.every_n = 1 if self.check_s <= 0 else int(max(1, min(1000, self.check_s // max(per_step, 1e-3))))
        return int(got)

    def on_epoch_end(self, epoch, logs=None):
        self.last = time.monotonic()  # the epoch's checkpoint was just written
        if self.pending:
            self._stop(self.pending, f"at the end of epoch {self.state.epoch}", mid=False)

    def _stop(self, signum: int, where: str, mid: bool):
        if mid and self.root:
            self.save_step()
        hvd.barrier()  # Horovod: every rank leaves after rank 0 wrote the checkpoint
        # rank 0: one line
        get_logger().info("stopped by %s %s; resume with --resume", signal.Signals(signum).name, where)
        raise Stopped(signum, where)


def append_batches(path: Path, rows) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(BATCH_COLUMNS)
        w.writerows(csv_row(r) for r in rows)  # text cells neutralised for spreadsheets (data_prep.textsafe)


def truncate_batches(path: Path, epochs: int, step: int) -> None:
    """Keep the rows of steps a checkpoint covers (epochs 1..``epochs`` and ``step`` steps of the next)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = [r for r in rows if int(r["epoch"]) <= epochs or (int(r["epoch"]) == epochs + 1 and int(r["step"]) <= step)]
    if len(keep) != len(rows):
        atomic_write_text(path, ",".join(BATCH_COLUMNS) + "\n" +
                          "".join(",".join(r[k] for k in BATCH_COLUMNS) + "\n" for r in keep))


# --------------------------------------------------------------------------- files

def append_history(path: Path, row: dict) -> None:
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
    if isinstance(v, (float, np.floating)):
        return "nan" if not math.isfinite(float(v)) else f"{float(v):.6g}"
    return str(v)


def truncate_history(path: Path, epochs: int) -> int:
    """Keep the header and the first ``epochs`` rows (a resumed run drops uncommitted rows)."""
    rows = read_history(path)
    if len(rows) <= epochs:
        return len(rows)
    lines = [",".join(HISTORY_COLUMNS)] + [",".join(r.get(k, "") or "" for k in HISTORY_COLUMNS) for r in rows[:epochs]]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return epochs


def inference_view(model) -> tf.keras.Model:
    """The same layers (shared weights, nothing copied) without optimizer and compile settings:
    what is saved, so a saved model loads anywhere, Horovod or not, without training objects."""
    return tf.keras.Model(model.inputs, model.outputs, name=model.name)


def save_model_atomic(model, path: Path) -> Path:
    """Save (without optimizer) to a temporary name beside ``path`` (Keras wants the suffix),
    then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix}"
    try:
        inference_view(model).save(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
