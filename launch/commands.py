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
import shlex
import shutil
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
# Forwarded by name to remote ranks (local ranks inherit mpirun's environment anyway).
FORWARD_VARS = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")
# horovodrun --gloo (every elastic job) writes its whole environment onto the ssh command line of each
# rank, readable with `ps` on every node: it gets these variables only (plus the cluster file's
# env_passthrough names), so no secret of the launcher's environment leaves it.
ENV_ALLOW = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR",
             "SSH_AUTH_SOCK")
ENV_ALLOW_PREFIXES = ("HOROVOD_", "OMPI_", "CXR_", "TF_", "KMP_", "OMP_", "MKL_", "ONEDNN_", "DNNL_", "SLURM_", "LC_")


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

    @property
    def binding_args(self) -> list[str]:
        if self.bind_to == "none":
            return ["--bind-to", "none"] + (["--map-by", self.map_by] if self.map_by else [])
        return ["--map-by", self.map_by, "--bind-to", self.bind_to]


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

def node_topology(cluster: ClusterConfig, detected: Topology | None = None) -> Topology:
    """Every node is assumed alike: this node, unless the cluster file describes the nodes."""
    t = detected or detect_topology()
    if cluster.sockets_per_node or cluster.cores_per_socket:
        sockets = cluster.sockets_per_node or t.sockets
        cps = cluster.cores_per_socket or max(1, t.physical_cores // t.sockets)
        return Topology(sockets=sockets, physical_cores=sockets * cps, logical_cpus=sockets * cps,
                        numa_nodes=sockets, source="cluster file")
    if t.bound_cores and t.bound_cores < t.physical_cores:
        # This launcher is confined to part of the node (taskset, cpuset): that part is the node.
        return Topology(sockets=1, physical_cores=t.bound_cores, logical_cpus=t.bound_cores, numa_nodes=1,
                        source=f"{t.source}, affinity mask")
    return dataclasses.replace(t, bound_cores=None)


# --------------------------------------------------------------------------- layout

def plan_layout(stage: str, allocation: Allocation, cluster: ClusterConfig, node: Topology,
                np: int | None = None) -> Layout:
    """Ranks, ranks per node, cores per rank and binding for ``stage``."""
    sockets = max(1, node.sockets)
    cores = node.physical_cores
    per_node_cfg = cluster.ranks_per_node
    if stage == "prep" and cluster.prep_ranks_per_node:
        per_node_cfg = cluster.prep_ranks_per_node
    notes: list[str] = []
    uniform = True

    if np is not None and np < 1:
        raise LaunchError(f"--np must be at least 1, got {np}")

    if allocation.source == "local":
        total = np or per_node_cfg or sockets
        hosts: tuple[Host, ...] = ()
        rpn = total
        slots = None
    else:
        hosts = allocation.hosts
        slots = allocation.total_slots
        if np:
            total = np
        elif allocation.source == "slurm":
            total = allocation.ntasks or slots
        elif per_node_cfg:
            total = sum(min(h.slots, per_node_cfg) for h in hosts)
        else:
            total = slots
        if total > slots:
            where = "the Slurm allocation" if allocation.source == "slurm" else "the hosts"
            raise LaunchError(f"{total} ranks asked for but {where} offer only {slots} slots "
                              f"({','.join(h.spec() for h in hosts)}); lower --np or add hosts/slots")
        # R ranks per node on the first ceil(np / R) hosts; R = ranks_per_node or an even spread.
        rpn = max(per_node_cfg, math.ceil(total / len(hosts)))
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

    cpr = cluster.cores_per_rank or allocation.cpus_per_task
    if not cpr:
        if rpn % sockets == 0:
            cpr = (cores // sockets) // (rpn // sockets)
        else:
            cpr = cores // rpn
    oversubscribe = False
    if cpr < 1 or rpn * cpr > cores:
        bind_to, map_by, cpr = "none", "slot", 0
        notes.append(f"{rpn} ranks per node on {cores} cores: not bound (oversubscribed)")
        if not hosts and rpn > cores:
            oversubscribe = True  # Open MPI counts one slot per core on an unlisted node
        elif hosts and any(h.slots < rpn for h in hosts):
            oversubscribe = True
    elif not uniform:
        bind_to, map_by = "core", f"slot:PE={cpr}"
    elif rpn % sockets == 0 and cpr * (rpn // sockets) <= cores // sockets:
        bind_to, map_by = "core", f"ppr:{rpn // sockets}:socket:pe={cpr}"
    else:
        bind_to, map_by = "core", f"ppr:{rpn}:node:pe={cpr}"
    return Layout(np=total, hosts=hosts, ranks_per_node=rpn, cores_per_rank=cpr, map_by=map_by,
                  bind_to=bind_to, oversubscribe=oversubscribe, node=node, notes=tuple(notes))


def rank_thread_env(layout: Layout, runtime=None) -> dict[str, str]:
    """The tuned thread variables every rank of ``layout`` gets."""
    node = layout.node
    if layout.cores_per_rank and layout.bind_to != "none":
        node = dataclasses.replace(node, bound_cores=layout.cores_per_rank)
    return thread_env(node, layout.ranks_per_node, runtime)


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
    launcher: str = "mpirun"  # mpirun | horovodrun (prep always uses mpirun)
    python: str = ""  # interpreter of the ranks; empty: the cluster file's, else this one
    runtime: Any = None  # the config's runtime section (thread settings); None: defaults
    hostfile: str = ""
    module_argv: tuple[str, ...] | None = None  # replaces the stage's ``python -m ...`` (the benchmarks)
    thread_vars: bool = True  # False leaves the threads to TensorFlow (the benchmarks' untuned baseline)

    def inner_argv(self) -> list[str]:
        """The command every rank runs."""
        if self.module_argv is not None:
            return list(self.module_argv)
        python = self.python or self.cluster.python or sys.executable
        return stage_argv(self.stage, python, self.config, self.overrides, self.extra)


def build_command(spec: LaunchSpec, environ: Mapping[str, str] | None = None, uid: int | None = None) -> StageCommand:
    """The command for ``spec``: a plain process for one local rank, else horovodrun (train,
    evaluate with ``launcher="horovodrun"``) or the cluster's mpirun (Open MPI, MPICH, Intel MPI).
    ``environ`` decides which variables are forwarded to remote ranks, ``uid`` whether Open MPI
    must be allowed to run as root (defaults: this process's)."""
    environ = os.environ if environ is None else environ
    uid = os.getuid() if uid is None else uid
    layout, cluster = spec.layout, spec.cluster
    inner = spec.inner_argv()
    threads = rank_thread_env(layout, spec.runtime) if spec.thread_vars else {}
    if layout.np == 1 and not layout.hosts:
        return StageCommand(spec.stage, inner, dict(threads), layout, "python")
    root_env = dict(ROOT_VARS) if uid == 0 and cluster.mpi == "openmpi" else {}
    if spec.launcher == "horovodrun" and spec.stage != "prep":
        argv = _horovodrun_argv(layout, cluster, spec.hostfile)
        return StageCommand(spec.stage, argv + inner, {**root_env, **threads}, layout, "horovodrun",
                            ssh_config=cluster.ssh_config if layout.hosts else "",
                            env_passthrough=cluster.env_passthrough)
    if cluster.mpi == "openmpi":
        argv = _openmpi_argv(layout, cluster, spec.hostfile, threads, environ)
        return StageCommand(spec.stage, argv + inner, root_env, layout, "mpirun")
    argv = _hydra_argv(layout, cluster, spec.hostfile, threads, environ)
    return StageCommand(spec.stage, argv + inner, {}, layout, "mpirun")


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
    if cluster.horovod_controller == "gloo":
        argv += ["--gloo"]
    else:
        # horovodrun pastes --binding-args/--mpi-args into one shell string: each item quoted
        argv += ["--mpi", "--binding-args=" + " ".join(shlex.quote(a) for a in layout.binding_args)]
        mpi_args = list(cluster.mpi_args)
        if cluster.ssh_config and layout.hosts:
            # Open MPI's tree spawn would ssh on from the first remote node, where the launcher's
            # `ssh -F` wrapper (put first on horovodrun's PATH) does not exist: every ssh from here.
            mpi_args = ["--mca", "plm_rsh_no_tree_spawn", "1"] + mpi_args
        if mpi_args:
            argv += ["--mpi-args=" + " ".join(shlex.quote(a) for a in mpi_args)]
    return argv


def _ssh_args(cluster: ClusterConfig) -> str:
    """Arguments of every ssh mpirun makes: the cluster's client file and port."""
    args = (["-F", cluster.ssh_config] if cluster.ssh_config else []) + \
        (["-p", str(cluster.ssh_port)] if cluster.ssh_port else [])
    return shlex.join(args)


def _openmpi_argv(layout: Layout, cluster: ClusterConfig, hostfile: str, threads: Mapping[str, str],
                  environ: Mapping[str, str]) -> list[str]:
    """Open MPI's mpirun: --host/--hostfile, binding, -x for the thread and forwarded variables."""
    argv = ["mpirun", "-np", str(layout.np)]
    if hostfile:
        argv += ["--hostfile", hostfile]
    elif layout.hosts:
        argv += ["--host", ",".join(h.spec() for h in layout.hosts)]
    if layout.oversubscribe:
        argv += ["--oversubscribe"]
    argv += layout.binding_args
    if cluster.network_interface:
        argv += ["--mca", "btl_tcp_if_include", cluster.network_interface,
                 "--mca", "oob_tcp_if_include", cluster.network_interface]
    ssh_args = _ssh_args(cluster)
    if ssh_args and layout.hosts:
        argv += ["--mca", "plm_rsh_args", ssh_args]
    for k, v in threads.items():
        argv += ["-x", f"{k}={v}"]
    for k in FORWARD_VARS:
        if k in environ and k not in threads:
            argv += ["-x", k]
    return argv + list(cluster.mpi_args)


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
        argv += ["-bind-to", f"core:{layout.cores_per_rank}" if layout.bind_to == "core" else "none"]
    else:
        pin = {"I_MPI_PIN": "1", "I_MPI_PIN_DOMAIN": f"{layout.cores_per_rank}:compact"} \
            if layout.bind_to == "core" else {"I_MPI_PIN": "0"}
        for k, v in pin.items():
            argv += ["-genv", k, v]
    for k, v in threads.items():
        argv += ["-genv", k, v]
    forward = [k for k in FORWARD_VARS if k in environ and k not in threads]
    if forward:
        argv += ["-genvlist", ",".join(forward)]
    return argv + list(cluster.mpi_args)
