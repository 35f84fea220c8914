"""Two ranks stop at the same step on a signal and resume there: the batches of an uninterrupted run.

* ``mpirun -np 2``, SIGUSR1 to mpirun (Open MPI forwards it to every rank, on every node: what the
  launcher and the Slurm script send);
* ``horovodrun --gloo -np 2``, SIGTERM to rank 1 alone: the stop flag, allreduced every step,
  stops rank 0 at the same step.

Each time: exit within 30 s with a step checkpoint written by rank 0, ``--resume`` under the same
launcher, then ``batches.csv`` (both ranks' rows) equal to an uninterrupted two-rank run's.
"""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import test_stop_signal  # noqa: E402
from test_stop_signal import wait_for_rows  # noqa: E402

# the e2e module's fixture (the tiny data set, prepared once), registered here under its name; an assignment,
# not an import, as the tests below take it as their parameter ``config``
config = test_stop_signal.config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.needs_horovod
STEPS = 5  # 160 training images / (16 x 2 ranks)


def _env(extra=None):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(extra or {}))
    e.pop("CXR_NO_HOROVOD", None)
    return e


def _launcher(kind: str) -> list[str]:
    if kind == "mpirun":
        return ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "CXR_STEP_SLEEP_S",
                "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL"]
    return ["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2"]


def _train(kind, config, run, *extra):
    return [*_launcher(kind), sys.executable, "-m", "distributed.train", "--config", str(config),
            "--set", f"run.dir={run}", *extra]


def _rows(run: Path):
    with open(run / "batches.csv", newline="") as f:
        return [tuple(r.values()) for r in csv.DictReader(f)]


def _check(p):
    assert p.returncode == 0, f"{p.args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory):
    run = tmp_path_factory.mktemp("full2") / "run"
    _check(subprocess.run(_train("gloo", config, run), cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600))
    rows = _rows(run)
    assert len(rows) == 2 * 3 * STEPS and {r[3] for r in rows} == {"0", "1"}
    return rows


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the local training processes below the launcher (from their environment)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                children.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = {}, [launcher_pid]
    while todo:
        for c in children.get(todo.pop(), []):
            todo.append(c)
            try:
                env = dict(kv.split("=", 1) for kv in (Path(f"/proc/{c}/environ").read_bytes().decode(errors="replace")
                                                       .split("\0")) if "=" in kv)
                cmd = Path(f"/proc/{c}/cmdline").read_bytes()
            except OSError:
                continue
            rank = env.get("HOROVOD_RANK") or env.get("OMPI_COMM_WORLD_RANK")
            if rank is not None and b"distributed.train" in cmd:
                out[int(rank)] = c
    return out


@pytest.mark.parametrize("kind,sig,target", [("mpirun", signal.SIGUSR1, "launcher"),
                                             ("gloo", signal.SIGTERM, "rank 1")])
def test_two_ranks_stop_at_the_same_step_and_resume_with_the_same_batches(config, reference, tmp_path, kind, sig,
                                                                          target):
    run = tmp_path / "run"
    proc = subprocess.Popen(_train(kind, config, run), cwd=ROOT, env=_env({"CXR_STEP_SLEEP_S": "0.5",
                                                                           "PYTHONPATH": str(ROOT)}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rows(run, proc, 2 * (STEPS + 2), timeout=300)  # inside epoch 2
        t0 = time.monotonic()
        os.kill(proc.pid if target == "launcher" else _rank_pids(proc.pid)[1], sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - t0
    assert took < 30, took
    assert proc.returncode != 0, err[-3000:]  # 128 + signal from the ranks (launchers report it their way)
    text = out + err
    stopped = [ln for ln in text.splitlines() if "stopped by" in ln and "resume with --resume" in ln]
    assert len(stopped) == 1 and f"stopped by {sig.name} at epoch 2 step " in stopped[0], text[-3000:]  # rank 0 says it
    step = int(stopped[0].split(" step ")[1].split()[0])
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == [f"step-000002-{step:06d}"]
    rows = _rows(run)
    assert len(rows) == 2 * (STEPS + step)  # both ranks stopped after the same step
    resumed = _check(subprocess.run(_train(kind, config, run, "--resume"), cwd=ROOT,
                                    env=_env({"PYTHONPATH": str(ROOT)}), capture_output=True, text=True, timeout=600))
    assert f"and step {step} of epoch 2" in resumed.stdout + resumed.stderr
    assert _rows(run) == reference
    print(f"reliability: 2 ranks ({kind}), {sig.name} to the {target}: {took:.1f} s to exit, 0 steps lost")
