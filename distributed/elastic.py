"""Elastic training (``train.elastic: true``, started by ``python -m launch train --elastic``).

The phases of :func:`distributed.trainer.run`, restartable with any number of ranks. Horovod's
elastic driver (``horovodrun --min-np --max-np --host-discovery-script``) keeps the job going when a
rank is lost and adds ranks when hosts come back; every (re)start runs :func:`_attempt` with the
committed :class:`Committed` values, broadcast from rank 0:

* commit: at the end of every epoch, after the checkpoint files (rank 0): the run state (phase,
  epochs, early stopping, best val_loss), the weights and the optimizer's variables, in memory on
  every rank. A lost rank rolls every survivor back to it: the epoch in progress is run again,
  from its first step, by the ranks that remain; no image is skipped or seen twice in it.
* restart: Horovod re-initialised with the new ranks; the learning rate is scaled by the new number
  of ranks (a new optimizer whose schedule gets ``hvd.size()``; its step counter and slots come from
  the commit), the epoch is re-sharded (:func:`distributed.data.epoch_indices` with the new rank
  and size: one permutation per epoch, disjoint parts), and rank 0 cuts ``history.csv`` back to the
  committed epochs. ``history.csv`` records the ranks of every epoch.
* files: rank 0 alone writes, each file atomically (temp file, rename), ``state.json`` last.

Cost: one copy of the weights and optimizer variables into host memory per epoch on every rank
(about 120 MB for VGG16 with SGD momentum) and a broadcast of them at each restart.
Horovod calls stay in ``distributed.hvd``.
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from data_prep.log import follow_rank
from distributed import callbacks as cb
from distributed import data as D
from distributed import hvd
from distributed import model as M


T = None  # distributed.trainer, set by run()


@dataclass(frozen=True)
class Committed:
    """What a commit keeps: replaced as a whole at every commit, never changed in place."""
    run_state: dict            # cb.RunState.to_json()
    weights: list              # model.get_weights()
    opt_phase: str = ""        # phase the optimizer values belong to ("" = none yet)
    opt_values: tuple = ()     # the optimizer's variables (iterations, slots) as numpy arrays


@dataclass
class _Local:
    """This process's own counters (not committed, not synchronised): they survive restarts."""
    writes: int = 0
    tb: object = None


def run(cfg, model, train_data, val_data, resume: bool, log, recipe) -> dict:
    """Train elastically; the same result as :func:`distributed.trainer.run` (on every rank).
    ``recipe``: the ``distributed.trainer`` module, whose optimizer, checkpoint and finishing helpers
    this reuses (handed in, not imported: trainer imports this module)."""
    global T
    T = recipe
    run_dir = Path(cfg.run.dir)
    state = None
    precision = M.precision_of(model)
    if hvd.is_root():  # rank 0 reads or clears the checkpoints; the first synchronisation hands them on
        if resume:
            state, _ = T._read_checkpoint(run_dir, model, log, precision)
        elif (run_dir / "checkpoints" / "state.json").exists():
            log.warning("%s has checkpoints of an earlier run: starting afresh (use --resume to continue)", run_dir)
            (run_dir / "history.csv").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    state = state or cb.RunState(size=hvd.size())
    state.precision = precision
    # No collective before the elastic function: ranks added later start here while the others
    # wait in its synchronisation (Horovod's rule for elastic.run).
    es = hvd.elastic_state(committed=Committed(state.to_json(), model.get_weights()))
    local = _Local()
    return hvd.elastic_run(_attempt)(es, cfg, model, train_data, val_data, log, local)


def _attempt(es, cfg, model, train_data, val_data, log, local: _Local) -> dict:
    """One (re)start: from the committed values, with the ranks there are now."""
    c: Committed = es.committed
    run_dir = Path(cfg.run.dir)
    log = follow_rank(hvd.rank(), logfile=str(run_dir / "train.log"))  # a restart may change this rank
    state = cb.RunState.from_json(c.run_state)
    state.size = hvd.size()
    model.set_weights(c.weights)  # the synchronised copy: the same on every rank
    if hvd.is_root():
        cb.truncate_history(run_dir / "history.csv", state.epoch)  # drop the rows of a rolled-back epoch
    multilabel = train_data.multilabel
    # Horovod: 1/size of every epoch per rank, for the size of this restart.
    steps = D.steps_per_epoch(train_data.n, cfg.train.batch_size, hvd.size(), cfg.train.steps_per_epoch)
    log.info("elastic (re)start: %d rank(s) x %d images x %d steps per epoch, from epoch %d (%s %d)",
             hvd.size(), cfg.train.batch_size, steps, state.epoch + 1, state.phase, state.phase_epoch)

    # The phase loop of trainer.run, plus the commit and the optimizer restored from memory.
    for phase in T.PHASES:
        if state.complete or T._phase_done(cfg, state, phase):
            continue
        if state.phase == phase and state.early_stopping.get("stopped"):
            break
        pcfg = cfg.train.warmup if phase == "warmup" else cfg.train.finetune
        if state.phase != phase:
            state.phase, state.phase_epoch = phase, 0
            state.early_stopping = {"best": math.inf, "wait": 0, "stopped": False}
        M.set_trainable(model, phase, cfg.train.finetune.freeze, cfg.train.finetune.freeze_first)
        # Horovod: learning rate x the ranks of this restart (rescaled at every reset).
        opt = hvd.DistributedOptimizer(T.make_optimizer(phase, pcfg, cfg.train, hvd.size(), steps))
        model.compile(optimizer=opt, loss="binary_crossentropy" if multilabel else "categorical_crossentropy",
                      metrics=["accuracy"])
        T._build_optimizer(opt, model)
        if c.opt_phase == phase:  # the committed optimizer state (identical on every rank after the sync)
            for v, a in zip(T._opt_variables(opt), c.opt_values):
                v.assign(a)
        if hvd.is_root() and local.tb is None:  # Horovod: rank 0 logs (rank 0 may change at a restart)
            local.tb = tf.summary.create_file_writer(str(run_dir / "tb"))
        ckpt = cb.Checkpointer(run_dir, state, phase, lambda p, o=opt, ph=phase: T._save_optimizer(o, model, p, ph),
                               local.tb if hvd.is_root() else None)
        # Horovod: the trainer's callbacks for this restart's ranks; the elastic commit after rank 0's files.
        callbacks = T.epoch_callbacks(cfg, state, phase, steps, val_data, train_data.num_classes, multilabel,
                                      [ckpt, Commit(es, state, opt, phase)])
        # Horovod: progress on this restart's rank 0 only; a live bar only on a terminal without a launcher.
        verbose, shown = cb.progress(phase, steps, cfg.train.batch_size * hvd.size(), hvd.is_root())
        # Horovod: this restart's rank and size shard the epoch; the epoch number keeps the permutation.
        ds = D.train_dataset(train_data, batch_size=cfg.train.batch_size, rank=hvd.rank(), size=hvd.size(),
                             seed=cfg.train.seed, start_epoch=state.epoch, steps=steps, augment=cfg.train.augment,
                             data_threads=cfg.runtime.data_threads, autotune=cfg.runtime.data_autotune)
        try:
            model.fit(ds, steps_per_epoch=steps, epochs=pcfg.epochs, initial_epoch=state.phase_epoch,
                      callbacks=callbacks + shown, verbose=verbose)
        finally:
            local.writes += ckpt.writes
        if state.early_stopping.get("stopped"):
            break

    state.complete = True
    T._dump_for_tests(model, local.writes)
    if hvd.is_root():  # Horovod: rank 0 writes the final model
        T._finalize(model, run_dir, state, log)
    hvd.barrier()  # Horovod: nobody leaves before rank 0 has written everything
    history = cb.read_history(run_dir / "history.csv") if hvd.is_root() else []
    return {"state": state.to_json(), "history": history, "run_dir": str(run_dir)}


class Commit(tf.keras.callbacks.Callback):
    """At the end of every epoch: keep the run state, weights and optimizer variables in memory
    (``es.commit()``, which also raises Horovod's HostsUpdatedInterrupt when hosts were added or
    removed: the restart happens here, at an epoch boundary)."""

    def __init__(self, es, state: cb.RunState, opt, phase: str):
        super().__init__()
        self.es, self.state, self.opt, self.phase = es, state, opt, phase

    def on_epoch_end(self, epoch, logs=None):
        self.es.committed = Committed(self.state.to_json(), self.model.get_weights(), self.phase,
                                      tuple(v.numpy() for v in T._opt_variables(self.opt)))
        self.es.commit()  # Horovod: saves, then checks for host changes on every rank at once
