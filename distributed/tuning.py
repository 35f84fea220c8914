"""This rank's thread plan: oneDNN / OpenMP / TensorFlow / Horovod settings from the node's topology.

Pure planning: this module imports no TensorFlow, numpy or Horovod, so the launcher
(``launch/commands.py``) uses it to build every rank's environment. Putting a plan into a
process (environment, CPU binding, tf.config) is :mod:`distributed.runtime`.

TensorFlow sizes its thread pools once, when its runtime starts, from ``TF_NUM_INTRAOP_THREADS``
/ ``TF_NUM_INTEROP_THREADS`` (and oneDNN/OpenMP builds from ``OMP_NUM_THREADS``, ``KMP_*``), so
these have to be in the environment before ``import tensorflow``. The rule, from the node's
physical cores, its sockets/NUMA nodes and the number of ranks on the node:

* intra-op threads = physical cores / local ranks (at least 1): ranks share a node's cores,
  never more threads than cores (hyper-threads do not help these GEMM-bound kernels);
  a rank that the launcher bound to a set of cores (``mpirun --bind-to ...``) uses those cores;
* ``runtime.reserve_cores`` (default 0) of a rank's cores are left to Horovod's background thread
  and tf.data, as Intel's launch scripts do: intra-op threads = the rank's cores minus those
  (at least 1). The default stays 0 until a measurement shows a gain;
* inter-op threads = the sockets a rank's cores span: Intel's guidance for TensorFlow on CPUs
  ("inter_op_parallelism = number of sockets", in *Maximize TensorFlow Performance on CPU:
  Considerations and Recommendations for Inference Workloads*) applied to the rank's share. A rank
  bound within one socket (one rank per socket, or per NUMA domain on NPS2/NPS4 and SNC nodes, which
  the launcher never lets straddle a socket) gets 1; one rank over a 2-socket node gets 2; NUMA
  domains inside one socket add none (the guidance counts sockets). The launcher's plan and the
  rank's own plan (from its CPU mask) agree;
* ``OMP_NUM_THREADS`` = intra-op threads; ``KMP_AFFINITY``/``KMP_BLOCKTIME`` as configured
  (they only matter to OpenMP builds such as intel-tensorflow; stock TF ignores them);
* ``TF_ENABLE_ONEDNN_OPTS``: ``on`` = 1, ``off`` = 0, ``auto`` = TensorFlow's default (left unset).
  That default is ON only on x86 CPUs with AVX512_VNNI, AVX512_BF16 or AMX and OFF on AVX2-only
  CPUs, so ``auto`` does not mean "oneDNN". Whether oneDNN pays depends on the CPU, the image
  size and the threads per rank (measurements in BENCHMARKS.md), so it stays a measured choice;
  ``distributed.runtime.onednn_enabled`` says what TensorFlow actually does and the training
  log prints it;
* ``HOROVOD_CYCLE_TIME`` = 50 ms. Horovod's background thread wakes every cycle and, even with
  nothing to reduce, negotiates with every other rank; its 1 ms default suits GPU steps of tens
  of ms. On CPU every core of a rank runs TensorFlow's threads, so each wake-up (and Open MPI's
  busy polling while it waits for a descheduled rank) takes CPU from the step; a step of seconds
  loses at most one cycle waiting to start its allreduce. BENCHMARKS.md has the measured step
  times with 1 ms and 50 ms.

Explicit ``runtime.*`` values win over the rule. :func:`thread_env` is the pure function the
launcher passes to every rank (``mpirun -x``); :func:`rank_cpus` is the share of cores a rank
binds itself to when the launcher binds nothing (``horovodrun --gloo``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["AUTO_CYCLE_MS", "Topology", "ThreadPlan", "detect_topology", "plan_threads", "thread_env",
           "rank_cpus", "node_cores"]


AUTO_CYCLE_MS = 50.0  # HOROVOD_CYCLE_TIME for CPU training (see the module's docstring)


@dataclass(frozen=True)
class Topology:
    """What a node offers. ``bound_cores``: physical cores in this process' CPU affinity mask when
    a launcher bound it to fewer CPUs than the node has (then the mask is the rank's share)."""
    sockets: int
    physical_cores: int
    logical_cpus: int = 0
    numa_nodes: int = 1
    bound_cores: int | None = None
    source: str = "given"
    bound_sockets: int | None = None  # sockets the affinity mask (or the launcher's binding) spans

    @property
    def threads_per_core(self) -> int:
        """Hardware threads per physical core (2 with hyper-threading / SMT on, else 1)."""
        return max(1, self.logical_cpus // self.physical_cores) if self.logical_cpus else 1

    @property
    def cores_per_socket(self) -> int:
        return max(1, self.physical_cores // self.sockets)

    def __post_init__(self):
        if self.sockets < 1 or self.physical_cores < 1:
            raise ValueError(f"topology needs at least one socket and one core, got {self}")

    @property
    def domains(self) -> int:
        """Memory domains: sockets, or NUMA nodes when there are more (AMD NPS>1, sub-NUMA)."""
        return max(self.sockets, self.numa_nodes, 1)


@dataclass(frozen=True)
class ThreadPlan:
    intra_op: int
    inter_op: int
    omp_num_threads: int
    kmp_affinity: str
    kmp_blocktime: int
    onednn: str  # on | off | auto
    local_ranks: int
    topology: Topology
    horovod_cycle_ms: float = AUTO_CYCLE_MS
    origin: Mapping[str, str] = field(default_factory=dict)  # value -> "config" | "auto"
    precision: Any = None  # distributed.precision.PrecisionPlan, set by distributed.runtime.apply

    def env(self) -> dict[str, str]:
        env = {
            "OMP_NUM_THREADS": str(self.omp_num_threads),
            "TF_NUM_INTRAOP_THREADS": str(self.intra_op),
            "TF_NUM_INTEROP_THREADS": str(self.inter_op),
        }
        if self.kmp_affinity:
            env["KMP_AFFINITY"] = self.kmp_affinity
            env["KMP_BLOCKTIME"] = str(self.kmp_blocktime)
        if self.onednn != "auto":
            env["TF_ENABLE_ONEDNN_OPTS"] = "1" if self.onednn == "on" else "0"
        env["HOROVOD_CYCLE_TIME"] = f"{self.horovod_cycle_ms:g}"
        return env

    def describe(self) -> str:
        t = self.topology
        share = (f"{t.bound_cores} bound cores" if t.bound_cores
                 else f"{t.physical_cores} physical cores / {self.local_ranks} local rank(s)")
        o = self.origin
        return (f"threads: intra_op={self.intra_op} ({o.get('intra_op', 'auto')}), "
                f"inter_op={self.inter_op} ({o.get('inter_op', 'auto')}), "
                f"OMP_NUM_THREADS={self.omp_num_threads}, KMP_AFFINITY={self.kmp_affinity or '(unset)'}, "
                f"KMP_BLOCKTIME={self.kmp_blocktime}, oneDNN={self.onednn}, "
                f"HOROVOD_CYCLE_TIME={self.horovod_cycle_ms:g} ms ({o.get('horovod_cycle_ms', 'auto')}); "
                f"node: {t.sockets} socket(s), "
                f"{t.numa_nodes} NUMA node(s), {t.physical_cores} physical cores, {t.logical_cpus} CPUs "
                f"[{t.source}]; share: {share}"
                + (f"; {self.precision.describe()}" if self.precision is not None else ""))


# --------------------------------------------------------------------------- detection

def _parse_cpulist(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            cpus.update(range(int(a), int(b) + 1))
        else:
            cpus.add(int(part))
    return cpus


def _read(p: Path) -> str | None:
    try:
        return p.read_text().strip()
    except OSError:
        return None


def _from_sys(sys_root: Path) -> tuple[dict[int, tuple[int, int]], int] | None:
    """cpu -> (package, core) for online CPUs, and the NUMA node count."""
    cpu_root = sys_root / "devices/system/cpu"
    online = _read(cpu_root / "online")
    if online is None:
        return None
    cores: dict[int, tuple[int, int]] = {}
    for cpu in sorted(_parse_cpulist(online)):
        topo = cpu_root / f"cpu{cpu}" / "topology"
        pkg, core = _read(topo / "physical_package_id"), _read(topo / "core_id")
        if pkg is None or core is None:
            return None
        cores[cpu] = (int(pkg), int(core))
    if not cores:
        return None
    nodes = [p for p in (sys_root / "devices/system/node").glob("node[0-9]*") if p.is_dir()]
    return cores, max(1, len(nodes))


def _from_lscpu() -> tuple[dict[int, tuple[int, int]], int] | None:
    if not shutil.which("lscpu"):
        return None
    try:
        out = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET,NODE"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cores, nodes = {}, set()
    for line in out.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cpu, core, sock, node = (line.split(",") + ["", "", "", ""])[:4]
        cores[int(cpu)] = (int(sock or 0), int(core or cpu))
        nodes.add(node or "0")
    return (cores, max(1, len(nodes))) if cores else None


def detect_topology(sys_root: str | os.PathLike = "/sys") -> Topology:
    """The node's sockets, NUMA nodes and physical cores from /sys (lscpu, then os.cpu_count()
    as fallbacks), and the cores of this process' affinity mask when a launcher bound it."""
    found, source = _from_sys(Path(sys_root)), "sysfs"
    if found is None:
        found, source = _from_lscpu(), "lscpu"
    if found is None:
        n = os.cpu_count() or 1
        return Topology(sockets=1, physical_cores=n, logical_cpus=n, numa_nodes=1, source="os.cpu_count")
    cores, numa = found
    sockets = len({pkg for pkg, _ in cores.values()})
    physical = len(set(cores.values()))
    bound = None
    try:
        mask = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        mask = set(cores)
    bound_sockets = None
    if mask and set(cores) - mask:  # bound to a subset of the node: that subset is our share
        bound = max(1, len({cores[c] for c in mask if c in cores}))
        bound_sockets = max(1, len({cores[c][0] for c in mask if c in cores}))
    return Topology(sockets=sockets, physical_cores=physical, logical_cpus=len(cores), numa_nodes=numa,
                    bound_cores=bound, source=source, bound_sockets=bound_sockets)


def node_cores(sys_root: str | os.PathLike = "/sys") -> dict[int, tuple[int, int]] | None:
    """CPU -> (package, core) of the node's online CPUs from sysfs, or None when unreadable."""
    found = _from_sys(Path(sys_root))
    return found[0] if found is not None else None


def rank_cpus(cores: Mapping[int, tuple[int, int]], local_rank: int, local_ranks: int) -> set[int]:
    """The CPUs of rank ``local_rank`` of ``local_ranks`` on a node whose ``cores`` map CPU ->
    (package, core): the physical cores in (package, core) order are cut into ``local_ranks``
    equal blocks (what ``mpirun --map-by ppr:R:socket:pe=C --bind-to core`` gives), and the rank
    gets every CPU (hyper-threads included) of its block. Empty when there are more ranks than
    physical cores (nothing sensible to bind to)."""
    physical = sorted(set(cores.values()))
    if local_ranks < 1 or not 0 <= local_rank < local_ranks or local_ranks > len(physical):
        return set()
    per = len(physical) // local_ranks
    mine = set(physical[local_rank * per:(local_rank + 1) * per])
    return {cpu for cpu, core in cores.items() if core in mine}


# --------------------------------------------------------------------------- the rule

def _rt(runtime, name, default):
    return getattr(runtime, name, default) if runtime is not None else default


def plan_threads(topology: Topology, local_ranks: int, runtime=None) -> ThreadPlan:
    """Thread settings for one rank of ``local_ranks`` on a node with ``topology``.

    ``runtime`` is the config's ``runtime`` section (or None for all-auto); its non-zero values win.
    """
    local_ranks = max(1, int(local_ranks))
    if topology.bound_cores:
        cores = topology.bound_cores
        sockets_per_rank = topology.bound_sockets or 1
    else:
        cores = max(1, topology.physical_cores // local_ranks)
        sockets_per_rank = max(1, topology.sockets // local_ranks)
    origin = {}
    intra = _rt(runtime, "intra_op_threads", 0)
    origin["intra_op"] = "config" if intra else "auto"
    intra = intra or max(1, cores - _rt(runtime, "reserve_cores", 0))
    inter = _rt(runtime, "inter_op_threads", 0)
    origin["inter_op"] = "config" if inter else "auto"
    inter = inter or sockets_per_rank
    omp = _rt(runtime, "omp_num_threads", 0)
    origin["omp_num_threads"] = "config" if omp else "auto"
    omp = omp or intra
    cycle = _rt(runtime, "horovod_cycle_ms", 0.0)
    origin["horovod_cycle_ms"] = "config" if cycle else "auto"
    cycle = cycle or AUTO_CYCLE_MS
    return ThreadPlan(
        intra_op=intra, inter_op=inter, omp_num_threads=omp,
        kmp_affinity=_rt(runtime, "kmp_affinity", "granularity=fine,compact,1,0"),
        kmp_blocktime=_rt(runtime, "kmp_blocktime", 1),
        onednn=_rt(runtime, "onednn", "auto"),
        local_ranks=local_ranks, topology=topology, horovod_cycle_ms=float(cycle), origin=origin)


def thread_env(topology: Topology, local_ranks: int, runtime=None) -> dict[str, str]:
    """The environment one rank should get (pure: what the launcher passes with ``-x``)."""
    return plan_threads(topology, local_ranks, runtime).env()
