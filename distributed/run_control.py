"""When training stops: early stopping on val_loss, and a stop signal at a step every rank agrees on.

Both keep their state where a resume finds it (``RunState``), so that a resumed run stops where the
uninterrupted one would have. The signal handlers themselves are ``distributed.stopping``'s
(installed before TensorFlow loads); a stop ends in :class:`distributed.stopping.Stopped`.
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_prep.log import get_logger
from distributed import hvd
from distributed.rundir import RunState, append_batches
from distributed.stopping import Signals, Stopped


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
