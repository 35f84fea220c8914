"""``python -m launch train --elastic [--min-np A] [--max-np B]`` (or ``train.elastic: true``):
the ``horovodrun`` command of elastic training.

    horovodrun -np N --min-np A --max-np B --host-discovery-script "python -m launch.discover ..."
               --slots-per-host R --gloo [--network-interfaces IF] --blacklist-cooldown-range 5 60
               python -m distributed.train --config C --set train.elastic=true

Horovod's elastic mode runs on Gloo. The discovery command (:mod:`launch.discover`) lists the hosts
of the same allocation that answer now; the job starts with N ranks (the hosts' slots, or ``--np``)
as soon as A are there, goes on with the ranks that remain when a host is lost (while at least A
remain), and grows up to B when hosts come back. A host whose rank failed is left out for 5 to 60 s
(Horovod's blacklist cooldown, doubling with each failure) before it is tried again.
"""
from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from launch.commands import LaunchSpec, StageCommand
from launch.commands import build_command as plain_command
from launch.hosts import LaunchError

COOLDOWN_S = (5, 60)  # a failed host is tried again after 5-60 s (Horovod doubles it per failure)


def add_arguments(p) -> None:
    p.add_argument("--elastic", action="store_true",
                   help="train: Horovod elastic, going on when a host is lost and growing back when it returns "
                        "(also train.elastic: true in the config)")
    p.add_argument("--min-np", type=int, default=None, help="elastic: fewest ranks to go on with (default 1)")
    p.add_argument("--max-np", type=int, default=None,
                   help="elastic: most ranks to grow to (default: the hosts' slots)")


def wanted(stage: str, args, cfg) -> bool:
    return stage == "train" and bool(getattr(args, "elastic", False) or cfg.train.elastic)


def discovery_command(args) -> str:
    """The shell command horovodrun runs, on this machine, to list the hosts (the same sources as this launch)."""
    argv = [sys.executable, "-m", "launch.discover"]
    if args.cluster:
        argv += ["--cluster", str(Path(args.cluster).resolve())]
    if args.hosts:
        argv += ["--hosts", args.hosts]
    elif args.hostfile:
        argv += ["--hostfile", str(Path(args.hostfile).resolve())]
    return shlex.join(argv)  # Horovod runs it through a shell; under Slurm it inherits SLURM_JOB_NODELIST


def build_command(spec: LaunchSpec, args) -> StageCommand:
    """The elastic horovodrun command for ``spec`` (a train stage over at least two hosts)."""
    layout = spec.layout
    if len(layout.hosts) < 2:
        raise LaunchError("elastic training needs at least two hosts (--hosts, --cluster or a Slurm allocation): "
                          "on one host a lost rank takes the whole host out of the job")
    lo = args.min_np if args.min_np is not None else 1
    hi = args.max_np if args.max_np is not None else sum(h.slots for h in layout.hosts)
    if not 1 <= lo <= layout.np <= hi:
        raise LaunchError(f"elastic ranks must satisfy 1 <= --min-np ({lo}) <= ranks to start ({layout.np}) "
                          f"<= --max-np ({hi})")
    # Horovod: elastic mode needs the Gloo controller; every rank binds itself (distributed.runtime).
    cluster = dataclasses.replace(spec.cluster, horovod_controller="gloo")
    spec = dataclasses.replace(spec, cluster=cluster, launcher="horovodrun",
                               overrides=tuple(spec.overrides) + ("train.elastic=true",))
    base = plain_command(spec)  # for the ranks' thread variables and root settings
    argv = ["horovodrun", "-np", str(layout.np), "--min-np", str(lo), "--max-np", str(hi),
            "--host-discovery-script", discovery_command(args),
            "--slots-per-host", str(max(1, layout.ranks_per_node)), "--gloo"]
    if cluster.network_interface:
        argv += ["--network-interfaces", cluster.network_interface]  # the rendezvous address the nodes reach
    if cluster.ssh_port:
        argv += ["--ssh-port", str(cluster.ssh_port)]
    argv += ["--blacklist-cooldown-range", str(COOLDOWN_S[0]), str(COOLDOWN_S[1])]
    return StageCommand(spec.stage, argv + spec.inner_argv(), base.env, layout, "horovodrun",
                        env_passthrough=cluster.env_passthrough)


def is_elastic(cmd: StageCommand) -> bool:
    return "--host-discovery-script" in cmd.argv
