"""The cluster file (``--cluster configs/cluster.yaml``): hosts, ranks, network, MPI flavour.

Checked as strictly as the run config: an unknown key or a wrong type is one sentence naming
the key. Every key is optional; the flags of ``python -m launch`` override the file.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from data_prep.config import read_yaml_mapping
from launch.hosts import Allocation, Host, LaunchError, check_interface, parse_hostfile, parse_hosts, slurm_allocation

MPI_FLAVOURS = ("openmpi", "mpich", "intelmpi")
LAUNCHERS = ("auto", "mpirun", "horovodrun", "srun")
CONTROLLERS = ("mpi", "gloo")
TRANSPORTS = ("auto", "ucx", "ofi", "tcp")
RANK_UNITS = ("socket", "numa")


@dataclass(frozen=True)
class ClusterConfig:
    hosts: tuple[Host, ...] = ()          # node01:2 items; empty = this node (or the Slurm allocation)
    hostfile: str = ""                    # Open MPI hostfile instead of hosts
    ranks_per_node: int | str = ""        # socket | numa | N; empty = the hosts' slots, else one rank per socket
    prep_ranks_per_node: int = 0          # 0 = as ranks_per_node (prep is single-threaded per rank)
    cores_per_rank: int = 0               # 0 = the node's cores divided among its ranks
    sockets_per_node: int = 0             # node shape of the compute nodes; 0 = probed on the first node
    cores_per_socket: int = 0             # 0 = probed (physical cores, hyper-threads not counted)
    numa_per_socket: int = 0              # 0 = probed (AMD NPS2/NPS4, Intel SNC: 2 or 4)
    threads_per_core: int = 0             # 0 = probed (2 with hyper-threading / SMT)
    network_interface: str = ""           # e.g. eth0, ib0; empty = MPI's choice
    transport: str = "auto"               # auto (Open MPI's choice) | ucx | ofi | tcp
    mpi: str = "openmpi"                  # openmpi | mpich | intelmpi
    launcher: str = "auto"                # train/evaluate: auto | mpirun | horovodrun | srun (prep: mpirun or srun)
    horovod_controller: str = "mpi"       # mpi or gloo (horovodrun --gloo; each rank binds itself, distributed.runtime)
    python: str = ""                      # interpreter on every node; empty = this one (shared file system)
    ssh_port: int = 0                     # 0 = ssh's default
    ssh_config: str = ""                  # ssh client file (ssh -F) for every ssh the launcher, MPI and Horovod make
    check_hosts: bool = True              # probe remote hosts with a short ssh before starting
    mpi_args: tuple[str, ...] = ()        # extra arguments for mpirun, e.g. ["--mca", "btl", "^openib"]; they win
    env_passthrough: tuple[str, ...] = ()  # variables passed to the ranks beyond the allow-list (commands.ENV_ALLOW)
    start_timeout: int = 0                # horovodrun --start-timeout in s; 0 = 30 + 1 s per 2 hosts
    source: str = field(default="", compare=False)


_INT_KEYS = ("prep_ranks_per_node", "cores_per_rank", "sockets_per_node", "cores_per_socket",
             "numa_per_socket", "threads_per_core", "ssh_port", "start_timeout")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STR_KEYS = ("hostfile", "network_interface", "python", "ssh_config")
_CHOICES = {"mpi": MPI_FLAVOURS, "launcher": LAUNCHERS, "horovod_controller": CONTROLLERS,
            "transport": TRANSPORTS}


def load_cluster(path: str | Path | None) -> ClusterConfig:
    if not path:
        return ClusterConfig()
    p = Path(path)
    tree = read_yaml_mapping(p, LaunchError, "cluster")
    return cluster_from_dict(tree, str(p))


def resolve_allocation(cluster: ClusterConfig, hosts: str | None = None, hostfile: str | None = None,
                       environ: Mapping[str, str] = os.environ) -> Allocation:
    """Where the ranks may run, first match wins: ``--hosts``, ``--hostfile``, the Slurm allocation
    in ``environ``, the cluster file's hosts or hostfile, else this node alone."""
    if hosts:
        return Allocation(parse_hosts(hosts), "hosts")
    if hostfile:
        return Allocation(parse_hostfile(hostfile), "hostfile", hostfile=hostfile)
    slurm = slurm_allocation(environ)
    if slurm is not None:
        return slurm
    if cluster.hosts:
        return Allocation(cluster.hosts, "cluster")
    if cluster.hostfile:
        return Allocation(parse_hostfile(cluster.hostfile), "cluster", hostfile=cluster.hostfile)
    return Allocation((Host("localhost", 0),), "local", slots_given=False)


def cluster_from_dict(tree: dict[str, Any], source: str = "<cluster>") -> ClusterConfig:
    allowed = [f.name for f in dataclasses.fields(ClusterConfig) if f.name != "source"]
    unknown = sorted(set(tree) - set(allowed))
    if unknown:
        raise LaunchError(f"{source}: unknown key '{unknown[0]}'; allowed keys: {', '.join(allowed)}")
    kw: dict[str, Any] = {"source": source}
    for key, value in tree.items():
        if value is None:
            continue
        if key == "hosts":
            kw[key] = _hosts(value, source)
        elif key in _INT_KEYS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LaunchError(f"{source}: {key} must be a whole number >= 0, got {value!r}")
            kw[key] = value
        elif key in _STR_KEYS:
            if not isinstance(value, str):
                raise LaunchError(f"{source}: {key} must be a string, got {value!r}")
            kw[key] = value
        elif key in _CHOICES:
            if value not in _CHOICES[key]:
                raise LaunchError(f"{source}: {key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
            kw[key] = value
        elif key == "ranks_per_node":
            kw[key] = ranks_per_node_value(value, f"{source}: ranks_per_node")
        elif key == "check_hosts":
            if not isinstance(value, bool):
                raise LaunchError(f"{source}: check_hosts must be true or false, got {value!r}")
            kw[key] = value
        elif key == "mpi_args":
            if isinstance(value, str):
                value = value.split()
            if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
                raise LaunchError(f"{source}: mpi_args must be a list of strings")
            kw[key] = tuple(str(v) for v in value)
        elif key == "env_passthrough":
            if not isinstance(value, list) or not all(isinstance(v, str) and _ENV_NAME.match(v) for v in value):
                raise LaunchError(f"{source}: env_passthrough must be a list of variable names, e.g. [WANDB_MODE]")
            kw[key] = tuple(value)
    if kw.get("network_interface"):
        check_interface(kw["network_interface"], f"{source}: network_interface")
    if kw.get("ssh_config"):
        kw["ssh_config"] = _ssh_config(kw["ssh_config"], source)
    cfg = ClusterConfig(**kw)
    if cfg.hosts and cfg.hostfile:
        raise LaunchError(f"{source}: give either hosts or hostfile, not both")
    return cfg


def ranks_per_node_value(value, where: str = "ranks_per_node") -> int | str:
    """``socket``, ``numa``, a whole number >= 1, or empty/0 (the hosts' slots, else one per socket)."""
    if value in ("", 0, None):
        return ""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value in RANK_UNITS or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise LaunchError(f"{where} must be socket, numa or a whole number >= 1, got {value!r}")


def _ssh_config(value: str, source: str) -> str:
    """An existing file, as an absolute path (a relative one is read from the cluster file's folder):
    the ranks' ssh sessions may start elsewhere."""
    p = Path(value).expanduser()
    if not p.is_absolute() and Path(source).is_file():
        p = Path(source).resolve().parent / p
    if not p.is_file():
        raise LaunchError(f"{source}: ssh_config {value!r} is not a file; give the ssh client file "
                          f"(ssh -F) the nodes are reached with, or leave the key out")
    return str(p.resolve())


def _hosts(value, source: str) -> tuple[Host, ...]:
    if isinstance(value, str):
        return parse_hosts(value)
    if not isinstance(value, list):
        raise LaunchError(f"{source}: hosts must be a list like [node01:2, node02:2]")
    items = []
    for v in value:
        if isinstance(v, dict):
            extra = set(v) - {"host", "slots"}
            if "host" not in v or extra:
                raise LaunchError(f"{source}: each host is 'name:slots' or {{host: name, slots: N}}, got {v!r}")
            items.append(f"{v['host']}:{v.get('slots', 1)}")
        else:
            items.append(str(v))
    return parse_hosts(items)
