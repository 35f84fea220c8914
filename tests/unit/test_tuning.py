"""Thread tuning from an injected topology: no TensorFlow, no real hardware assumptions."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.config import RuntimeConfig, load_config
from distributed import tuning
from distributed.tuning import Topology, plan_threads, thread_env

ONE_SOCKET_2 = Topology(sockets=1, physical_cores=2, logical_cpus=2, numa_nodes=1)
TWO_SOCKETS_28 = Topology(sockets=2, physical_cores=28, logical_cpus=56, numa_nodes=2)


def test_one_socket_two_cores_two_ranks_get_one_thread_each():
    env = thread_env(ONE_SOCKET_2, local_ranks=2)
    assert env["TF_NUM_INTRAOP_THREADS"] == "1"
    assert env["TF_NUM_INTEROP_THREADS"] == "1"
    assert env["OMP_NUM_THREADS"] == "1"
    assert "TF_ENABLE_ONEDNN_OPTS" not in env  # auto: TensorFlow's own default


def test_two_sockets_28_cores_two_ranks_one_socket_each():
    plan = plan_threads(TWO_SOCKETS_28, local_ranks=2)
    assert (plan.intra_op, plan.inter_op, plan.omp_num_threads) == (14, 1, 14)
    env = plan.env()
    assert env["TF_NUM_INTRAOP_THREADS"] == "14" and env["OMP_NUM_THREADS"] == "14"
    assert env["KMP_AFFINITY"] == "granularity=fine,compact,1,0" and env["KMP_BLOCKTIME"] == "1"


def test_two_sockets_28_cores_one_rank_uses_both_sockets():
    plan = plan_threads(TWO_SOCKETS_28, local_ranks=1)
    assert (plan.intra_op, plan.inter_op, plan.omp_num_threads) == (28, 2, 28)
    # hyper-threads are not counted: 56 logical CPUs, 28 threads
    assert thread_env(TWO_SOCKETS_28, 1)["TF_NUM_INTRAOP_THREADS"] == "28"


def test_more_ranks_than_cores_still_one_thread():
    assert plan_threads(ONE_SOCKET_2, local_ranks=4).intra_op == 1


def test_bound_rank_uses_its_mask():
    t = Topology(sockets=2, physical_cores=28, logical_cpus=56, numa_nodes=2, bound_cores=7)
    plan = plan_threads(t, local_ranks=4)
    assert plan.intra_op == 7 and plan.inter_op == 1


def test_explicit_config_values_win():
    cfg = load_config(None, ["runtime.intra_op_threads=3", "runtime.inter_op_threads=4",
                             "runtime.omp_num_threads=5", "runtime.onednn=off",
                             "runtime.kmp_affinity=", "runtime.kmp_blocktime=0"])
    plan = plan_threads(TWO_SOCKETS_28, 2, cfg.runtime)
    env = plan.env()
    assert (plan.intra_op, plan.inter_op, plan.omp_num_threads) == (3, 4, 5)
    assert plan.origin["intra_op"] == "config"
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "0"
    assert "KMP_AFFINITY" not in env  # empty = unset
    on = load_config(None, ["runtime.onednn=on"]).runtime
    assert thread_env(ONE_SOCKET_2, 1, on)["TF_ENABLE_ONEDNN_OPTS"] == "1"


def test_detect_topology_from_sysfs_counts_physical_cores(tmp_path, monkeypatch, fake_sysfs):
    # 2 sockets x 4 cores x 2 hyper-threads: cpu i and i+8 are siblings
    fake_sysfs(tmp_path, sockets=2, cores=4, threads=2, numa=2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    t = tuning.detect_topology(tmp_path)
    assert (t.sockets, t.physical_cores, t.logical_cpus, t.numa_nodes, t.bound_cores) == (2, 8, 16, 2, None)
    # bound to the first socket's 4 cores (8 CPUs with siblings)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 8, 9, 10, 11})
    assert tuning.detect_topology(tmp_path).bound_cores == 4


def test_detect_topology_of_this_machine_is_sane():
    """This machine's topology against an independent reading: ``lscpu -p`` (util-linux), or
    /proc/cpuinfo where lscpu is missing."""
    t = tuning.detect_topology()
    try:
        rows = [line.split(",") for line in subprocess.run(
            ["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True, check=True).stdout.splitlines()
            if line and not line.startswith("#")]
        cores = {int(cpu): (sock, core) for cpu, core, sock in rows}
    except (OSError, subprocess.CalledProcessError):
        blocks = [dict(kv.split(":", 1) for kv in b.splitlines() if ":" in kv)
                  for b in Path("/proc/cpuinfo").read_text().split("\n\n") if b.strip()]
        blocks = [{k.strip(): v.strip() for k, v in b.items()} for b in blocks]
        if not all("physical id" in b and "core id" in b for b in blocks):
            pytest.skip("neither lscpu nor /proc/cpuinfo's physical/core ids to compare with")
        cores = {int(b["processor"]): (b["physical id"], b["core id"]) for b in blocks}
    assert t.logical_cpus == len(cores)
    assert t.physical_cores == len(set(cores.values())) <= t.logical_cpus
    assert t.sockets == len({sock for sock, _ in cores.values()}) <= t.physical_cores
    mask = os.sched_getaffinity(0)
    if mask >= set(cores):  # unbound: the whole node is this process' share
        assert t.bound_cores is None and len(mask) == t.logical_cpus
    else:
        assert t.bound_cores == len({cores[c] for c in mask if c in cores})


def test_tuning_does_not_import_tensorflow():
    # the planner is what the launcher imports: standard library only
    code = ("import sys; from distributed import tuning; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'numpy', 'horovod', 'mpi4py')]; "
            "assert not bad, bad; "
            # a command applies the plan before TensorFlow: neither runtime nor train may pull it in
            "from distributed import runtime; import distributed.train; "
            "runtime.apply(None, local_ranks=2); assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_horovod_cycle_time_defaults_to_50ms_and_config_wins():
    # Horovod's 1 ms default makes each rank's background thread negotiate 1,000 times a second,
    # which costs CPU on ranks whose cores are all TensorFlow's (measured in BENCHMARKS.md).
    plan = plan_threads(ONE_SOCKET_2, 2)
    assert plan.env()["HOROVOD_CYCLE_TIME"] == "50" and plan.origin["horovod_cycle_ms"] == "auto"
    cfg = RuntimeConfig(horovod_cycle_ms=2.5)
    plan = plan_threads(TWO_SOCKETS_28, 1, cfg)
    assert plan.env()["HOROVOD_CYCLE_TIME"] == "2.5" and plan.origin["horovod_cycle_ms"] == "config"
    assert "HOROVOD_CYCLE_TIME=2.5 ms (config)" in plan.describe()


def _ht_node():
    """2 sockets x 4 cores x 2 hyper-threads: cpu i and i+8 are siblings."""
    cpus = {}
    for i in range(8):
        cpus[i] = cpus[i + 8] = (i // 4, i % 4)
    return cpus


def test_rank_cpus_cut_the_cores_like_mpirun_bind_to_core():
    one_socket_2 = {0: (0, 0), 1: (0, 1)}
    assert tuning.rank_cpus(one_socket_2, 0, 2) == {0} and tuning.rank_cpus(one_socket_2, 1, 2) == {1}
    node = _ht_node()
    # one rank per socket: its 4 cores with their hyper-threads
    assert tuning.rank_cpus(node, 0, 2) == {0, 1, 2, 3, 8, 9, 10, 11}
    assert tuning.rank_cpus(node, 1, 2) == {4, 5, 6, 7, 12, 13, 14, 15}
    # 4 ranks: 2 cores each, never a core split between ranks
    assert tuning.rank_cpus(node, 3, 4) == {6, 7, 14, 15}
    # more ranks than physical cores, or a bad rank: nothing to bind to
    assert tuning.rank_cpus(node, 0, 9) == set() and tuning.rank_cpus(node, 2, 2) == set()
