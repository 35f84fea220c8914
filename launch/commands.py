"""Command lines for one stage: a plain python process, ``mpirun`` or ``horovodrun``.

The layout (ranks per node, cores per rank, binding) comes from the hosts, the node topology and
the config; the thread environment from ``distributed.tuning.thread_env`` (pure, no TensorFlow)
and is passed to every rank: ``-x VAR=value`` for mpirun, the environment of horovodrun (which
exports its whole environment to the ranks), the environment of a plain process.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from distributed.tuning import Topology, detect_topology, thread_env
from launch.cluster import ClusterConfig
from launch.hosts import Allocation, Host, LaunchError

STAGE_MODULES = {
    "prep": "data_prep",
    "train": "distributed.train",
    "evaluate": "distributed.evaluate",
}
# Forwarded by name (``mpirun -x NAME``, Hydra's ``-genvlist``: the value never reaches a command line) to
# remote ranks; local ranks inherit mpirun's environment anyway. Interconnects and I/O read theirs from
# these (UCX_NET_DEVICES, FI_PROVIDER, HDF5_USE_FILE_LOCKING, I_MPI_*, PMIx), and Intel recommends a
# tcmalloc LD_PRELOAD; the project's own and TensorFlow's settings ride along.
FORWARD_VARS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "LD_PRELOAD", "VIRTUAL_ENV", "TMPDIR")
FORWARD_PREFIXES = ("UCX_", "FI_", "HDF5_", "I_MPI_", "PMIX_", "PRTE_", "MALLOC_", "HOROVOD_", "CXR_", "TF_",
                    "KMP_", "OMP_", "MKL_", "ONEDNN_", "DNNL_")
# horovodrun --gloo (every elastic job) writes its whole environment onto the ssh command line of each
# rank, readable with `ps` on every node: it gets these variables only (plus the cluster file's
# env_passthrough names), so no secret of the launcher's environment leaves it.
ENV_ALLOW = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV", "HOME", "USER", "LOGNAME",
             "LANG", "TMPDIR", "SSH_AUTH_SOCK")
ENV_ALLOW_PREFIXES = ("HOROVOD_", "OMPI_", "CXR_", "TF_", "KMP_", "OMP_", "MKL_", "ONEDNN_", "DNNL_", "SLURM_", "LC_",
                      "UCX_", "FI_", "HDF5_", "I_MPI_", "PMIX_", "PRTE_", "MALLOC_")


def forwarded_names(environ: Mapping[str, str], passthrough: Sequence[str] = (), skip: Sequence[str] = ()) -> list[str]:
    """Names of ``environ`` an MPI launcher hands to remote ranks (values stay off the command line)."""
    extra, skip = set(passthrough), set(skip)
    return [k for k in environ if k not in skip and (k in FORWARD_VARS or k in extra or k.startswith(FORWARD_PREFIXES))]


def allowed_env(base: Mapping[str, str], passthrough: Sequence[str] = ()) -> dict[str, str]:
    """The variables of ``base`` horovodrun may hand on (``ENV_ALLOW``, ``ENV_ALLOW_PREFIXES``, ``passthrough``)."""
    extra = set(passthrough)
    return {k: v for k, v in base.items()
            if k in ENV_ALLOW or k in extra or k.startswith(ENV_ALLOW_PREFIXES)}


ROOT_VARS = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@dataclass(frozen=True)
class Layout:
    """Where the ranks of one stage go and how they are bound."""
    np: int
    hosts: tuple[Host, ...]  # empty: this node, no --host argument
    ranks_per_node: int
    cores_per_rank: int  # 0 when oversubscribed (ranks share cores)
    map_by: str  # Open MPI --map-by value, "" for none
    bind_to: str  # "core" or "none"
    oversubscribe: bool
    node: Topology  # topology assumed for every node
    notes: tuple[str, ...] = ()
    unit: str = "socket"  # what one block of ranks fills: socket | numa | node (one rank) | slot (uneven hosts)
    shape_source: str = ""  # where ``node`` came from: "probed on cn001", "cluster file", "this node"
    own_slots: bool = False  # the hosts' slots are the stage's own (prep_ranks_per_node under Slurm)

    @property
    def binding_args(self) -> list[str]:
        if self.bind_to == "none":
            return ["--bind-to", "none"] + (["--map-by", self.map_by] if self.map_by else [])
        return ["--map-by", self.map_by, "--bind-to", self.bind_to]

    @property
    def sockets_per_rank(self) -> int:
        """Sockets one bound rank's cores span: all of them for one rank per node, else 1 (never straddled)."""
        return self.node.sockets if self.unit == "node" else 1


@dataclass
class StageCommand:
    """One command: ``argv`` run with ``env`` added to the launcher's environment."""
    stage: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    layout: Layout | None = None
    kind: str = "python"  # python | mpirun | horovodrun
    ssh_config: str = ""  # horovodrun: its ssh (and its mpirun's) runs `ssh -F ssh_config` (launch.supervise)
    env_passthrough: tuple[str, ...] = ()  # horovodrun: names handed on beyond ENV_ALLOW
    launcher_argc: int = 0  # argv[:launcher_argc] is the launcher's part, the rest what every rank runs

    def process_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` plus this command's variables (horovodrun: only the allow-listed part of ``base``,
        :func:`allowed_env`); when the launcher is not on PATH but beside this interpreter (a venv run
        without activating it), that bin directory goes first on PATH."""
        if self.kind == "horovodrun":
            base = allowed_env(base, self.env_passthrough)
        env = {**base, **self.env}
        if self.kind != "python" and not shutil.which(self.argv[0], path=env.get("PATH")):
            found = find_tool(self.argv[0])
            if found:
                env["PATH"] = str(Path(found).parent) + (os.pathsep + env["PATH"] if env.get("PATH") else "")
        return env

    def shell(self) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


# --------------------------------------------------------------------------- topology

def node_topology(cluster: ClusterConfig, detected: Topology | None = None, base: Topology | None = None,
                  base_source: str = "") -> Topology:
    """The compute nodes' shape (every node alike): ``base`` (probed on the first compute node,
    :mod:`launch.shape`), else this node; the cluster file's keys override single fields."""
    t = base or detected or detect_topology()
    source = base_source or t.source
    if base is None and t.bound_cores and t.bound_cores < t.physical_cores:
        # This launcher is confined to part of the node (taskset, cpuset, a Slurm step): that part is the node.
        t = Topology(sockets=1, physical_cores=t.bound_cores, logical_cpus=t.bound_cores * t.threads_per_core,
                     numa_nodes=1, source=f"{t.source}, affinity mask")
        source = t.source
    keys = (cluster.sockets_per_node, cluster.cores_per_socket, cluster.numa_per_socket, cluster.threads_per_core)
    if any(keys):
        sockets = cluster.sockets_per_node or t.sockets
        cps = cluster.cores_per_socket or t.cores_per_socket
        nps = cluster.numa_per_socket or max(1, t.numa_nodes // t.sockets)
        tpc = cluster.threads_per_core or t.threads_per_core
        whole = all(keys) or (base is None and cluster.sockets_per_node and cluster.cores_per_socket)
        src = "cluster file" if whole or source == "cluster file" else f"{source}, cluster file"
        return Topology(sockets=sockets, physical_cores=sockets * cps, logical_cpus=sockets * cps * tpc,
                        numa_nodes=sockets * nps, source=src)
    return dataclasses.replace(t, bound_cores=None, bound_sockets=None, source=source)


# --------------------------------------------------------------------------- layout

def _wanted_per_node(value, node: Topology) -> tuple[int, str]:
    """(ranks per node, unit) a ``ranks_per_node`` value asks for; (0, socket) when unset."""
    if value == "socket":
        return node.sockets, "socket"
    if value == "numa":
        return node.domains, "numa"
    return (int(value) if value else 0), "socket"


def check_per_node(rpn: int, node: Topology, unit: str = "socket") -> str:
    """The unit ``rpn`` bound ranks per node fill (node, socket or numa); LaunchError naming the valid
    counts when a rank would have cores on two sockets (or, for ``numa``, two NUMA domains)."""
    if rpn == 1 and node.sockets > 1:
        return "node"
    if unit == "numa" and rpn % node.domains == 0 and node.domains > node.sockets:
        return "numa"
    if rpn % node.sockets == 0:
        return "socket"
    s = node.sockets
    lower, upper = (rpn // s) * s, (rpn // s + 1) * s
    valid = sorted({1, upper} | ({lower} if lower else set()))
    numa = f", `ranks_per_node: numa` for {node.domains}" if node.domains > s else ""
    raise LaunchError(f"{rpn} ranks per node on {s}-socket nodes would bind a rank to cores of two sockets; "
                      f"use {' or '.join(map(str, valid))} ranks per node (a multiple of {s}{numa}; "
                      f"node shape: {describe_shape(node)})")


def describe_shape(node: Topology) -> str:
    return (f"{node.sockets} socket(s) x {node.cores_per_socket} cores x {node.threads_per_core} thread(s), "
            f"{node.domains} NUMA domain(s) [{node.source}]")


def slurm_cores_per_task(allocation: Allocation, node: Topology) -> tuple[int, str]:
    """Physical cores per rank from ``SLURM_CPUS_PER_TASK``: Slurm counts hardware threads unless the job
    runs with ``--hint=nomultithread`` (or ``--threads-per-core=1``); (cores, note)."""
    cpus, tpc = allocation.cpus_per_task, node.threads_per_core
    if allocation.cpus_are_cores or tpc == 1:
        return cpus, ""
    cores = max(1, cpus // tpc)
    return cores, f"SLURM_CPUS_PER_TASK={cpus} counts hardware threads ({tpc} per core): {cores} cores per rank"


def plan_layout(stage: str, allocation: Allocation, cluster: ClusterConfig, node: Topology,
                np: int | None = None) -> Layout:
    """Ranks, ranks per node, cores per rank and binding for ``stage``; never a rank across two sockets."""
    sockets = max(1, node.sockets)
    cores = node.physical_cores
    want, unit = _wanted_per_node(cluster.ranks_per_node, node)
    if stage == "prep" and cluster.prep_ranks_per_node:
        want, unit = cluster.prep_ranks_per_node, "socket"
    # prep's own ranks per node in a Slurm allocation: they replace the allocation's tasks and cores per task
    own_slots = allocation.source == "slurm" and stage == "prep" and bool(cluster.prep_ranks_per_node)
    notes: list[str] = []
    uniform = True

    if np is not None and np < 1:
        raise LaunchError(f"--np must be at least 1, got {np}")

    if allocation.source == "local":
        total = np or want or sockets
        hosts: tuple[Host, ...] = ()
        rpn = total
    else:
        hosts = allocation.hosts
        if own_slots:  # prep is single-threaded per rank: its own ranks on every node of the allocation
            hosts = tuple(Host(h.name, cluster.prep_ranks_per_node) for h in hosts)
        slots = sum(h.slots for h in hosts)
        if np:
            total = np
        elif allocation.source == "slurm" and not own_slots:
            total = allocation.ntasks or slots
        elif want:
            total = sum(min(h.slots, want) for h in hosts)
        else:
            total = slots
        if total > slots:
            where = "the Slurm allocation" if allocation.source == "slurm" else "the hosts"
            raise LaunchError(f"{total} ranks asked for but {where} offer only {slots} slots "
                              f"({','.join(h.spec() for h in hosts)}); lower --np or add hosts/slots")
        # R ranks per node on the first ceil(np / R) hosts; R = ranks_per_node (at most every host's
        # slots) or an even spread.
        rpn = max(min([want] + [h.slots for h in hosts]) if want else 0, math.ceil(total / len(hosts)))
        rpn = min(rpn, total)
        used = hosts[: math.ceil(total / rpn)]
        placed = [rpn] * (len(used) - 1) + [total - rpn * (len(used) - 1)]
        if any(h.slots < n for h, n in zip(used, placed)):
            # Uneven slots: fill hosts in order, as many ranks as each has slots.
            used, left = [], total
            for h in hosts:
                if left <= 0:
                    break
                used.append(h)
                left -= h.slots
            rpn = max(h.slots for h in used)
            uniform = False
        hosts = tuple(used)

    oversubscribed = rpn > cores or (cluster.cores_per_rank and rpn * cluster.cores_per_rank > cores)
    kind = "socket" if oversubscribed else check_per_node(rpn, node, unit)
    if not uniform:
        kind = "slot"  # hosts with fewer slots take the first ranks' cores in order
    ranks_per_unit = {"node": 1, "socket": max(1, rpn // sockets), "numa": max(1, rpn // node.domains),
                      "slot": rpn}[kind]
    unit_cores = {"node": cores, "socket": cores // sockets, "numa": cores // node.domains, "slot": cores}[kind]
    if kind == "slot" and rpn % sockets == 0:
        ranks_per_unit, unit_cores = rpn // sockets, cores // sockets  # blocks never cross a socket
    if cluster.cores_per_rank:
        cpr = cluster.cores_per_rank
    elif allocation.cpus_per_task and allocation.source == "slurm" and not own_slots:
        cpr, note = slurm_cores_per_task(allocation, node)
        share = unit_cores // ranks_per_unit
        if note:
            notes.append(note)
        if cpr > share:
            notes.append(f"{cpr} cores per rank asked for, {rpn} rank(s) on {describe_shape(node)}: "
                         f"{share} cores each")
            cpr = share
    else:
        cpr = unit_cores // ranks_per_unit
    oversubscribe = False
    if oversubscribed or cpr < 1 or rpn * cpr > cores:
        bind_to, map_by, cpr, kind = "none", "slot", 0, "slot"
        notes.append(f"{rpn} ranks per node on {cores} cores: not bound (oversubscribed)")
        if not hosts and rpn > cores:
            oversubscribe = True  # Open MPI counts one slot per core on an unlisted node
        elif hosts and any(h.slots < rpn for h in hosts):
            oversubscribe = True
    elif kind == "slot":
        bind_to, map_by = "core", f"slot:PE={cpr}"
    else:
        bind_to, map_by = "core", f"ppr:{ranks_per_unit}:{kind}:pe={cpr}"
    return Layout(np=total, hosts=hosts, ranks_per_node=rpn, cores_per_rank=cpr, map_by=map_by,
                  bind_to=bind_to, oversubscribe=oversubscribe, node=node, notes=tuple(notes), unit=kind,
                  shape_source=node.source, own_slots=own_slots)


def rank_topology(layout: Layout) -> Topology:
    """What one rank of ``layout`` sees: the node, narrowed to its bound cores and sockets when bound."""
    if layout.cores_per_rank and layout.bind_to != "none":
        return dataclasses.replace(layout.node, bound_cores=layout.cores_per_rank,
                                   bound_sockets=layout.sockets_per_rank)
    return layout.node


def rank_thread_env(layout: Layout, runtime=None) -> dict[str, str]:
    """The tuned thread variables every rank of ``layout`` gets."""
    return thread_env(rank_topology(layout), layout.ranks_per_node, runtime)


# --------------------------------------------------------------------------- commands

def stage_argv(stage: str, python: str, config: str, overrides: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    argv = [python, "-m", STAGE_MODULES[stage], "--config", str(config)]
    for o in overrides:
        argv += ["--set", o]
    return argv + list(extra)


def find_tool(name: str) -> str | None:
    """``mpirun``/``horovodrun`` on PATH, or beside this interpreter (the venv's bin)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def horovodrun_hosts(layout: Layout) -> list[Host]:
    """``-H`` for horovodrun: each host with the ranks placed on it, not its free slots.
    horovodrun --gloo (0.28.1) starts a rank in every listed slot whatever ``-np`` says:
    ``-np 1 -H localhost:2`` ran 2 ranks of size 2 (--mpi ran 1)."""
    left, out = layout.np, []
    for h in layout.hosts or (Host("localhost", layout.np),):
        n = min(h.slots, max(1, layout.ranks_per_node), left)
        if n > 0:
            out.append(Host(h.name, n))
            left -= n
    return out


@dataclass(frozen=True)
class LaunchSpec:
    """What to start for one stage, and how: the input of :func:`build_command`."""
    stage: str  # prep | train | evaluate
    layout: Layout
    config: str = ""
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE items passed on to the stage
    extra: tuple[str, ...] = ()  # further stage arguments, e.g. --resume
    cluster: ClusterConfig = ClusterConfig()
    launcher: str = ""  # "" (the cluster file's) | auto | mpirun | horovodrun | srun (prep never horovodrun)
    python: str = ""  # interpreter of the ranks; empty: the cluster file's, else this one
    runtime: Any = None  # the config's runtime section (thread settings); None: defaults
    hostfile: str = ""
    module_argv: tuple[str, ...] | None = None  # replaces the stage's ``python -m ...`` (the benchmarks)
    slurm: bool = False  # the ranks run inside a Slurm allocation (mpirun takes its hosts from it)
    srun_mpi: str = ""  # srun's PMI plugin there (pmix, pmi2; srun_mpi_type), "" when srun has none
    cpus_are_cores: bool = False  # Slurm: the job runs with --hint=nomultithread
    thread_vars: bool = True  # False leaves the threads to TensorFlow (the benchmarks' untuned baseline)

    def inner_argv(self) -> list[str]:
        """The command every rank runs."""
        if self.module_argv is not None:
            return list(self.module_argv)
        python = self.python or self.cluster.python or sys.executable
        return stage_argv(self.stage, python, self.config, self.overrides, self.extra)


def resolve_launcher(requested: str, stage: str, cluster: ClusterConfig, slurm: bool = False,
                     srun_mpi: str = "") -> str:
    """The launcher of ``stage``: ``auto`` is horovodrun for the Gloo controller (its only launcher),
    else srun inside a Slurm allocation whose srun has a PMI plugin (sites' way), else mpirun; prep
    (mpi4py, no Horovod) never uses horovodrun."""
    launcher = requested or cluster.launcher
    if launcher == "auto":
        if cluster.horovod_controller == "gloo" and stage != "prep":
            launcher = "horovodrun"
        else:
            launcher = "srun" if slurm and srun_mpi and cluster.mpi == "openmpi" else "mpirun"
    if launcher == "horovodrun" and stage == "prep":
        launcher = "mpirun"
    if launcher == "srun" and not slurm:
        raise LaunchError("launcher: srun needs a Slurm allocation (sbatch/salloc); outside one use mpirun")
    return launcher


SRUN_MPI_PREFERENCE = ("pmix", "pmi2")


def srun_mpi_type(run=subprocess.run) -> str:
    """The PMI plugin srun offers (``srun --mpi=list``: pmix first, then pmi2), "" when none or no srun."""
    if not shutil.which("srun"):
        return ""
    try:
        r = run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return ""
    words = set(re.findall(r"[A-Za-z0-9_]+", r.stdout + r.stderr))
    return next((m for m in SRUN_MPI_PREFERENCE if m in words), "")


def _srun_argv(layout: Layout, spec: "LaunchSpec") -> list[str]:
    """srun inside the allocation: PMI for MPI_Init, ranks and cores per node, each rank bound to its cores
    (Slurm counts --cpus-per-task in hardware threads unless the job has --hint=nomultithread)."""
    mpi = spec.srun_mpi or "pmix"
    argv = ["srun", f"--mpi={mpi}", f"--nodes={max(1, len(layout.hosts))}", f"--ntasks={layout.np}",
            f"--ntasks-per-node={layout.ranks_per_node}"]
    if layout.bind_to == "core" and layout.cores_per_rank:
        tpc = 1 if spec.cpus_are_cores else layout.node.threads_per_core
        argv += [f"--cpus-per-task={layout.cores_per_rank * tpc}", "--cpu-bind=cores", "--distribution=block:block"]
    else:
        argv += ["--cpu-bind=none"]
    return argv + ["--kill-on-bad-exit=1"]


def build_command(spec: LaunchSpec, environ: Mapping[str, str] | None = None, uid: int | None = None) -> StageCommand:
    """The command for ``spec``: a plain process for one local rank, else the cluster's mpirun (Open MPI,
    MPICH, Intel MPI) or horovodrun (Gloo, or asked for). ``environ`` decides which variables are forwarded
    to remote ranks, ``uid`` whether Open MPI must be allowed to run as root (defaults: this process's)."""
    environ = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    layout, cluster = spec.layout, spec.cluster
    inner = spec.inner_argv()
    threads = rank_thread_env(layout, spec.runtime) if spec.thread_vars else {}
    if layout.np == 1 and not layout.hosts:
        return StageCommand(spec.stage, inner, dict(threads), layout, "python")
    root_env = dict(ROOT_VARS) if uid == 0 and cluster.mpi == "openmpi" else {}
    launcher = resolve_launcher(spec.launcher, spec.stage, cluster, spec.slurm, spec.srun_mpi)
    if launcher == "srun":
        argv = _srun_argv(layout, spec)
        # srun hands its whole environment to the tasks (--export=ALL): the thread variables travel there
        return StageCommand(spec.stage, argv + inner, dict(threads), layout, "srun", launcher_argc=len(argv))
    if launcher == "horovodrun":
        argv = _horovodrun_argv(layout, cluster, spec.hostfile)
        return StageCommand(spec.stage, argv + inner, {**root_env, **threads}, layout, "horovodrun",
                            ssh_config=cluster.ssh_config if layout.hosts else "",
                            env_passthrough=cluster.env_passthrough, launcher_argc=len(argv))
    if cluster.mpi == "openmpi":
        argv = _openmpi_argv(layout, cluster, spec.hostfile, threads, environ, spec.slurm)
        return StageCommand(spec.stage, argv + inner, root_env, layout, "mpirun", launcher_argc=len(argv))
    argv = _hydra_argv(layout, cluster, spec.hostfile, threads, environ)
    return StageCommand(spec.stage, argv + inner, {}, layout, "mpirun", launcher_argc=len(argv))


# --------------------------------------------------------------------------- MCA parameters

MCA_FLAGS = ("--mca", "-mca", "--gmca", "-gmca")
# Open MPI's point-to-point layer per cluster-file ``transport`` (auto: Open MPI picks, UCX first where built).
TRANSPORT_MCA = {
    "auto": (),
    "ucx": (("pml", "ucx"), ("osc", "ucx")),
    "ofi": (("pml", "cm"), ("mtl", "ofi")),
    "tcp": (("pml", "ob1"), ("btl", "tcp,self,vader")),
}
# What horovodrun --mpi (Horovod 0.28.1, horovod/runner/mpi_run.py) puts on every mpirun line it makes,
# and, from 64 hosts on, what it adds for large clusters.
HOROVODRUN_MCA = (("pml", "ob1"), ("btl", "^openib"))
HOROVODRUN_LARGE_MCA = ("plm_rsh_no_tree_spawn", "plm_rsh_num_concurrent")
HOROVODRUN_LARGE_HOSTS = 64


def _mca_tokens(args: Sequence[str]):
    """An mpirun argument list in order: ``(flag, name, value)`` for each ``--mca NAME VALUE`` item,
    ``(arg,)`` for anything else."""
    args, i = list(args), 0
    while i < len(args):
        if args[i] in MCA_FLAGS and i + 2 < len(args):
            yield tuple(args[i:i + 3])
            i += 3
        else:
            yield (args[i],)
            i += 1


def mca_params(args: Sequence[str]) -> dict[str, str]:
    """``--mca NAME VALUE`` pairs of an mpirun argument list, by name (the last one of a name wins)."""
    return {t[1]: t[2] for t in _mca_tokens(args) if len(t) == 3}


def merge_mca(ours: Sequence[tuple[str, str]], user_args: Sequence[str]) -> list[str]:
    """Our MCA parameters then the user's ``mpi_args``, each parameter once: a name the user sets is
    left out of ours (the user's value wins), and a name the user lists twice is kept at its last value.
    Open MPI refuses a line that names a parameter twice."""
    tokens = list(_mca_tokens(user_args))
    last = {t[1]: k for k, t in enumerate(tokens) if len(t) == 3}
    argv = [a for name, value in ours if name not in last for a in ("--mca", name, value)]
    for k, t in enumerate(tokens):
        if len(t) == 1:
            argv.append(t[0])
        elif last[t[1]] == k:
            argv += ["--mca", t[1], t[2]]
    return argv


def _horovodrun_argv(layout: Layout, cluster: ClusterConfig, hostfile: str) -> list[str]:
    """horovodrun's own arguments; the thread variables travel in its environment."""
    argv = ["horovodrun", "-np", str(layout.np)]
    if hostfile:
        argv += ["--hostfile", hostfile]
    else:
        argv += ["-H", ",".join(h.spec() for h in horovodrun_hosts(layout))]
    if cluster.network_interface:
        argv += ["--network-interfaces", cluster.network_interface]
    if cluster.ssh_port:
        argv += ["--ssh-port", str(cluster.ssh_port)]
    if layout.hosts:
        # ssh checks and NIC discovery of every host must finish within it (Horovod's default 30 s)
        argv += ["--start-timeout", str(start_timeout(cluster, len(layout.hosts)))]
    if cluster.horovod_controller == "gloo":
        argv += ["--gloo"]
    else:
        # horovodrun pastes --binding-args/--mpi-args into one shell string: each item quoted
        argv += ["--mpi", "--binding-args=" + " ".join(shlex.quote(a) for a in layout.binding_args)]
        mpi_args = horovodrun_mpi_args(layout, cluster)
        if mpi_args:
            argv += ["--mpi-args=" + " ".join(shlex.quote(a) for a in mpi_args)]
    return argv


def start_timeout(cluster: ClusterConfig, hosts: int) -> int:
    """horovodrun's --start-timeout: the cluster file's, else 30 s plus 1 s per 2 hosts."""
    return cluster.start_timeout or 30 + (hosts + 1) // 2


def horovodrun_mpi_args(layout: Layout, cluster: ClusterConfig) -> list[str]:
    """``--mpi-args`` for horovodrun --mpi: the user's mpi_args without what horovodrun puts on its mpirun
    line itself (``pml ob1``, ``btl ^openib``; ``btl_tcp_if_include`` with --network-interfaces,
    ``plm_rsh_args`` with --ssh-port; from 64 hosts its tree-spawn settings), so no parameter appears
    twice. A transport or an mpi_args value it would contradict is refused."""
    if cluster.transport in ("ucx", "ofi"):
        raise LaunchError(f"transport: {cluster.transport} needs launcher: mpirun (the default): horovodrun --mpi "
                          f"always adds -mca pml ob1 -mca btl ^openib (TCP; Horovod 0.28.1)")
    fixed = dict(HOROVODRUN_MCA)
    if cluster.network_interface:
        fixed["btl_tcp_if_include"] = cluster.network_interface
    if cluster.ssh_port:
        fixed["plm_rsh_args"] = f"-p {cluster.ssh_port}"
    for name, value in mca_params(cluster.mpi_args).items():
        if name in fixed and value != fixed[name]:
            raise LaunchError(f"mpi_args --mca {name} {value}: horovodrun --mpi sets --mca {name} {fixed[name]} itself "
                              f"and mpirun refuses a parameter twice; use launcher: mpirun (the default) for it")
    large = len(layout.hosts) >= HOROVODRUN_LARGE_HOSTS
    drop = set(fixed) | (set(HOROVODRUN_LARGE_MCA) if large else set())
    ours = []
    if cluster.ssh_config and layout.hosts and not large:
        # Open MPI's tree spawn would ssh on from the first remote node, where the launcher's
        # `ssh -F` wrapper (put first on horovodrun's PATH) does not exist: every ssh from here.
        ours = [("plm_rsh_no_tree_spawn", "1")]
    return merge_mca(ours, _without_mca(cluster.mpi_args, drop))


def horovodrun_fixed_mca(layout: Layout, cluster: ClusterConfig) -> list[str]:
    """The MCA parameters horovodrun --mpi writes on its mpirun line before --mpi-args (mapview shows it)."""
    argv = [a for name, value in HOROVODRUN_MCA for a in ("--mca", name, value)]
    if cluster.network_interface:
        argv += ["--mca", "btl_tcp_if_include", cluster.network_interface]
    if cluster.ssh_port:
        argv += ["--mca", "plm_rsh_args", f"-p {cluster.ssh_port}"]
    if len(layout.hosts) >= HOROVODRUN_LARGE_HOSTS:
        argv += ["--mca", HOROVODRUN_LARGE_MCA[0], "true", "--mca", HOROVODRUN_LARGE_MCA[1], str(len(layout.hosts))]
    return argv


def _without_mca(args: Sequence[str], names) -> list[str]:
    """``args`` without the ``--mca NAME VALUE`` items whose NAME is in ``names``."""
    return [a for t in _mca_tokens(args) if not (len(t) == 3 and t[1] in names) for a in t]


def _common_mca(layout: Layout, cluster: ClusterConfig) -> list[tuple[str, str]]:
    """Our MCA parameters of an Open MPI line: transport, interface, the ssh of remote daemons."""
    ours = list(TRANSPORT_MCA[cluster.transport])
    if cluster.network_interface:
        ours += [("btl_tcp_if_include", cluster.network_interface), ("oob_tcp_if_include", cluster.network_interface)]
    ssh_args = _ssh_args(cluster)
    if ssh_args and layout.hosts:
        ours.append(("plm_rsh_args", ssh_args))
    return ours


def _ssh_args(cluster: ClusterConfig) -> str:
    """Arguments of every ssh mpirun makes: the cluster's client file and port."""
    args = (["-F", cluster.ssh_config] if cluster.ssh_config else []) + \
        (["-p", str(cluster.ssh_port)] if cluster.ssh_port else [])
    return shlex.join(args)


def _openmpi_argv(layout: Layout, cluster: ClusterConfig, hostfile: str, threads: Mapping[str, str],
                  environ: Mapping[str, str], slurm: bool = False) -> list[str]:
    """Open MPI's mpirun: --host/--hostfile (none inside a Slurm allocation: Open MPI reads it itself, unless
    the stage places more ranks per node than it has tasks), binding, MCA parameters merged by name, -x for
    the thread and forwarded variables."""
    argv = ["mpirun", "-np", str(layout.np)]
    if hostfile:
        argv += ["--hostfile", hostfile]
    elif slurm and not layout.oversubscribe and not layout.own_slots:
        pass
    elif layout.hosts:
        argv += ["--host", ",".join(h.spec() for h in layout.hosts)]
    if layout.oversubscribe:
        argv += ["--oversubscribe"]
    argv += layout.binding_args
    for k, v in threads.items():
        argv += ["-x", f"{k}={v}"]
    for k in forwarded_names(environ, cluster.env_passthrough, skip=threads):
        argv += ["-x", k]
    return argv + merge_mca(_common_mca(layout, cluster), cluster.mpi_args)


def intel_pin_domain(layout: Layout) -> str:
    """``I_MPI_PIN_DOMAIN`` for ``layout``: Intel MPI counts a domain's size in logical CPUs, so a rank's
    cores times the threads per core (``socket``/``numa`` where a rank has a whole one)."""
    if layout.unit == "socket" and layout.ranks_per_node == layout.node.sockets:
        return "socket"
    if layout.unit == "numa" and layout.ranks_per_node == layout.node.domains:
        return "numa"
    if layout.unit == "node":
        return "node"
    return f"{layout.cores_per_rank * layout.node.threads_per_core}:compact"


def _hydra_argv(layout: Layout, cluster: ClusterConfig, hostfile: str, threads: Mapping[str, str],
                environ: Mapping[str, str]) -> list[str]:
    """MPICH and Intel MPI (Hydra): -genv for variables, -ppn for ranks per node."""
    argv = ["mpirun", "-n", str(layout.np)]
    if hostfile:
        argv += ["-f", hostfile]
    elif layout.hosts:
        argv += ["-hosts", ",".join(h.name for h in layout.hosts)]
    argv += ["-ppn", str(layout.ranks_per_node)]
    if cluster.network_interface:
        argv += ["-iface", cluster.network_interface]
    ssh_args = _ssh_args(cluster)
    if ssh_args and layout.hosts:
        argv += ["-bootstrap", "ssh", "-bootstrap-exec-args", ssh_args]
    if cluster.mpi == "mpich":
        if cluster.transport != "auto":
            raise LaunchError(f"transport: {cluster.transport} with mpi: mpich: MPICH picks its network at build "
                              f"time (ch4:ofi or ch4:ucx); leave transport: auto and set FI_PROVIDER or UCX_* "
                              f"in the environment (both are forwarded)")
        argv += ["-bind-to", f"core:{layout.cores_per_rank}" if layout.bind_to == "core" else "none"]
    else:
        pin = {"I_MPI_PIN": "1", "I_MPI_PIN_DOMAIN": intel_pin_domain(layout)} \
            if layout.bind_to == "core" else {"I_MPI_PIN": "0"}
        pin.update(INTEL_TRANSPORT[cluster.transport])
        for k, v in pin.items():
            argv += ["-genv", k, v]
    for k, v in threads.items():
        argv += ["-genv", k, v]
    forward = forwarded_names(environ, cluster.env_passthrough, skip=threads)
    if forward:
        argv += ["-genvlist", ",".join(forward)]
    return argv + list(cluster.mpi_args)


# Intel MPI 2019+: libfabric always; the provider picks the network (mlx: UCX/InfiniBand, tcp).
INTEL_TRANSPORT = {"auto": {}, "ucx": {"I_MPI_FABRICS": "shm:ofi", "FI_PROVIDER": "mlx"},
                   "ofi": {"I_MPI_FABRICS": "shm:ofi"}, "tcp": {"I_MPI_FABRICS": "shm:ofi", "FI_PROVIDER": "tcp"}}
