"""Which compute precision a rank trains and evaluates in (``runtime.precision``), from its CPU.

Pure planning, like :mod:`distributed.tuning`: no TensorFlow here, because the choice decides an
environment variable (``TF_ENABLE_ONEDNN_OPTS``) that TensorFlow reads once, at import.

* ``float32``: everything in float32.
* ``mixed_bfloat16``: Keras' mixed-precision policy. Convolutions and matmuls compute in bfloat16;
  variables, gradients (and so Horovod's allreduce), the input layers, the classifier's softmax
  and the loss stay float32. No loss scaling is needed: bfloat16 has float32's exponent range.
  TensorFlow's oneDNN kernels run bfloat16 on AMX tiles (``amx_bf16``) or as AVX512_BF16 dot
  products, so oneDNN is turned on for it unless ``runtime.onednn: off`` forbids it.
* ``auto``: decided by measurement where the CPU has bfloat16 instructions (``avx512_bf16``, e.g.
  AMD Zen 4/5 and Intel Cooper Lake or later, or ``amx_bf16``) and oneDNN may run: after TensorFlow
  loads, rank 0 times a bfloat16 against a float32 pass over the model's own convolution and dense
  shapes (:mod:`distributed.precision_probe`) and every rank takes ``mixed_bfloat16`` when it was at
  least ``MARGIN`` (1.15x) faster, else ``float32``; the figures are cached per CPU, thread count,
  TensorFlow version and layer shapes. Without bfloat16 instructions (bfloat16 would be emulated
  in float32, slower) or with oneDNN off: ``float32``, nothing measured.

The planner here runs before TensorFlow (it may turn oneDNN on); :func:`decide` turns a measured
speed ratio into the choice. The choice and its reason are logged and recorded in the run's
state and report.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["PRECISIONS", "MARGIN", "BF16_FLAGS", "PrecisionPlan", "cpu_flags", "cpu_model", "plan_precision",
           "onednn_default_on", "decide"]


PRECISIONS = ("float32", "mixed_bfloat16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU instructions that compute in bfloat16 (not emulated)
MARGIN = 1.15  # auto takes bfloat16 when its measured pass is at least this much faster than float32
# TensorFlow 2.15 turns oneDNN on by default on x86 CPUs with any of these (util_port.cc).
_ONEDNN_DEFAULT_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str        # float32 | mixed_bfloat16
    reason: str           # one phrase for the log
    onednn_env: str = ""  # "1" when TF_ENABLE_ONEDNN_OPTS must be set for it, else "" (leave as is)
    measure: bool = False  # auto on a CPU with bfloat16 instructions: decided after TensorFlow loads
    figures: tuple = ()   # ((name, value), ...) of the measurement that decided it, for state and report

    @property
    def bfloat16(self) -> bool:
        return self.precision == "mixed_bfloat16"

    def describe(self) -> str:
        if self.measure:  # before TensorFlow loads: float32 only until the calibration decides
            return f"precision {self.reason}"
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


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first CPU's model name with its family and model numbers (virtual machines often show
    one name, "AMD EPYC", for several generations), e.g. ``AMD EPYC (family 25, model 17)``."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if not line.strip():
                break
            if ":" in line:
                k, v = line.split(":", 1)
                fields.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    name = fields.get("model name", "unknown CPU")
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


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
    units = [f for f in BF16_FLAGS if f in flags]
    if not units:
        return PrecisionPlan("float32", "auto: this CPU has no bfloat16 instructions; bfloat16 would be emulated")
    if onednn == "off":
        return PrecisionPlan("float32", f"auto: the CPU has {units[0].upper()} but oneDNN is off")
    return PrecisionPlan("float32", f"auto: to be measured ({units[0].upper()})", "1" if onednn == "auto" else "",
                         measure=True)


_SOURCES = {"measured": "measured", "cached": "cached measurement,", "shared": "rank 0 measured"}


def decide(plan: PrecisionPlan, ratio: float | None, source: str = "measured", margin: float = MARGIN,
           figures: dict | None = None, flags=()) -> PrecisionPlan:
    """The choice of an ``auto`` plan that waits for a measurement (``plan.measure``): bfloat16
    when ``ratio`` (float32 time / bfloat16 time of the calibration pass) is at least ``margin``.
    ``source``: measured (here, now), cached (an earlier measurement on this CPU), shared (rank 0's,
    broadcast). ``ratio`` None (no measurement could run): AMX-BF16 keeps bfloat16 (far faster at
    VGG16 sizes, BENCHMARKS.md), otherwise float32. Plans that wait for nothing come back unchanged."""
    if not plan.measure:
        return plan
    figs = tuple(sorted((figures or {}).items()))
    if ratio is None:
        if "amx_bf16" in flags:
            return PrecisionPlan("mixed_bfloat16", "auto: AMX-BF16, not measured", plan.onednn_env,
                                 figures=figs)
        return PrecisionPlan("float32", "auto: not measured", plan.onednn_env, figures=figs)
    how = _SOURCES[source]
    where = "" if source == "shared" else " on this CPU"
    if ratio >= margin:
        return PrecisionPlan("mixed_bfloat16", f"auto: {how} {ratio:.2f}x float32{where}", plan.onednn_env,
                             figures=figs)
    return PrecisionPlan("float32", f"auto: {how} bfloat16 {ratio:.2f}x float32{where}, below the {margin:.2f}x "
                                    f"margin", plan.onednn_env, figures=figs)
