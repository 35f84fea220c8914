"""What this rank's TensorFlow runs with: the thread plan put into the process, before and after
``import tensorflow``.

A command calls :func:`apply` first (thread variables into ``os.environ``, and for
``horovodrun --gloo`` ranks the CPU binding the launcher did not do), then imports TensorFlow,
then calls :func:`configure_tensorflow`. The plan itself is :mod:`distributed.tuning` (pure).

This module is imported before TensorFlow, so the three functions that need TensorFlow import it
inside: importing it here would start TensorFlow's runtime before :func:`apply` has set its
threads.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Mapping

from data_prep.cli import quiet_tensorflow
from data_prep.log import env_local_size, get_logger
from distributed.precision import cpu_flags, decide, plan_precision
from distributed.tuning import ThreadPlan, Topology, detect_topology, node_cores, plan_threads, rank_cpus

__all__ = ["apply", "bind_gloo_rank", "configure_tensorflow", "settle_precision", "configure_precision",
           "onednn_enabled", "onednn_note", "effective_threads"]


def bind_gloo_rank(environ: Mapping[str, str] | None = None, sys_root: str | os.PathLike = "/sys") -> set[int] | None:
    """Bind this process to its share of the node's cores when ``horovodrun --gloo`` started it.

    Gloo's launcher binds nothing (``--binding-args`` are MPI-only), so every rank could run on
    every core; under ``--mpi`` the launcher binds (bound Gloo and bound MPI ranks compared:
    BENCHMARKS.md). Only acts when the process is unbound, there are 2+ ranks on the node and no
    more than its physical cores. ``environ`` holds
    horovodrun's variables (``HOROVOD_GLOO_RENDEZVOUS_ADDR``, and the
    ``HOROVOD_LOCAL_RANK``/``HOROVOD_LOCAL_SIZE`` it always sets with it). Returns the CPUs bound
    to, or None when it did nothing."""
    environ = os.environ if environ is None else environ
    if "HOROVOD_GLOO_RENDEZVOUS_ADDR" not in environ or not hasattr(os, "sched_setaffinity"):
        return None
    cores = node_cores(sys_root)
    if cores is None:
        return None
    local_ranks = int(environ.get("HOROVOD_LOCAL_SIZE", "1"))
    if local_ranks < 2 or os.sched_getaffinity(0) != set(cores):
        return None
    cpus = rank_cpus(cores, int(environ.get("HOROVOD_LOCAL_RANK", "0")), local_ranks)
    if not cpus:
        return None
    os.sched_setaffinity(0, cpus)
    return cpus


def apply(runtime=None, local_ranks: int | None = None, topology: Topology | None = None,
          environ: dict | None = None, log: bool = True) -> ThreadPlan:
    """Compute this rank's plan and put it into ``os.environ``. Call before importing TensorFlow.

    ``local_ranks`` defaults to the launcher's local size (1 without a launcher).
    """
    environ = os.environ if environ is None else environ
    # TensorFlow's C++ notices, once per rank at import and as echoes of errors stated in one line:
    # hidden unless the user chose a level or --debug; rank 0's log says what matters in its own words.
    quiet_tensorflow(environ)
    # Gloo's launcher binds nothing: bind this rank to its cores as mpirun --bind-to core would,
    # before TensorFlow starts its threads (they inherit the mask) and before the topology is read.
    bound = bind_gloo_rank(environ) if topology is None and environ is os.environ else None
    topology = topology or detect_topology()
    local_ranks = env_local_size() if local_ranks is None else local_ranks
    plan = plan_threads(topology, local_ranks, runtime)
    # The compute precision for this rank's CPU; bfloat16 needs oneDNN, which TensorFlow reads at import.
    precision = plan_precision(getattr(runtime, "precision", "float32") if runtime is not None else "float32",
                               plan.onednn, environ=environ)
    plan = dataclasses.replace(plan, precision=precision)
    logger = get_logger(all_ranks=True)
    if "tensorflow" in sys.modules and environ is os.environ:
        logger.warning("thread settings applied after TensorFlow was imported: intra/inter-op "
                       "threads are set through tf.config where still possible, OMP/KMP may be ignored")
    changed = []
    env = plan.env()
    if precision.onednn_env:
        env["TF_ENABLE_ONEDNN_OPTS"] = precision.onednn_env
    for k, v in env.items():
        old = environ.get(k)
        if old is not None and old != v:
            changed.append(f"{k}={old}->{v}")
        environ[k] = v
    if log:
        logger.info(plan.describe() + (f" (replaced {', '.join(changed)})" if changed else "")
                    + (f"; bound to CPUs {sorted(bound)} (Gloo launcher)" if bound else ""))
        if local_ranks > topology.physical_cores and not topology.bound_cores:
            logger.warning("%d ranks on %d physical cores: oversubscribed, one thread each",
                           local_ranks, topology.physical_cores)
    return plan


def configure_tensorflow(plan: ThreadPlan) -> bool:
    """After ``import tensorflow``: make tf.config agree with the plan (the env vars already did
    when set before import). Returns False when TensorFlow's runtime had already started."""
    import tensorflow as tf  # after apply(): see the module docstring

    try:
        if tf.config.threading.get_intra_op_parallelism_threads() != plan.intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(plan.intra_op)
        if tf.config.threading.get_inter_op_parallelism_threads() != plan.inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(plan.inter_op)
        return True
    except RuntimeError:
        return False


def settle_precision(plan: ThreadPlan, cfg, share=None, root: bool = True) -> ThreadPlan:
    """After ``import tensorflow``: the plan with the precision of ``runtime.precision: auto`` decided,
    where it waits for a measurement (a CPU with bfloat16 instructions; others come back as they are).

    ``root`` measures, or reads the cached measurement (:mod:`distributed.precision_probe`), with the
    model of ``cfg`` (its layers at ``data.image_size``, ``train.batch_size``) and this process'
    threads; ``share(obj)`` (``hvd.broadcast_object``) hands root's result to every rank, so all
    compute in the same precision. Without ``share`` every process decides for itself. Logged
    with its figures on rank 0."""
    p = plan.precision
    if p is None or not p.measure:
        return plan
    result = _probe(plan, cfg) if root or share is None else None
    if share is not None:
        result = share(result)  # every rank takes root's figures (None never reaches here on root)
    source = result.get("source", "measured") if root or share is None else "shared"
    flags = cpu_flags() if result.get("onednn", True) else ()
    figures = {k: result[k] for k in ("ratio", "method", "float32_ms", "bfloat16_ms", "batch", "measured")
               if k in result}
    chosen = decide(p, result.get("ratio"), source, figures=figures, flags=flags)
    if root or share is None:  # the ranks that took root's figures have nothing of their own to say
        _log_probe(chosen, result, source)
    return dataclasses.replace(plan, precision=chosen)


def _log_probe(chosen, result: dict, source: str) -> None:
    logger = get_logger()
    if result.get("error"):
        logger.warning("precision auto: not measured (%s); %s", result["error"], chosen.describe())
        return
    what = ("training step (forward and backward)" if result.get("method") == "step"
            else f"forward pass over the model's {result.get('layers', '?')} conv/dense layers")
    when = (f"measured in {result.get('calibration_s', 0):.1f} s" if source == "measured"
            else f"measured {result.get('measured', '?')}")
    logger.info("%s [float32 %.1f ms, bfloat16 %.1f ms per %s, batch %s; %s, cached in %s]", chosen.describe(),
                result["float32_ms"], result["bfloat16_ms"], what, result.get("batch", "?"), when,
                result.get("cache", "?"))


def _probe(plan: ThreadPlan, cfg) -> dict:
    """This process' measured figures for ``cfg``'s model (:func:`distributed.precision_probe.probe`);
    ``{"ratio": None, "error": ...}`` when it cannot run."""
    if onednn_enabled() is False:  # bfloat16 would run on TensorFlow's slow fallback kernels
        return {"ratio": None, "error": "oneDNN is off in this process", "onednn": False}
    try:
        from distributed import precision_probe  # imports TensorFlow: after apply()

        got = precision_probe.probe(cfg, plan.intra_op, lambda r: decide(plan.precision, r).precision)
    except Exception as e:  # noqa: BLE001 - a failed measurement falls back to the rule, said in one line
        return {"ratio": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    if got.get("cache_error"):
        get_logger().warning("precision auto: cannot cache the measurement in %s (%s)", got["cache"],
                             got["cache_error"])
    return got


def configure_precision(plan: ThreadPlan) -> str:
    """After ``import tensorflow``: the precision this process computes in, checked against what
    TensorFlow really runs. A bfloat16 plan whose oneDNN did not come on (the user's
    ``TF_ENABLE_ONEDNN_OPTS=0``, or TensorFlow imported before :func:`apply`) is logged as a
    warning: it stays correct but runs TensorFlow's slow bfloat16 fallback kernels."""
    chosen = plan.precision.precision if plan.precision is not None else "float32"
    if chosen == "mixed_bfloat16" and onednn_enabled() is False:
        get_logger(all_ranks=True).warning(
            "precision mixed_bfloat16 without oneDNN: correct but slow (TensorFlow's fallback kernels); "
            "set runtime.onednn=on or runtime.precision=float32")
    return chosen


def onednn_enabled() -> bool | None:
    """Whether this TensorFlow runs its oneDNN custom ops (after ``import tensorflow``; it decides
    at import from ``TF_ENABLE_ONEDNN_OPTS`` and, unset, from the CPU). None when it cannot say."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # after apply(); private, may be absent
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def onednn_note(plan: ThreadPlan) -> str:
    """One phrase for the log: what oneDNN does in this process and who decided it."""
    state = onednn_enabled()
    what = "unknown" if state is None else ("on" if state else "off")
    why = "runtime.onednn" if plan.onednn != "auto" else (
        "TF_ENABLE_ONEDNN_OPTS from the environment" if "TF_ENABLE_ONEDNN_OPTS" in os.environ
        else "TensorFlow's default for this CPU")
    return f"oneDNN custom ops {what} ({why})"


def effective_threads() -> dict:
    """What TensorFlow reports now (for logs and tests)."""
    import tensorflow as tf  # after apply(): see the module docstring

    return {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
            "onednn": onednn_enabled()}
