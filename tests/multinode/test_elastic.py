"""Elastic training on a two-node virtual cluster: a node lost in the middle of an epoch, then back.

``python -m launch train --elastic`` is started on the first node over ssh, as from a head node
(2 nodes x 1 rank, Gloo, tiny backbone, 32 px, 0.5 s per step). During the third epoch the rank on
the second node is killed with SIGKILL and the node's ``eth0`` taken down (the discovery script
stops listing it): training must go on with one rank from the last committed epoch. Once an epoch
has finished on one rank, ``eth0`` comes back up: the job must grow back to two ranks and finish,
with every epoch in the history once, the ranks of each epoch recorded, identical weights on both
ranks and files written by rank 0 only (about 2 minutes). The non-elastic path (the same fault
ends the job, ``--resume`` finishes it) is tests/multinode's node-failure test and tests/e2e/test_resume.py.
"""
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vnodes, beside this file
import vnodes  # noqa: E402

from launch import vcluster  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WHY = vcluster.unavailable_reason()
pytestmark = [pytest.mark.needs_horovod,
              pytest.mark.skipif(WHY is not None, reason=f"elastic training on a virtual cluster: {WHY}")]
EPOCHS = 7  # 1 warm-up + 6 fine-tune


@pytest.fixture(scope="module")
def cluster():
    with vnodes.virtual_cluster(2) as state:
        yield state


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("elastic")
    run = [sys.executable, "-m"]
    subprocess.run(run + ["data_prep.synthetic", "--out", str(base / "data"), "--patients", "120", "--image-size",
                          "32", "--seed", "3", "--no-progress"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    cfg = {
        "data": {"csv": str(base / "data" / "Data_Entry_2017.csv"), "images": str(base / "data"), "image_size": 32},
        "prep": {"out": str(base / "prepared"), "shard_size": 64, "train_per_class": 80, "val_fraction": 0.2,
                 "test_fraction": 0.2},
        "model": {"backbone": "tiny", "weights": "none", "dense_units": 16},
        "train": {"batch_size": 16, "warmup": {"epochs": 1},
                  "finetune": {"epochs": EPOCHS - 1, "patience": 20, "lr": 0.01}},
        "run": {"dir": str(base / "run")},
    }
    path = base / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    subprocess.run(run + ["data_prep", "--config", str(path)], cwd=ROOT, check=True, capture_output=True,
                   timeout=120, env=dict(os.environ, CXR_NO_HOROVOD="1"))
    return path


def _rank_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10).stdout.split()
    pids = []
    for p in out:
        try:
            if b"distributed.train" in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.append(int(p))
        except OSError:
            pass
    return pids


def _link(node: vcluster.Node, state: str) -> None:
    subprocess.run(["ip", "netns", "exec", node.netns, "ip", "link", "set", "eth0", state], check=True, timeout=10)


def _history(run: Path) -> list[dict]:
    if not (run / "history.csv").is_file():
        return []
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _committed(run: Path) -> int:
    try:
        return json.loads((run / "checkpoints" / "state.json").read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def _until(cond, timeout: float, proc, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def test_node_lost_mid_epoch_job_shrinks_then_grows_back(cluster, prepared, tmp_path):
    first, second = cluster.nodes[0], cluster.nodes[1]
    run, dump = tmp_path / "run", tmp_path / "dump"
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"hosts": [f"{first.name}:1", f"{second.name}:1"],
                                            "network_interface": "eth0", "python": sys.executable}))
    bin_dir = vnodes.ssh_wrapper(cluster, tmp_path / "bin")  # horovodrun's ssh reaches the nodes by name
    script = tmp_path / "train.sh"
    script.write_text(
        f"cd {ROOT}\n"
        f"export PATH={bin_dir}:{Path(sys.executable).parent}:$PATH PYTHONPATH={ROOT} TF_CPP_MIN_LOG_LEVEL=2 "
        f"CXR_STEP_SLEEP_S=0.5 CXR_TEST_DUMP={dump}\n"
        f"exec {sys.executable} -m launch train --config {prepared} --cluster {cluster_file} --elastic "
        f"--min-np 1 --max-np 2 --set run.dir={run}\n")
    log = tmp_path / "job.log"
    with open(log, "w") as f:  # a file, not a pipe: nobody reads while the test waits
        proc = subprocess.Popen(vcluster.ssh_command(cluster, first.name, f"bash {script}"), stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # the second node is lost during epoch 3: its rank killed, its network gone
        _until(lambda: _committed(run) >= 2, 180, proc, log, "two committed epochs")
        time.sleep(1.0)
        victims = _rank_pids(second.netns)
        assert len(victims) == 1, victims
        os.kill(victims[0], 9)
        killed_at = time.time()
        time.sleep(1.0)  # horovodrun sees the rank's exit first, then the node is unreachable
        _link(second, "down")
        _until(lambda: any(r["ranks"] == "1" for r in _history(run)), 120, proc, log, "an epoch on one rank")
        _link(second, "up")  # back: the discovery lists it again, the job grows at an epoch's end
        proc.wait(timeout=240)
    finally:
        _link(second, "up")
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]

    hist = _history(run)
    assert [int(r["epoch"]) for r in hist] == list(range(1, EPOCHS + 1))  # each epoch once, none lost
    ranks = [int(r["ranks"]) for r in hist]
    assert ranks[:2] == [2, 2] and ranks[2] == 1 and ranks[-1] == 2, ranks
    # training went on within seconds of the kill, from the committed epoch (epoch 3 run again in full),
    # and grew back to two ranks at a later epoch's end
    resumed = re.search(r"(\d\d):(\d\d):(\d\d) \[rank 0\] INFO elastic \(re\)start: 1 rank\(s\).* from epoch 3 ", out)
    assert resumed, out[-4000:]
    assert re.search(r"elastic \(re\)start: 2 rank\(s\).* from epoch [4-7] ", out), out[-4000:]
    t = time.localtime(killed_at)
    gap = ((int(resumed[1]) * 3600 + int(resumed[2]) * 60 + int(resumed[3]))
           - (t.tm_hour * 3600 + t.tm_min * 60 + t.tm_sec))
    # Seen: 1 s when the lost rank was not Horovod's rank 0; 81 s once when it was (the driver's reset
    # then waits longer for the cut-off node). Bounded either way: no hang, no job ended.
    assert 0 <= gap <= 150, gap
    # both ranks of the final world hold the same weights; one checkpoint per epoch, by whichever
    # process was rank 0 then (rank 0 moves to the other node when its node is the one lost)
    dumps = [json.loads((dump / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(d["size"] == 2 for d in dumps)
    assert dumps[0]["weights_sha256"] == dumps[1]["weights_sha256"]
    assert dumps[0]["checkpoint_writes"] >= 1 and sum(d["checkpoint_writes"] for d in dumps) <= EPOCHS
    assert (run / "model.keras").is_file() and json.loads((run / "checkpoints" / "state.json").read_text())["complete"]
