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
* a stop signal (``train.stop_signals``) stops the elastic job as it stops any training: the
  step checkpoint, then every rank exits; ``--resume`` continues at the step.

The phases themselves are the trainer's (:func:`distributed.trainer.train_phases`); this module adds
the commit (a callback after the checkpoint writer) and the restore from the commit.

Cost: one copy of the weights and optimizer variables into host memory per epoch on every rank
and a broadcast of them at each restart.
Horovod calls stay in ``distributed.hvd``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from data_prep.log import follow_rank
from distributed import hvd, rundir
from distributed import trainer as T
from distributed.rundir import RunState
from distributed.stopping import Stopped


@dataclass(frozen=True)
class Committed:
    """What a commit keeps: replaced as a whole at every commit, never changed in place."""
    run_state: dict            # RunState.to_json()
    weights: list              # model.get_weights()
    opt_phase: str = ""        # phase the optimizer values belong to ("" = none yet)
    opt_values: tuple = ()     # the optimizer's variables (iterations, slots) as numpy arrays


@dataclass
class _Local(T.Tally):
    """This process's own counters (not committed, not synchronised): they survive restarts."""
    tb: object = None


def run(cfg, plan, resume: bool = False, restart: bool = False) -> dict:
    """Train elastically; the same result as :func:`distributed.trainer.run` (on every rank)."""
    su = T.setup(cfg, plan, restart=restart)
    run_dir, log, model = Path(cfg.run.dir), su.log, su.model
    start = T.Start(None)
    if hvd.is_root():  # rank 0 reads or clears the checkpoints; the first synchronisation hands them on
        start = (T.read_checkpoint(run_dir, model, log, su.precision) if resume
                 else T.clear_checkpoints(run_dir, log) or start)
    state = start.state or RunState(size=hvd.size())
    state.precision = su.precision
    # No collective before the elastic function: ranks added later start here while the others
    # wait in its synchronisation (Horovod's rule for elastic.run).
    es = hvd.elastic_state(committed=Committed(state.to_json(), model.get_weights(), start.opt_phase,
                                               start.opt_values))
    try:
        return hvd.elastic_run(_attempt)(es, cfg, model, su.train, su.val, log, _Local())
    except Stopped as e:  # a stop signal: the step checkpoint is written, every rank ends here
        return T.stopped(cfg, e)


def _attempt(es, cfg, model, train_data, val_data, log, local: _Local) -> dict:
    """One (re)start: from the committed values, with the ranks there are now."""
    c: Committed = es.committed
    run_dir = Path(cfg.run.dir)
    log = follow_rank(hvd.rank(), logfile=str(run_dir / "train.log"))  # a restart may change this rank
    state = RunState.from_json(c.run_state)
    if state.step and state.size != hvd.size():  # a step of an epoch cut for another number of ranks
        state.step = 0
    state.size = hvd.size()
    model.set_weights(c.weights)  # the synchronised copy: the same on every rank
    if hvd.is_root():
        rundir.truncate_history(run_dir / rundir.HISTORY, state.epoch)  # drop the rows of a rolled-back epoch
        rundir.truncate_batches(run_dir / rundir.BATCHES, state.epoch, state.step)
    log.info("elastic (re)start: %d rank(s) x %d images, from epoch %d (%s %d)%s", hvd.size(),
             cfg.train.batch_size, state.epoch + 1, state.phase, state.phase_epoch,
             f" step {state.step + 1}" if state.step else "")
    if hvd.is_root() and local.tb is None:  # Horovod: rank 0 logs (rank 0 may change at a restart)
        local.tb = tf.summary.create_file_writer(str(run_dir / rundir.TB))
    # Horovod: the trainer's phases for this restart's ranks (learning rate x the ranks of this
    # restart, rescaled at every reset), the committed optimizer state, the elastic commit after
    # rank 0's files.
    T.train_phases(cfg, model, state, train_data, val_data, log, local.tb if hvd.is_root() else None, local,
                   c.opt_phase, c.opt_values, extra_callbacks=lambda ph: [Commit(es, state, ph)])
    return T.finish(cfg, model, state, local.writes, log)


class Commit(tf.keras.callbacks.Callback):
    """At the end of every epoch: keep the run state, weights and optimizer variables in memory
    (``es.commit()``, which also raises Horovod's HostsUpdatedInterrupt when hosts were added or
    removed: the restart happens here, at an epoch boundary)."""

    def __init__(self, es, state: RunState, phase: T.Phase):
        super().__init__()
        self.es, self.state, self.phase = es, state, phase

    def on_epoch_end(self, epoch, logs=None):
        self.es.committed = Committed(self.state.to_json(), self.model.get_weights(), self.phase.name,
                                      tuple(v.numpy() for v in T.opt_variables(self.phase.optimizer)))
        self.es.commit()  # Horovod: saves, then checks for host changes on every rank at once
