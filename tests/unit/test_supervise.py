"""launch.supervise and the cluster file's ssh_config, without a cluster: which ssh the commands
use, where the ranks are, what the watch makes of mpirun's and horovodrun's failure lines, the
launch-site sentence, and a stage that is stopped with everything it started."""
import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distributed.tuning import Topology
from launch import supervise as sv
from launch.cluster import ClusterConfig, cluster_from_dict
from launch.commands import LaunchSpec, StageCommand, build_command, plan_layout
from launch.hosts import Allocation, Host, LaunchError

NODE = Topology(sockets=1, physical_cores=2, logical_cpus=2, numa_nodes=1, source="test")


def _cmd(stage, hosts, launcher="horovodrun", **cluster):
    cl = ClusterConfig(**cluster)
    lay = plan_layout(stage, Allocation(tuple(hosts), "cluster"), cl, NODE)
    return build_command(LaunchSpec(stage, lay, config="c.yaml", cluster=cl, launcher=launcher), environ={}, uid=0)


def test_ssh_config_is_checked_and_made_absolute(tmp_path):
    (tmp_path / "ssh_config").write_text("Host *\n")
    src = tmp_path / "cluster.yaml"
    src.write_text("")
    assert cluster_from_dict({"ssh_config": "ssh_config"}, str(src)).ssh_config == str(tmp_path / "ssh_config")
    with pytest.raises(LaunchError, match="ssh_config 'nope' is not a file"):
        cluster_from_dict({"ssh_config": "nope"}, str(src))
    with pytest.raises(LaunchError, match="ssh_config must be a string"):
        cluster_from_dict({"ssh_config": 3}, str(src))


def test_every_ssh_uses_the_client_file(tmp_path):
    hosts = [Host("n1", 1), Host("n2", 1)]
    mpirun = _cmd("prep", hosts, ssh_config="/c/ssh_config", ssh_port=2222)
    i = mpirun.argv.index("plm_rsh_args")
    assert mpirun.argv[i + 1] == "-F /c/ssh_config -p 2222"
    hvd = _cmd("train", hosts, ssh_config="/c/ssh_config")
    assert hvd.ssh_config == "/c/ssh_config" and "--mpi-args=--mca plm_rsh_no_tree_spawn 1" in hvd.argv
    assert _cmd("train", hosts).ssh_config == "" and not any("tree_spawn" in a for a in _cmd("train", hosts).argv)
    with sv.ssh_wrapper("/c/ssh_config") as folder:
        script = (Path(folder) / "ssh").read_text()
        assert os.access(Path(folder) / "ssh", os.X_OK) and "-F /c/ssh_config \"$@\"" in script
    assert not Path(folder).exists()


def test_placement_follows_the_hosts_in_order():
    hosts = [Host("n1", 2), Host("n2", 2)]
    assert sv.placement(_cmd("train", hosts)) == [("n1", [0, 1]), ("n2", [2, 3])]
    assert sv.placement(_cmd("prep", hosts, launcher="mpirun")) == [("n1", [0, 1]), ("n2", [2, 3])]
    assert sv.placement(StageCommand("train", ["python"])) == []


def _watch(lines):
    w = sv.Watch([("n1", [0, 1]), ("n2", [2, 3])])
    for line in lines:
        w.feed(line)
    return w


def test_the_watch_names_the_killed_rank_not_the_survivors():
    w = _watch(["[1,0]<stderr>: Horovod has been shut down", "Process 0 exit with status code 1.",
                "Process 3 exit with status code 137."])
    assert (w.failure.node, w.failure.ranks, w.failure.why) == ("n2", "rank 3", "killed by SIGKILL")
    w = _watch(["mpirun noticed that process rank 1 with PID 4242 on node n1 exited on signal 9 (Killed)."])
    assert (w.failure.node, w.failure.ranks, w.failure.why) == ("n1", "rank 1", "killed by SIGKILL")
    assert not w.should_stop()  # the launcher gets its grace time to end by itself
    w.failure.at -= sv.FAULT_GRACE_S + 1
    assert w.should_stop()
    assert _watch(["epoch 3 done"]).failure is None
    s = w.failure.sentence("train", 3.2)
    assert s.startswith("train failed on n1 (rank 1: killed by SIGKILL), stopped 3 s after the fault;")


def test_launching_off_the_nodes_network_is_one_sentence(monkeypatch):
    monkeypatch.setattr(sv, "_iface_ipv4", lambda name: ipaddress.IPv4Interface("192.0.2.2/24"))
    monkeypatch.setattr(sv.socket, "gethostbyname", lambda name: "198.18.0.11")
    with pytest.raises(LaunchError) as e:
        sv.check_launch_site([Host("node1", 1), Host("node2", 1)], "eth0", "", "python -m launch train")
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith("`") and "launch from one of the nodes, e.g. `ssh node1 'cd " in msg
    assert "its eth0 is 192.0.2.2/24, not on the network of node1 (198.18.0.11)" in msg
    monkeypatch.setattr(sv, "_iface_ipv4", lambda name: ipaddress.IPv4Interface("198.18.0.1/26"))
    sv.check_launch_site([Host("node1", 1)], "eth0")  # on the nodes' network: fine
    sv.check_launch_site([Host("node1", 1)], "")  # no interface named: MPI's own choice


def test_a_stopped_stage_leaves_no_process(tmp_path):
    # a child in a process group of its own (as mpirun's local ranks) dies with the stage
    pidfile = tmp_path / "pid"
    code = ("import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
            f"open({str(pidfile)!r}, 'w').write(str(p.pid))\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    t0 = time.monotonic()
    sv._stop(proc, ((signal.SIGTERM, 1), (signal.SIGKILL, 5)))
    assert time.monotonic() - t0 < 10
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or \
        Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_stop_signal_goes_to_the_ranks_and_the_stage_may_end_by_itself(tmp_path):
    """SIGTERM to the launcher: the rank (a process with HOROVOD_RANK) gets it, its launcher does
    not, and the stage's own exit is awaited (the rank checkpoints and exits with 128 + 15)."""
    ready, got, rc = tmp_path / "ready", tmp_path / "got", tmp_path / "rc"
    rank = ("import signal, sys, time, pathlib\n"
            "signal.signal(signal.SIGTERM, lambda s, f: (time.sleep(1), "
            f"pathlib.Path({str(got)!r}).write_text(str(s)), "
            "sys.exit(128 + s)))\n"
            f"pathlib.Path({str(ready)!r}).write_text('1')\ntime.sleep(60)\n")
    launcher = ("import os, subprocess, sys, pathlib\n"
                f"p = subprocess.run([sys.executable, '-c', {rank!r}], env=dict(os.environ, HOROVOD_RANK='0'))\n"
                f"pathlib.Path({str(rc)!r}).write_text(str(p.returncode))\nsys.exit(p.returncode)\n")
    t = threading.Thread(target=lambda: (_wait_for(ready), os.kill(os.getpid(), signal.SIGTERM)), daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(sv.Interrupted) as e:
        sv.run(StageCommand("train", [sys.executable, "-c", launcher]))
    assert e.value.signum == signal.SIGTERM and time.monotonic() - t0 < 30
    assert got.read_text() == "15" and rc.read_text() == "143"  # the launcher lived to see its rank's exit


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
