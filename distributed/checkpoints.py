"""``--resume`` from checkpoints that may be damaged: ``last.keras`` <-> ``best.keras`` and ``state.json``.

The checkpointer (``distributed.callbacks.Checkpointer``) writes, each epoch and each atomically:
the ``history.csv`` row, ``last.keras``, ``best.keras`` on a new best, and ``state.json`` last. A
file can still be damaged afterwards (a full disk elsewhere, a copy cut short, a bad sector).
:func:`restore` reads what can be read and says what it fell back to:

* ``state.json`` and ``last.keras`` readable: the normal resume;
* ``last.keras`` unreadable, ``best.keras`` readable: resume after the best epoch (phase, epoch and
  early-stopping state as ``history.csv`` had them then; the optimizer restarts, since its saved
  state is the last epoch's); the epochs after it are trained again;
* ``state.json`` unreadable: the state is rebuilt from ``history.csv`` (its rows are the committed
  epochs) for ``last.keras``, or for ``best.keras`` at the best row;
* nothing readable: one line naming each file and why.

Rank 0 only (the trainer broadcasts the state); no Horovod here.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from data_prep.cli import UserError, one_line
from distributed import model as M
from distributed import rundir as R

__all__ = ["restore", "CheckpointError", "state_at"]


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
