"""A real Slurm (Debian's slurm-wlm 22.05 and munge) on a two-node virtual cluster.

``launch.vslurm`` starts munged, slurmctld and one slurmd per namespace node; the tests submit
with ``sbatch`` as a user does: the allocation's variables, ``srun`` and ``mpirun`` inside it, and
``launch/cxr.sbatch`` running prep, train and evaluate across both nodes, cancelled with
``scancel`` during training and resubmitted to finish from the checkpoint (about 2 minutes).
Skipped, with the reason, without root, network namespaces or the Slurm packages (`make slurm-deps`).
"""
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # vnodes, beside this file
import vnodes  # noqa: E402
from cluster_tools import tiny_dataset  # noqa: E402

from launch import vslurm  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent  # the venv running pytest: the jobs use it too (cxr.sbatch's VENV)
WHY = vslurm.unavailable_reason()
pytestmark = [pytest.mark.needs_mpirun, pytest.mark.needs_horovod,
              pytest.mark.skipif(WHY is not None, reason=f"real Slurm: {WHY}")]


@pytest.fixture(scope="module")
def slurm():
    with vnodes.virtual_cluster(2) as cluster:
        # its own folder per cluster id: a second run first removes what a crashed one left
        state = vslurm.up(cluster.id, vslurm.default_dir(cluster.id), Path(cluster.dir), log=lambda m: None)
        try:
            yield state
        finally:
            vslurm.down(Path(state.dir), quiet=True)
            assert vslurm.leftovers(folder=Path(state.dir)) == []


def _env(slurm, **extra) -> dict:
    env = slurm.env()
    env.update(PYTHONPATH=str(ROOT), VENV=str(VENV), TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def _sbatch(slurm, script, out: Path, *opts, **env) -> str:
    r = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                        f"--output={out}", *opts, str(script)], cwd=ROOT, env=_env(slurm, **env),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


# States after which a job runs no more (squeue -t all lists them while slurmctld keeps the job).
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}


def _state(slurm, job: str) -> str | None:
    """The job's state; '' once it has ended or left slurmctld's memory; None when squeue could not
    tell (a slow or busy slurmctld): callers wait on and ask again, never take it for the end."""
    r = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], env=slurm.env(), capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        return "" if "Invalid job id" in r.stderr else None
    state = r.stdout.strip()
    return "" if state in ENDED else state


def _story(slurm, job: str) -> str:
    """What Slurm says of ``job`` (for a failure message): ``scontrol show job`` and the daemons' log lines on it."""
    r = subprocess.run(["scontrol", "show", "job", job], env=slurm.env(), capture_output=True, text=True, timeout=30)
    mine = re.compile(rf"(JobId=|job |job_id |StepId=){job}\b", re.IGNORECASE)
    out = f"scontrol show job:\n{r.stdout}{r.stderr}"
    for log in sorted((Path(slurm.dir) / "log").glob("*.log")):  # slurmctld's and each slurmd's
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if mine.search(ln)]
        out += f"\n{log.name}:\n" + "\n".join(lines[-20:])
    return out


def _wait(slurm, job: str, timeout: float, until=None, log: Path | None = None) -> float:
    """Until ``until()`` holds or the job has ended (else the job is cancelled and the test fails,
    with the end of the job's output ``log``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if until is not None and until():
            return time.monotonic() - t0
        if _state(slurm, job) == "":
            return time.monotonic() - t0
        time.sleep(1)
    subprocess.run(["scancel", job], env=slurm.env(), timeout=15)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"job {job} still {_state(slurm, job) or 'gone'} after {timeout:.0f} s\n{tail}\n"
                         + _story(slurm, job))


def _nodes_idle(slurm) -> bool:
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=slurm.env(), capture_output=True, text=True,
                       timeout=30)
    states = dict(ln.split()[:2] for ln in r.stdout.splitlines() if len(ln.split()) >= 2)
    return r.returncode == 0 and all(states.get(n) == "idle" for n in slurm.nodes)


def _batch_shell(job: str) -> int | None:
    """pid of job ``job``'s batch script (the shell slurmstepd runs: ``slurm_script`` in its command line)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"slurm_script" in cmd and f"SLURM_JOB_ID={job}".encode() in env:
            return int(p.name)
    return None


def _start_requeued_now(slurm, job: str, *updates: str) -> None:
    """Slurm holds a requeued job back until the old run's job credential has expired on the nodes
    (``vslurm.CRED_EXPIRE_S``, 120 s by default) and then waits for a scheduling pass: once the
    credential has expired and both nodes are idle, start it now (and change ``updates``, e.g. its
    time limit). Started sooner, slurmd refuses it ("Job credential revoked") and the job fails."""
    t0 = time.monotonic()
    while _state(slurm, job) != "PENDING" and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    time.sleep(vslurm.CRED_EXPIRE_S + 2)  # the requeue (and the revocation) came before PENDING

    def started_by_slurm() -> bool:  # once eligible, Slurm's own scheduling pass may start it at any moment
        return _state(slurm, job) not in ("PENDING", None)

    def started_without_us() -> bool:
        """Started (or even done) by Slurm: ``updates`` still apply to it while it runs."""
        if not started_by_slurm():
            return False
        if updates:
            subprocess.run(["scontrol", "update", f"JobId={job}", *updates], env=slurm.env(), capture_output=True,
                           timeout=15)
        return True

    t0 = time.monotonic()
    while not _nodes_idle(slurm) and time.monotonic() - t0 < 60:
        if started_without_us():
            return
        time.sleep(0.5)
    if started_without_us():
        return
    assert _state(slurm, job) == "PENDING" and _nodes_idle(slurm), _story(slurm, job)
    r = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now", *updates], env=slurm.env(),
                       capture_output=True, text=True, timeout=15)
    if r.returncode != 0 and started_without_us():
        return  # Slurm's pass came between the check and the update
    assert r.returncode == 0, r.stderr + _story(slurm, job)


def test_allocation_srun_and_mpirun_see_both_nodes(slurm, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n"
                      "echo ALLOC $SLURM_JOB_NODELIST $SLURM_TASKS_PER_NODE $SLURM_NTASKS $SLURM_CPUS_PER_TASK\n"
                      "srun bash -c 'echo SRUN $SLURM_PROCID $(hostname)'\n"
                      "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1\n"
                      "mpirun bash -c 'echo MPI $OMPI_COMM_WORLD_RANK $OMPI_COMM_WORLD_SIZE $(hostname)'\n"
                      f"{VENV}/bin/python -m launch prep --config {ROOT / 'configs/demo.yaml'} --dry-run\n")
    out = tmp_path / "job.out"
    _wait(slurm, _sbatch(slurm, script, out), 60, log=out)
    lines = out.read_text().splitlines()
    a, b = slurm.nodes
    assert f"ALLOC {a[:-1]}[1-2] 1(x2) 2 1" in lines
    assert sorted(ln for ln in lines if ln.startswith("SRUN")) == [f"SRUN 0 {a}", f"SRUN 1 {b}"]
    assert sorted(ln for ln in lines if ln.startswith("MPI")) == [f"MPI 0 2 {a}", f"MPI 1 2 {b}"]
    # the launcher reads the allocation: one rank on each node, one core each, started by srun with
    # the PMI plugin this Slurm offers (`srun --mpi=list`: Debian's has pmix)
    srun = next((ln for ln in lines if " srun " in ln and not ln.startswith("#")), "\n".join(lines[-20:]))
    assert ("srun --mpi=pmix --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=1 --cpu-bind=cores"
            in srun and "OMP_NUM_THREADS=1 " in srun), srun


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("slurm-pipeline"), seed=3, test_fraction=0.2,
                        train={"batch_size": 16, "warmup": {"epochs": 1},
                               "finetune": {"epochs": 3, "patience": 10, "lr": 0.01}},
                        evaluate={"tta_rounds": 2, "bootstrap": 50, "gradcam_per_group": 2})


def test_sbatch_pipeline_scancel_and_resubmit_resumes(slurm, tiny_config, tmp_path):
    run = Path(yaml.safe_load(tiny_config.read_text())["run"]["dir"])
    history, state_file = run / "history.csv", run / "checkpoints" / "state.json"

    def committed() -> int:
        try:
            return json.loads(state_file.read_text())["epoch"]
        except (OSError, ValueError, KeyError):
            return 0

    # 1. submitted; cancelled once the first fine-tune epoch is committed (1 s per step: 5 s per epoch)
    first = tmp_path / "first.out"
    job = _sbatch(slurm, ROOT / "launch" / "cxr.sbatch", first, CONFIG=str(tiny_config), CXR_STEP_SLEEP_S="1")
    _wait(slurm, job, 240, until=lambda: committed() >= 2, log=first)
    assert _state(slurm, job) == "RUNNING", first.read_text()[-3000:]
    subprocess.run(["scancel", job], env=slurm.env(), check=True, timeout=15)
    stopped = _wait(slurm, job, 60, log=first)
    log = first.read_text()
    assert stopped < 30, log[-3000:]
    state = json.loads(state_file.read_text())
    assert not state["complete"] and 2 <= state["epoch"] < 4, state
    assert not (run / "model.keras").exists() and not (run / "report.md").exists()
    # hosts, ranks and cores of the allocation reached the launcher and Horovod
    assert "prep: 2 rank(s) on 2 node(s), up to 1 per node, 1 core(s) per rank" in log
    # cxr.sbatch's launcher auto: srun with Debian's Slurm PMIx plugin starts the ranks (no mpirun)
    assert "srun --mpi=pmix --nodes=2 --ntasks=2 --ntasks-per-node=1" in log and "via srun" in log, log[-3000:]
    assert "Horovod 0.28.1: 2 rank(s), 1 on this node" in log  # each rank alone on its node

    # 2. the same submission again: prep skipped, training resumed, evaluation, report
    second = tmp_path / "second.out"
    _wait(slurm, _sbatch(slurm, ROOT / "launch" / "cxr.sbatch", second, CONFIG=str(tiny_config)), 300, log=second)
    log = second.read_text()
    assert "skip prep" in log, log[-3000:]
    assert f"resuming after epoch {state['epoch']}" in (run / "train.log").read_text()
    with open(history, newline="") as f:
        hist = [(r["phase"], r["epoch"]) for r in csv.DictReader(f)]
    assert hist == [("warmup", "1"), ("finetune", "2"), ("finetune", "3"), ("finetune", "4")]
    assert (run / "report.md").is_file() and (run / "metrics.json").is_file()
    done = json.loads(state_file.read_text())
    assert done["complete"] and done["epoch"] == 4


@pytest.fixture(scope="module")
def signal_config(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("slurm-signal"), seed=4, test_fraction=0.2,
                        train={"batch_size": 16, "record_batches": True, "stop_check_s": 0, "warmup": {"epochs": 1},
                               "finetune": {"epochs": 3, "patience": 10, "lr": 0.01}})


def test_sbatch_usr1_stops_at_a_step_requeues_and_finishes(slurm, signal_config, tmp_path):
    """Slurm's warning before a time limit (`scancel --signal=USR1 --batch`, as --signal=B:USR1@120
    sends it): cxr.sbatch forwards it, the ranks stop at a step with a checkpoint, the job is
    requeued, and the requeued job resumes at the next step: every step of every epoch once, with
    the batches the seed decides."""
    import hashlib

    from distributed.data import epoch_indices

    run = Path(yaml.safe_load(signal_config.read_text())["run"]["dir"])
    batches = run / "batches.csv"

    def rows() -> list[dict]:
        try:
            with open(batches, newline="") as f:
                return list(csv.DictReader(f))
        except OSError:
            return []

    out = tmp_path / "job.out"
    job = _sbatch(slurm, ROOT / "launch" / "cxr.sbatch", out, CONFIG=str(signal_config), CXR_STEP_SLEEP_S="1")
    _wait(slurm, job, 240, until=lambda: any(r["epoch"] == "2" and int(r["step"]) >= 2 for r in rows()), log=out)
    shell = _batch_shell(job)
    assert shell, "no batch shell of job " + job
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env(), check=True, timeout=15)
    t0 = time.monotonic()
    # A SIGTERM to the batch shell while the ranks stop (a preemption's or the time limit's, sent to the
    # shell's pid directly: `scancel --signal=TERM` on this Slurm cancels the whole job) must not cancel
    # the requeue; the steps sleep 1 s, so the stop is under way for about a second
    time.sleep(0.5)
    os.kill(shell, signal.SIGTERM)
    while time.monotonic() - t0 < 60 and "requeueing job" not in out.read_text():
        time.sleep(0.5)
    log = out.read_text()
    assert "requeueing job" in log, log[-3000:]
    assert "SIGTERM after SIGUSR1 ignored" in log, log[-3000:]
    assert time.monotonic() - t0 < 30  # signal to exit, checkpoint written
    _start_requeued_now(slurm, job)
    _wait(slurm, job, 400, until=lambda: (run / "report.md").is_file() and _state(slurm, job) == "", log=out)
    log = out.read_text()
    assert "stopped by SIGUSR1 at epoch 2 step" in log, log[-3000:]
    train_log = (run / "train.log").read_text()
    assert " and step " in train_log and "of epoch 2" in train_log, (train_log[-2000:] + "\njob output:\n" + log[-2000:]
                                                                   + _story(slurm, job))
    with open(run / "history.csv", newline="") as f:
        assert [(r["phase"], r["epoch"]) for r in csv.DictReader(f)] == [
            ("warmup", "1"), ("finetune", "2"), ("finetune", "3"), ("finetune", "4")]
    # every step once, on both ranks, reading what the seed and the epoch decide
    from data_prep.manifest import load_manifest

    man = load_manifest(Path(yaml.safe_load(signal_config.read_text())["prep"]["out"]))
    n = sum(int(s["count"]) for s in man["splits"]["train"]["shards"])
    steps = n // 32
    want = sorted((str(e + 1), str(b + 1), str(r),
                   hashlib.sha1(epoch_indices(n, 16, r, 2, 1234, e, steps)[b].astype("int64").tobytes()).hexdigest())
                  for e in range(4) for b in range(steps) for r in range(2))
    got = sorted((r["epoch"], r["step"], r["rank"], r["indices_sha1"]) for r in rows())
    assert got == want


def test_sbatch_time_limit_signals_requeues_and_finishes(slurm, tmp_path):
    """A job with a short --time: Slurm's --signal=B:USR1@100 (as cxr.sbatch's @120) arrives about
    20-50 s in; the job requeues itself and its second run finishes (the test raises the requeued
    job's limit and starts it at once, so that it ends in minutes)."""
    config = tiny_dataset(tmp_path / "limit", seed=5, test_fraction=0.2,
                          train={"batch_size": 16, "warmup": {"epochs": 1},
                                 "finetune": {"epochs": 3, "patience": 10, "lr": 0.01}})
    run = tmp_path / "limit" / "run"
    out = tmp_path / "job.out"
    job = _sbatch(slurm, ROOT / "launch" / "cxr.sbatch", out, "--time=2", "--signal=B:USR1@100",
                  CONFIG=str(config), CXR_STEP_SLEEP_S="1")
    _wait(slurm, job, 150, until=lambda: out.exists() and "requeueing job" in out.read_text(), log=out)
    assert "SIGUSR1 received" in out.read_text(), out.read_text()[-3000:]
    # The requeued job's limit raised at once: Slurm may start it by itself as soon as the credential has
    # expired, and with the old 2 min its second run would be signalled again before it could finish.
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=15"], env=slurm.env(), capture_output=True,
                   timeout=15)
    _start_requeued_now(slurm, job, "TimeLimit=15")
    _wait(slurm, job, 500, log=out)
    log = out.read_text()
    assert (run / "report.md").is_file(), log[-3000:]
    with open(run / "history.csv", newline="") as f:
        assert [(r["phase"], r["epoch"]) for r in csv.DictReader(f)] == [
            ("warmup", "1"), ("finetune", "2"), ("finetune", "3"), ("finetune", "4")]


def test_a_refused_requeue_keeps_the_checkpoint_and_says_so(slurm, tmp_path):
    """A site that forbids users to requeue: ``scontrol requeue`` fails (a stand-in ``scontrol`` first on
    the job's PATH answers as Slurm does, 'Access/permission denied'). The USR1 stop still writes its
    checkpoint; the job log says it was not requeued and the job exits 75."""
    config = tiny_dataset(tmp_path / "norequeue", seed=6, test_fraction=0.2,
                          train={"batch_size": 16, "stop_check_s": 0, "warmup": {"epochs": 1},
                                 "finetune": {"epochs": 3, "patience": 10, "lr": 0.01}})
    run = tmp_path / "norequeue" / "run"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\n[ \"$1\" = requeue ] && { echo 'scontrol: error: "
                                   "Access/permission denied for job' >&2; exit 1; }\nexec /usr/bin/scontrol \"$@\"\n")
    (fake / "scontrol").chmod(0o755)
    out = tmp_path / "job.out"
    job = _sbatch(slurm, ROOT / "launch" / "cxr.sbatch", out, CONFIG=str(config), CXR_STEP_SLEEP_S="1",
                  PATH=f"{fake}:{os.environ['PATH']}")
    state_file = run / "checkpoints" / "state.json"
    _wait(slurm, job, 240, until=lambda: state_file.is_file(), log=out)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm.env(), check=True, timeout=15)
    _wait(slurm, job, 90, log=out)
    log = out.read_text()
    assert "not requeued: scontrol requeue refused (scontrol: error: Access/permission denied" in log, log[-3000:]
    r = subprocess.run(["sacct", "-n", "-X", "-j", job, "-o", "ExitCode"], env=slurm.env(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 or not r.stdout.strip() or r.stdout.split()[0].startswith("75"), r.stdout
    steps = list((run / "checkpoints").glob("step-*")) + list((run / "checkpoints").glob("last.keras"))
    assert steps, sorted(p.name for p in (run / "checkpoints").iterdir())
    assert _state(slurm, job) == ""  # not requeued: ended
