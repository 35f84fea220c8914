"""The launcher on real node types: the compute nodes' shape, layouts that never straddle a socket,
MCA parameters once, Intel MPI's units, the environment interconnects need, Slurm's CPU counting.

Node shapes are fabricated: a sysfs tree of a 2-socket, 56-core Xeon 8480+ with hyper-threads stands
for a compute node reached over ssh (the probe runs the project's own ``python -m launch.shape`` on it),
and Slurm variables stand for an allocation.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from distributed.tuning import Topology, detect_topology, plan_threads
from launch import shape as shapes
from launch.cluster import ClusterConfig, cluster_from_dict
from launch.commands import (
    LaunchSpec,
    build_command,
    intel_pin_domain,
    mca_params,
    node_topology,
    plan_layout,
    rank_thread_env,
)
from launch.hosts import Allocation, Host, LaunchError, parse_hosts, slurm_allocation

ROOT = Path(__file__).resolve().parents[2]
SPR = Topology(sockets=2, physical_cores=112, logical_cpus=224, numa_nodes=2, source="given")
NPS4 = Topology(sockets=2, physical_cores=192, logical_cpus=384, numa_nodes=8, source="given")
LOGIN = Topology(sockets=1, physical_cores=16, logical_cpus=16, numa_nodes=1, source="sysfs")


def remote_runner(sys_root: Path, calls: list):
    """Stands for ssh to a compute node: runs the command given after the host here, on ``sys_root``."""
    def run(cmd, **kw):
        calls.append(cmd)
        assert cmd[0] == "ssh" and "--" in cmd
        remote = cmd[cmd.index("--") + 2]  # the one quoted string the remote shell splits
        import shlex
        argv = shlex.split(remote) + ["--sys-root", str(sys_root)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    return run


def test_a_shape_probed_on_the_compute_node_wins_over_the_launching_node(tmp_path, fake_sysfs):
    sysfs = fake_sysfs(tmp_path / "sys", sockets=2, cores=56, threads=2, numa=2)
    alloc = Allocation(parse_hosts("cn001:2,cn002:2"), "hosts")
    calls = []
    got = shapes.resolve(ClusterConfig(), alloc, run_dir=tmp_path / "run", here=LOGIN,
                         run=remote_runner(sysfs, calls))
    t = got.topology
    assert (t.sockets, t.physical_cores, t.logical_cpus, t.numa_nodes) == (2, 112, 224, 2)
    assert got.source == "probed on cn001" and len(calls) == 1 and "cn001" in calls[0]
    assert "differ from this node" in got.warning
    lay = plan_layout("train", alloc, ClusterConfig(), node_topology(ClusterConfig(), base=t, base_source=got.source))
    assert lay.map_by == "ppr:1:socket:pe=56" and lay.shape_source == "probed on cn001"
    # cached beside the run: the next launch does not probe again
    cached = json.loads((tmp_path / "run" / shapes.CACHE_NAME).read_text())
    assert cached["host"] == "cn001" and cached["physical_cores"] == 112
    again = shapes.resolve(ClusterConfig(), alloc, run_dir=tmp_path / "run", here=LOGIN,
                           run=remote_runner(sysfs, calls))
    assert again.source == "probed on cn001 (cached)" and len(calls) == 1


def test_the_cluster_file_overrides_and_an_unprobed_shape_is_a_warning(tmp_path):
    alloc = Allocation(parse_hosts("cn001:2"), "hosts")
    full = ClusterConfig(sockets_per_node=2, cores_per_socket=56, numa_per_socket=1, threads_per_core=2)
    assert shapes.resolve(full, alloc, here=LOGIN, run=None).source == "cluster file"
    blind = shapes.resolve(ClusterConfig(), alloc, here=LOGIN, may_probe=False)
    assert blind.source == "this node" and "sockets_per_node and cores_per_socket" in blind.warning
    node = node_topology(full, base=LOGIN)
    assert (node.sockets, node.physical_cores, node.logical_cpus, node.source) == (2, 112, 224, "cluster file")


def test_hostile_probe_output_is_refused():
    with pytest.raises(LaunchError, match="sockets must be a whole number"):
        shapes.from_dict({"sockets": "2; rm -rf /", "physical_cores": 1, "logical_cpus": 1, "numa_nodes": 1}, "x")
    with pytest.raises(LaunchError, match="inconsistent"):
        shapes.from_dict({"sockets": 4, "physical_cores": 2, "logical_cpus": 2, "numa_nodes": 1}, "x")


def test_the_probe_prints_this_nodes_shape():
    out = subprocess.run([sys.executable, "-m", "launch.shape"], capture_output=True, text=True, cwd=ROOT, check=True)
    d = json.loads(out.stdout)
    t = detect_topology()
    assert (d["sockets"], d["physical_cores"], d["logical_cpus"]) == (t.sockets, t.physical_cores, t.logical_cpus)


def test_odd_ranks_per_node_are_refused_naming_the_valid_ones():
    with pytest.raises(LaunchError, match=r"3 ranks per node on 2-socket nodes .* use 1 or 2 or 4 ranks per node"):
        plan_layout("train", Allocation(parse_hosts("cn001:3,cn002:3"), "hosts"), ClusterConfig(), SPR)
    with pytest.raises(LaunchError, match="use 1 or 2 or 4"):
        plan_layout("train", Allocation(parse_hosts("cn001:8"), "hosts"), ClusterConfig(ranks_per_node=3), SPR)
    with pytest.raises(LaunchError, match="ranks_per_node must be socket, numa or a whole number"):
        cluster_from_dict({"ranks_per_node": "core"})


def test_numa_gives_one_rank_per_domain_and_the_documented_inter_op_rule():
    lay = plan_layout("train", Allocation(parse_hosts("cn001:8"), "hosts"), ClusterConfig(ranks_per_node="numa"), NPS4)
    assert (lay.np, lay.map_by, lay.unit) == (8, "ppr:1:numa:pe=24", "numa")
    env = rank_thread_env(lay)
    assert (env["TF_NUM_INTRAOP_THREADS"], env["TF_NUM_INTEROP_THREADS"]) == ("24", "1")
    # one rank per socket (4 NUMA domains each): still within a socket, 1 inter-op thread
    lay = plan_layout("train", Allocation(parse_hosts("cn001:2"), "hosts"),
                      ClusterConfig(ranks_per_node="socket"), NPS4)
    assert lay.map_by == "ppr:1:socket:pe=96" and rank_thread_env(lay)["TF_NUM_INTEROP_THREADS"] == "1"
    # one rank over both sockets: 2, and the rank's own plan from its CPU mask says the same
    lay = plan_layout("train", Allocation(parse_hosts("cn001:1"), "hosts"), ClusterConfig(), SPR)
    assert lay.map_by == "ppr:1:node:pe=112" and rank_thread_env(lay)["TF_NUM_INTEROP_THREADS"] == "2"
    mask = Topology(sockets=2, physical_cores=112, logical_cpus=224, numa_nodes=2, bound_cores=112, bound_sockets=2)
    assert plan_threads(mask, 1).inter_op == 2
    mask = Topology(sockets=2, physical_cores=112, logical_cpus=224, numa_nodes=2, bound_cores=56, bound_sockets=1)
    assert plan_threads(mask, 2).inter_op == 1


def test_reserve_cores_leaves_cores_to_horovod_and_tf_data():
    from data_prep.config import load_config
    rt = load_config(None, ["runtime.reserve_cores=2"]).runtime
    lay = plan_layout("train", Allocation(parse_hosts("cn001:2"), "hosts"), ClusterConfig(), SPR)
    env = rank_thread_env(lay, rt)
    assert (lay.cores_per_rank, env["TF_NUM_INTRAOP_THREADS"], env["OMP_NUM_THREADS"]) == (56, "54", "54")


def test_transport_and_user_mca_parameters_appear_once():
    cl = ClusterConfig(transport="ucx", mpi_args=("--mca", "pml", "ucx", "--mca", "btl", "^openib"),
                       network_interface="ib0")
    lay = plan_layout("train", Allocation(parse_hosts("cn001:2,cn002:2"), "hosts"), cl, SPR)
    argv = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl), environ={}, uid=1000).argv
    names = [argv[i + 1] for i, a in enumerate(argv) if a == "--mca"]
    assert names.count("pml") == 1 and len(names) == len(set(names))
    p = mca_params(argv)
    assert (p["pml"], p["osc"], p["btl"], p["oob_tcp_if_include"]) == ("ucx", "ucx", "^openib", "ib0")
    assert argv[0] == "mpirun"  # the default launcher
    # the user's value wins over the transport's
    cl = ClusterConfig(transport="tcp", mpi_args=("--mca", "btl", "tcp,self"))
    argv = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl), environ={}, uid=1000).argv
    assert mca_params(argv)["btl"] == "tcp,self" and [a for a in argv if a == "btl"] == ["btl"]


def test_horovodrun_at_64_hosts_and_its_forced_tcp(tmp_path):
    ssh = tmp_path / "ssh_config"
    ssh.write_text("")
    hosts = Allocation(tuple(Host(f"cn{i:03d}", 2) for i in range(1, 65)), "hosts")
    cl = ClusterConfig(ssh_config=str(ssh), mpi_args=("--mca", "btl", "^openib"))
    lay = plan_layout("train", hosts, cl, SPR)
    argv = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="horovodrun"),
                         environ={}, uid=1000).argv
    mpi_args = next((a for a in argv if a.startswith("--mpi-args=")), "--mpi-args=").split("=", 1)[1]
    # horovodrun adds pml/btl and, from 64 hosts, plm_rsh_no_tree_spawn itself: none of them again
    assert "plm_rsh_no_tree_spawn" not in mpi_args and "btl" not in mpi_args and "pml" not in mpi_args
    assert argv[argv.index("--start-timeout") + 1] == "62"
    with pytest.raises(LaunchError, match="transport: ucx needs launcher: mpirun"):
        build_command(LaunchSpec("train", lay, config="c.yaml", cluster=ClusterConfig(transport="ucx"),
                                 launcher="horovodrun"), environ={}, uid=1000)
    with pytest.raises(LaunchError, match="horovodrun --mpi sets --mca pml ob1 itself"):
        build_command(LaunchSpec("train", lay, config="c.yaml", cluster=ClusterConfig(mpi_args=("--mca", "pml", "ucx")),
                                 launcher="horovodrun"), environ={}, uid=1000)


def test_auto_launcher_is_mpirun_and_horovodrun_for_gloo():
    lay = plan_layout("train", Allocation(parse_hosts("cn001:2,cn002:2"), "hosts"), ClusterConfig(), SPR)
    assert build_command(LaunchSpec("train", lay, config="c"), environ={}, uid=1000).kind == "mpirun"
    gloo = ClusterConfig(horovod_controller="gloo")
    cmd = build_command(LaunchSpec("train", lay, config="c", cluster=gloo), environ={}, uid=1000)
    assert cmd.kind == "horovodrun" and "--gloo" in cmd.argv
    assert build_command(LaunchSpec("prep", lay, config="c", cluster=gloo), environ={}, uid=1000).kind == "mpirun"


def test_intel_mpi_pins_in_logical_cpus():
    cl = ClusterConfig(mpi="intelmpi")
    lay = plan_layout("train", Allocation(parse_hosts("cn001:4"), "hosts"), cl, SPR)
    assert lay.cores_per_rank == 28 and intel_pin_domain(lay) == "56:compact"  # 28 cores x 2 hyper-threads
    argv = build_command(LaunchSpec("train", lay, config="c", cluster=cl), environ={}, uid=1000).argv
    assert ["-genv", "I_MPI_PIN_DOMAIN", "56:compact"] == argv[argv.index("I_MPI_PIN_DOMAIN") - 1:][:3]
    lay = plan_layout("train", Allocation(parse_hosts("cn001:2"), "hosts"), cl, SPR)
    assert intel_pin_domain(lay) == "socket"


def test_interconnect_variables_reach_the_ranks_by_name_only():
    environ = {"UCX_NET_DEVICES": "mlx5_0:1", "FI_PROVIDER": "mlx", "HDF5_USE_FILE_LOCKING": "FALSE",
               "LD_PRELOAD": "/usr/lib/libtcmalloc.so", "I_MPI_DEBUG": "5", "PMIX_MCA_gds": "hash",
               "MALLOC_ARENA_MAX": "2", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "PATH": "/usr/bin"}
    lay = plan_layout("train", Allocation(parse_hosts("cn001:2,cn002:2"), "hosts"), ClusterConfig(), SPR)
    argv = build_command(LaunchSpec("train", lay, config="c"), environ=environ, uid=1000).argv
    xs = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    for name in ("UCX_NET_DEVICES", "FI_PROVIDER", "HDF5_USE_FILE_LOCKING", "LD_PRELOAD", "I_MPI_DEBUG",
                 "PMIX_MCA_gds", "MALLOC_ARENA_MAX", "PATH"):
        assert name in xs, name
    assert "AWS_SECRET_ACCESS_KEY" not in " ".join(argv) and "mlx5_0:1" not in argv and "s3cr3t" not in " ".join(argv)
    hydra = build_command(LaunchSpec("train", lay, config="c", cluster=ClusterConfig(mpi="intelmpi")),
                          environ=environ, uid=1000).argv
    listed = hydra[hydra.index("-genvlist") + 1].split(",")
    assert "UCX_NET_DEVICES" in listed and "AWS_SECRET_ACCESS_KEY" not in listed


@pytest.mark.parametrize("hint", [{}, {"SLURM_HINT": "nomultithread"}])
def test_slurm_cpus_per_task_counts_hardware_threads(hint):
    """``-c 112`` on a 2 x 56-core node with hyper-threads: 56 bound cores per rank with or without
    ``--hint=nomultithread`` (Slurm counts threads without it; with it, 112 is more than a socket holds)."""
    env = {"SLURM_JOB_NODELIST": "cn[001-002]", "SLURM_NTASKS": "4", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_CPUS_PER_TASK": "112", **hint}
    alloc = slurm_allocation(env)
    assert alloc.cpus_are_cores == bool(hint)
    lay = plan_layout("train", alloc, ClusterConfig(), SPR)
    assert (lay.cores_per_rank, lay.map_by, lay.bind_to) == (56, "ppr:1:socket:pe=56", "core")
    env["SLURM_CPUS_PER_TASK"] = "56"  # without the hint: 56 threads = 28 cores
    lay = plan_layout("train", slurm_allocation(env), ClusterConfig(), SPR)
    assert lay.cores_per_rank == (56 if hint else 28)


def test_srun_inside_an_allocation_with_pmix():
    """``SLURM_JOB_NODELIST=cn[001-064]``, 2 tasks per node, ``-c 112`` on 2 x 56-core nodes with hyper-threads,
    srun offering PMIx (what ``srun --mpi=list`` says, given here): auto picks srun, bound by Slurm."""
    env = {"SLURM_JOB_NODELIST": "cn[001-064]", "SLURM_NTASKS": "128", "SLURM_TASKS_PER_NODE": "2(x64)",
           "SLURM_CPUS_PER_TASK": "112"}
    alloc = slurm_allocation(env)
    lay = plan_layout("train", alloc, ClusterConfig(), SPR)
    spec = LaunchSpec("train", lay, config="c.yaml", slurm=True, srun_mpi="pmix")
    cmd = build_command(spec, environ={}, uid=0)
    assert cmd.kind == "srun"
    assert cmd.argv[:cmd.launcher_argc] == ["srun", "--mpi=pmix", "--nodes=64", "--ntasks=128", "--ntasks-per-node=2",
                                            "--cpus-per-task=112", "--cpu-bind=cores", "--distribution=block:block",
                                            "--kill-on-bad-exit=1"]
    assert cmd.env["OMP_NUM_THREADS"] == "56" and "OMPI_ALLOW_RUN_AS_ROOT" not in cmd.env
    # without PMI support in srun: mpirun, taking the hosts from the allocation (no --host)
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", slurm=True, srun_mpi=""), environ={}, uid=0)
    assert cmd.kind == "mpirun" and "--host" not in cmd.argv and cmd.argv[:3] == ["mpirun", "-np", "128"]
    with pytest.raises(LaunchError, match="launcher: srun needs a Slurm allocation"):
        build_command(LaunchSpec("train", lay, config="c.yaml", launcher="srun"), environ={}, uid=0)


def test_srun_mpi_type_reads_srun_mpi_list(monkeypatch):
    from launch import commands
    out = ("MPI plugin types are...\n\tnone\n\tcray_shasta\n\tpmi2\n\tpmix\n"
           "specific pmix plugin versions available: pmix_v4\n")
    monkeypatch.setattr(commands.shutil, "which", lambda name: "/usr/bin/srun")
    fake = lambda *a, **k: subprocess.CompletedProcess(a[0], 0, stdout=out, stderr="")  # noqa: E731
    assert commands.srun_mpi_type(run=fake) == "pmix"
    fake2 = lambda *a, **k: subprocess.CompletedProcess(a[0], 0, stdout="none\npmi2\n", stderr="")  # noqa: E731
    assert commands.srun_mpi_type(run=fake2) == "pmi2"


def test_prep_ranks_per_node_are_honoured_under_slurm():
    env = {"SLURM_JOB_NODELIST": "cn[001-004]", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "2(x4)",
           "SLURM_CPUS_PER_TASK": "112"}
    cl = ClusterConfig(prep_ranks_per_node=56)
    lay = plan_layout("prep", slurm_allocation(env), cl, SPR)
    assert (lay.np, lay.ranks_per_node, lay.cores_per_rank, lay.map_by) == (224, 56, 2, "ppr:28:socket:pe=2")
    cmd = build_command(LaunchSpec("prep", lay, config="c", cluster=cl, slurm=True), environ={}, uid=1000)
    assert cmd.argv[cmd.argv.index("--host") + 1].startswith("cn001:56,cn002:56")  # its own slots, not Slurm's 2
    srun = build_command(LaunchSpec("prep", lay, config="c", cluster=cl, slurm=True, srun_mpi="pmi2"),
                         environ={}, uid=1000)
    assert "--ntasks-per-node=56" in srun.argv and "--ntasks=224" in srun.argv and "--mpi=pmi2" in srun.argv
    assert plan_layout("train", slurm_allocation(env), cl, SPR).np == 8  # training keeps the allocation's tasks
