"""The compute nodes' shape (sockets, cores, NUMA domains, threads per core), not the launching node's.

The layout of every stage is planned for the nodes the ranks run on. Their shape comes from, first
that applies:

* the cluster file, when it gives ``sockets_per_node`` and ``cores_per_socket`` (``numa_per_socket``
  and ``threads_per_core`` too, or they are taken from the next source);
* this node, when it is one of the compute nodes (one node, or inside a Slurm allocation);
* ``<run.dir>/node-shape.json``, what an earlier launch probed on the same first node;
* a probe of the first compute node: ``python -m launch.shape`` there (over ssh with the cluster's
  client file, or ``srun -N1 -n1`` inside an allocation), which reads its sysfs with
  :func:`distributed.tuning.detect_topology`, the same code every rank uses;
* this node, with a one-line warning, when none of these can be had (``check_hosts: false``,
  ``--no-check-hosts``, a node that does not answer).

What a probe prints is input from another machine: it is read as JSON with bounded whole numbers and
nothing else is taken from it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distributed.tuning import Topology, detect_topology
from launch.cluster import ClusterConfig
from launch.hosts import Allocation, LaunchError, is_local_host

CACHE_NAME = "node-shape.json"
PROBE_TIMEOUT_S = 30.0
ROOT = Path(__file__).resolve().parents[1]
_LIMITS = {"sockets": 64, "physical_cores": 65536, "logical_cpus": 262144, "numa_nodes": 1024}


@dataclass(frozen=True)
class Shape:
    topology: Topology  # the node shape every layout is planned for
    source: str  # "cluster file", "this node", "probed on cn001", "probed on cn001 (cached)", ...
    warning: str = ""  # one line for the user, or ""


def to_dict(t: Topology) -> dict:
    return {"sockets": t.sockets, "physical_cores": t.physical_cores, "logical_cpus": t.logical_cpus,
            "numa_nodes": t.numa_nodes}


def from_dict(d, where: str) -> Topology:
    """A Topology from what a probe printed; LaunchError for anything but four bounded whole numbers."""
    if not isinstance(d, dict):
        raise LaunchError(f"{where}: not a node shape")
    vals = {}
    for key, top in _LIMITS.items():
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
            raise LaunchError(f"{where}: {key} must be a whole number from 1 to {top}, got {v!r}")
        vals[key] = v
    if not vals["sockets"] <= vals["physical_cores"] <= vals["logical_cpus"]:
        raise LaunchError(f"{where}: inconsistent node shape {vals}")
    return Topology(**vals, source=where)


def probe_command(host: str, cluster: ClusterConfig, allocation: Allocation) -> list[str]:
    """The command that prints ``host``'s shape: srun inside its Slurm allocation, else ssh."""
    python = cluster.python or sys.executable
    inner = ["env", f"PYTHONPATH={ROOT}", python, "-m", "launch.shape"]
    if allocation.source == "slurm":
        return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={host}", "--overlap", "--quiet", *inner]
    cmd = ["ssh"] + (["-F", cluster.ssh_config] if cluster.ssh_config else [])
    cmd += ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if cluster.ssh_port:
        cmd += ["-p", str(cluster.ssh_port)]
    return cmd + ["--", host, shlex.join(inner)]  # one quoted string: the remote shell splits it back


def probe(host: str, cluster: ClusterConfig, allocation: Allocation,
          run: Callable = subprocess.run, timeout: float = PROBE_TIMEOUT_S) -> Topology:
    """``host``'s shape, probed there; LaunchError with the reason when it cannot be had."""
    cmd = probe_command(host, cluster, allocation)
    try:
        r = run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LaunchError(f"{cmd[0]} is not installed on this node") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"no answer within {timeout:g} s") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1][:200]
        raise LaunchError(why)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    return from_dict(data, f"probed on {host}")


def _read_cache(path: Path, host: str) -> Topology | None:
    try:
        d = json.loads(path.read_text())
        return from_dict(d, f"probed on {host} (cached)") if d.get("host") == host else None
    except (OSError, ValueError, LaunchError, AttributeError):
        return None


def _write_cache(path: Path, host: str, t: Topology) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"host": host, **to_dict(t), "probed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a cache: the next launch probes again


def _short(t: Topology) -> str:
    return (f"{t.sockets}x{t.cores_per_socket} cores x{t.threads_per_core}, "
            f"{max(t.numa_nodes, t.sockets)} NUMA")


def resolve(cluster: ClusterConfig, allocation: Allocation, run_dir: str | os.PathLike | None = None,
            may_probe: bool = True, write_cache: bool = True, here: Topology | None = None,
            run: Callable = subprocess.run) -> Shape:
    """The compute nodes' shape and where it came from (module docstring)."""
    here = here or detect_topology()
    full_file = bool(cluster.sockets_per_node and cluster.cores_per_socket)
    first = allocation.hosts[0].name if allocation.hosts else ""
    on_a_node = allocation.source == "local" or any(is_local_host(h.name) for h in allocation.hosts)
    if full_file and cluster.numa_per_socket and cluster.threads_per_core:
        return Shape(here, "cluster file")
    if on_a_node:
        return Shape(here, "this node")
    cache = Path(run_dir) / CACHE_NAME if run_dir else None
    probed = _read_cache(cache, first) if cache else None
    if probed is None and may_probe:
        try:
            probed = probe(first, cluster, allocation, run=run)
        except LaunchError as e:
            why = f"cannot probe {first} ({e})"
        else:
            if cache and write_cache:
                _write_cache(cache, first, probed)
    elif probed is None:
        why = f"{first} not probed (check_hosts: false or --no-check-hosts)"
    if probed is not None:
        warning = ""
        if not full_file and (probed.sockets, probed.physical_cores, probed.logical_cpus) != \
                (here.sockets, here.physical_cores, here.logical_cpus):
            warning = (f"the compute nodes ({_short(probed)}, {probed.source}) differ from this node "
                       f"({_short(here)}): planned for the compute nodes")
        return Shape(probed, probed.source, "" if full_file else warning)
    if full_file:
        return Shape(here, "cluster file")
    return Shape(here, "this node", f"node shape: {why}; planned for this node's ({_short(here)}): set "
                                    f"sockets_per_node and cores_per_socket in the cluster file if the compute "
                                    f"nodes differ")


def main(argv=None) -> int:
    """Print this node's shape as one JSON line (what :func:`probe` runs on a compute node)."""
    p = argparse.ArgumentParser(prog="python -m launch.shape", description=main.__doc__)
    p.add_argument("--sys-root", default="/sys", help=argparse.SUPPRESS)  # tests: a fabricated sysfs tree
    args = p.parse_args(argv)
    t = detect_topology(args.sys_root)
    print(json.dumps({**to_dict(t), "source": t.source}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
