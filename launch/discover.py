"""Host discovery for elastic training: which hosts of the allocation can take ranks now.

``python -m launch.discover [--cluster FILE] [--hosts h1:2,h2:2 | --hostfile F]`` prints one
``host:slots`` line per host that answers: the hosts come from the same places as the launcher's
(``--hosts``/``--hostfile``, the Slurm allocation in the environment, the cluster file), and a host
is listed when a TCP connection to its ssh port opens within ``--timeout`` seconds (this node is
always listed). ``python -m launch train --elastic`` hands this command to ``horovodrun
--host-discovery-script``; Horovod runs it every few seconds, drops ranks of hosts that vanish and
starts ranks on hosts that (re)appear. On the virtual cluster a node whose ``eth0`` is down (a node
lost) is not listed, and is listed again once it is back up.
"""
from __future__ import annotations

import argparse
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from launch.cluster import load_cluster, resolve_allocation
from launch.hosts import Host, LaunchError, is_local_host


def answers(name: str, port: int, timeout: float) -> bool:
    """True when ``name`` resolves and accepts a TCP connection on ``port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection((name, port), timeout=timeout):
            return True
    except OSError:
        return False


def available(hosts: Sequence[Host], port: int = 22, timeout: float = 1.0, ranks_per_node: int = 0) -> list[Host]:
    """The hosts that can take ranks now, in order; slots capped at ``ranks_per_node`` when set."""
    def up(h: Host) -> bool:
        return is_local_host(h.name) or answers(h.name, port, timeout)

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(hosts)))) as ex:
        alive = list(ex.map(up, hosts))
    return [Host(h.name, min(h.slots, ranks_per_node) if ranks_per_node else h.slots)
            for h, ok in zip(hosts, alive) if ok]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.discover", description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", "-H", help="hosts and slots, e.g. node01:2,node02:2")
    where.add_argument("--hostfile", help="Open MPI hostfile ('host slots=N' per line)")
    p.add_argument("--cluster", help="cluster file (hosts, ranks_per_node, ssh_port)")
    p.add_argument("--timeout", type=float, default=1.0, help="seconds a host has to answer (default 1)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cluster = load_cluster(args.cluster)
        allocation = resolve_allocation(cluster, hosts=args.hosts, hostfile=args.hostfile)
        if allocation.source == "local":
            raise LaunchError("no hosts to discover: give --hosts, --hostfile or --cluster, or run inside Slurm")
        for h in available(allocation.hosts, cluster.ssh_port or 22, args.timeout, cluster.ranks_per_node):
            print(h.spec())
    except LaunchError as e:
        print(f"launch.discover: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
