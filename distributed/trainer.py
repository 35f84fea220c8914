"""The training recipe behind ``python -m distributed.train`` (see that module for the command,
the run directory and the test hooks). It imports TensorFlow, so it is imported only after
``distributed.runtime.apply`` has set this rank's threads: :func:`distributed.train.train` does.

It follows Horovod's ``examples/tensorflow2/tensorflow2_keras_mnist.py``; every distributed line
says why. Two phases: ``warmup`` (backbone frozen, only the new head learns) and ``finetune``
(the first ``freeze_first`` backbone layers frozen, or all of them with ``freeze: all_conv``),
each with its own optimizer, learning rate scaled by the number of ranks and ramped up over
``train.lr_warmup_epochs``. Validation on the whole val split each epoch (sharded, gathered),
best-val_loss checkpoint, early stopping in the fine-tune phase.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_prep import locks
from data_prep.config import save_resolved
from data_prep.fsutil import atomic_write_bytes, atomic_write_json
from data_prep.log import get_logger
from distributed import callbacks as cb
from distributed import checkpoints
from distributed import data as D
from distributed import hvd
from distributed import model as M
from distributed import runtime

PHASES = ("warmup", "finetune")


# --------------------------------------------------------------------------- the recipe

def run(cfg, plan, resume: bool = False) -> dict:
    """Train per ``cfg`` with the thread ``plan`` already applied (``runtime.apply``); returns
    {"state", "history", "run_dir"} (the same on every rank)."""
    runtime.configure_tensorflow(plan)
    precision = runtime.configure_precision(plan)  # float32 or mixed_bfloat16 for this rank's CPU
    hvd.init()  # Horovod: initialise; rank and size come from horovodrun/mpirun (1 process without)
    run_dir = Path(cfg.run.dir)
    log = _logger(run_dir / "train.log")  # INFO and the log file on rank 0 only
    if hvd.is_root():  # Horovod: one writer per file
        locks.acquire(run_dir, "training")  # one run per run.dir: a second one is refused (data_prep.locks)
        save_resolved(cfg, run_dir, note=f"runtime.precision {cfg.runtime.precision}: rank 0 computed in "
                                         f"{plan.precision.describe() if plan.precision else precision}")
    # Seeds: the same initial weights everywhere (then broadcast anyway), distinct dropout per rank.
    tf.keras.utils.set_random_seed(cfg.train.seed + hvd.rank())

    manifest_data = D.load_split(cfg.prep.out, "train", cache=cfg.train.cache)
    val_data = D.load_split(cfg.prep.out, "val", manifest=manifest_data.manifest)
    multilabel = manifest_data.multilabel
    # Horovod: each rank takes 1/size of every epoch, so an epoch is the same number of images.
    steps = D.steps_per_epoch(manifest_data.n, cfg.train.batch_size, hvd.size(), cfg.train.steps_per_epoch)
    log.info("train %d images, val %d; %d rank(s) x %d images x %d steps per epoch; %s; %s; tf.data autotuning %s",
             manifest_data.n, val_data.n, hvd.size(), cfg.train.batch_size, steps, plan.describe(),
             runtime.onednn_note(plan), _autotune_note(cfg.runtime.data_autotune))

    if val_data.n == 0:
        log.warning("the validation split is empty: no val metrics, no early stopping, the last epoch is kept")
    model = M.build_model(cfg.model, manifest_data.image_size, manifest_data.num_classes, multilabel,
                          precision=precision)
    if cfg.train.elastic:  # Horovod elastic: the same phases, restartable with any number of ranks
        from distributed import elastic  # only elastic runs need it; it imports this module (the recipe)
        return elastic.run(cfg, model, manifest_data, val_data, resume, log, recipe=sys.modules[__name__])
    state = cb.RunState(size=hvd.size(), precision=precision)
    if resume:
        state, finished = _resume(cfg, run_dir, model, log, precision)
        if finished:
            log.info("%s: training already complete (%d epochs); nothing to do", run_dir, state.epoch)
            return {"state": state.to_json(), "history": cb.read_history(run_dir / "history.csv"),
                    "run_dir": str(run_dir)}
    elif hvd.is_root() and any((run_dir / f).exists() for f in ("checkpoints/state.json", "history.csv")):
        # history.csv without state.json: an earlier run that ended before its first checkpoint (a full disk)
        log.warning("%s has checkpoints of an earlier run: starting afresh (use --resume to continue)", run_dir)
        for f in ("history.csv",):
            (run_dir / f).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    tb = tf.summary.create_file_writer(str(run_dir / "tb")) if hvd.is_root() else None  # Horovod: rank 0 logs

    writes = 0
    for phase in PHASES:
        if state.complete or _phase_done(cfg, state, phase):
            continue
        if state.phase == phase and state.early_stopping.get("stopped"):
            break  # resumed after early stopping had ended the run
        pcfg = cfg.train.warmup if phase == "warmup" else cfg.train.finetune
        if state.phase != phase:  # entering this phase (not resuming inside it)
            state.phase, state.phase_epoch = phase, 0
            state.early_stopping = {"best": math.inf, "wait": 0, "stopped": False}
        M.set_trainable(model, phase, cfg.train.finetune.freeze, cfg.train.finetune.freeze_first)
        opt = make_optimizer(phase, pcfg, cfg.train, hvd.size(), steps)
        # Horovod: average gradients over ranks (allreduce) before they are applied. They are float32
        # under both precisions (bfloat16 computes, the variables stay float32); fp16 compression halves the bytes.
        opt = hvd.DistributedOptimizer(opt, compression=cfg.train.allreduce_compression)
        model.compile(optimizer=opt, loss="binary_crossentropy" if multilabel else "categorical_crossentropy",
                      metrics=["accuracy"])
        _build_optimizer(opt, model)
        if resume and state.phase_epoch > 0 and hvd.is_root():
            _load_optimizer(opt, model, run_dir / "checkpoints" / "last-optimizer.npz", phase, log)
        # Horovod: start every rank from rank 0's weights and optimizer state: initial weights,
        # weights after a resume, and the weights at the phase switch.
        hvd.broadcast_variables(model.variables + _opt_variables(opt), root_rank=0)
        ckpt = cb.Checkpointer(run_dir, state, phase, lambda p, o=opt, ph=phase: _save_optimizer(o, model, p, ph), tb)
        callbacks = epoch_callbacks(cfg, state, phase, steps, val_data, manifest_data.num_classes, multilabel,
                                    [ckpt])  # Horovod: checkpoints written on rank 0 only
        # Horovod: progress on rank 0 only; a live bar only on a terminal without a launcher.
        verbose, shown = cb.progress(phase, steps, cfg.train.batch_size * hvd.size(), hvd.is_root())
        # Horovod: disjoint share of each epoch per rank; the epoch number keeps resumes exact.
        ds = D.train_dataset(manifest_data, batch_size=cfg.train.batch_size, rank=hvd.rank(), size=hvd.size(),
                             seed=cfg.train.seed, start_epoch=state.epoch, steps=steps,
                             augment=cfg.train.augment, data_threads=cfg.runtime.data_threads,
                             autotune=cfg.runtime.data_autotune)
        log.info("phase %s: epochs %d..%d, %d trainable weight tensors, %s lr %.3g x %d rank(s)",
                 phase, state.phase_epoch + 1, pcfg.epochs, len(model.trainable_weights), pcfg.optimizer,
                 pcfg.lr, hvd.size() if cfg.train.scale_lr else 1)
        model.fit(ds, steps_per_epoch=steps, epochs=pcfg.epochs, initial_epoch=state.phase_epoch,
                  callbacks=callbacks + shown, verbose=verbose)
        writes += ckpt.writes
        if state.early_stopping.get("stopped"):
            break

    state.complete = True
    _dump_for_tests(model, writes)
    if hvd.is_root():  # Horovod: rank 0 writes the final model
        _finalize(model, run_dir, state, log)
    hvd.barrier()  # Horovod: nobody leaves before rank 0 has written everything
    history = cb.read_history(run_dir / "history.csv") if hvd.is_root() else []
    return {"state": state.to_json(), "history": history, "run_dir": str(run_dir)}


def epoch_callbacks(cfg, state, phase: str, steps: int, val_data, num_classes: int, multilabel: bool,
                    checkpointing: list) -> list:
    """The callbacks of a phase's ``fit``, with ``checkpointing`` (the checkpoint writer, and the
    elastic commit after it) in place, for the size of this run (or elastic restart)."""
    return [
        # Horovod: average loss/accuracy of the epoch over ranks (validation is gathered instead).
        hvd.metric_average_callback(),
        cb.EpochTimer(steps * cfg.train.batch_size * hvd.size()),
        # Horovod: BatchNorm moving statistics are per rank (not gradients): average them.
        cb.AverageBatchNormStatistics(),
        cb.LearningRateLogger(),
        # Horovod: validation sharded over ranks, predictions gathered: identical metrics everywhere.
        cb.Validation(lambda: D.eval_dataset(val_data, batch_size=cfg.eval.batch_size, rank=hvd.rank(),
                                             size=hvd.size(), with_index=True,
                                             data_threads=cfg.runtime.data_threads,
                                             autotune=cfg.runtime.data_autotune), multilabel),
        cb.EarlyStopping(state, cfg.train.finetune.patience, active=phase == "finetune" and val_data.n > 0),
        *checkpointing,
        cb.LearningCheck(phase, num_classes, multilabel),  # Horovod: rank 0 warns
        cb.StopHook(phase),
    ]


# --------------------------------------------------------------------------- optimizers

def make_optimizer(phase: str, pcfg, tcfg, size: int, steps_per_epoch: int):
    """The phase's Keras optimizer (legacy optimizer classes: the ones Horovod 0.28's
    DistributedOptimizer wraps), learning rate per rank x ``size`` with a linear warm-up."""
    warm = int(round(tcfg.lr_warmup_epochs * steps_per_epoch))
    # Horovod: learning rate x size (the global batch is size times larger), ramped up over
    # lr_warmup_epochs from the one-rank rate (as LearningRateWarmupCallback, but as a schedule
    # of the optimizer's step: it composes with the decay and resumes with the optimizer).
    lr = cb.WarmupInverseTimeDecay(pcfg.lr, size, warm, getattr(pcfg, "decay", 0.0), tcfg.scale_lr)
    legacy = tf.keras.optimizers.legacy
    if pcfg.optimizer == "sgd":
        return legacy.SGD(lr, momentum=getattr(pcfg, "momentum", 0.0), nesterov=getattr(pcfg, "nesterov", False))
    if pcfg.optimizer == "rmsprop":
        return legacy.RMSprop(lr)
    if pcfg.optimizer == "adam":
        return legacy.Adam(lr)
    raise ValueError(f"train.{phase}.optimizer: {pcfg.optimizer!r}")


def _opt_variables(opt) -> list:
    v = opt.variables
    return list(v() if callable(v) else v)


def _build_optimizer(opt, model) -> None:
    """Create the optimizer's slots now (Keras would at the first step), so they can be restored
    and broadcast before training."""
    if hasattr(opt, "_create_all_weights"):  # legacy OptimizerV2
        opt._create_all_weights(model.trainable_variables)
    else:  # Keras 2.11+ optimizer
        opt.build(model.trainable_variables)


def _save_optimizer(opt, model, path: Path, phase: str) -> None:
    vs = _opt_variables(opt)
    buf = io.BytesIO()
    np.savez(buf, **{f"v{i:04d}": v.numpy() for i, v in enumerate(vs)},
             names=np.array([v.name for v in vs]), phase=np.array(phase))
    atomic_write_bytes(path, buf.getvalue())


def _load_optimizer(opt, model, path: Path, phase: str, log) -> None:
    if not path.is_file():
        log.warning("no optimizer state at %s: the optimizer restarts (learning-rate warm-up again)", path)
        return
    with np.load(path, allow_pickle=False) as z:
        if str(z["phase"]) != phase:
            log.warning("optimizer state is of phase %s, not %s: not restored", str(z["phase"]), phase)
            return
        vs = _opt_variables(opt)
        values = [z[f"v{i:04d}"] for i in range(len(vs))] if len(z["names"]) == len(vs) else None
    if values is None or any(tuple(v.shape) != a.shape for v, a in zip(vs, values)):
        raise RuntimeError(f"{path}: optimizer state does not fit this model/optimizer (changed config?)")
    for v, a in zip(vs, values):
        v.assign(a)
    log.info("optimizer state restored (%d variables, step %d)", len(vs), int(opt.iterations.numpy()))


# --------------------------------------------------------------------------- resume / finish

def _phase_done(cfg, state, phase) -> bool:
    """True when ``phase`` is behind ``state`` (or has no epochs)."""
    pcfg = cfg.train.warmup if phase == "warmup" else cfg.train.finetune
    if pcfg.epochs == 0:
        return True
    order = PHASES.index(phase)
    cur = PHASES.index(state.phase) if state.phase in PHASES else len(PHASES)
    if cur > order:
        return True
    return cur == order and state.phase_epoch >= pcfg.epochs


def _resume(cfg, run_dir: Path, model, log, precision: str):
    """Rank 0 reads the checkpoint state and weights; every rank gets the state by broadcast (and
    the weights by the broadcast before the phase's first step). Returns (state, finished): the
    run was already complete, with its final model."""
    state, finished = _read_checkpoint(run_dir, model, log, precision) if hvd.is_root() else (None, False)
    # Horovod: every rank continues from the same phase and epoch (rank 0 read them).
    state, finished = hvd.broadcast_object((state, finished), root_rank=0)
    if state is None:
        state = cb.RunState(size=hvd.size())
    state.size = hvd.size()
    state.precision = precision
    return state, finished


def _read_checkpoint(run_dir: Path, model, log, precision: str = "float32"):
    """Rank 0's part of a resume: the run state and last weights of ``run_dir`` (into ``model``), the
    history cut to the committed epochs; (None, False) without a checkpoint."""
    state = checkpoints.restore(run_dir, model, log)  # last.keras, else best.keras; state.json, else history.csv
    if state is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", run_dir / "checkpoints")
        return None, False
    if state.precision != precision:
        # Converted explicitly: the variables are float32 under both policies, copied as they are.
        log.warning("--resume: the checkpoint was trained in %s, this run computes in %s (runtime.precision); "
                    "its float32 weights and optimizer state carry over unchanged", state.precision, precision)
    kept = cb.truncate_history(run_dir / "history.csv", state.epoch)
    finished = state.complete and (run_dir / "model.keras").is_file()
    log.info("resuming after epoch %d (%s epoch %d), best val_loss %.4f at epoch %d, early-stopping "
             "wait %d; history has %d rows", state.epoch, state.phase, state.phase_epoch,
             state.best_val_loss, state.best_epoch, state.early_stopping.get("wait", 0), kept)
    return state, finished


def _finalize(model, run_dir: Path, state, log) -> None:
    best = run_dir / "checkpoints" / "best.keras"
    if best.is_file():
        M.copy_weights(M.load_model(best), model)
    # The delivered model computes in float32, so it runs at full speed on any CPU; evaluation and
    # predict convert it to their own runtime.precision (bfloat16 where AMX is).
    model = M.convert_precision(model, "float32")
    cb.save_model_atomic(model, run_dir / "model.keras")
    sm, tmp = run_dir / "saved_model", run_dir / f".saved_model.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # export() prints every captured variable
        cb.inference_view(model).export(str(tmp))  # inference SavedModel: tf.saved_model.load(p).serve(x)
    old = run_dir / f".saved_model.old-{os.getpid()}"
    if sm.exists():
        os.replace(sm, old)
    os.replace(tmp, sm)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(run_dir / "checkpoints" / "state.json", state.to_json())
    log.info("done: %d epochs, best val_loss %.4f at epoch %d; %s, %s", state.epoch, state.best_val_loss,
             state.best_epoch, run_dir / "model.keras", sm)


def _autotune_note(setting: str) -> str:
    if setting != "auto":
        return setting + " (config)"
    cpus = D.available_cpus()
    train, val = ("on" if D.autotune_enabled(setting, cpus, finite=f) else "off" for f in (False, True))
    return f"{train} for training, {val} for validation ({cpus} CPU(s) for this rank)"


def _logger(logfile: Path):
    """The shared logger, writing to this run's train.log (not to an earlier run's, when train()
    is called again in the same process, as benchmarks do)."""
    for name in ("cxr", "cxr.all"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename) != logfile.resolve():
                lg.removeHandler(h)
                h.close()
    return get_logger(logfile=str(logfile))


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _dump_for_tests(model, writes: int) -> None:
    folder = os.environ.get("CXR_TEST_DUMP")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    info = {"rank": hvd.rank(), "size": hvd.size(), "horovod": hvd.enabled(), "weights_sha256": weights_digest(model),
            "checkpoint_writes": writes, "pid": os.getpid(), "time": time.time(), "host": os.uname().nodename}
    (Path(folder) / f"rank{hvd.rank()}.json").write_text(json.dumps(info))
