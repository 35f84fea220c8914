"""The rank map before the run, as Open MPI's own mapper computes it.

``python -m launch plan`` and every ``--dry-run`` show, per node, each rank's cores, socket, NUMA domain
and threads. For Open MPI lines (mpirun, and the mpirun line horovodrun --mpi makes) the map is Open
MPI's answer, not a copy of its logic: the stage's own mpirun arguments run under Open MPI's
``ras simulator`` with ``--do-not-launch --display-map``, over simulated nodes whose hardware is an
hwloc synthetic topology of the compute nodes' shape (written by hwloc's ``lstopo-no-graphics``).
Nothing is started and no node is contacted; the same run shows whether mpirun accepts the line
(a parameter named twice, a binding it cannot make). Where that cannot run (MPICH, Intel MPI, srun,
Gloo, no hwloc), the map is the project's plan and says so.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from distributed.tuning import Topology, plan_threads
from launch.cluster import ClusterConfig
from launch.commands import MCA_FLAGS, Layout, StageCommand, horovodrun_fixed_mca, horovodrun_mpi_args, rank_topology

SIM_TIMEOUT_S = 120.0
CRASH_RETRIES = 12


class MapUnavailable(RuntimeError):
    """Open MPI's mapper cannot be asked here (the reason is the message)."""


class MapRefused(RuntimeError):
    """mpirun refused the line (its first error line is the message)."""


@dataclass
class RankMap:
    rank: int
    cores: list[tuple[int, int]]  # (socket, core index on the node) of every core it is bound to
    hwts: dict[tuple[int, int], int] = field(default_factory=dict)  # bound hardware threads per core
    threads: int = 0  # the plan's intra-op threads for this rank
    unbound: bool = False  # Open MPI printed UNBOUND (no binding, or a binding to every CPU)

    def sockets(self) -> set[int]:
        return {s for s, _ in self.cores}

    def numa(self, node: Topology) -> set[int]:
        per = max(1, node.physical_cores // node.domains)
        return {c // per for _, c in self.cores}


@dataclass
class NodeMap:
    name: str
    ranks: list[RankMap]


@dataclass
class RankMapResult:
    nodes: list[NodeMap]
    source: str  # "Open MPI 4.1.4's mapper (ras simulator)" or "the project's plan (...)"
    argv: list[str] = field(default_factory=list)  # the mpirun line that was mapped


def synthetic(node: Topology) -> str:
    """hwloc's synthetic description of ``node``: ``pack:2 numa:4 core:24 pu:2``."""
    nps = max(1, node.domains // node.sockets)
    cps = node.cores_per_socket
    if cps % nps:
        nps = 1
    return f"pack:{node.sockets} numa:{nps} core:{cps // nps} pu:{node.threads_per_core}"


def _mpirun_line(cmd: StageCommand, cluster: ClusterConfig) -> list[str]:
    """The mpirun arguments (without the program) the stage's launcher will run."""
    lay = cmd.layout
    if cmd.kind == "mpirun":
        return list(cmd.argv[:cmd.launcher_argc])
    if cmd.kind == "horovodrun" and "--gloo" not in cmd.argv:
        # what horovodrun --mpi makes (Horovod 0.28.1 horovod/runner/mpi_run.py): its fixed parameters,
        # from 64 hosts its tree-spawn ones, then --binding-args and --mpi-args
        argv = ["mpirun", "-np", str(lay.np)]
        if lay.hosts:
            argv += ["--host", ",".join(h.spec() for h in lay.hosts)]
        return argv + horovodrun_fixed_mca(lay, cluster) + lay.binding_args + horovodrun_mpi_args(lay, cluster)
    raise MapUnavailable(f"{cmd.kind}{' --gloo' if '--gloo' in cmd.argv else ''} does not map through Open MPI")


def _simulated(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` with its hosts replaced by the simulated nodes' names, its ``-x`` items and interface
    parameters (``*_if_include``: names of the nodes' network, not this machine's) dropped."""
    out, i, argv = [], 0, list(argv)
    while i < len(argv):
        a = argv[i]
        if a in ("--host", "-H", "--hostfile", "-hostfile", "--machinefile"):
            slots = [h.rsplit(":", 1)[1] if ":" in h else "1" for h in argv[i + 1].split(",")] \
                if a in ("--host", "-H") else []
            if slots:
                out += ["--host", ",".join(f"{n}:{s}" for n, s in zip(names, slots))]
            i += 2
        elif a == "-x":
            i += 2
        elif a in MCA_FLAGS and i + 2 < len(argv) and argv[i + 1].endswith("_if_include"):
            i += 3  # this machine's interfaces are not the nodes': mpirun would refuse a name it lacks here
        else:
            out.append(a)
            i += 1
    return out


def sim_names(n: int) -> list[str]:
    """The node names of Open MPI's ras simulator for ``n`` nodes (``nodeA0``, ``nodeA000``...)."""
    width = len(str(max(0, n - 1)))
    return [f"nodeA{i:0{width}d}" for i in range(n)]


def open_mpi_map(cmd: StageCommand, cluster: ClusterConfig, runtime=None, mpirun: str = "mpirun",
                 lstopo: str = "lstopo-no-graphics", timeout: float = SIM_TIMEOUT_S) -> RankMapResult:
    """Ask Open MPI's mapper where every rank of ``cmd`` goes (module docstring)."""
    lay = cmd.layout
    if cluster.mpi != "openmpi":
        raise MapUnavailable(f"mpi: {cluster.mpi} (only Open MPI has a simulator)")
    line = _mpirun_line(cmd, cluster)
    tool, hw = shutil.which(mpirun), shutil.which(lstopo)
    if not tool:
        raise MapUnavailable("mpirun not found")
    if not hw:
        raise MapUnavailable(f"{lstopo} not found (Debian's hwloc package: `make setup` installs it)")
    nodes = max(1, len(lay.hosts))
    names = sim_names(nodes)
    with tempfile.TemporaryDirectory(prefix="cxr-map-") as tmp:
        xml = Path(tmp) / "node.xml"
        r = subprocess.run([hw, "--input", synthetic(lay.node), "--of", "xml", str(xml)], capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0 or not xml.is_file():
            raise MapUnavailable(f"{lstopo} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        # a session folder of its own: mpiruns of other jobs on this machine never share it
        argv = [tool, "--mca", "ras", "simulator", "--mca", "ras_simulator_num_nodes", str(nodes),
                "--mca", "ras_simulator_topo_files", str(xml), "--mca", "orte_tmpdir_base", tmp,
                "--do-not-launch", "--display-map",
                *_simulated(line[1:], names), "true"]
        env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        for k in [k for k in env if k.startswith("OMPI_MCA_")]:
            del env[k]  # the simulator's own parameters only
        for attempt in range(CRASH_RETRIES):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                               stdin=subprocess.DEVNULL)
            out = r.stdout + r.stderr
            nodes_map = parse_display_map(out)
            crashed = "*** End of error message ***" in out
            if crashed and sum(len(n.ranks) for n in nodes_map) != lay.np:
                nodes_map = []  # cut short by the crash
            if nodes_map or not crashed:
                break
            # Open MPI 4.1.4 segfaults now and then while printing a map (opal_hwloc_base_cset2str, in
            # runs of consecutive process ids): start the next try from process ids further on
            for _ in range(16 * (attempt + 1)):
                subprocess.run(["true"], check=False)
    if not nodes_map:
        raise MapRefused(_first_error(out))
    real = [h.name for h in lay.hosts] or ["this node"]
    by_sim = dict(zip(names, real))
    plan = plan_threads(rank_topology(lay), lay.ranks_per_node, runtime) if lay.cores_per_rank else None
    node = lay.node
    whole = [(c // node.cores_per_socket, c) for c in range(node.physical_cores)]
    for nm in nodes_map:
        nm.name = by_sim.get(nm.name, nm.name)
        for rk in nm.ranks:
            rk.threads = plan.intra_op if plan else 0
            if rk.unbound and len(nm.ranks) == 1 and lay.cores_per_rank == node.physical_cores:
                # Open MPI prints a binding to every CPU of the node as UNBOUND: the rank has the whole node
                rk.cores, rk.hwts = list(whole), {c: node.threads_per_core for c in whole}
    version = _version(tool)
    return RankMapResult(nodes_map, f"Open MPI {version}'s mapper (ras simulator, {synthetic(lay.node)} per node)",
                         [os.path.basename(tool)] + argv[1:])


def _version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"(\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else "?"


def _first_error(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not set(ln.strip()) <= set("-=")]
    for i, ln in enumerate(lines):
        if "listed once" in ln or "error" in ln.lower() or "request was made" in ln.lower() or "not enough" in ln:
            return " ".join(lines[i:i + 3])[:300]
    return (" ".join(lines[:3]) or "no map printed")[:300]


_NODE = re.compile(r"Data for node:\s*(\S+)")
_RANK = re.compile(r"Process rank:\s*(\d+)\s+Bound:\s*(.*)$")


def parse_display_map(text: str) -> list[NodeMap]:
    """Open MPI 4.1's ``--display-map`` output -> nodes with their ranks' bound cores. Each rank's
    bitmap is one ``[...]`` per socket, cores split by ``/``, one character per hardware thread
    (``B`` bound, ``.`` not); ``UNBOUND`` leaves the rank without cores."""
    nodes: list[NodeMap] = []
    for line in text.splitlines():
        m = _NODE.search(line)
        if m:
            nodes.append(NodeMap(m.group(1), []))
            continue
        m = _RANK.search(line)
        if m and nodes:
            rank, rest = int(m.group(1)), m.group(2)
            cores, hwts = [], {}
            bitmap = re.findall(r"\[([B./]*)\]", rest)
            offset = 0
            for sock, block in enumerate(bitmap):
                for ci, core in enumerate(block.split("/")):
                    n = core.count("B")
                    if n:
                        cores.append((sock, offset + ci))
                        hwts[(sock, offset + ci)] = n
                offset += len(block.split("/"))
            nodes[-1].ranks.append(RankMap(rank, cores, hwts, unbound=rest.strip().startswith("UNBOUND")))
    return nodes


def planned_map(cmd: StageCommand, runtime=None, why: str = "") -> RankMapResult:
    """The map the project's plan expects (ranks in order, blocks of whole cores), for launchers whose
    mapper cannot be asked."""
    lay = cmd.layout
    hosts = [h.name for h in lay.hosts] or ["this node"]
    per, cpr = max(1, lay.ranks_per_node), lay.cores_per_rank
    node = lay.node
    plan = plan_threads(rank_topology(lay), per, runtime)
    out, rank = [], 0
    for name in hosts:
        ranks = []
        for local in range(min(per, lay.np - rank)):
            cores = []
            if cpr:
                unit_cores = {"numa": node.physical_cores // node.domains, "node": node.physical_cores}.get(
                    lay.unit, node.cores_per_socket)
                per_unit = max(1, unit_cores // cpr)
                unit, slot = divmod(local, per_unit)
                first = unit * unit_cores + slot * cpr
                cores = [(c // node.cores_per_socket, c) for c in range(first, first + cpr)]
            ranks.append(RankMap(rank, cores, {c: node.threads_per_core for c in cores}, plan.intra_op))
            rank += 1
        out.append(NodeMap(name, ranks))
        if rank >= lay.np:
            break
    return RankMapResult(out, f"the project's plan ({why})" if why else "the project's plan")


def rank_map(cmd: StageCommand, cluster: ClusterConfig, runtime=None) -> tuple[RankMapResult, str]:
    """Open MPI's map where it can be had, else the plan's; (map, a one-line note or "")."""
    try:
        return open_mpi_map(cmd, cluster, runtime), ""
    except MapUnavailable as e:
        return planned_map(cmd, runtime, f"Open MPI's mapper not asked: {e}"), ""
    except (OSError, subprocess.SubprocessError) as e:
        return planned_map(cmd, runtime, f"Open MPI's mapper failed: {e}"), ""
    except MapRefused as e:
        return planned_map(cmd, runtime, "mpirun refused the line"), f"mpirun refuses this line: {e}"


def _ranges(nums: Sequence[int]) -> str:
    nums = sorted(nums)
    if not nums:
        return "-"
    parts, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(parts)


def render(result: RankMapResult, node: Topology, prefix: str = "") -> list[str]:
    """Lines for the user: each node's ranks; nodes bound alike are folded into one line."""
    lines = [f"{prefix}rank map from {result.source}:"]

    def pattern(nm: NodeMap):
        return [(tuple(r.cores), r.threads) for r in nm.ranks]

    shown = None
    folded: list[str] = []
    for nm in result.nodes:
        if shown is not None and pattern(nm) == shown:
            folded.append(nm.name)
            continue
        if folded:
            lines.append(f"{prefix}  {_names(folded)}: bound alike")
            folded = []
        shown = pattern(nm)
        for r in nm.ranks:
            if r.cores:
                cores = [c for _, c in r.cores]
                hw = sorted(set(r.hwts.values()))
                where = (f"socket {_ranges(sorted(r.sockets()))}, NUMA {_ranges(sorted(r.numa(node)))}, "
                         f"{len(cores)} cores x {'/'.join(map(str, hw))} hw threads")
                lines.append(f"{prefix}  {nm.name} rank {r.rank}: cores {_ranges(cores)} ({where}); "
                             f"{r.threads} intra-op threads")
            else:
                lines.append(f"{prefix}  {nm.name} rank {r.rank}: not bound")
    if folded:
        lines.append(f"{prefix}  {_names(folded)}: bound alike")
    return lines


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{len(names)} more nodes ({names[0]} .. {names[-1]})"


def check(result: RankMapResult, layout: Layout) -> list[str]:
    """What is wrong with a map for ``layout`` (empty when right): a rank on two sockets (``numa``: two
    NUMA domains), a core of two ranks, a core's hardware threads split, bound cores != the plan's."""
    node, problems = layout.node, []
    for nm in result.nodes:
        used: dict[tuple[int, int], int] = {}
        for r in nm.ranks:
            if len(r.sockets()) > 1 and layout.unit != "node":
                problems.append(f"{nm.name} rank {r.rank} spans sockets {sorted(r.sockets())}")
            if layout.unit == "numa" and len(r.numa(node)) > 1:
                problems.append(f"{nm.name} rank {r.rank} spans NUMA domains {sorted(r.numa(node))}")
            for c in r.cores:
                if c in used:
                    problems.append(f"{nm.name} core {c[1]} bound to ranks {used[c]} and {r.rank}")
                used[c] = r.rank
                if r.hwts.get(c) != node.threads_per_core:
                    problems.append(f"{nm.name} rank {r.rank} has {r.hwts.get(c)} of core {c[1]}'s "
                                    f"{node.threads_per_core} hardware threads")
            if len(r.cores) != layout.cores_per_rank:
                problems.append(f"{nm.name} rank {r.rank} bound to {len(r.cores)} cores, "
                                f"planned {layout.cores_per_rank}")
            if r.threads and r.threads != len(r.cores):
                problems.append(f"{nm.name} rank {r.rank}: {r.threads} threads on {len(r.cores)} cores")
    return problems


__all__ = ["MapUnavailable", "MapRefused", "RankMap", "NodeMap", "RankMapResult", "synthetic", "sim_names",
           "open_mpi_map", "planned_map", "rank_map", "render", "check", "parse_display_map", "MCA_FLAGS"]
