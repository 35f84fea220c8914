"""What an epoch reports besides its metrics: its time and speed, the learning rate, progress lines.

:class:`EpochTimer` and :class:`LearningRateLogger` add ``seconds``, ``images_per_s`` and ``lr`` to
the epoch's logs (``history.csv``); :func:`progress` chooses between Keras' live bar and
:class:`Progress` lines on rank 0.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np
import tensorflow as tf

from data_prep.log import get_logger
from distributed import hvd


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


class LearningRateLogger(tf.keras.callbacks.Callback):
    """``lr``: the learning rate the last step used (schedules evaluated at the step)."""

    def on_epoch_end(self, epoch, logs=None):
        opt = self.model.optimizer
        lr = opt.learning_rate if hasattr(opt, "learning_rate") else opt.lr
        if isinstance(lr, tf.keras.optimizers.schedules.LearningRateSchedule):
            lr = lr(tf.maximum(opt.iterations - 1, 0))
        if logs is not None:
            logs["lr"] = float(tf.keras.backend.get_value(lr))


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
