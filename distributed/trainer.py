"""The training recipe behind ``python -m distributed.train`` (see that module for the command,
the run directory and the test hooks). It imports TensorFlow, so it is imported only after
``distributed.runtime.apply`` has set this rank's threads: :func:`distributed.train.train` does.

Read it top to bottom as Horovod's ``examples/tensorflow2/tensorflow2_keras_mnist.py``: :func:`run`
(initialise, data and model, where to start, the phases, the final model) and :func:`train_phase`, the
recipe of one phase (learning rate x ranks with a warm-up, ``DistributedOptimizer``, initial variables
broadcast from rank 0, metrics averaged over ranks, checkpoints and progress on rank 0, ``fit``); every
distributed line says why in a ``# Horovod:`` comment. Two phases: ``warmup`` (backbone frozen, only
the new head learns) and ``finetune`` (the first ``freeze_first`` backbone layers frozen, blocks
1..``freeze_blocks`` with ``freeze: blocks``, or all of them with ``freeze: all_conv``), each with its own
optimizer. Validation on the whole val split each epoch (sharded, gathered), best-val_loss checkpoint,
early stopping in the fine-tune phase.

What lets a run stop and continue anywhere is beside the recipe, under "resilience":
:func:`phases_from` (the phases a resumed run has left), :func:`fit_epochs` (a resumed epoch's
remaining steps alone, then the further epochs), :func:`step_control` (a stop at a step every rank
agrees on, periodic step checkpoints), :func:`read_checkpoint` and :func:`save_step_checkpoint`.
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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_prep import locks, testhooks
from data_prep.backbones import BACKBONES
from data_prep.config import save_resolved
from data_prep.fsutil import atomic_write_bytes, atomic_write_json
from data_prep.log import get_logger
from distributed import checkpoints, hvd, rundir, runtime
from distributed import data as D
from distributed import model as M
from distributed.batchnorm import AverageBatchNormStatistics
from distributed.checkpoints import Checkpointer, inference_view, save_model_atomic
from distributed.learning_check import LearningCheck
from distributed.progress import EpochTimer, LearningRateLogger, progress
from distributed.run_control import EarlyStopping, StepControl
from distributed.rundir import RunState
from distributed.schedule import WarmupInverseTimeDecay
from distributed.stopping import Stopped, stop_signals
from distributed.validation import Validation

# --------------------------------------------------------------------------- the recipe (Horovod's Keras example)

PHASES = ("warmup", "finetune")


def run(cfg, plan, resume: bool = False, restart: bool = False) -> dict:
    """Train per ``cfg`` with the thread ``plan`` already applied (``runtime.apply``); returns
    {"state", "history", "run_dir"} (the same on every rank), with "exit_code" 128 + signal when a
    stop signal ended it (its step checkpoint written). ``restart``: an earlier run in ``run.dir`` is
    moved aside first (``distributed.rundir``). Elastic training: ``distributed.elastic.run``."""
    su = setup(cfg, plan, restart=restart)
    run_dir, log, model = Path(cfg.run.dir), su.log, su.model
    start = Start(RunState(size=hvd.size(), precision=su.precision))
    if hvd.is_root():  # Horovod: rank 0 reads or clears the checkpoints
        start = (read_checkpoint(run_dir, model, log, su.precision) if resume
                 else clear_checkpoints(run_dir, log) or start)
    # Horovod: every rank continues from the same phase, epoch and step (rank 0 read them); the
    # weights and optimizer state follow by the broadcast before the phase's first step.
    state, finished = hvd.broadcast_object((start.state, start.finished), root_rank=0)
    state = state or RunState()
    state.size, state.precision = hvd.size(), su.precision
    if finished:
        log.info("%s: training already complete (%d epochs); nothing to do", run_dir, state.epoch)
        return {"state": state.to_json(), "history": rundir.read_history(run_dir / rundir.HISTORY),
                "run_dir": str(run_dir)}
    tb = tf.summary.create_file_writer(str(run_dir / rundir.TB)) if hvd.is_root() else None  # Horovod: rank 0 logs
    tally = Tally()
    try:
        train_phases(cfg, model, state, su.train, su.val, log, tb, tally, start.opt_phase, start.opt_values)
    except Stopped as e:  # a stop signal: the step checkpoint is written, every rank ends here
        return stopped(cfg, e)
    return finish(cfg, model, state, tally.writes, log)


def setup(cfg, plan, restart: bool = False) -> Setup:
    """Horovod, TensorFlow's threads and precision, the run directory's config and log, the data
    splits and the model: the start of plain and of elastic training. Rank 0 refuses a run directory
    that holds a run of another definition, or with ``restart`` moves that run aside
    (``distributed.rundir``), before it writes anything there."""
    runtime.configure_tensorflow(plan)
    hvd.init()  # Horovod: initialise; rank and size come from horovodrun/mpirun (1 process without)
    # runtime.precision auto on a bfloat16 CPU: rank 0 measures (or reads its cached figures) and
    # Horovod: broadcasts them, so every rank computes in the same precision. Elastic ranks join
    # mid-run, when no one would answer a broadcast: each decides for itself (cached per node).
    plan = runtime.settle_precision(plan, cfg, share=None if cfg.train.elastic else hvd.broadcast_object,
                                    root=hvd.is_root())
    precision = runtime.configure_precision(plan)  # float32 or mixed_bfloat16
    run_dir = Path(cfg.run.dir)
    moved = None
    if hvd.is_root():  # Horovod: one writer per file
        locks.acquire(run_dir, "training")  # one run per run.dir: a second one is refused (data_prep.locks)
        moved = rundir.prepare(cfg, restart=restart)  # another run's folder: refused, or moved aside (--restart)
    log = _logger(run_dir / "train.log")  # INFO and the log file on rank 0 only; after a move: a new one
    if hvd.is_root():
        log.info("%s: one writer by %s", run_dir, locks.kind(run_dir))
        if moved is not None:
            log.warning("--restart: the earlier run in %s was moved to %s", run_dir, moved)
        save_resolved(cfg, run_dir, note=f"runtime.precision {cfg.runtime.precision}: rank 0 computed in "
                                         f"{plan.precision.describe() if plan.precision else precision}")
    # Seeds: the same initial weights everywhere (then broadcast anyway), distinct dropout per rank.
    tf.keras.utils.set_random_seed(cfg.train.seed + hvd.rank())

    train_data = D.load_split(cfg.prep.out, "train", cache=cfg.train.cache, stage_to=cfg.prep.stage_to)
    rundir.check_prep(cfg, train_data.manifest, cfg.prep.out)  # prepared for this label and size (every rank)
    val_data = D.load_split(cfg.prep.out, "val", manifest=train_data.manifest, stage_to=cfg.prep.stage_to)
    # Horovod: each rank takes 1/size of every epoch, so an epoch is the same number of images.
    steps = D.steps_per_epoch(train_data.n, cfg.train.batch_size, hvd.size(), cfg.train.steps_per_epoch)
    log.info("train %d images, val %d; %d rank(s) x %d images x %d steps per epoch; %s; %s; tf.data autotuning %s",
             train_data.n, val_data.n, hvd.size(), cfg.train.batch_size, steps, plan.describe(),
             runtime.onednn_note(plan), _autotune_note(cfg.runtime.data_autotune))
    if val_data.n == 0:
        log.warning("the validation split is empty: no val metrics, no early stopping, the last epoch is kept")
    model = M.build_model(cfg.model, train_data.image_size, train_data.num_classes, train_data.multilabel,
                          precision=precision)
    return Setup(log, train_data, val_data, model, precision)


@dataclass
class Setup:
    """What every way of training starts with (:func:`setup`)."""
    log: object
    train: D.SplitData
    val: D.SplitData
    model: object
    precision: str


def train_phases(cfg, model, state, train_data, val_data, log, tb, tally: Tally, opt_phase: str = "",
                 opt_values=(), extra_callbacks=None) -> None:
    """The phases from ``state`` on (every rank, the same ``state``); ``opt_values``: optimizer
    variables of phase ``opt_phase`` to start from (a checkpoint, an elastic commit);
    ``extra_callbacks(phase) -> list``: callbacks after the checkpoint writer (the elastic commit);
    ``tally.writes`` counts the epoch checkpoints this rank wrote."""
    # Horovod: 1/size of every epoch per rank, for the size of this run (or elastic restart).
    steps = D.steps_per_epoch(train_data.n, cfg.train.batch_size, hvd.size(), cfg.train.steps_per_epoch)
    with stop_signals(cfg.train.stop_signals) as signals:
        for phase in phases_from(cfg, state):
            train_phase(cfg, model, state, phase, steps, train_data, val_data, log, tb, tally, signals,
                        opt_values if opt_phase == phase else (), extra_callbacks)


def train_phase(cfg, model, state, phase: str, steps: int, train_data, val_data, log, tb, tally: Tally, signals,
                opt_values=(), extra_callbacks=None) -> None:
    """One phase, on every rank, as Horovod's Keras example trains; ``opt_values``: the optimizer's
    variables to continue from (a resume). The resilience is in the functions called by name."""
    run_dir = Path(cfg.run.dir)
    # Horovod: learning rate x size (the global batch is size times larger), warmed up from the
    # one-rank rate (the schedule), and DistributedOptimizer, which averages gradients over ranks.
    ph = prepare_phase(cfg, model, phase, hvd.size(), steps, train_data.multilabel,
                       masked=getattr(train_data, "masked", False))  # U-Ignore labels: a masked loss
    if hvd.is_root():  # Horovod: rank 0 writes the run's files
        rundir.record_phase_layers(run_dir, phase, M.trainable_summary(model))
    if opt_values:
        assign_optimizer(ph.optimizer, opt_values, log)  # resume: the optimizer continues
    # Horovod: start every rank from rank 0's weights and optimizer state: initial weights,
    # weights after a resume, and the weights at the phase switch.
    hvd.broadcast_variables(model.variables + opt_variables(ph.optimizer), root_rank=0)
    # Horovod: checkpoints written on rank 0 only (every rank keeps the same run state).
    ckpt = Checkpointer(run_dir, state, phase, lambda p: save_optimizer(ph.optimizer, p, phase), tb)
    control = step_control(cfg, ph, state, signals)
    callbacks = epoch_callbacks(cfg, state, phase, steps, val_data, train_data.num_classes, train_data.multilabel,
                                [ckpt, *(extra_callbacks(ph) if extra_callbacks else [])]) + [control]
    # Horovod: progress on rank 0 only; a live bar only on a terminal without a launcher.
    verbose, shown = progress(phase, steps, cfg.train.batch_size * hvd.size(), hvd.is_root())
    try:
        fit_epochs(cfg, ph, state, train_data, callbacks + shown, verbose, control, log)
    finally:
        tally.writes += ckpt.writes


def prepare_phase(cfg, model, phase: str, size: int, steps: int, multilabel: bool = False,
                  masked: bool = False) -> Phase:
    """Freeze for ``phase``, make its optimizer (learning rate for ``size`` ranks, warm-up over
    ``steps`` per epoch), wrap it in Horovod's DistributedOptimizer and compile: the training
    step of every way of training (plain, elastic, the benchmarks)."""
    pcfg = cfg.train.warmup if phase == "warmup" else cfg.train.finetune
    trainable = M.set_trainable(model, phase, cfg.train.finetune.freeze, cfg.train.finetune.freeze_first,
                                  cfg.train.finetune.freeze_blocks)
    # Horovod: average gradients over ranks (allreduce) before they are applied. They are float32
    # under both precisions (bfloat16 computes, the variables stay float32); fp16 compression halves the bytes.
    opt = hvd.DistributedOptimizer(make_optimizer(phase, pcfg, cfg.train, size, steps),
                                   compression=cfg.train.allreduce_compression)
    model.compile(optimizer=opt, loss=M.training_loss(multilabel, masked), metrics=M.training_metrics(masked))
    build_optimizer(opt, model)
    return Phase(phase, pcfg, model, opt, steps, trainable)


def make_optimizer(phase: str, pcfg, tcfg, size: int, steps_per_epoch: int):
    """The phase's Keras optimizer (legacy optimizer classes: the ones Horovod 0.28's
    DistributedOptimizer wraps), learning rate per rank x ``size`` with a linear warm-up."""
    warm = int(round(tcfg.lr_warmup_epochs * steps_per_epoch))
    # Horovod: learning rate x size (the global batch is size times larger), ramped up over
    # lr_warmup_epochs from the one-rank rate (as LearningRateWarmupCallback, but as a schedule
    # of the optimizer's step: it composes with the decay and resumes with the optimizer).
    lr = WarmupInverseTimeDecay(pcfg.lr, size, warm, getattr(pcfg, "decay", 0.0), tcfg.scale_lr)
    legacy = tf.keras.optimizers.legacy
    if pcfg.optimizer == "sgd":
        return legacy.SGD(lr, momentum=getattr(pcfg, "momentum", 0.0), nesterov=getattr(pcfg, "nesterov", False))
    if pcfg.optimizer == "rmsprop":
        return legacy.RMSprop(lr)
    if pcfg.optimizer == "adam":
        return legacy.Adam(lr)
    raise ValueError(f"train.{phase}.optimizer: {pcfg.optimizer!r}")


def epoch_callbacks(cfg, state, phase: str, steps: int, val_data, num_classes: int, multilabel: bool,
                    checkpointing: list) -> list:
    """The callbacks of a phase's ``fit``, with ``checkpointing`` (the checkpoint writer, and the
    elastic commit after it) in place, for the size of this run (or elastic restart)."""
    return [
        # Horovod: average loss/accuracy of the epoch over ranks (validation is gathered instead).
        hvd.metric_average_callback(),
        EpochTimer(steps * cfg.train.batch_size * hvd.size(), steps),
        # Horovod: BatchNorm moving statistics are per rank (not gradients): average them, for the
        # backbones the registry says have BatchNorm (a test keeps the flag equal to the built model).
        *([AverageBatchNormStatistics()] if BACKBONES[cfg.model.backbone].batch_norm else []),
        LearningRateLogger(),
        # Horovod: validation sharded over ranks, predictions gathered: identical metrics everywhere.
        Validation(lambda: D.eval_dataset(val_data, batch_size=cfg.eval.batch_size, rank=hvd.rank(),
                                          size=hvd.size(), with_index=True, data_threads=cfg.runtime.data_threads,
                                          autotune=cfg.runtime.data_autotune), multilabel),
        EarlyStopping(state, cfg.train.finetune.patience, active=phase == "finetune" and val_data.n > 0),
        *checkpointing,
        LearningCheck(phase, num_classes, multilabel),  # Horovod: rank 0 warns
        *([tf.keras.callbacks.LambdaCallback(**testhooks.training_callback_functions(phase, hvd.barrier))]
          if testhooks.training_hooks(phase) else []),  # tests only (data_prep.testhooks)
    ]


def finish(cfg, model, state, writes: int, log) -> dict:
    """After the last phase: rank 0 writes the final model; the run's result on every rank."""
    run_dir = Path(cfg.run.dir)
    state.complete = True
    _dump_for_tests(model, writes)
    if hvd.is_root():  # Horovod: rank 0 writes the final model
        _finalize(model, run_dir, state, log)
    hvd.barrier()  # Horovod: nobody leaves before rank 0 has written everything
    history = rundir.read_history(run_dir / rundir.HISTORY) if hvd.is_root() else []
    return {"state": state.to_json(), "history": history, "run_dir": str(run_dir)}


def stopped(cfg, e: Stopped) -> dict:
    """The result of a run a stop signal ended (every rank): its exit code is 128 + the signal."""
    return {"state": None, "history": [], "run_dir": str(cfg.run.dir), "exit_code": e.exit_code}


@dataclass
class Tally:
    """What this process wrote (counted across elastic restarts too)."""
    writes: int = 0     # epoch checkpoints


@dataclass
class Start:
    """Where a run starts: its state, whether it had already finished, and the optimizer values of
    the checkpoint (``opt_phase``: the phase they belong to; "" = none)."""
    state: RunState | None
    finished: bool = False
    opt_phase: str = ""
    opt_values: tuple = ()


@dataclass
class Phase:
    """A phase ready to train: the model compiled with its (distributed) optimizer."""
    name: str
    pcfg: object
    model: object
    optimizer: object
    steps: int
    trainable: int    # trainable weight tensors


# --------------------------------------- resilience: partial epochs, stop at a step, step checkpoints, resume

def phases_from(cfg, state):
    """The phases left to train from ``state`` (all of them for a new run): a finished phase is
    skipped, entering a phase resets its epoch, step and early stopping, and none follows once
    early stopping has ended the run (also when resumed after it)."""
    for phase in PHASES:
        if state.complete or _phase_done(cfg, state, phase):
            continue
        if state.phase == phase and state.early_stopping.get("stopped"):
            return  # resumed after early stopping had ended the run
        if state.phase != phase:  # entering this phase (not resuming inside it)
            state.phase, state.phase_epoch, state.step = phase, 0, 0
            state.early_stopping = {"best": math.inf, "wait": 0, "stopped": False}
        yield phase
        if state.early_stopping.get("stopped"):
            return


def fit_epochs(cfg, ph: Phase, state, train_data, callbacks: list, verbose: int, control: StepControl, log) -> None:
    """``fit`` the phase from ``state`` (phase epoch, and step within the epoch after a stop): a
    resumed epoch first runs its remaining steps alone, then the phase's further epochs."""
    B = cfg.train.batch_size
    log.info("phase %s: epochs %d..%d, %d trainable weight tensors, %s lr %.3g x %d rank(s)%s",
             ph.name, state.phase_epoch + 1, ph.pcfg.epochs, ph.trainable, ph.pcfg.optimizer, ph.pcfg.lr,
             hvd.size() if cfg.train.scale_lr else 1,
             f"; epoch {state.epoch + 1} from step {state.step + 1} of {ph.steps}" if state.step else "")
    while state.phase_epoch < ph.pcfg.epochs and not state.early_stopping.get("stopped"):
        first = state.step  # > 0: the rest of an epoch stopped at that step
        control.offset = first
        # Horovod: disjoint share of each epoch per rank; the epoch number (and step) keep resumes exact.
        ds = D.train_dataset(train_data, batch_size=B, rank=hvd.rank(), size=hvd.size(), seed=cfg.train.seed,
                             start_epoch=state.epoch, start_step=first, steps=ph.steps, augment=cfg.train.augment,
                             data_threads=cfg.runtime.data_threads, autotune=cfg.runtime.data_autotune,
                             record=control.record_slots)
        ph.model.fit(ds, steps_per_epoch=ph.steps - first, epochs=state.phase_epoch + 1 if first else ph.pcfg.epochs,
                     initial_epoch=state.phase_epoch, callbacks=callbacks, verbose=verbose)
        if not first:
            break
    if control.flags and hvd.size() > 1:
        log.info("stop flag: %d allreduce(s) of %.1f ms in phase %s", control.flags,
                 1e3 * control.flag_s / control.flags, ph.name)


def step_control(cfg, ph: Phase, state, signals) -> StepControl:
    """The phase's :class:`distributed.run_control.StepControl`: the stop at a step every rank agrees
    on (``train.stop_signals``, ``train.stop_check_s``), rank 0's step checkpoints
    (``train.checkpoint_every_s``, :func:`save_step_checkpoint`) and the batch record."""
    run_dir = Path(cfg.run.dir)
    return StepControl(state, ph.name, ph.steps, signals, cfg.train.checkpoint_every_s,
                       lambda: save_step_checkpoint(run_dir, ph.model, ph.optimizer, state),
                       run_dir / rundir.BATCHES if cfg.train.record_batches else None, cfg.train.stop_check_s)


STEP_PREFIX = rundir.STEP_PREFIX  # checkpoints/step-<epoch>-<step>/: a checkpoint inside an epoch


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


def clear_checkpoints(run_dir: Path, log) -> None:
    """Rank 0, a run started without --resume: an earlier run's checkpoints and history go."""
    # history.csv without state.json: an earlier run that ended before its first checkpoint (a full disk)
    if any((run_dir / f).exists() for f in (rundir.STATE, rundir.HISTORY)) or step_checkpoints(run_dir):
        log.warning("%s has checkpoints of an earlier run: starting afresh (use --resume to continue)", run_dir)
        for f in (rundir.HISTORY, rundir.BATCHES):
            (run_dir / f).unlink(missing_ok=True)
        shutil.rmtree(run_dir / rundir.CHECKPOINTS, ignore_errors=True)


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Complete step checkpoints (renamed into place whole), oldest first."""
    folder = Path(run_dir) / rundir.CHECKPOINTS
    return sorted(p for p in folder.glob(rundir.STEP_GLOB) if p.is_dir())


def read_checkpoint(run_dir: Path, model, log, precision: str = "float32") -> Start:
    """Rank 0's part of a resume (the one place checkpoints are read): the run state, weights (into
    ``model``) and optimizer values of the newest checkpoint of ``run_dir``: the last epoch's (or,
    when that is damaged, what ``distributed.checkpoints.restore`` falls back to), or a step
    checkpoint inside the epoch after it; the history and batch record cut to it."""
    folder = run_dir / rundir.CHECKPOINTS
    state = checkpoints.restore(run_dir, model, log)  # last.keras, else best.keras; state.json, else history.csv
    optimizer = folder / rundir.OPTIMIZER_FILE
    steps = step_checkpoints(run_dir)
    if steps:
        inside = RunState.from_json(json.loads((steps[-1] / rundir.STATE_FILE).read_text()))
        if inside.epoch == (state.epoch if state else 0):  # not behind the last epoch's checkpoint
            state, optimizer = inside, steps[-1] / rundir.OPTIMIZER_FILE
            M.copy_weights(M.load_model(steps[-1] / rundir.LAST_FILE), model)
    if state is None:
        log.warning("--resume: no checkpoint in %s, starting from the beginning", folder)
        return Start(None)
    if state.precision != precision:
        # Converted explicitly: the variables are float32 under both policies, copied as they are.
        log.warning("--resume: the checkpoint was trained in %s, this run computes in %s (runtime.precision); "
                    "its float32 weights and optimizer state carry over unchanged", state.precision, precision)
    kept = rundir.truncate_history(run_dir / rundir.HISTORY, state.epoch)
    rundir.truncate_batches(run_dir / rundir.BATCHES, state.epoch, state.step)
    finished = state.complete and (run_dir / rundir.FINAL).is_file()
    opt_phase, opt_values = ("", ())
    if state.phase_epoch > 0 or state.step > 0:
        opt_phase, opt_values = read_optimizer(optimizer, log)
        if opt_phase and opt_phase != state.phase:
            log.warning("optimizer state is of phase %s, not %s: not restored", opt_phase, state.phase)
    if state.step and state.size != hvd.size():
        log.warning("--resume: stopped at step %d with %d rank(s), resumed with %d: epoch %d starts again from its "
                    "first step (the steps of an epoch depend on the number of ranks)", state.step, state.size,
                    hvd.size(), state.epoch + 1)
        state.step = 0
    log.info("resuming after epoch %d (%s epoch %d)%s, best val_loss %.4f at epoch %d, early-stopping "
             "wait %d; history has %d rows", state.epoch, state.phase, state.phase_epoch,
             f" and step {state.step} of epoch {state.epoch + 1}" if state.step else "",
             state.best_val_loss, state.best_epoch, state.early_stopping.get("wait", 0), kept)
    return Start(state, finished, opt_phase, opt_values)


def save_step_checkpoint(run_dir: Path, model, opt, state) -> float:
    """Rank 0: a checkpoint inside an epoch (weights, optimizer state, run state with the step),
    written whole into a temporary folder and renamed into place; older step checkpoints are
    removed only after that. Returns its size in bytes."""
    folder = run_dir / rundir.CHECKPOINTS
    final = folder / f"{STEP_PREFIX}{state.epoch + 1:06d}-{state.step:06d}"
    tmp = folder / f".step.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model_atomic(model, tmp / rundir.LAST_FILE)
    save_optimizer(opt, tmp / rundir.OPTIMIZER_FILE, state.phase)
    state.writer_rank = hvd.rank()
    atomic_write_json(tmp / rundir.STATE_FILE, state.to_json())
    size = sum(f.stat().st_size for f in tmp.iterdir())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in step_checkpoints(run_dir):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return size


# --------------------------------------------------------------------------- optimizer state

def opt_variables(opt) -> list:
    """The optimizer's variables (step counter, slots) in a stable order."""
    v = opt.variables
    return list(v() if callable(v) else v)


def build_optimizer(opt, model) -> None:
    """Create the optimizer's slots now (Keras would at the first step), so they can be restored
    and broadcast before training."""
    if hasattr(opt, "_create_all_weights"):  # legacy OptimizerV2
        opt._create_all_weights(model.trainable_variables)
    else:  # Keras 2.11+ optimizer
        opt.build(model.trainable_variables)


def save_optimizer(opt, path: Path, phase: str) -> None:
    vs = opt_variables(opt)
    buf = io.BytesIO()
    np.savez(buf, **{f"v{i:04d}": v.numpy() for i, v in enumerate(vs)},
             names=np.array([v.name for v in vs]), phase=np.array(phase))
    atomic_write_bytes(path, buf.getvalue())


def read_optimizer(path: Path, log) -> tuple[str, tuple]:
    """(phase, values) of an optimizer state file; ("", ()) when there is none."""
    if not path.is_file():
        log.warning("no optimizer state at %s: the optimizer restarts (learning-rate warm-up again)", path)
        return "", ()
    with np.load(path, allow_pickle=False) as z:
        n = len(z["names"])
        return str(z["phase"]), tuple(z[f"v{i:04d}"] for i in range(n))


def assign_optimizer(opt, values, log) -> None:
    """Set the optimizer's variables to ``values`` (a checkpoint's or an elastic commit's)."""
    vs = opt_variables(opt)
    if len(values) != len(vs) or any(tuple(v.shape) != tuple(a.shape) for v, a in zip(vs, values)):
        raise RuntimeError("the checkpoint's optimizer state does not fit this model/optimizer (changed config?)")
    for v, a in zip(vs, values):
        v.assign(a)
    log.info("optimizer state restored (%d variables, step %d)", len(vs), int(opt.iterations.numpy()))


# --------------------------------------------------------------------------- the end, and helpers

def _finalize(model, run_dir: Path, state, log) -> None:
    best = rundir.evaluated_file(run_dir, "best", "finetune")  # the article's: best val_loss of the fine-tune phase
    if best.is_file():
        M.copy_weights(M.load_model(best), model)
    # The delivered model computes in float32, so it runs at full speed on any CPU; evaluation and
    # predict convert it to their own runtime.precision (bfloat16 where AMX is).
    model = M.convert_precision(model, "float32")
    save_model_atomic(model, run_dir / rundir.FINAL)
    sm, tmp = run_dir / rundir.SAVED_MODEL, run_dir / f".{rundir.SAVED_MODEL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.redirect_stdout(io.StringIO()):  # export() prints every captured variable
        inference_view(model).export(str(tmp))  # inference SavedModel: tf.saved_model.load(p).serve(x)
    old = run_dir / f".saved_model.old-{os.getpid()}"
    if sm.exists():
        os.replace(sm, old)
    os.replace(tmp, sm)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(run_dir / rundir.STATE, state.to_json())
    for old in step_checkpoints(run_dir):  # the finished run's state.json is newer than any of them
        shutil.rmtree(old, ignore_errors=True)
    log.info("done: %d epochs, best val_loss %.4f at epoch %d; %s, %s", state.epoch, state.best_val_loss,
             state.best_epoch, run_dir / rundir.FINAL, sm)


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
    folder = testhooks.dump_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    info = {"rank": hvd.rank(), "size": hvd.size(), "horovod": hvd.enabled(), "weights_sha256": weights_digest(model),
            "checkpoint_writes": writes, "pid": os.getpid(), "time": time.time(), "host": os.uname().nodename}
    (folder / f"rank{hvd.rank()}.json").write_text(json.dumps(info))
