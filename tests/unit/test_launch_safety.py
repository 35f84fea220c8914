"""Hostile host names, interfaces and environments are refused or filtered before anything runs."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from distributed.tuning import Topology
from launch.cluster import ClusterConfig, cluster_from_dict
from launch.commands import ENV_ALLOW, LaunchSpec, StageCommand, allowed_env, build_command, plan_layout
from launch.hosts import Allocation, LaunchError, parse_hostfile, parse_hosts, slurm_allocation

ROOT = Path(__file__).resolve().parents[2]
TOPO = Topology(sockets=1, physical_cores=2, logical_cpus=2, numa_nodes=1)
HOSTILE = ["-Fevil", "-oProxyCommand=id", "a;id", "a$(id)", "a`id`", "a b", "a|b", ".hidden", "a>f", "a'b", "n[1-2]"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_host_names_are_refused_everywhere(name, tmp_path):
    with pytest.raises(LaunchError, match="not a host"):
        parse_hosts(f"{name}:1")
    hf = tmp_path / "hostfile"
    hf.write_text(f"{name} slots=1\n")
    with pytest.raises(LaunchError):
        parse_hostfile(hf)
    with pytest.raises(LaunchError):
        cluster_from_dict({"hosts": [f"{name}:1"]})


@pytest.mark.parametrize("nodelist", ["-Fevil", "node[1-2],-oProxyCommand=x", "n;id", "n$(id)[1-2]"])
def test_hostile_slurm_node_lists_are_refused_after_expansion(nodelist):
    with pytest.raises(LaunchError):
        slurm_allocation({"SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": "2"})
    assert [h.name for h in slurm_allocation({"SLURM_JOB_NODELIST": "node[01-02]"}).hosts] == ["node01", "node02"]


@pytest.mark.parametrize("iface", ["eth0;id>f", "-x", "eth0 eth1", "$(id)", "averyveryverylongname0"])
def test_hostile_network_interfaces_are_refused(iface):
    with pytest.raises(LaunchError, match="not an interface name"):
        cluster_from_dict({"network_interface": iface})


def test_good_names_and_interfaces_pass():
    assert [h.name for h in parse_hosts("node01:2,10.0.0.5:1,n_1.example.org:1")] == \
        ["node01", "10.0.0.5", "n_1.example.org"]
    for iface in ("eth0", "ib0", "enp3s0f1", "eth0,ib0", "10.0.0.0/24"):
        assert cluster_from_dict({"network_interface": iface}).network_interface == iface


def test_horovodrun_shell_strings_are_quoted_item_by_item():
    cl = ClusterConfig(horovod_controller="mpi", mpi_args=("--mca", "btl_tcp_if_exclude", "lo;id>f"))
    lay = plan_layout("train", Allocation(parse_hosts("n1:1,n2:1"), "hosts"), cl, TOPO)
    argv = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="horovodrun")).argv
    mpi_args = next(a for a in argv if a.startswith("--mpi-args=")).split("=", 1)[1]
    assert shlex.split(mpi_args) == ["--mca", "btl_tcp_if_exclude", "lo;id>f"]  # one word each when the shell reads it
    binding = next(a for a in argv if a.startswith("--binding-args=")).split("=", 1)[1]
    assert shlex.split(binding) == lay.binding_args


def test_horovodrun_gets_only_the_allow_listed_environment():
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/p", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "GITHUB_TOKEN": "t",
            "HOROVOD_LOG_LEVEL": "info", "CXR_DEBUG": "1", "OMPI_MCA_x": "1", "WANDB_API_KEY": "k", "MY_FLAG": "1"}
    cmd = StageCommand("train", ["horovodrun", "python"], {"OMP_NUM_THREADS": "1"}, kind="horovodrun",
                       env_passthrough=("MY_FLAG",))
    env = cmd.process_env(base)
    assert set(env) == {"PATH", "PYTHONPATH", "HOROVOD_LOG_LEVEL", "CXR_DEBUG", "OMPI_MCA_x", "MY_FLAG",
                        "OMP_NUM_THREADS"}
    plain = StageCommand("train", ["python"], kind="python").process_env(base)
    assert plain["GITHUB_TOKEN"] == "t"  # a local process inherits as before: nothing is put on a command line
    assert "PATH" in ENV_ALLOW and allowed_env({"SLURM_JOB_NODELIST": "n1"}) == {"SLURM_JOB_NODELIST": "n1"}
    cl = cluster_from_dict({"env_passthrough": ["MY_FLAG"], "horovod_controller": "gloo"})
    lay = plan_layout("train", Allocation(parse_hosts("n1:1,n2:1"), "hosts"), cl, TOPO)
    assert build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="horovodrun")) \
        .env_passthrough == ("MY_FLAG",)
    with pytest.raises(LaunchError, match="env_passthrough"):
        cluster_from_dict({"env_passthrough": ["A=B"]})


def test_a_hostile_host_is_refused_before_ssh_runs(tmp_path):
    """`--hosts=-Fevil:1` used to reach the launcher's ssh probe as an ssh option."""
    marker = tmp_path / "ssh-ran"
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("ssh", "mpirun", "horovodrun"):
        (fake / tool).write_text(f"#!/bin/sh\ntouch {marker}\n")
        (fake / tool).chmod(0o755)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"prep: {{out: {tmp_path}/p}}\nrun: {{dir: {tmp_path}/r}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    r = subprocess.run([sys.executable, "-m", "launch", "train", "--config", str(cfg), "--hosts=-Fevil:1,n2:1"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "not a host" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not marker.exists()
