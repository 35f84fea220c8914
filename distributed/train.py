"""Training: ``python -m distributed.train --config C [--resume]`` (console script ``cxr-train``).

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

Exit codes: 0 trained; 128 + signal (SIGTERM 143, SIGUSR1 138, SIGINT 130) stopped by a stop signal
(``train.stop_signals``) with a step checkpoint (0 under horovodrun's elastic driver: see ``main``);
1 and 2 the project's errors (``data_prep.cli``).

Test hooks (environment): ``CXR_STOP_AFTER=<phase>:<n>`` exits like a kill after that epoch;
``CXR_TEST_DUMP=<dir>`` makes every rank write ``rank<r>.json`` (weights checksum, files written);
``CXR_STEP_SLEEP_S=<s>`` sleeps after every training step (to cancel or kill a tiny run mid-epoch).
"""
from __future__ import annotations

import argparse
import sys

from data_prep.cli import command, note_output
from data_prep.config import add_config_args, config_from_args
from distributed import runtime
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


@command("cxr-train")  # the project's errors: one line, exit 2 (config) or 1
def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    note_output(cfg.run.dir)  # a full disk's one line names the run directory
    # 0: trained; 128 + signal number when a stop signal (train.stop_signals) ended it at a step
    # with a checkpoint (SIGTERM 143, SIGUSR1 138, SIGINT 130: "ended by that signal" to shells and Slurm).
    with stop_signals(cfg.train.stop_signals):  # from now on: a signal during start-up is kept too
        code = int(train(cfg, resume=args.resume, restart=args.restart).get("exit_code", 0))
    # Under horovodrun's elastic driver a rank's non-zero exit blacklists its host and the driver then
    # waits for another one (up to its elastic timeout): after a stop the ranks exit 0 there, and the
    # launcher, which forwarded the signal, still exits 128 + signal.
    from distributed import hvd  # (numpy) only now: the thread plan came first

    return 0 if code and hvd.elastic_enabled() else code


def train(cfg, resume: bool = False, plan=None, restart: bool = False) -> dict:
    """Train per ``cfg``; returns {"state", "history", "run_dir"} (the same on every rank).
    ``plan``: a thread plan the caller already applied (benchmarks), else this applies one.
    ``restart``: move an earlier run in ``run.dir`` aside first (``data_prep.rundir``)."""
    plan = plan or runtime.apply(cfg.runtime)  # oneDNN/OpenMP threads of this rank: BEFORE TensorFlow starts
    if cfg.train.elastic:  # Horovod elastic: the same phases, restartable with any number of ranks
        from distributed import elastic  # imports TensorFlow: only now that the thread plan is in os.environ

        return elastic.run(cfg, plan, resume=resume, restart=restart)
    from distributed import trainer  # imports TensorFlow: only now that the thread plan is in os.environ

    return trainer.run(cfg, plan, resume=resume, restart=restart)


if __name__ == "__main__":
    sys.exit(main())
