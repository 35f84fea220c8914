"""The test Slurm's configuration (launch.vslurm), without starting anything."""
from pathlib import Path

from launch import vcluster, vslurm


def test_slurm_conf_controller_on_first_node_one_cpu_per_node_no_cgroup_plugins(tmp_path):
    names = vcluster.Names(2)
    cluster = vcluster.State(dir=str(tmp_path), slots=1, id=2, nodes=[names.node(1), names.node(2)])
    conf = vslurm.slurm_conf(cluster, Path("/x"))
    lines = conf.splitlines()
    assert "SlurmctldHost=c2node1(198.18.0.139)" in lines
    assert "NodeName=c2node1 NodeAddr=198.18.0.139 CPUs=1 State=UNKNOWN" in lines
    assert "NodeName=c2node2 NodeAddr=198.18.0.140 CPUs=1 State=UNKNOWN" in lines
    assert "PartitionName=cxr Nodes=c2node1,c2node2 Default=YES MaxTime=INFINITE State=UP" in lines
    for want in ("ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
                 f"AuthInfo=socket=/x/munge.sock,cred_expire={vslurm.CRED_EXPIRE_S}",
                 "SlurmdSpoolDir=/x/spool/%n", "SlurmdPidFile=/x/slurmd-%n.pid",
                 "StateSaveLocation=/x/ctld"):
        assert want in lines
    # every file it names lies in its own folder
    paths = [v for ln in lines for v in ln.split("=")[1:] if v.startswith("/") and not v.startswith("/bin/")]
    assert paths and all(p.startswith("/x/") for p in paths)


def test_up_without_a_virtual_cluster_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setattr(vslurm, "unavailable_reason", lambda: None)
    try:
        vslurm.up(1, tmp_path / "s", tmp_path / "no-cluster")
    except vslurm.LaunchError as e:
        assert "virtual cluster 1 is not up" in str(e) and "vcluster up --id 1" in str(e)
    else:
        raise AssertionError("up() without a cluster should fail")
