"""Training: ``python -m distributed.train --config C [--resume | --restart]`` (console script ``cxr-train``).

The same code runs alone, under ``horovodrun -np N`` or ``mpirun -np N``; without Horovod it
trains on one process and says so once. The recipe (two phases, Horovod's lines, checkpoints,
resume) is :func:`distributed.trainer.run` (:func:`distributed.elastic.run` with ``train.elastic``).

Order matters: this module is imported before TensorFlow. :func:`train` first puts this rank's
thread plan into the environment (``distributed.runtime.apply``: TensorFlow sizes its thread
pools once, when it starts) and only then imports ``distributed.trainer``, which imports
TensorFlow. The other commands (``evaluate``, ``predict``) follow the same rule.

Run directory: ``config.yaml``, ``train.log``, ``history.csv`` (one row per epoch, ``epoch``
counted over the whole run), ``checkpoints/{last,best}.keras`` + ``last-optimizer.npz`` +
``state.json``, ``tb/``, and at the end ``model.keras`` and ``saved_model/`` (inference-only
SavedModel for serving: ``tf.saved_model.load(p).serve(images)``), both with the weights of the
best epoch (lowest val_loss), i.e. what early stopping with restore_best_weights gives. Inside an
epoch: ``checkpoints/step-<epoch>-<step>/`` (a stop signal, ``train.checkpoint_every_s``), which
``--resume`` continues from at the next step; ``batches.csv`` with ``train.record_batches``.
``run.json`` records the run's definition (``distributed.rundir``): a run of another one there is
refused; ``--restart`` moves it into ``<run.dir>.replaced-<time>`` first.

A damaged shard found during training (``data_prep.manifest.damaged``, raised inside tf.data's
generator) ends the rank that read it at once with its one line (:func:`data_errors_end_the_rank`):
raised through TensorFlow it would first be printed by TensorFlow's C++ log as a 25-line Python
traceback. The other ranks then find Horovod shut down and say so in one line each
(:class:`PeerStopped`). ``--debug`` keeps TensorFlow's way (tracebacks). When training ends, rank 0
records the prep it trained on in ``run.dir/training_prep.json`` (``distributed.provenance``), which
``cxr-eval`` checks the prep it evaluates against.

Exit codes: 0 trained; 128 + signal (SIGTERM 143, SIGUSR1 138, SIGINT 130) stopped by a stop signal
(``train.stop_signals``) with a step checkpoint (0 under horovodrun's elastic driver: see ``main``);
1 and 2 the project's errors (``data_prep.cli``).

Test hooks (``CXR_STOP_AFTER``, ``CXR_STEP_SLEEP_S``, ``CXR_TEST_DUMP``): ``data_prep.testhooks``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time

from data_prep import cli
from data_prep.cli import UserError, command, note_output
from data_prep.config import add_config_args, config_from_args
from data_prep.log import env_rank
from distributed import runtime, tracking
from distributed.stopping import stop_signals


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="cxr-train", description=__doc__.split("\n\n")[0])
    add_config_args(ap)
    ap.add_argument("--resume", action="store_true",
                    help="continue from <run.dir>/checkpoints (phase, epoch, optimizer, early stopping)")
    ap.add_argument("--restart", action="store_true",
                    help="start over in run.dir: an earlier run there (also one of another config, which is "
                         "refused otherwise) is first moved aside into <run.dir>.replaced-<time>")
    args = ap.parse_args(argv)
    if args.resume and args.restart:
        from data_prep.cli import UsageError

        raise UsageError("--resume and --restart exclude each other: continue the run, or start it over")
    return args


PROG = "cxr-train"


class PeerStopped(UserError):
    """Horovod shut down under this rank because another rank stopped (its own line says why)."""


class _EndTheRank(list):
    """``data_prep.cli``'s list of deferred errors while training runs: an error raised where TensorFlow
    would wrap it (a damaged shard read inside tf.data) is reported as the command's one line at once and
    ends this rank (exit code 1), before TensorFlow logs it with a traceback."""

    def append(self, e):
        super().append(e)
        _REPORTED.set()  # the main thread, which Horovod's shutdown below wakes with an error, says nothing more
        code = cli.report(PROG, e)
        sys.stdout.flush()
        sys.stderr.flush()
        _leave_horovod(SHUTDOWN_WAIT_S)
        os._exit(code)


SHUTDOWN_WAIT_S = 5.0
_REPORTED = threading.Event()


def _leave_horovod(wait_s: float) -> None:
    """Shut Horovod down (bounded), so that the other ranks see an orderly shutdown rather than a lost peer."""
    from distributed import hvd

    if hvd.enabled() and hvd.size() > 1:
        t = threading.Thread(target=hvd.shutdown, daemon=True)
        t.start()
        t.join(wait_s)


@contextlib.contextmanager
def data_errors_end_the_rank():
    """While training: :class:`_EndTheRank` in place of ``data_prep.cli``'s deferred-error list; without
    ``--debug``/``CXR_DEBUG`` only."""
    if cli.debug_enabled():
        yield
        return
    saved, cli._DEFERRED = cli._DEFERRED, _EndTheRank(cli._DEFERRED)
    try:
        yield
    finally:
        cli._DEFERRED = saved


def _peer_gone(e: BaseException) -> bool:
    seen = 0
    while e is not None and seen < 10:
        if "Horovod has been shut down" in str(e) or type(e).__name__ == "HorovodInternalError":
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


@command(PROG)  # the project's errors: one line, exit 2 (config) or 1
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    note_output(cfg.run.dir)  # a full disk's one line names the run directory
    tracking.require(cfg)  # tracking.backend mlflow without MLflow: one line now, not after training
    # 0: trained; 128 + signal number when a stop signal (train.stop_signals) ended it at a step
    # with a checkpoint (SIGTERM 143, SIGUSR1 138, SIGINT 130: "ended by that signal" to shells and Slurm).
    try:
        with stop_signals(cfg.train.stop_signals), data_errors_end_the_rank():  # a signal during start-up is kept too
            code = int(train(cfg, resume=args.resume, restart=args.restart).get("exit_code", 0))
    except Exception as e:  # noqa: BLE001 - only Horovod's shutdown under this rank is translated
        if _REPORTED.is_set():  # this rank's data error was reported; its thread ends the process
            time.sleep(SHUTDOWN_WAIT_S + 5.0)
            os._exit(1)
        if cli.debug_enabled() or isinstance(e, UserError) or not _peer_gone(e):
            raise
        raise PeerStopped("training stopped: another rank ended and Horovod shut down (its own error line names "
                          "the cause); rerun the same command with --resume once it is fixed") from None
    # Under horovodrun's elastic driver a rank's non-zero exit blacklists its host and the driver then
    # waits for another one (up to its elastic timeout): after a stop the ranks exit 0 there, and the
    # launcher, which forwarded the signal, still exits 128 + signal.
    from distributed import hvd  # (numpy) only now: the thread plan came first

    if code == 0 and (hvd.rank() if hvd.enabled() else env_rank()) == 0:
        record_prep(cfg)
        tracking.log_training(cfg, resume=args.resume)  # MLflow (tracking.backend), else nothing
    return 0 if code and hvd.elastic_enabled() else code


def record_prep(cfg) -> None:
    """Rank 0, after training: the prep it trained on, for cxr-eval's leakage check (distributed.provenance)."""
    from data_prep.log import get_logger
    from distributed import provenance

    try:
        provenance.record_training(cfg.run.dir, cfg.prep.out)
    except (OSError, UserError, KeyError, ValueError) as e:
        get_logger().warning("%s not written (%s: %s): cxr-eval will take the prep from config.yaml",
                             provenance.RECORD, type(e).__name__, e)


def train(cfg, resume: bool = False, plan=None, restart: bool = False) -> dict:
    """Train per ``cfg``; returns {"state", "history", "run_dir"} (the same on every rank).
    ``plan``: a thread plan the caller already applied (benchmarks), else this applies one.
    ``restart``: move an earlier run in ``run.dir`` aside first (``distributed.rundir``)."""
    plan = plan or runtime.apply(cfg.runtime)  # oneDNN/OpenMP threads of this rank: BEFORE TensorFlow starts
    if cfg.train.elastic:  # Horovod elastic: the same phases, restartable with any number of ranks
        from distributed import elastic  # imports TensorFlow: only now that the thread plan is in os.environ

        return elastic.run(cfg, plan, resume=resume, restart=restart)
    from distributed import trainer  # imports TensorFlow: only now that the thread plan is in os.environ

    return trainer.run(cfg, plan, resume=resume, restart=restart)


if __name__ == "__main__":
    sys.exit(main())
