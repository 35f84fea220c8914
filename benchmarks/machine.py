"""Facts about the machine a benchmark ran on, and its measured float32 and bfloat16 matmul peaks.

``facts()`` needs no TensorFlow: CPU model, sockets, cores, threads, the SIMD/AI flags that
decide which kernels oneDNN picks (avx2, fma, avx512*, amx*), memory, OS, Python, package
versions, the load average (a busy machine makes timings noisy: reports say so).
``matmul_peak()`` runs in a TensorFlow process (a variant's worker, or a subprocess of ours).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata

from distributed.tuning import detect_topology

INTERESTING_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
PACKAGES = ("tensorflow", "tensorflow-cpu", "intel-tensorflow", "intel-extension-for-tensorflow",
            "keras", "numpy", "horovod", "mpi4py")


def _cpuinfo() -> dict:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    k, v = line.split(":", 1)
                    info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    return info


def cpu_flags() -> list[str]:
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in INTERESTING_FLAGS if f in flags]


def package_versions(names=PACKAGES) -> dict:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return out


def mpi_version() -> str:
    if not shutil.which("mpirun"):
        return ""
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


def memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def facts() -> dict:
    t = detect_topology()
    ci = _cpuinfo()
    model = ci.get("model name", platform.processor() or "unknown")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    hypervisor = "hypervisor" in ci.get("flags", "").split()
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": model,
        "vendor": ci.get("vendor_id", ""),
        "sockets": t.sockets,
        "physical_cores": t.physical_cores,
        "logical_cpus": t.logical_cpus,
        "numa_nodes": t.numa_nodes,
        "cpu_flags": cpu_flags(),
        "virtualized": hypervisor,
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": package_versions(),
        "mpi": mpi_version(),
        "loadavg_1m": round(load[0], 2),
        "busy": load[0] > 0.25 * (t.physical_cores or 1),
    }


def matmul_peak(n: int = 1536, seconds: float = 3.0, dtype: str = "float32") -> dict:
    """Best sustained GFLOP/s of an n x n matmul (``dtype``: float32 or bfloat16) in TensorFlow with
    the process' threads.

    The best of several timed blocks (each >= 0.3 s) after one warm-up: the peak this TensorFlow
    build reaches here, the denominator of the MFU column.
    """
    import tensorflow as tf  # only in a worker, after tuning has set the thread variables

    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)

    @tf.function
    def mm(a, b):
        return tf.linalg.matmul(a, b)

    mm(a, b).numpy()  # trace + warm-up
    flops = 2.0 * n**3
    best, reps, t_end = 0.0, 1, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(reps):
            c = mm(a, b)
        c.numpy()
        dt = time.perf_counter() - t0
        if dt < 0.3:
            reps *= 2
            continue
        best = max(best, flops * reps / dt / 1e9)
    if best == 0.0:  # very slow machine: one block longer than the budget
        best = flops * reps / dt / 1e9
    return {"gflops": round(best, 2), "n": n, "dtype": dtype}


PEAK_SHAPES = (1536, 2048, 4096)


def matmul_peak_over_shapes(dtype: str = "float32", shapes=PEAK_SHAPES, seconds: float = 1.5) -> dict:
    """The best :func:`matmul_peak` over square ``shapes``: the best shape differs between builds and
    types (BENCHMARKS.md, "What we learned"). ``by_shape`` keeps each."""
    runs = [matmul_peak(n, seconds, dtype) for n in shapes]
    best = max(runs, key=lambda r: r["gflops"])
    return {**best, "by_shape": {str(r["n"]): r["gflops"] for r in runs}}


def main() -> None:  # python -m benchmarks.machine: print the facts (and the peak with --peak)
    out = facts()
    if "--peak" in sys.argv:
        out["matmul_peak"] = matmul_peak_over_shapes("float32")
        if "amx_bf16" in out["cpu_flags"] or "avx512_bf16" in out["cpu_flags"]:
            out["matmul_peak_bf16"] = matmul_peak_over_shapes("bfloat16")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
