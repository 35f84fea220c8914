"""The checkpoints of a run: written every epoch (:class:`Checkpointer`), read back by ``--resume``.

:class:`Checkpointer` writes, each epoch and each atomically, on rank 0: the ``history.csv`` row,
``last.keras``, ``best.keras`` on a new best, and ``state.json`` last (which commits the epoch);
every rank keeps the same ``RunState`` in memory. A model file is saved as :func:`inference_view`
(no optimizer, no compile settings) by :func:`save_model_atomic`.

A file can still be damaged afterwards (a full disk elsewhere, a copy cut short, a bad sector).
:func:`restore` reads what can be read and says what it fell back to:

* ``state.json`` and ``last.keras`` readable: the normal resume;
* ``last.keras`` unreadable, ``best.keras`` readable: resume after the best epoch (phase, epoch and
  early-stopping state as ``history.csv`` had them then; the optimizer restarts, since its saved
  state is the last epoch's); the epochs after it are trained again;
* ``state.json`` unreadable: the state is rebuilt from ``history.csv`` (its rows are the committed
  epochs) for ``last.keras``, or for ``best.keras`` at the best row;
* nothing readable: one line naming each file and why.

:func:`restore` runs on rank 0 only (the trainer broadcasts the state).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import tensorflow as tf

from data_prep.cli import UserError, one_line
from data_prep.fsutil import atomic_write_json
from data_prep.log import get_logger
from distributed import hvd
from distributed import model as M
from distributed import rundir as R

__all__ = ["restore", "CheckpointError", "state_at", "Checkpointer", "save_model_atomic", "inference_view"]


# --------------------------------------------------------------------------- writing: every epoch

class Checkpointer(tf.keras.callbacks.Callback):
    """Updates ``RunState`` on every rank; rank 0 writes, each atomically (temp file, rename):
    ``history.csv`` row, TensorBoard scalars, ``checkpoints/last.keras`` (+ optimizer state),
    ``best.keras`` on a new best val_loss (``best-finetune.keras``: within the fine-tune phase), and
    ``state.json`` LAST, which commits the epoch."""

    def __init__(self, run_dir: Path, state: R.RunState, phase: str, save_optimizer, tb_writer=None):
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
        R.append_history(self.run_dir / R.HISTORY, {**logs, "phase": self.phase, "epoch": s.epoch,
                                                      "ranks": hvd.size()})
        if self.tb is not None:
            with self.tb.as_default():
                for k in R.HISTORY_COLUMNS[2:]:
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
        for old in self.ckpt.glob(R.STEP_GLOB):  # step checkpoints of this epoch: behind state.json now
            shutil.rmtree(old, ignore_errors=True)
        self.writes += 1


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


# --------------------------------------------------------------------------- reading: --resume

class CheckpointError(UserError, RuntimeError):
    """No checkpoint of the run directory can be read."""


def _float(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def state_at(history: list[dict], epoch: int, precision: str) -> R.RunState:
    """The run state after ``epoch`` (1-based) as ``history.csv``'s first ``epoch`` rows imply it."""
    rows = history[:epoch]
    if not rows:
        return R.RunState(precision=precision)
    phase = rows[-1].get("phase") or "warmup"
    losses = [_float(r.get("val_loss")) for r in rows]
    finite = [(v, i + 1) for i, v in enumerate(losses) if math.isfinite(v)]
    best_val, best_epoch = min(finite) if finite else (math.inf, 0)
    in_phase = [(i + 1, losses[i]) for i, r in enumerate(rows) if r.get("phase") == phase]
    es_best, es_wait = math.inf, 0
    for _, v in in_phase:  # EarlyStopping's own rule: a strictly lower val_loss resets the wait
        if math.isfinite(v) and v < es_best:
            es_best, es_wait = v, 0
        else:
            es_wait += 1
    return R.RunState(phase=phase, phase_epoch=len(in_phase), epoch=len(rows), best_val_loss=best_val,
                       best_epoch=best_epoch, early_stopping={"best": es_best, "wait": es_wait, "stopped": False},
                       precision=precision)


def _aside(path: Path, log) -> None:
    """An optimizer state that belongs to another epoch is not restored (renamed, not deleted)."""
    if path.is_file():
        os.replace(path, path.with_name(path.name + ".unused"))
        log.warning("%s belongs to a later epoch: kept as %s.unused, the optimizer restarts", path, path.name)


def restore(run_dir, model, log):
    """The run state of ``run_dir`` with the weights it implies copied into ``model``; None when the
    run has no checkpoint at all. Falls back as the module says, with a WARNING naming the damage."""
    run_dir = Path(run_dir)
    ckpt = run_dir / R.CHECKPOINTS
    S, L, B = R.STATE_FILE, R.LAST_FILE, R.BEST_FILE
    files = {name: ckpt / name for name in (S, L, B)}
    if not any(p.exists() for p in files.values()):
        return None
    why: dict[str, str] = {}
    try:
        state = R.read_state(run_dir)
        if state is None:
            why[S] = "missing"
    except (ValueError, KeyError, TypeError, OSError) as e:  # JSONDecodeError is a ValueError
        state, why[S] = None, one_line(e)[:160]

    def load(name):
        if not files[name].exists():
            why[name] = "missing"
            return None
        try:
            return M.load_model(files[name])
        except (UserError, OSError, ValueError, KeyError) as e:
            why[name] = one_line(e)[:200]
            return None

    try:
        history = R.read_history(run_dir / R.HISTORY)
    except (OSError, ValueError):
        history = []
    last = load(L)
    if last is not None and state is not None:
        M.copy_weights(last, model)
        return state
    best = load(B) if last is None else None
    if state is not None and best is not None and state.best_epoch > 0:
        back = state_at(history, state.best_epoch, state.precision)
        log.warning("--resume: %s is unreadable (%s); falling back to %s (epoch %d): epochs %d-%d are trained again",
                    files[L], why[L], files[B], state.best_epoch,
                    state.best_epoch + 1, state.epoch)
        _aside(ckpt / R.OPTIMIZER_FILE, log)
        M.copy_weights(best, model)
        return back
    if state is None and (last is not None or best is not None) and history:
        use, name = (last, L) if last is not None else (best, B)
        precision = M.precision_of(use)
        if name == L:
            epoch = len(history)
        else:
            losses = [_float(r.get("val_loss")) for r in history]
            finite = [(v, i + 1) for i, v in enumerate(losses) if math.isfinite(v)]
            epoch = min(finite)[1] if finite else len(history)
            _aside(ckpt / R.OPTIMIZER_FILE, log)
        back = state_at(history, epoch, precision)
        log.warning("--resume: %s is unreadable (%s); resuming from %s at epoch %d as history.csv records it",
                    files[S], why[S], files[name], epoch)
        M.copy_weights(use, model)
        return back
    listed = "; ".join(f"{files[n]}: {why.get(n, 'not usable without state.json and history.csv')}"
                       for n in (S, L, B))
    raise CheckpointError(f"--resume: no checkpoint of {run_dir} can be read ({listed}); "
                          f"train afresh without --resume (or into another run.dir)")
