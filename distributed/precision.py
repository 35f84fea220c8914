"""Which compute precision a rank trains and evaluates in (``runtime.precision``), from its CPU.

Pure planning, like :mod:`distributed.tuning`: no TensorFlow here, because the choice decides an
environment variable (``TF_ENABLE_ONEDNN_OPTS``) that TensorFlow reads once, at import.

* ``float32``: everything in float32.
* ``mixed_bfloat16``: Keras' mixed-precision policy. Convolutions and matmuls compute in bfloat16;
  variables, gradients (and so Horovod's allreduce), the input layers, the classifier's softmax
  and the loss stay float32. No loss scaling is needed: bfloat16 has float32's exponent range.
  TensorFlow's oneDNN kernels run bfloat16 on AMX tiles (``amx_bf16``), so oneDNN is turned on
  for it unless ``runtime.onednn: off`` forbids it.
* ``auto``: ``mixed_bfloat16`` when the CPU has AMX-BF16 and oneDNN may run, else ``float32``.
  Without AMX, bfloat16 runs as AVX512_BF16 dot products or is emulated in float32 (AVX2), which
  BENCHMARKS.md measured slower than, or no faster than, float32; so ``auto`` keeps float32 there.

Every rank decides for its own CPU (nodes of a cluster can differ); the choice and its reason are
logged and recorded in the run's state and report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRECISIONS", "PrecisionPlan", "cpu_flags", "plan_precision", "onednn_default_on"]

PRECISIONS = ("float32", "mixed_bfloat16")
# TensorFlow 2.15 turns oneDNN on by default on x86 CPUs with any of these (util_port.cc).
_ONEDNN_DEFAULT_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str        # float32 | mixed_bfloat16
    reason: str           # one phrase for the log
    onednn_env: str = ""  # "1" when TF_ENABLE_ONEDNN_OPTS must be set for it, else "" (leave as is)

    @property
    def bfloat16(self) -> bool:
        return self.precision == "mixed_bfloat16"

    def describe(self) -> str:
        return f"precision {self.precision} ({self.reason})"


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's flags from /proc/cpuinfo (empty when unreadable)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("flags") and ":" in line:
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def onednn_default_on(flags) -> bool:
    """What TensorFlow 2.15's ``auto`` will do on a CPU with ``flags`` (a prediction for the
    planner; :func:`distributed.runtime.onednn_enabled` reports what it did)."""
    return any(f in flags for f in _ONEDNN_DEFAULT_FLAGS)


def plan_precision(setting: str = "auto", onednn: str = "auto", flags=None, environ=None) -> PrecisionPlan:
    """The precision for ``runtime.precision`` = ``setting`` with ``runtime.onednn`` = ``onednn`` on a
    CPU with ``flags`` (default: this one's). ``environ``: a ``TF_ENABLE_ONEDNN_OPTS`` the user set
    counts as their oneDNN choice when ``onednn`` is auto."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    user = (environ or {}).get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower()
    if onednn == "auto" and user in ("0", "false", "off"):
        onednn = "off"
    if setting == "float32":
        return PrecisionPlan("float32", "runtime.precision")
    if setting == "mixed_bfloat16":
        if onednn == "off":
            return PrecisionPlan("mixed_bfloat16", "runtime.precision; oneDNN is off, so bfloat16 runs on "
                                                   "TensorFlow's slow fallback kernels")
        return PrecisionPlan("mixed_bfloat16", "runtime.precision", "1" if onednn == "auto" else "")
    if setting != "auto":
        raise ValueError(f"runtime.precision: {setting!r} is not auto, float32 or mixed_bfloat16")
    if "amx_bf16" not in flags:
        what = "AVX512_BF16 without AMX" if "avx512_bf16" in flags else "no bfloat16 units"
        return PrecisionPlan("float32", f"auto: this CPU has {what}; bfloat16 would not be faster")
    if onednn == "off":
        return PrecisionPlan("float32", "auto: the CPU has AMX-BF16 but oneDNN is off")
    return PrecisionPlan("mixed_bfloat16", "auto: the CPU has AMX-BF16 and oneDNN runs",
                         "1" if onednn == "auto" else "")
