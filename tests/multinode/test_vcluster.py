"""The virtual cluster itself: nodes with their own hostname and address, ssh with the cluster's
client file only, a cluster file the launcher reads, recovery after a crash, nothing left after down."""
import ipaddress
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_tools import CLUSTER_ID

from launch import vcluster
from launch.cluster import load_cluster

pytestmark = pytest.mark.multinode


def test_up_status_crash_recovery_and_down_leave_nothing(cluster_available, tmp_path):
    folder = tmp_path / "vc"
    try:
        state = vcluster.up(nodes=2, slots=2, folder=folder, cluster_id=CLUSTER_ID, log=lambda m: None)
        names = [n.name for n in state.nodes]
        for n in state.nodes:
            assert ipaddress.ip_address(n.addr) in ipaddress.ip_network("198.18.0.0/24")
        r = subprocess.run(vcluster.ssh_command(state, names[1], "hostname"), capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and r.stdout.strip() == names[1], r.stderr
        # the cluster file is one the launcher reads as it is, with the ssh client file
        cl = load_cluster(folder / "cluster.yaml")
        assert [h.spec() for h in cl.hosts] == [f"{n}:2" for n in names]
        assert cl.network_interface == "eth0" and cl.ssh_config == str(folder / "ssh_config")
        # a crash: the sshd of node1 gone, the state file kept; a second up recovers
        os.kill(state.nodes[0].sshd_pid, signal.SIGKILL)
        state = vcluster.up(nodes=2, slots=1, folder=folder, cluster_id=CLUSTER_ID, log=lambda m: None)
        r = subprocess.run(vcluster.ssh_command(state, names[0], "hostname"), capture_output=True, text=True,
                           timeout=30)
        assert r.stdout.strip() == names[0], r.stderr
        assert vcluster.leftovers(CLUSTER_ID, folder)  # it exists ...
    finally:
        vcluster.down(folder, CLUSTER_ID, quiet=True)
    assert vcluster.leftovers(CLUSTER_ID, folder) == []  # ... and nothing of it after down


def test_command_line(cluster_available, tmp_path):
    folder = str(tmp_path / "cli")
    run = lambda *a: subprocess.run([sys.executable, "-m", "launch", "vcluster", *a, "--id", str(CLUSTER_ID),  # noqa
                                     "--dir", folder], capture_output=True, text=True, timeout=120)
    try:
        up = run("up", "--nodes", "2")
        assert up.returncode == 0 and "virtual cluster up" in up.stdout, up.stderr
        st = run("status")
        assert st.stdout.count(f"netns cxr{CLUSTER_ID}-node") == 2
    finally:
        down = run("down")
    assert down.returncode == 0 and "removed" in down.stdout
    assert vcluster.leftovers(CLUSTER_ID, Path(folder)) == []
    assert "nothing to remove" in run("down").stdout
