"""Stop on a signal mid-epoch, resume at the next step: the same batches as an uninterrupted run.

``python -m distributed.train`` on one process, tiny backbone, 32 px, 10 steps per epoch slowed
down by ``CXR_STEP_SLEEP_S``; ``train.record_batches`` writes ``batches.csv`` (phase, epoch, step,
rank, SHA-1 of the step's image indices). Two ranks: tests/parallel/test_stop_signal_hvd.py.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "multinode"))
from cluster_tools import tiny_dataset  # noqa: E402  (120 patients, 32 px, the tiny backbone)

SLEEP = "0.3"


def _env(extra=None):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CXR_NO_HOROVOD="1", **(extra or {}))


def _run(args, env=None, timeout=300, check=True):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(env), capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tiny_dataset(tmp_path_factory.mktemp("stop"), seed=3,
                        train={"batch_size": 16, "record_batches": True, "stop_check_s": 0, "warmup": {"epochs": 1},
                               "finetune": {"epochs": 2, "patience": 10, "lr": 0.01}})
    _run(["-m", "data_prep", "--config", str(path)])
    return path


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    _run(["-m", "distributed.train", "--config", str(config), "--set", f"run.dir={run}"])
    return _rows(run)


def _rows(run: Path) -> list[tuple]:
    with open(run / "batches.csv", newline="") as f:
        return [tuple(r.values()) for r in csv.DictReader(f)]


def _start(config, run, *extra, env=None):
    return subprocess.Popen([sys.executable, "-m", "distributed.train", "--config", str(config),
                             "--set", f"run.dir={run}", *extra], cwd=ROOT, env=_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(run: Path, proc, n: int, timeout: float = 180.0) -> None:
    """Until batches.csv has ``n`` rows (the training is inside its epochs by then)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        if (run / "batches.csv").exists() and len((run / "batches.csv").read_text().splitlines()) > n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} rows in {run / 'batches.csv'} after {timeout} s")


@pytest.mark.parametrize("sig,elastic,check_s", [(signal.SIGUSR1, False, 0), (signal.SIGUSR1, True, 0),
                                                 (signal.SIGTERM, False, 1)])  # (SIGTERM every step: 2 ranks)
def test_signal_mid_epoch_stops_with_a_step_checkpoint_and_resume_reads_the_same_batches(config, reference, tmp_path,
                                                                                        sig, elastic, check_s):
    assert [r[:3] for r in reference] == [(ph, str(e), str(s)) for ph, e in (("warmup", 1), ("finetune", 2),
                                                                              ("finetune", 3)) for s in range(1, 11)]
    run = tmp_path / "run"
    # elastic training stops and resumes the same way; stop_check_s 1: the flag checked every few steps
    mode = ("--set", f"train.elastic={str(elastic).lower()}", "--set", f"train.stop_check_s={check_s}")
    proc = _start(config, run, *mode, env={"CXR_STEP_SLEEP_S": SLEEP})
    wait_for_rows(run, proc, 13)  # epoch 2, the first fine-tune epoch, is under way
    t0 = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 128 + sig, err[-3000:]
    assert took < 30, took
    stopped = [ln for ln in err.splitlines() if "stopped by" in ln]
    assert len(stopped) == 1 and stopped[0].endswith("; resume with --resume"), err[-3000:]
    steps = sorted((run / "checkpoints").glob("step-*"))
    if check_s and f"stopped by {sig.name} at the end of epoch 2;" in stopped[0]:  # the check fell on its last step
        step = 0
        assert steps == [] and json.loads((run / "checkpoints" / "state.json").read_text())["epoch"] == 2
    else:
        assert f"stopped by {sig.name} at epoch 2 step " in stopped[0] and " of 10;" in stopped[0], stopped[0]
        step = int(stopped[0].split(" step ")[1].split()[0])
        assert [p.name for p in steps] == [f"step-000002-{step:06d}"]
        state = json.loads((steps[0] / "state.json").read_text())
        assert (state["phase"], state["epoch"], state["phase_epoch"], state["step"]) == ("finetune", 1, 0, step)
    assert not (run / "model.keras").exists()
    assert len(_rows(run)) == 10 + (step or 10)  # every step done is recorded, none after the stop

    resumed = _run(["-m", "distributed.train", "--config", str(config), "--set", f"run.dir={run}", "--resume", *mode])
    assert (f"and step {step} of epoch 2" if step else "resuming after epoch 2 (finetune epoch 1)") in resumed.stderr
    assert "optimizer state restored" in resumed.stderr
    assert _rows(run) == reference  # the same batches, in the same order, each once
    print(f"reliability: 1 rank, {sig.name}{' (elastic)' if elastic else ''}: {took:.1f} s to exit, 0 steps lost")
    with open(run / "history.csv", newline="") as f:
        assert [(r["phase"], r["epoch"]) for r in csv.DictReader(f)] == [("warmup", "1"), ("finetune", "2"),
                                                                         ("finetune", "3")]
    assert not list((run / "checkpoints").glob("step-*"))  # the finished run's state.json is newer


def test_kill_9_loses_at_most_one_checkpoint_interval(config, reference, tmp_path):
    run, every = tmp_path / "run", 1.0
    proc = _start(config, run, "--set", f"train.checkpoint_every_s={every}", env={"CXR_STEP_SLEEP_S": SLEEP})
    wait_for_rows(run, proc, 16)
    proc.kill()  # SIGKILL: no handler, no checkpoint at the stop
    proc.communicate(timeout=30)
    done = len(_rows(run))
    steps = sorted((run / "checkpoints").glob("step-*"))
    assert len(steps) == 1, steps  # the previous one is removed only after the new one is complete
    at = json.loads((steps[0] / "state.json").read_text())
    kept = at["epoch"] * 10 + at["step"]
    # at most one interval's steps (and the one in progress) are lost
    assert 0 <= done - kept <= every / float(SLEEP) + 2, (done, kept)
    print(f"reliability: kill -9, checkpoint_every_s {every}, {SLEEP} s steps: {done - kept} step(s) to redo")
    resumed = _run(["-m", "distributed.train", "--config", str(config), "--set", f"run.dir={run}", "--resume"])
    assert "resuming after epoch" in resumed.stderr
    assert _rows(run) == reference


def test_elastic_training_uses_the_same_step_with_its_compression(config, tmp_path):
    code = ("import sys; from distributed import hvd; seen = []; wrap = hvd.DistributedOptimizer\n"
            "hvd.DistributedOptimizer = lambda o, compression='none', **k: "
            "seen.append(compression) or wrap(o, compression, **k)\n"
            "from data_prep.config import load_config; from distributed.train import train\n"
            "r = train(load_config(sys.argv[1], sys.argv[2:])); print('SEEN', seen, r['state']['epoch'])")
    p = _run(["-c", code, str(config), f"run.dir={tmp_path / 'run'}", "train.elastic=true",
              "train.allreduce_compression=fp16", "train.finetune.epochs=1", "train.steps_per_epoch=2"])
    assert "SEEN ['fp16', 'fp16'] 2" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
