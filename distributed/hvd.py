"""The only module that imports Horovod: a thin edge with a single-process fallback.

Everything else calls these functions and never tests whether Horovod is there. Without Horovod
(not installed, built without TensorFlow, or ``CXR_NO_HOROVOD=1``) the job runs as one process:
rank 0 of 1, collectives are identities, and the first call says so once. Started by a launcher
with several ranks but without Horovod, it refuses instead of letting N copies race on one
run directory.

The commands import this module before TensorFlow (their thread settings come first), so it
imports neither at the top: :func:`init` imports Horovod, which imports TensorFlow.
"""
from __future__ import annotations

import os

import numpy as np

from data_prep.log import env_size, get_logger

__all__ = ["init", "enabled", "rank", "size", "local_rank", "local_size", "is_root", "allreduce",
           "allgather", "allgather_object", "broadcast", "broadcast_object", "broadcast_variables",
           "DistributedOptimizer", "broadcast_callback", "metric_average_callback", "barrier", "shutdown",
           "elastic_state", "elastic_run", "elastic_enabled"]

_hvd = None           # horovod.tensorflow.keras once initialised
_hvd_tf = None        # horovod.tensorflow (object collectives, reduction ops)
_state = {"init": False, "enabled": False, "version": "?"}


def init() -> bool:
    """Initialise Horovod once (idempotent). True when Horovod runs this job."""
    global _hvd, _hvd_tf
    if _state["init"]:
        return _state["enabled"]
    _state["init"] = True
    log = get_logger()
    reason = None
    if os.environ.get("CXR_NO_HOROVOD", "") not in ("", "0"):
        reason = "CXR_NO_HOROVOD is set"
    else:
        try:
            # The one Horovod import, here and not at the top: it may fail (then one process), and
            # it imports TensorFlow, which must wait for the command's thread settings.
            import horovod
            import horovod.tensorflow as hvd_tf
            import horovod.tensorflow.keras as hvd_keras
            _hvd, _hvd_tf, _state["version"] = hvd_keras, hvd_tf, getattr(horovod, "__version__", "?")
        except Exception as e:  # ImportError, or Horovod built without TensorFlow support
            reason = ("Horovod cannot be imported "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    if reason is not None:
        if env_size() > 1:
            raise RuntimeError(f"{reason}, but the launcher started {env_size()} ranks: each would train alone "
                               f"on the same run directory. Install/build Horovod or start one process.")
        log.warning("%s: training on ONE process (rank 0 of 1), no distributed collectives", reason)
        _hvd = _hvd_tf = None
        return False
    _hvd.init()
    _state["enabled"] = True
    log.info("Horovod %s: %d rank(s), %d on this node", _state["version"], _hvd.size(), _hvd.local_size())
    return True


def enabled() -> bool:
    return _state["enabled"]


def rank() -> int:
    return _hvd.rank() if _state["enabled"] else 0


def size() -> int:
    return _hvd.size() if _state["enabled"] else 1


def local_rank() -> int:
    return _hvd.local_rank() if _state["enabled"] else 0


def local_size() -> int:
    return _hvd.local_size() if _state["enabled"] else 1


def is_root() -> bool:
    return rank() == 0


def _op(op: str):
    return {"average": _hvd_tf.Average, "sum": _hvd_tf.Sum, "max": _hvd_tf.Max, "min": _hvd_tf.Min}[op]


def _tensor(value):
    import tensorflow as tf  # already loaded by init()'s Horovod import (module docstring)

    return tf.convert_to_tensor(value)


def _no_op_callback():
    import tensorflow as tf  # the caller is building a Keras model: TensorFlow runs (module docstring)

    return tf.keras.callbacks.Callback()


def allreduce(value, op: str = "average", name: str | None = None) -> np.ndarray:
    """Reduce a number/array over ranks (op: average, sum, max, min); numpy result."""
    if not _state["enabled"] or size() == 1:
        return np.asarray(value)
    return _hvd.allreduce(_tensor(value), op=_op(op), name=name).numpy()


def allgather(value, name: str | None = None) -> np.ndarray:
    """Concatenate arrays from all ranks along axis 0 in rank order (first dims may differ)."""
    if not _state["enabled"] or size() == 1:
        return np.asarray(value)
    return _hvd.allgather(_tensor(value), name=name).numpy()


def allgather_object(obj) -> list:
    """A picklable object from every rank, as a list in rank order."""
    if not _state["enabled"] or size() == 1:
        return [obj]
    return _hvd_tf.allgather_object(obj)


def broadcast(value, root_rank: int = 0, name: str | None = None) -> np.ndarray:
    if not _state["enabled"] or size() == 1:
        return np.asarray(value)
    return _hvd.broadcast(_tensor(value), root_rank, name=name).numpy()


def broadcast_object(obj, root_rank: int = 0):
    """A picklable object (a dict of resume state, say) from ``root_rank`` to every rank."""
    if not _state["enabled"] or size() == 1:
        return obj
    return _hvd_tf.broadcast_object(obj, root_rank)


def broadcast_variables(variables, root_rank: int = 0) -> None:
    """Overwrite ``variables`` on every rank with root's values (in place)."""
    if not _state["enabled"] or size() == 1:
        return
    _hvd_tf.broadcast_variables(list(variables), root_rank)


def DistributedOptimizer(optimizer, compression: str = "none", **kwargs):  # noqa: N802 - Horovod's name
    """Wrap a Keras optimizer so gradients are averaged over ranks before they are applied;
    ``compression`` ``fp16`` sends them as float16 (Horovod's ``Compression.fp16``)."""
    if not _state["enabled"] or size() == 1:
        return optimizer
    if compression not in ("none", "fp16"):
        raise ValueError(f"train.allreduce_compression: {compression!r} is not none or fp16")
    comp = _hvd.Compression.fp16 if compression == "fp16" else _hvd.Compression.none
    return _hvd.DistributedOptimizer(optimizer, compression=comp, **kwargs)


def broadcast_callback(root_rank: int = 0):
    """Horovod's callback broadcasting model and optimizer variables after the first batch (the
    optimizer's slots exist only then); a no-op callback without Horovod."""
    if not _state["enabled"] or size() == 1:
        return _no_op_callback()
    return _hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank)


def metric_average_callback():
    """Horovod's callback averaging the epoch's logged metrics over ranks; no-op without Horovod."""
    if not _state["enabled"] or size() == 1:
        return _no_op_callback()
    return _hvd.callbacks.MetricAverageCallback()


def barrier() -> None:
    if _state["enabled"] and size() > 1:
        allreduce(np.int32(0), op="sum", name="cxr_barrier")


def shutdown() -> None:
    if _state["enabled"]:
        _hvd.shutdown()
        _state.update(init=False, enabled=False)


# --------------------------------------------------------------------------- elastic (horovodrun --min-np/--max-np)

class _LocalState:
    """One process without Horovod: an elastic state that never resets."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def commit(self):
        pass

    def register_reset_callbacks(self, callbacks):
        pass


def elastic_state(**values):
    """Horovod's elastic ``ObjectState``: the ``values`` as attributes; ``commit()`` keeps them in memory
    (and raises ``HostsUpdatedInterrupt`` when hosts were added or removed), a failure restores the last
    commit, and every (re)start broadcasts rank 0's copy. Values must be picklable and replaced, not
    changed in place, between commits. Without Horovod: a plain object."""
    if not _state["enabled"]:
        return _LocalState(**values)
    from horovod.common.elastic import ObjectState  # Horovod's own, as KerasState builds on it

    # Horovod: rank 0's values win at every (re)start of the elastic function.
    return ObjectState(_hvd_tf.broadcast_object, rank, **values)


def elastic_run(func):
    """``func(state)`` under Horovod elastic: after a lost rank (``HorovodInternalError``: state restored
    to its last commit) or a host change (``HostsUpdatedInterrupt``), Horovod is re-initialised with the
    ranks there are now and ``func`` runs again from the synchronised state. Without Horovod: ``func``."""
    if not _state["enabled"]:
        return func
    import horovod.tensorflow.keras.elastic as hvd_elastic  # the TensorFlow flavour: maps failed ops to resets

    return hvd_elastic.run(func)


def elastic_enabled() -> bool:
    """True when horovodrun started this process in elastic mode (``--min-np``/``--host-discovery-script``)."""
    return os.environ.get("HOROVOD_ELASTIC", "") == "1"
