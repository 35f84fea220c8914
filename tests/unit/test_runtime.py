"""Putting a thread plan into a process (``distributed.runtime``): environment, Gloo binding,
TensorFlow's pools and oneDNN, checked in fresh interpreters where TensorFlow's import order matters."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import runtime, tuning
from distributed.tuning import Topology, plan_threads

ONE_SOCKET_2 = Topology(sockets=1, physical_cores=2, logical_cpus=2, numa_nodes=1)


def test_apply_writes_environment_and_logs_every_rank(caplog):
    environ = {"OMP_NUM_THREADS": "8"}
    plan = runtime.apply(None, local_ranks=2, topology=ONE_SOCKET_2, environ=environ)
    assert environ["OMP_NUM_THREADS"] == "1" and environ["TF_NUM_INTRAOP_THREADS"] == "1"
    assert plan.intra_op == 1


@pytest.mark.parametrize("ranks,expected", [(2, "1")])
def test_tensorflow_sees_the_threads(ranks, expected, tmp_path):
    """Applied before import, TensorFlow's pools have the planned size (2 ranks on 2 cores)."""
    code = ("from distributed import runtime, tuning\n"
            f"plan = runtime.apply(None, local_ranks={ranks}, topology=tuning.Topology(1, 2, 2, 1))\n"
            "import tensorflow as tf\n"
            "runtime.configure_tensorflow(plan)\n"
            "import os; print(tf.config.threading.get_intra_op_parallelism_threads(), os.environ['OMP_NUM_THREADS'])\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.split()
    assert out == [expected, expected]


@pytest.mark.parametrize("setting,expected", [("on", "True oneDNN custom ops on (runtime.onednn)"),
                                               ("off", "False oneDNN custom ops off (runtime.onednn)")])
def test_onednn_setting_reaches_tensorflow_and_the_log(setting, expected):
    """runtime.onednn=on/off decides what TensorFlow runs (auto leaves it to TensorFlow, which turns
    it off on AVX2-only CPUs), and the log phrase reports TensorFlow's own answer."""
    code = ("from data_prep.config import RuntimeConfig\n"
            "from distributed import runtime, tuning\n"
            f"plan = runtime.apply(RuntimeConfig(onednn={setting!r}), local_ranks=1, log=False)\n"
            "import tensorflow as tf\n"
            "print(runtime.onednn_enabled(), runtime.onednn_note(plan))\n")
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert out == expected


def test_onednn_note_names_who_decided(monkeypatch):
    monkeypatch.setattr(runtime, "onednn_enabled", lambda: False)
    auto = plan_threads(ONE_SOCKET_2, 1)
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert runtime.onednn_note(auto) == "oneDNN custom ops off (TensorFlow's default for this CPU)"
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert runtime.onednn_note(auto) == "oneDNN custom ops off (TF_ENABLE_ONEDNN_OPTS from the environment)"
    monkeypatch.setattr(runtime, "onednn_enabled", lambda: None)
    assert runtime.onednn_note(auto).startswith("oneDNN custom ops unknown")


def test_bind_gloo_rank_only_under_the_gloo_launcher():
    assert runtime.bind_gloo_rank({}) is None  # mpirun binds, a plain process is not a rank


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 CPUs in the affinity mask")
def test_apply_binds_a_gloo_rank_to_its_core():
    """As ``horovodrun --gloo -np 2`` starts rank 1: the process ends bound to the second half of
    the node's cores and the plan counts that share."""
    code = ("import os; from distributed import runtime\n"
            "plan = runtime.apply(None, log=False)\n"
            "print(sorted(os.sched_getaffinity(0)), plan.topology.bound_cores, plan.intra_op)\n")
    cores = tuning.node_cores()
    if cores is None or len(set(cores.values())) < 2 or set(cores) != os.sched_getaffinity(0):
        pytest.skip("needs an unbound process on a node with 2+ physical cores in sysfs")
    want = sorted(tuning.rank_cpus(cores, 1, 2))
    env = {**os.environ, "HOROVOD_GLOO_RENDEZVOUS_ADDR": "127.0.0.1", "HOROVOD_LOCAL_RANK": "1",
           "HOROVOD_LOCAL_SIZE": "2"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    physical = len(set(cores.values()))
    assert out.split("]")[0] + "]" == str(want)
    assert out.split("]")[1].split() == [str(physical // 2), str(physical // 2)]
    # without the Gloo launcher's variable nothing is bound
    env.pop("HOROVOD_GLOO_RENDEZVOUS_ADDR")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.startswith(str(sorted(os.sched_getaffinity(0))))

