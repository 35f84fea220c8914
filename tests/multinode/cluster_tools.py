"""Helpers of the multi-node tests: run commands on the virtual cluster's nodes as a user would."""
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from launch import vcluster

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_ID = int(os.environ.get("CXR_VCLUSTER_TEST_ID", "3"))  # never a user's cluster 0
# What every command started on a node needs from this process (ssh starts a clean environment).
PASSED_VARS = ("PATH", "PYTHONPATH", "OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM")


def cluster_file(cluster, folder: Path, **changes) -> Path:
    """The cluster's file with ``changes`` (e.g. horovod_controller="gloo") written to ``folder``."""
    tree = yaml.safe_load((Path(cluster.dir) / "cluster.yaml").read_text())
    tree.update(changes)
    path = folder / f"cluster-{abs(hash(tuple(sorted(map(str, changes.items()))))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def on_node(cluster, node: str, argv, env=None) -> list[str]:
    """ssh argv running ``argv`` in the repository on ``node``, as a user on a head node would."""
    pass_env = {k: os.environ[k] for k in PASSED_VARS if k in os.environ}
    pass_env.setdefault("PYTHONPATH", str(ROOT))
    pass_env.update({"TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    inner = (f"cd {shlex.quote(str(ROOT))} && exec env "
             f"{' '.join(f'{k}={shlex.quote(v)}' for k, v in pass_env.items())} "
             + shlex.join([str(a) for a in argv]))
    return vcluster.ssh_command(cluster, node, inner)


def launch(cluster, *args, env=None, timeout=300, node=None):
    """``python -m launch ARGS`` on the first node; returns the finished process."""
    node = node or cluster.nodes[0].name
    return subprocess.run(on_node(cluster, node, [sys.executable, "-m", "launch", *args], env), capture_output=True,
                          text=True, timeout=timeout)


def start_launch(cluster, *args, env=None):
    node = cluster.nodes[0].name
    return subprocess.Popen(on_node(cluster, node, [sys.executable, "-m", "launch", *args], env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def wait_for(pred, timeout: float, what: str, proc=None, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the job ended (exit {proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(step)
    raise AssertionError(f"no {what} within {timeout:.0f} s")


def tiny_dataset(base: Path, seed: int, test_fraction: float = 0.1, train=None, evaluate=None) -> Path:
    """A generated data set (120 patients, 32 px) under ``base`` and ``base/cfg.yaml`` training the tiny
    backbone for 1 + 3 short epochs; ``train``/``evaluate`` replace those config sections."""
    subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(base / "data"), "--patients", "120",
                    "--image-size", "32", "--seed", str(seed), "--no-progress"], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    cfg = {
        "data": {"csv": str(base / "data" / "Data_Entry_2017.csv"), "images": str(base / "data"), "image_size": 32},
        "prep": {"out": str(base / "prepared"), "shard_size": 64, "train_per_class": 80, "val_fraction": 0.2,
                 "test_fraction": test_fraction},
        "model": {"backbone": "tiny", "weights": "none", "dense_units": 16},
        "train": train or {"batch_size": 16, "warmup": {"epochs": 1}, "finetune": {"epochs": 3, "patience": 10}},
        "eval": evaluate or {"tta": False, "bootstrap": 0, "gradcam_per_group": 0},
        "run": {"dir": str(base / "run")},
    }
    (base / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return base / "cfg.yaml"
