"""``python -m launch``: command lines, hosts, Slurm, binding and thread variables, one-sentence errors.

Topologies are injected (a cluster file's sockets_per_node/cores_per_socket, or Topology objects),
so the expected commands do not depend on the machine running the tests.
"""
import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import config as cfgmod
from data_prep.config import load_config
from distributed.tuning import Topology
from launch import pipeline as pl
from launch.cluster import ClusterConfig, cluster_from_dict, load_cluster
from launch.commands import LaunchSpec, build_command, plan_layout
from launch.hosts import (
    Allocation,
    Host,
    LaunchError,
    expand_nodelist,
    expand_tasks_per_node,
    parse_hostfile,
    parse_hosts,
    slurm_allocation,
)

ROOT = Path(__file__).resolve().parents[2]
ONE_SOCKET_2 = Topology(sockets=1, physical_cores=2, logical_cpus=2, numa_nodes=1)
TWO_SOCKETS_16 = Topology(sockets=2, physical_cores=16, logical_cpus=32, numa_nodes=2)
LOCAL = Allocation((Host("localhost", 0),), "local", slots_given=False)
THREAD_VARS = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


@pytest.fixture()
def cfg_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(f"data: {{csv: {tmp_path}/data/Data_Entry_2017.csv, images: {tmp_path}/data, image_size: 32}}\n"
                 f"prep: {{out: {tmp_path}/prepared}}\nmodel: {{backbone: tiny, weights: none}}\n"
                 f"run: {{dir: {tmp_path}/run}}\n")
    return p


def launch(*args, env=None, cwd=ROOT):
    e = dict(os.environ)
    for k in list(e):
        if k.startswith("SLURM_"):
            del e[k]
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "launch", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=120)


def commands(stdout: str) -> list[list[str]]:
    """One command per non-comment line, split as a shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def split_env(argv):
    env, i = {}, 0
    while i < len(argv) and "=" in argv[i] and not argv[i].startswith("-"):
        k, v = argv[i].split("=", 1)
        env[k] = v
        i += 1
    return env, argv[i:]


def x_vars(argv) -> dict:
    out = {}
    for a, b in zip(argv, argv[1:]):
        if a == "-x":
            k, _, v = b.partition("=")
            out[k] = v
    return out


def node_file(tmp_path, sockets, cores_per_socket, **extra):
    p = tmp_path / "cluster.yaml"
    lines = [f"sockets_per_node: {sockets}", f"cores_per_socket: {cores_per_socket}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    p.write_text("\n".join(lines) + "\n")
    return p


# --------------------------------------------------------------------------- hosts and Slurm

def test_parse_hosts_and_hostfile(tmp_path):
    assert parse_hosts("h1:2,h2:2") == (Host("h1", 2), Host("h2", 2))
    assert parse_hosts("h1,h1:3") == (Host("h1", 4),)
    hf = tmp_path / "hosts"
    hf.write_text("# cluster\nnode01 slots=4\nnode02:2\nnode03\n")
    assert parse_hostfile(hf) == (Host("node01", 4), Host("node02", 2), Host("node03", 1))
    with pytest.raises(LaunchError, match="slots"):
        parse_hosts("h1:two")


@pytest.mark.parametrize("nodelist,expected", [
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("cn7", ["cn7"]),
    ("a[1-2],b[09-10]", ["a1", "a2", "b09", "b10"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_expand_slurm_nodelist(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


def test_slurm_tasks_per_node_forms():
    assert expand_tasks_per_node("2(x3),1", 4) == [2, 2, 2, 1]
    assert expand_tasks_per_node("4", 3) == [4, 4, 4]
    alloc = slurm_allocation({"SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NTASKS": "4",
                              "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "8"})
    assert alloc.hosts == (Host("node01", 2), Host("node02", 2))
    assert (alloc.ntasks, alloc.cpus_per_task, alloc.source) == (4, 8, "slurm")
    assert slurm_allocation({}) is None


# --------------------------------------------------------------------------- layout (pure)

def test_one_node_two_ranks_bind_one_core_each():
    lay = plan_layout("train", LOCAL, ClusterConfig(), ONE_SOCKET_2, np=2)
    assert (lay.np, lay.ranks_per_node, lay.cores_per_rank) == (2, 2, 1)
    assert lay.binding_args == ["--map-by", "ppr:2:socket:pe=1", "--bind-to", "core"]
    assert not lay.oversubscribe


def test_default_is_one_rank_per_socket():
    assert plan_layout("train", LOCAL, ClusterConfig(), ONE_SOCKET_2).np == 1
    lay = plan_layout("train", LOCAL, ClusterConfig(), TWO_SOCKETS_16)
    assert (lay.np, lay.map_by) == (2, "ppr:1:socket:pe=8")


def test_more_local_ranks_than_cores_are_oversubscribed_and_unbound():
    lay = plan_layout("train", LOCAL, ClusterConfig(), ONE_SOCKET_2, np=3)
    assert lay.oversubscribe and lay.bind_to == "none"
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", launcher="mpirun"), uid=1000)
    assert "--oversubscribe" in cmd.argv and x_vars(cmd.argv)["OMP_NUM_THREADS"] == "1"


def test_more_ranks_than_slots_is_refused():
    with pytest.raises(LaunchError, match="5 ranks .* only 4 slots"):
        plan_layout("train", Allocation(parse_hosts("n1:2,n2:2"), "hosts"), ClusterConfig(), ONE_SOCKET_2, np=5)


def test_uneven_slots_fill_hosts_in_order():
    alloc = Allocation(parse_hosts("n1:4,n2:1"), "hosts")
    lay = plan_layout("train", alloc, ClusterConfig(), TWO_SOCKETS_16)
    assert lay.np == 5 and lay.map_by == "slot:PE=4" and lay.bind_to == "core"


def test_root_variables_only_for_root():
    lay = plan_layout("train", LOCAL, ClusterConfig(), ONE_SOCKET_2, np=2)
    as_user = build_command(LaunchSpec("train", lay, config="c.yaml", launcher="mpirun"), uid=1000)
    as_root = build_command(LaunchSpec("train", lay, config="c.yaml", launcher="mpirun"), uid=0)
    assert "OMPI_ALLOW_RUN_AS_ROOT" not in as_user.env
    assert as_root.env == {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    assert "--allow-run-as-root" not in as_root.argv


def test_hydra_flavours_pass_variables_with_genv():
    alloc = Allocation(parse_hosts("n1:2,n2:2"), "hosts")
    lay = plan_layout("train", alloc, ClusterConfig(mpi="mpich"), TWO_SOCKETS_16)
    argv = build_command(LaunchSpec("train", lay, config="c.yaml", launcher="mpirun",
                                    cluster=ClusterConfig(mpi="mpich")), uid=1000).argv
    assert argv[:3] == ["mpirun", "-n", "4"] and ["-ppn", "2"] == argv[argv.index("-ppn"):argv.index("-ppn") + 2]
    assert "-bind-to" in argv and argv[argv.index("-bind-to") + 1] == "core:8"
    assert (["-genv", "OMP_NUM_THREADS", "8"]
            == argv[argv.index("OMP_NUM_THREADS") - 1:argv.index("OMP_NUM_THREADS") + 2])


def test_cluster_file_is_checked(tmp_path):
    assert load_cluster(ROOT / "configs/cluster.yaml").hosts == (Host("node01", 2), Host("node02", 2))
    assert load_cluster(ROOT / "configs/cluster-local.yaml").ranks_per_node == 2
    with pytest.raises(LaunchError, match="unknown key 'rank_per_node'"):
        cluster_from_dict({"rank_per_node": 2})
    with pytest.raises(LaunchError, match="mpi must be one of"):
        cluster_from_dict({"mpi": "lam"})


# --------------------------------------------------------------------------- the CLI, --dry-run

def test_dry_run_one_node_two_ranks_mpirun(tmp_path, cfg_file):
    cl = node_file(tmp_path, 1, 2)
    r = launch("train", "--config", cfg_file, "--np", 2, "--cluster", cl, "--mpi-launcher", "mpirun", "--dry-run",
               "--set", "train.batch_size=4")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    env, argv = split_env(cmd)
    assert argv[:3] == ["mpirun", "-np", "2"]
    assert "--map-by" in argv and argv[argv.index("--map-by") + 1] == "ppr:2:socket:pe=1"
    assert argv[argv.index("--bind-to") + 1] == "core"
    assert "--oversubscribe" not in argv and "--allow-run-as-root" not in argv
    xs = x_vars(argv)
    for var in THREAD_VARS:
        assert xs[var] == "1", var
    assert argv[-7:] == [sys.executable, "-m", "distributed.train", "--config", str(cfg_file), "--set",
                         "train.batch_size=4"]
    if os.getuid() == 0:
        assert env == {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    assert "manifest.json does not exist" in r.stderr  # warned, not refused, in a dry run


def test_dry_run_one_node_two_ranks_horovodrun(tmp_path, cfg_file):
    cl = node_file(tmp_path, 1, 2)
    r = launch("train", "--config", cfg_file, "--np", 2, "--cluster", cl, "--mpi-launcher", "horovodrun", "--dry-run")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    env, argv = split_env(cmd)
    assert argv[:5] == ["horovodrun", "-np", "2", "-H", "localhost:2"]
    assert "--mpi" in argv
    assert "--binding-args=--map-by ppr:2:socket:pe=1 --bind-to core" in argv
    for var in THREAD_VARS:  # horovodrun exports its environment to every rank
        assert env[var] == "1", var


def test_dry_run_two_hosts_two_slots_each(tmp_path, cfg_file):
    cl = node_file(tmp_path, 2, 8, network_interface="eth0")
    r = launch("train", "--config", cfg_file, "--hosts", "n1:2,n2:2", "--cluster", cl, "--mpi-launcher", "mpirun",
               "--dry-run")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    _, argv = split_env(cmd)
    assert argv[:5] == ["mpirun", "-np", "4", "--host", "n1:2,n2:2"]
    assert argv[argv.index("--map-by") + 1] == "ppr:1:socket:pe=8"
    assert "btl_tcp_if_include" in argv and "eth0" in argv
    xs = x_vars(argv)
    assert (xs["OMP_NUM_THREADS"], xs["TF_NUM_INTRAOP_THREADS"], xs["TF_NUM_INTEROP_THREADS"]) == ("8", "8", "1")
    assert "PATH" in xs  # forwarded to the remote ranks

    r = launch("train", "--config", cfg_file, "--hosts", "n1:2,n2:2", "--cluster", cl, "--mpi-launcher", "horovodrun",
               "--dry-run")
    _, argv = split_env(commands(r.stdout)[0])
    assert argv[:5] == ["horovodrun", "-np", "4", "-H", "n1:2,n2:2"]
    assert ["--network-interfaces", "eth0"] == argv[argv.index("--network-interfaces"):][:2]


def test_dry_run_from_slurm_allocation(tmp_path, cfg_file):
    cl = node_file(tmp_path, 2, 8)
    slurm = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_NTASKS": "8",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_CPUS_PER_TASK": "8"}
    r = launch("pipeline", "--config", cfg_file, "--cluster", cl, "--mpi-launcher", "mpirun", "--dry-run", env=slurm)
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert [c[c.index("-m") + 1] for c in cmds] == ["data_prep", "distributed.train", "distributed.evaluate"]
    for cmd in cmds:
        _, argv = split_env(cmd)
        assert argv[:3] == ["mpirun", "-np", "8"] and "--host" not in argv  # Open MPI reads the allocation
        assert argv[argv.index("--map-by") + 1] == "ppr:1:socket:pe=8"
        assert x_vars(argv)["OMP_NUM_THREADS"] == "8"


def test_np_1_is_a_plain_process(cfg_file):
    r = launch("evaluate", "--config", cfg_file, "--np", 1, "--dry-run")
    (cmd,) = commands(r.stdout)
    env, argv = split_env(cmd)
    assert argv[:3] == [sys.executable, "-m", "distributed.evaluate"]
    assert "mpirun" not in cmd and "horovodrun" not in cmd
    assert all(v in env for v in THREAD_VARS)


def test_prep_always_uses_mpirun(tmp_path, cfg_file):
    r = launch("prep", "--config", cfg_file, "--np", 2, "--cluster", node_file(tmp_path, 1, 2), "--dry-run")
    _, argv = split_env(commands(r.stdout)[0])
    assert argv[0] == "mpirun" and argv[-4:-2] == ["-m", "data_prep"]


# --------------------------------------------------------------------------- errors: one sentence

def one_sentence_error(r, *fragments):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("cxr-launch: error:")]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_error_more_ranks_than_slots(cfg_file):
    r = launch("train", "--config", cfg_file, "--hosts", "n1:2,n2:2", "--np", 5, "--dry-run")
    one_sentence_error(r, "5 ranks", "only 4 slots")


def test_error_stage_before_its_input(cfg_file):
    r = launch("train", "--config", cfg_file, "--np", 1)
    one_sentence_error(r, "manifest.json does not exist", "launch prep")
    r = launch("prep", "--config", cfg_file, "--np", 1)
    one_sentence_error(r, "data.csv")


def make_inputs(tmp_path):
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "Data_Entry_2017.csv").write_text("Image Index\n")


def test_error_mpirun_not_found(tmp_path, cfg_file):
    make_inputs(tmp_path)
    empty = tmp_path / "bin"
    empty.mkdir()
    r = launch("prep", "--config", cfg_file, "--np", 2, "--cluster", node_file(tmp_path, 1, 2),
               env={"PATH": str(empty)})
    one_sentence_error(r, "mpirun not found")


@pytest.mark.needs_mpirun
def test_error_host_that_does_not_answer(tmp_path, cfg_file):
    make_inputs(tmp_path)
    r = launch("prep", "--config", cfg_file, "--hosts", "cxr-no-such-host.invalid:2", "--cluster",
               node_file(tmp_path, 1, 2))
    one_sentence_error(r, "cxr-no-such-host.invalid does not answer")


def test_error_bad_config_key(cfg_file):
    r = launch("train", "--config", cfg_file, "--set", "train.batchsize=4", "--dry-run")
    one_sentence_error(r, "train.batchsize")


# --------------------------------------------------------------------------- pipeline state

def test_stage_hashes_chain(cfg_file):
    """A change reruns its stage and every later one, never an earlier one."""
    base = load_config(cfg_file)
    hashes = {s: cfgmod.stage_hash(base, s) for s in pl.STAGES}
    assert hashes == {"prep": cfgmod.prep_hash(base), "train": cfgmod.train_hash(base),
                      "evaluate": cfgmod.eval_hash(base)}
    assert len(set(hashes.values())) == 3
    for override, changed in (("data.image_size=96", {"prep", "train", "evaluate"}),
                              ("prep.out=elsewhere", set()),
                              ("train.seed=7", {"train", "evaluate"}),
                              ("eval.checkpoint=last", {"evaluate"})):
        other = load_config(cfg_file, [override])
        assert {s for s in pl.STAGES if cfgmod.stage_hash(other, s) != hashes[s]} == changed, override


def test_pipeline_skips_complete_stages_and_resumes(tmp_path, cfg_file):
    cfg = load_config(cfg_file)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({"config_hash": cfgmod.prep_hash(cfg)}))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.keras").write_text("x")
    r = launch("pipeline", "--config", cfg_file, "--np", 1, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("# skip prep")
    cmds = commands(r.stdout)
    assert [c[c.index("-m") + 1] for c in cmds] == ["distributed.train", "distributed.evaluate"]
    assert cmds[0][-1] == "--resume"

    # a finished training run of the same config is skipped; another config retrains
    (run / "model.keras").write_text("x")
    pl.write_marker(cfg, "train", 1, "test")
    r = launch("pipeline", "--config", cfg_file, "--np", 1, "--dry-run")
    assert "# skip train" in r.stdout and len(commands(r.stdout)) == 1
    r = launch("pipeline", "--config", cfg_file, "--np", 1, "--dry-run", "--set", "train.seed=7")
    assert "# skip train" not in r.stdout

    # evaluate is complete when report.md is newer than the model
    (run / "report.md").write_text("r")
    old = (run / "model.keras").stat().st_mtime - 10
    os.utime(run / "model.keras", (old, old))
    os.utime(run / "checkpoints" / "last.keras", (old, old))
    r = launch("pipeline", "--config", cfg_file, "--np", 1, "--dry-run")
    assert commands(r.stdout) == [] and "# skip evaluate" in r.stdout
    # a manifest of another prep config: prep runs again
    (prepared / "manifest.json").write_text(json.dumps({"config_hash": "other"}))
    r = launch("pipeline", "--config", cfg_file, "--np", 1, "--dry-run")
    _, argv = split_env(commands(r.stdout)[0])
    assert argv[1:3] == ["-m", "data_prep"]


# --------------------------------------------------------------------------- real ranks

@pytest.mark.needs_mpirun
def test_every_rank_gets_binding_and_threads():
    """Run the generated mpirun line with a probe instead of the stage: each rank reports."""
    # one write(2) per rank: print() writes its arguments piecewise, and mpirun interleaves the pieces
    probe = ("import os;r=os.environ.get('OMPI_COMM_WORLD_RANK');"
             "os.write(1,(' '.join(map(str,['RANK',r,sorted(os.sched_getaffinity(0)),"
             "*[os.environ.get(v) for v in ('OMP_NUM_THREADS','TF_NUM_INTRAOP_THREADS','TF_NUM_INTEROP_THREADS')]]))"
             "+chr(10)).encode())")
    lay = plan_layout("train", LOCAL, ClusterConfig(), ONE_SOCKET_2, np=2)
    cmd = build_command(LaunchSpec("train", lay, config="c.yaml", launcher="mpirun",
                                   module_argv=(sys.executable, "-c", probe)))
    r = subprocess.run(cmd.argv, env={**os.environ, **cmd.env}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # mpirun merges the ranks' stdout, and two short writes can land on one line: find the
    # reports anywhere in the text rather than per line.
    rows = re.findall(r"RANK (\d+) (\[[\d, ]*\]) (\S+) (\S+) (\S+?)(?=RANK|\s|$)", r.stdout)
    assert sorted(row[0] for row in rows) == ["0", "1"], r.stdout
    cpus = set()
    for row in rows:
        mask, threads = row[1], list(row[2:])
        assert threads == ["1", "1", "1"]
        cores = ast.literal_eval(mask)
        if len(os.sched_getaffinity(0)) >= 2:
            assert len(cores) == 1  # bound to one core each
        cpus.update(cores)
    if len(os.sched_getaffinity(0)) >= 2:
        assert len(cpus) == 2  # different cores


def test_a_run_trained_without_the_launcher_counts_as_complete(tmp_path, cfg_file):
    """No pipeline.json: the trainer's state.json (complete) and its saved config decide."""
    from data_prep.config import save_resolved

    cfg = load_config(cfg_file)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "model.keras").write_text("x")
    (run / "checkpoints" / "state.json").write_text(json.dumps({"complete": True}))
    save_resolved(cfg, run)
    assert pl.stage_status("train", cfg).complete
    other = load_config(cfg_file, ["train.batch_size=4"])
    assert not pl.stage_status("train", other).complete
    (run / "checkpoints" / "state.json").write_text(json.dumps({"complete": False}))
    st = pl.stage_status("train", cfg)
    assert not st.complete and st.resume


def test_hostfile_is_passed_through(tmp_path, cfg_file):
    hf = tmp_path / "hosts"
    hf.write_text("n1 slots=2\nn2 slots=2\n")
    r = launch("evaluate", "--config", cfg_file, "--hostfile", hf, "--cluster", node_file(tmp_path, 1, 2),
               "--mpi-launcher", "mpirun", "--dry-run")
    _, argv = split_env(commands(r.stdout)[0])
    assert argv[:5] == ["mpirun", "-np", "4", "--hostfile", str(hf)]
    r = launch("evaluate", "--config", cfg_file, "--hostfile", hf, "--cluster", node_file(tmp_path, 1, 2),
               "--mpi-launcher", "horovodrun", "--dry-run")
    _, argv = split_env(commands(r.stdout)[0])
    assert argv[:5] == ["horovodrun", "-np", "4", "--hostfile", str(hf)]


def test_launcher_beside_the_interpreter_is_put_on_path(tmp_path, monkeypatch):
    # A venv used without activating it: horovodrun is in .venv/bin but not on PATH.
    from launch.commands import StageCommand

    bin_dir = tmp_path / "venv-bin"
    bin_dir.mkdir()
    tool = bin_dir / "horovodrun"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin")
    cmd = StageCommand("train", ["horovodrun", "-np", "2", "python"], {"OMP_NUM_THREADS": "1"}, kind="horovodrun")
    env = cmd.process_env({"PATH": "/usr/bin", "HOME": "/h"})
    assert env["PATH"].split(os.pathsep) == [str(bin_dir), "/usr/bin"]
    assert env["OMP_NUM_THREADS"] == "1" and env["HOME"] == "/h"
    plain = StageCommand("train", ["python", "-m", "x"], kind="python").process_env({"PATH": "/usr/bin"})
    assert plain["PATH"] == "/usr/bin"


def test_horovodrun_lists_the_ranks_per_host_not_the_free_slots():
    """horovodrun --gloo starts a rank in every slot given with -H, whatever -np says (0.28.1:
    ``-np 1 -H localhost:2`` ran 2 ranks), so -H carries the ranks placed on each host."""
    from launch.commands import horovodrun_hosts

    def hosts(spec, np, controller="gloo"):
        cl = ClusterConfig(horovod_controller=controller)
        lay = plan_layout("train", Allocation(parse_hosts(spec), "hosts"), cl, ONE_SOCKET_2, np=np)
        argv = build_command(LaunchSpec("train", lay, config="c.yaml", cluster=cl, launcher="horovodrun")).argv
        assert argv[argv.index("-H") + 1] == ",".join(h.spec() for h in horovodrun_hosts(lay))
        return argv[argv.index("-H") + 1]

    assert hosts("localhost:2", 1) == "localhost:1"
    assert hosts("localhost:2", 1, "mpi") == "localhost:1"
    assert hosts("localhost:2", 2) == "localhost:2"
    assert hosts("n1:2,n2:2", 3) == "n1:2,n2:1"
    assert hosts("n1:2,n2:2", 2) == "n1:1,n2:1"  # an even spread: one rank per node
    assert hosts("n1:1,n2:4", 3) == "n1:1,n2:2"  # uneven slots: filled in order


def test_restart_reaches_the_training_command(cfg_file):
    r = launch("train", "--config", cfg_file, "--np", 1, "--restart", "--dry-run")
    assert r.returncode == 0, r.stderr
    (cmd,) = commands(r.stdout)
    assert cmd[-1] == "--restart" and "--resume" not in cmd
    r = launch("train", "--config", cfg_file, "--np", 1, "--resume", "--dry-run")
    assert commands(r.stdout)[0][-1] == "--resume"
