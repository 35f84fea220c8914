"""``python -m launch {prep,train,evaluate,pipeline} --config C ...`` (console script ``cxr-launch``);
``python -m launch sweep --config C --seeds 0,1,2`` runs the pipeline once per seed (:mod:`launch.sweep`),
``--grid KEY=V1,V2`` / ``--preset transfer-options`` once per grid point and seed (:mod:`launch.grid`).

Builds the real command line of each stage (a plain python process for one rank, ``mpirun`` for
prep, ``horovodrun`` or ``mpirun`` for train and evaluate) with process binding and the tuned
thread environment for every rank, and runs it, or prints it with ``--dry-run``. ``pipeline`` runs
prep, train and evaluate, skipping the stages whose outputs are complete for the same config and
resuming an interrupted training run from its checkpoints. Running a stage (process group, ssh
through the cluster's client file, a bounded end when a node or rank fails) is
:mod:`launch.supervise`; ``python -m launch vcluster up|down|status`` is :mod:`launch.vcluster`.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

from data_prep.cli import command, quiet_tensorflow
from data_prep.config import add_config_args, config_from_args
from launch import elastic, mapview
from launch import pipeline as pl
from launch import shape as shapes
from launch.cluster import LAUNCHERS, load_cluster, resolve_allocation
from launch.commands import (
    LaunchSpec,
    StageCommand,
    build_command,
    describe_shape,
    find_tool,
    node_topology,
    plan_layout,
    srun_mpi_type,
)
from launch.hosts import LaunchError, check_hosts_answer
from launch.supervise import Interrupted, check_launch_site, run

PROG = "cxr-launch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Run a stage (or the whole pipeline) on one node, a list of hosts, or a Slurm "
                               "allocation, with process binding and tuned threads for every rank.",
        epilog=f"`{PROG} vcluster up|down|status` makes a virtual cluster of namespace nodes on this machine "
               f"(root) to rehearse a multi-node run; see `{PROG} vcluster --help`. `{PROG} sweep --config C "
               f"--seeds 0,1,2 [--grid KEY=V1,V2] [--resplit]` runs the pipeline once per seed and grid point; see "
               f"`{PROG} sweep --help`.")
    p.add_argument("stage", choices=("prep", "train", "evaluate", "pipeline", "plan"),
                   help="plan: print each stage's command and, per node, every rank's cores, NUMA domain and "
                        "threads as Open MPI's mapper binds them (nothing runs)")
    add_config_args(p)
    p.add_argument("--np", type=int, default=None,
                   help="total ranks (default: the hosts' slots, the Slurm tasks, or one per socket of this node; "
                        "1 = a plain python process)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", "-H", help="hosts and slots, e.g. node01:2,node02:2")
    where.add_argument("--hostfile", help="Open MPI hostfile ('host slots=N' per line)")
    p.add_argument("--cluster", help="cluster file (hosts, ranks per node, network interface, MPI flavour), "
                                     "e.g. configs/cluster.yaml")
    p.add_argument("--mpi-launcher", choices=LAUNCHERS, default=None,
                   help="launcher (default: the cluster file's, else auto: srun inside a Slurm allocation whose "
                        "srun has PMI support, else mpirun; horovodrun for the Gloo controller and elastic jobs)")
    p.add_argument("--dry-run", action="store_true", help="print the command of each stage, run nothing")
    p.add_argument("--resume", action="store_true", help="train: continue from run.dir/checkpoints "
                                                         "(pipeline does this by itself)")
    p.add_argument("--restart", action="store_true", help="train: start over in run.dir, moving the run there "
                                                          "aside (a run of another definition is refused otherwise)")
    p.add_argument("--force", action="store_true", help="pipeline: run every stage even when its outputs are complete")
    p.add_argument("--no-check-hosts", action="store_true", help="do not probe remote hosts with ssh first")
    elastic.add_arguments(p)
    return p


def describe(cmd: StageCommand) -> str:
    lay = cmd.layout
    if cmd.kind == "python":
        return f"{cmd.stage}: 1 process (no MPI)"
    nodes = max(1, len(lay.hosts))
    bind = f"--map-by {lay.map_by} --bind-to core" if lay.bind_to == "core" else "not bound"
    if "--gloo" in cmd.argv:
        bind = "each rank binds itself to its cores (Gloo controller)"
    elif cmd.kind == "horovodrun":
        bind += "; horovodrun --mpi forces -mca pml ob1 (TCP, no UCX/InfiniBand)"
    cores = f"{lay.cores_per_rank} core(s) per rank, " if lay.cores_per_rank else ""
    return (f"{cmd.stage}: {lay.np} rank(s) on {nodes} node(s), up to {lay.ranks_per_node} per node, {cores}{bind}, "
            f"via {cmd.kind}")


@command(PROG)  # config errors exit 2 (data_prep.cli), launch errors 2 below: one line each
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vcluster"]:
        from launch import vcluster  # a rehearsal cluster on this machine: its own verbs and options
        return vcluster.cli(argv[1:], prog=f"{PROG} vcluster")
    if argv[:1] == ["sweep"]:
        from launch import grid  # one pipeline per arm (seed, grid point), then sweep.json / sweep.md
        try:
            return grid.cli(argv[1:], prog=f"{PROG} sweep", run_pipeline=main)
        except LaunchError as e:
            print(f"{PROG} sweep: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ notices off for horovodrun (it loads TensorFlow) and every rank it starts, unless
    # the user chose a level or --debug; rank 0 reports the facts in its own words.
    quiet_tensorflow(argv=argv)
    try:
        return _main(args, argv)
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        name = signal.Signals(e.signum).name
        print(f"{PROG}: interrupted by {name}; run the same command again to continue where it stopped",
              file=sys.stderr)
        return 128 + e.signum


def _main(args, argv: list[str]) -> int:
    cfg = config_from_args(args)
    cluster = load_cluster(args.cluster)
    allocation = resolve_allocation(cluster, hosts=args.hosts, hostfile=args.hostfile)
    planning = args.stage == "plan"
    dry = args.dry_run or planning

    def say(m):
        print(f"[launch] {m}", file=sys.stderr)

    if not dry and allocation.source not in ("slurm", "local"):  # under Slurm the job script runs on the first node
        check_launch_site(allocation.hosts, cluster.network_interface, cluster.ssh_config,
                          "python -m launch " + shlex.join(argv))
    # The compute nodes' shape (probed on the first one, or the cluster file's), not this node's
    shape = shapes.resolve(cluster, allocation, run_dir=cfg.run.dir, write_cache=not dry,
                           may_probe=cluster.check_hosts and not args.no_check_hosts)
    node = node_topology(cluster, base=None if shape.source == "this node" else shape.topology,
                         base_source=shape.source)
    if shape.warning:
        print(f"{PROG}: warning: {shape.warning}", file=sys.stderr)
    launcher = args.mpi_launcher or cluster.launcher
    slurm = allocation.source == "slurm"
    # inside an allocation, srun with PMIx/PMI2 is the sites' launcher (auto picks it)
    srun_mpi = srun_mpi_type() if slurm and launcher in ("auto", "srun") else ""
    stages = pl.STAGES if args.stage in ("pipeline", "plan") else (args.stage,)
    checked_hosts = False

    for stage in stages:
        extra: list[str] = []
        if args.stage == "pipeline":
            st = pl.stage_status(stage, cfg)
            if st.complete and not args.force:
                if args.dry_run:
                    print(f"# skip {stage}: {st.why}")
                else:
                    say(f"skip {stage}: {st.why}")
                continue
            if stage == "train" and args.restart:
                extra.append("--restart")  # the old run is moved aside, not resumed
            elif stage == "train" and st.resume:
                extra.append("--resume")
        elif stage == "train" and (args.resume or args.restart):
            extra.append("--restart" if args.restart else "--resume")

        layout = plan_layout(stage, allocation, cluster, node, args.np)
        spec = LaunchSpec(stage, layout, config=args.config, overrides=tuple(args.overrides), extra=tuple(extra),
                          cluster=cluster, launcher=launcher, runtime=cfg.runtime, hostfile=allocation.hostfile,
                          slurm=slurm, srun_mpi=srun_mpi, cpus_are_cores=allocation.cpus_are_cores)
        cmd = elastic.build_command(spec, args) if elastic.wanted(stage, args, cfg) else build_command(spec)
        tool = cmd.argv[0] if cmd.kind != "python" else None
        if tool and not find_tool(tool):
            msg = (f"{tool} not found on PATH; " + (
                "build Horovod (`make setup`) and put the venv's bin first on PATH, or use --mpi-launcher mpirun"
                if tool == "horovodrun" else "install Open MPI (`make mpi`)") + ", or run one process with --np 1")
            if not dry:
                raise LaunchError(msg)
            print(f"{PROG}: warning: {msg}", file=sys.stderr)
        if dry:
            for note in layout.notes:
                print(f"{PROG}: note: {note}", file=sys.stderr)
            if args.stage not in ("pipeline", "plan"):
                try:
                    pl.check_inputs(stage, cfg, args.config, restart=args.restart)
                except LaunchError as e:
                    print(f"{PROG}: warning: {e}", file=sys.stderr)
            print(f"# {describe(cmd)}; node shape: {describe_shape(layout.node)}")
            if cmd.kind != "python":
                result, refused = mapview.rank_map(cmd, cluster, cfg.runtime)
                for line in mapview.render(result, layout.node, prefix="# "):
                    print(line)
                if refused:
                    print(f"{PROG}: warning: {refused}", file=sys.stderr)
            print(cmd.shell())
            continue

        pl.check_inputs(stage, cfg, args.config, restart=args.restart)
        if (not checked_hosts and layout.hosts and cluster.check_hosts and not args.no_check_hosts
                and allocation.source != "slurm" and not elastic.is_elastic(cmd)):  # elastic: discovery decides
            check_hosts_answer(layout.hosts, cluster.ssh_port, ssh_config=cluster.ssh_config)
            checked_hosts = True
        say(describe(cmd))
        say(cmd.shell())
        t0 = time.monotonic()
        rc, failure = run(cmd, cluster.ssh_port, probe_nodes=allocation.source != "slurm",
                          watch_faults=not elastic.is_elastic(cmd))  # elastic: a lost node is survived
        if failure:
            print(f"{PROG}: error: {failure.sentence(stage, time.monotonic() - failure.at)}", file=sys.stderr)
            return rc or 1
        if rc != 0:
            where = f"; see the messages above and {Path(cfg.run.dir) / 'train.log'}" if stage == "train" else \
                "; see the messages above"
            print(f"{PROG}: error: {stage} failed with exit code {rc}{where}", file=sys.stderr)
            return rc
        if stage in ("train", "evaluate"):
            pl.write_marker(cfg, stage, layout.np, cmd.shell())
        say(f"{stage} finished in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
