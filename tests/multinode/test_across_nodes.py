"""The pipeline across two namespace nodes, launched from the first one over ssh as a cluster user
does: prep with mpirun, train and evaluate with horovodrun (MPI controller and Gloo), 2 nodes x 1
and x 2 ranks, and node failures (a rank killed, a node cut off) that end the job in bounded time
and resume with nothing lost.

Set ``CXR_RELIABILITY_OUT=FILE`` to have the fault tests write their figures (seconds from the
fault to the job's exit, epochs repeated, images lost) as JSON: BENCHMARKS.md's reliability section.
"""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_tools import ROOT, cluster_file, launch, ok, start_launch, wait_for

from launch import vcluster

pytestmark = [pytest.mark.multinode, pytest.mark.needs_horovod]

SPLITS = ("train", "val", "test")
FAULT_BOUND_S = 60  # a failed job must end within this (launch.supervise: probes ~6 s, grace 20 s)
FIGURES: dict = {}


def _history(run_dir: Path):
    with open(Path(run_dir) / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _dumps(folder: Path, n: int):
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(n)]


def _shards(prep_out: Path):
    m = json.loads((Path(prep_out) / "manifest.json").read_text())
    return m, [(s["file"], s["sha256"]) for sp in SPLITS for s in m["splits"][sp]["shards"]]


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "checkpoints" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _ranks_of(cluster, node: str, module: str) -> list[int]:
    """pids of the python ranks running ``-m module`` on ``node`` (not mpirun, orted or a shell)."""
    return [pid for pid, cmd in vcluster.node_processes(cluster, node).items()
            if f"-m {module}" in cmd and cmd.split()[0].endswith(("python", "python3", Path(sys.executable).name))]


def _kill_rank(cluster, node: str, module: str, job) -> tuple[str, float]:
    """SIGKILL the one rank of ``-m module`` on ``node``; (the launcher's stderr, seconds from the kill
    to its exit). The launcher must fail within FAULT_BOUND_S."""
    victims = _ranks_of(cluster, node, module)
    assert len(victims) == 1, victims
    os.kill(victims[0], signal.SIGKILL)
    t_fault = time.monotonic()
    _, err = job.communicate(timeout=FAULT_BOUND_S + 30)
    seconds = time.monotonic() - t_fault
    assert job.returncode != 0 and seconds < FAULT_BOUND_S, err[-4000:]
    return err, seconds


def _record(name: str, **figures) -> None:
    FIGURES[name] = figures
    out = os.environ.get("CXR_RELIABILITY_OUT")
    if out:
        Path(out).write_text(json.dumps(FIGURES, indent=1))
    print(f"reliability {name}: {figures}")


@pytest.fixture(scope="module")
def single_prep(dataset):
    """The data set prepared by one local process: what every multi-node prep must equal."""
    out = dataset / "prepared-1"
    ok(subprocess.run([sys.executable, "-m", "data_prep", "--config", str(dataset / "cfg.yaml"), "--set",
                       f"prep.out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300))
    return out


@pytest.fixture(scope="module")
def reference(cluster, dataset):
    """``launch pipeline`` with the cluster file (2 nodes x 1 rank, MPI controller), uninterrupted."""
    dump = dataset / "dump-ref"
    t0 = time.monotonic()
    p = ok(launch(cluster, "pipeline", "--config", str(dataset / "cfg.yaml"), "--cluster",
                  str(Path(cluster.dir) / "cluster.yaml"), env={"CXR_TEST_DUMP": str(dump)}, timeout=600))
    return {"proc": p, "dump": dump, "run": dataset / "run", "seconds": time.monotonic() - t0}


def test_pipeline_on_two_nodes_mpi(reference, dataset, single_prep, cluster):
    err = reference["proc"].stderr
    assert "prep: 2 rank(s) on 2 node(s)" in err and "train: 2 rank(s) on 2 node(s)" in err
    assert "plm_rsh_args '-F " in err  # mpirun's ssh uses the cluster's client file
    # each rank ran on its own node, ended with the same weights, and only rank 0 wrote files
    ranks = _dumps(reference["dump"], 2)
    assert [r["host"] for r in ranks] == [n.name for n in cluster.nodes]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["checkpoint_writes"] == 4 and ranks[1]["checkpoint_writes"] == 0
    assert (reference["run"] / "report.md").is_file() and (reference["run"] / "model.keras").is_file()
    assert [(h["phase"], h["epoch"]) for h in _history(reference["run"])] == \
        [("warmup", "1"), ("finetune", "2"), ("finetune", "3"), ("finetune", "4")]
    # prep over both nodes == prep by one process: the same shards byte for byte, the same statistics
    two, one = _shards(dataset / "prepared"), _shards(single_prep)
    assert two[0]["timings"]["ranks"] == 2 and two[1] == one[1] and len(one[1]) >= 6
    assert (two[0]["mean"], two[0]["std"]) == (one[0]["mean"], one[0]["std"])


def test_two_nodes_two_ranks_each_mpi(reference, dataset, single_prep, cluster):
    hosts = ",".join(f"{n.name}:2" for n in cluster.nodes)
    cfg, cl = str(dataset / "cfg.yaml"), str(Path(cluster.dir) / "cluster.yaml")
    prep = dataset / "prepared-2x2"
    p = ok(launch(cluster, "prep", "--config", cfg, "--cluster", cl, "--hosts", hosts, "--set", f"prep.out={prep}",
                  timeout=600))  # four ranks on two cores, beside the other test worker: slow, not hung
    assert "prep: 4 rank(s) on 2 node(s), up to 2 per node" in p.stderr
    man, shards = _shards(prep)
    assert man["timings"]["ranks"] == 4 and shards == _shards(single_prep)[1]
    dump, run = dataset / "dump-2x2", dataset / "run-2x2"
    p = ok(launch(cluster, "train", "--config", cfg, "--cluster", cl, "--hosts", hosts, "--set", f"run.dir={run}",
                  "--set", "train.finetune.epochs=0", env={"CXR_TEST_DUMP": str(dump)}, timeout=600))
    assert "train: 4 rank(s) on 2 node(s), up to 2 per node" in p.stderr
    ranks = _dumps(dump, 4)
    a, b = (n.name for n in cluster.nodes)
    assert [r["host"] for r in ranks] == [a, a, b, b] and len({r["weights_sha256"] for r in ranks}) == 1
    assert [r["checkpoint_writes"] for r in ranks] == [1, 0, 0, 0]


def test_two_nodes_gloo(reference, dataset, cluster, tmp_path):
    cl = cluster_file(cluster, tmp_path, horovod_controller="gloo")
    dump, run = dataset / "dump-gloo", dataset / "run-gloo"
    p = ok(launch(cluster, "train", "--config", str(dataset / "cfg.yaml"), "--cluster", str(cl),
                  "--set", f"run.dir={run}", "--set", "train.finetune.epochs=0", env={"CXR_TEST_DUMP": str(dump)}))
    assert "--gloo" in p.stderr
    ranks = _dumps(dump, 2)
    assert [r["host"] for r in ranks] == [n.name for n in cluster.nodes]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] and ranks[1]["checkpoint_writes"] == 0


def test_launching_outside_the_nodes_stops_with_one_sentence(reference, dataset, cluster):
    # This machine's own network is not the nodes' (198.18.0.0/24): the ranks could not reach it.
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "launch", "train", "--config", str(dataset / "cfg.yaml"), "--cluster",
                        str(Path(cluster.dir) / "cluster.yaml"), "--set", f"run.dir={dataset / 'run-outside'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and time.monotonic() - t0 < 20
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "this machine is not one of the hosts" in lines[0], p.stderr
    assert f"launch from one of the nodes, e.g. `ssh -F {cluster.dir}/ssh_config {cluster.nodes[0].name} 'cd " \
        in lines[0] and "python -m launch train" in lines[0]
    assert not (dataset / "run-outside").exists()


def test_rank_killed_then_node_cut_off_then_resume(reference, dataset, cluster):
    """kill -9 the rank on node2, rerun; cut node2 off, rerun: the history is the uninterrupted one."""
    node1, node2 = (n.name for n in cluster.nodes)
    run = dataset / "run-faults"
    args = ("pipeline", "--config", str(dataset / "cfg.yaml"), "--cluster", str(Path(cluster.dir) / "cluster.yaml"),
            "--set", f"run.dir={run}")

    # 1. a training rank on node2 killed during an epoch
    job = start_launch(cluster, *args)
    wait_for(lambda: _state(run).get("epoch", 0) >= 1, 240, "first checkpoint", job)
    err, killed_s = _kill_rank(cluster, node2, "distributed.train", job)
    assert f"train failed on {node2} (rank 1: killed by SIGKILL)" in err, err[-4000:]
    first_done = _state(run)["epoch"]
    assert not _ranks_of(cluster, node1, "distributed.train")  # nothing left running on the launching node

    # 2. the same command again resumes; node2 cut off from the network during a later epoch
    job = start_launch(cluster, *args)
    wait_for(lambda: _state(run).get("epoch", 0) > first_done, 240, "a checkpoint after the resume", job)
    vcluster.set_link(cluster, node2, up=False)
    t_fault = time.monotonic()
    try:
        out2, err2 = job.communicate(timeout=FAULT_BOUND_S + 30)
        cut_s = time.monotonic() - t_fault
    finally:
        vcluster.set_link(cluster, node2, up=True)
        for pid in vcluster.node_processes(cluster, node2):  # what the cut-off node still runs
            os.kill(pid, signal.SIGKILL)
    assert "skip prep" in err2 and f"resuming after epoch {first_done}" in out2 + err2
    assert job.returncode != 0 and cut_s < FAULT_BOUND_S, err2[-4000:]
    assert f"train failed on {node2} (rank 1: the node stopped answering" in err2, err2[-4000:]
    second_done = _state(run)["epoch"]
    assert not _ranks_of(cluster, node1, "distributed.train")
    assert not [c for c in vcluster.node_processes(cluster, node1).values() if "mpirun" in c or "horovodrun" in c]

    # 3. once more: finishes; the same epochs as the uninterrupted run, none missing or doubled
    p = ok(launch(cluster, *args))
    assert "skip prep" in p.stderr and f"resuming after epoch {second_done}" in p.stdout + p.stderr
    hist, ref = _history(run), _history(reference["run"])
    assert [(h["phase"], h["epoch"]) for h in hist] == [(h["phase"], h["epoch"]) for h in ref]
    for a, b in zip(hist, ref):
        assert math.isclose(float(a["lr"]), float(b["lr"]), rel_tol=1e-5)
    for a, b in zip(hist[:first_done], ref[:first_done]):  # before any fault: the very same run
        assert math.isclose(float(a["val_loss"]), float(b["val_loss"]), rel_tol=1e-4)
    assert _state(run)["complete"] and (run / "report.md").is_file()
    man = json.loads((dataset / "prepared" / "manifest.json").read_text())
    _record("train", controller="mpi", nodes=2, ranks=2, kill9_rank_to_exit_s=round(killed_s, 1),
            cut_off_node_to_exit_s=round(cut_s, 1), epochs_repeated_per_fault=1, epochs_total=len(ref),
            images_lost=0, train_images=man["splits"]["train"]["count"])


def test_prep_rank_killed_then_rerun(reference, dataset, single_prep, cluster, tmp_path):
    """kill -9 node2's prep rank mid-run; the same command again completes a verified manifest."""
    from data_prep.manifest import verify_manifest

    node2 = cluster.nodes[1].name
    # mpirun passes on only the variables named with -x: the slow-down reaches node2's rank this way
    cl = cluster_file(cluster, tmp_path, mpi_args=["-x", "CXR_PREP_THROTTLE_S"])
    out = dataset / "prepared-faults"
    args = ("prep", "--config", str(dataset / "cfg.yaml"), "--cluster", str(cl), "--set", f"prep.out={out}")
    job = start_launch(cluster, *args, env={"CXR_PREP_THROTTLE_S": "0.03"})
    wait_for(lambda: any(out.glob("*/*.h5")), 120, "a first shard", job)
    err, killed_s = _kill_rank(cluster, node2, "data_prep", job)
    assert f"prep failed on {node2} (rank 1: killed by SIGKILL)" in err, err[-4000:]
    assert not (out / "manifest.json").exists()
    kept = len(list(out.glob("*/*.h5")))

    ok(launch(cluster, *args))
    summary = verify_manifest(out)
    man, shards = _shards(out)
    ref_man, ref_shards = _shards(single_prep)
    assert shards == ref_shards and summary["images"] == sum(ref_man["splits"][s]["count"] for s in SPLITS)
    _record("prep", nodes=2, ranks=2, kill9_rank_to_exit_s=round(killed_s, 1), shards_kept=kept,
            shards_total=len(shards), images_lost=0)
