"""Damage and contention between stages, as the user meets them (``python -m ...`` in subprocesses):
a damaged shard, damaged checkpoints, a second run on one folder, a full disk.

One tiny generated data set (32 px, ``tiny`` backbone, 1 warm-up + 2 fine-tune epochs), prepared once.
"""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STOP_EXIT_CODE = 75


def _run(args, env=None, timeout=300):
    e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CXR_NO_HOROVOD="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def _one_line_error(p, code=1):
    lines = [ln for ln in p.stderr.strip().splitlines() if " error: " in ln]
    assert p.returncode == code and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    base = tmp_path_factory.mktemp("safety")
    _ok(_run(["-m", "data_prep.synthetic", "--out", str(base / "data"), "--patients", "60", "--image-size", "32",
              "--seed", "5", "--no-progress"]))
    cfg = {
        "data": {"csv": str(base / "data" / "Data_Entry_2017.csv"), "images": str(base / "data"), "image_size": 32},
        "prep": {"out": str(base / "prepared"), "shard_size": 32, "val_fraction": 0.2, "test_fraction": 0.1},
        "model": {"backbone": "tiny", "weights": "none", "dense_units": 8},
        "train": {"batch_size": 16, "warmup": {"epochs": 1}, "finetune": {"epochs": 2, "patience": 10}},
        "eval": {"tta": False, "bootstrap": 0, "gradcam_per_group": 0},
        "run": {"dir": str(base / "run")},
    }
    path = base / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    _ok(_run(["-m", "data_prep", "--config", str(path)]))
    return path


def _train(config, run_dir, *extra, env=None, prep=None):
    sets = ["--set", f"run.dir={run_dir}"] + (["--set", f"prep.out={prep}"] if prep else [])
    return _run(["-m", "distributed.train", "--config", str(config), *sets, *extra], env=env)


def _history_phases(run_dir):
    lines = (Path(run_dir) / "history.csv").read_text().splitlines()[1:]
    return [ln.split(",")[:2] for ln in lines]


FULL = [["warmup", "1"], ["finetune", "2"], ["finetune", "3"]]


# --------------------------------------------------------------------------- integrity

def _damage_chunk(shard: Path, index: int = 3) -> None:
    """4 KiB of garbage where image ``index`` is stored (the data, not the file's metadata)."""
    with h5py.File(shard, "r") as h:
        off = h["images"].id.get_chunk_info(index).byte_offset
    with open(shard, "r+b") as f:
        f.seek(off)
        f.write(os.urandom(1024))


def test_a_damaged_shard_stops_training_naming_it_and_verify_lists_it(config, tmp_path):
    prep = tmp_path / "prepared"
    shutil.copytree(yaml.safe_load(config.read_text())["prep"]["out"], prep)
    _ok(_run(["-m", "data_prep", "verify", "--config", str(config), "--set", f"prep.out={prep}"]))
    entry = json.loads((prep / "manifest.json").read_text())["splits"]["train"]["shards"][0]
    shard = prep / entry["file"]
    _damage_chunk(shard, entry["count"] // 2)  # mid-file: found during training, inside tf.data's generator
    # TensorFlow's own log level (the project's default, warnings shown): its C++ log printed the generator's
    # 25-line traceback before the one line (issue 30)
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    p = subprocess.run([sys.executable, "-m", "distributed.train", "--config", str(config), "--set",
                        f"run.dir={tmp_path / 'run'}", "--set", f"prep.out={prep}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**env, "CXR_NO_HOROVOD": "1"})
    line = _one_line_error(p)
    assert str(shard) in line and "damaged" in line and "--overwrite" in line
    assert [ln for ln in p.stderr.splitlines()
            if not re.match(r"\d\d:\d\d:\d\d (\[rank \d+\] )?(INFO|WARNING) ", ln)] == [line]
    line = _one_line_error(_run(["-m", "data_prep", "--verify", "--config", str(config), "--set", f"prep.out={prep}"]))
    assert shard.name in line and "rerun prep with --overwrite" in line


def test_an_old_format_manifest_is_one_line(config, tmp_path):
    prep = tmp_path / "prepared"
    shutil.copytree(yaml.safe_load(config.read_text())["prep"]["out"], prep)
    m = json.loads((prep / "manifest.json").read_text())
    (prep / "manifest.json").write_text(json.dumps({**m, "format": 2}))
    line = _one_line_error(_train(config, tmp_path / "run", prep=prep))
    assert "shard format 2" in line and "Fletcher-32" in line and "--overwrite" in line


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture()
def killed_run(config, tmp_path):
    """A run stopped (as if killed) after its first fine-tune epoch: state.json, last.keras, best.keras."""
    run = tmp_path / "run"
    p = _train(config, run, env={"CXR_STOP_AFTER": "finetune:1"})
    assert p.returncode == STOP_EXIT_CODE, p.stderr[-3000:]
    assert {f.name for f in (run / "checkpoints").iterdir()} >= {"state.json", "last.keras", "best.keras"}
    return run


def test_resume_with_an_empty_last_checkpoint_falls_back_to_best(config, killed_run):
    best_epoch = json.loads((killed_run / "checkpoints" / "state.json").read_text())["best_epoch"]
    (killed_run / "checkpoints" / "last.keras").write_bytes(b"")
    p = _ok(_train(config, killed_run, "--resume"))
    assert f"falling back to {killed_run / 'checkpoints' / 'best.keras'} (epoch {best_epoch})" in p.stderr
    assert _history_phases(killed_run) == FULL and (killed_run / "model.keras").is_file()


def test_resume_with_a_damaged_state_json_uses_the_history(config, killed_run):
    (killed_run / "checkpoints" / "state.json").write_text('{"phase": "fine')
    p = _ok(_train(config, killed_run, "--resume"))
    assert "state.json is unreadable" in p.stderr and "at epoch 2 as history.csv records it" in p.stderr
    assert _history_phases(killed_run) == FULL


def test_resume_with_nothing_readable_is_one_line(config, killed_run):
    for name in ("last.keras", "best.keras"):
        (killed_run / "checkpoints" / name).write_bytes(b"PK\x03\x04 cut")
    line = _one_line_error(_train(config, killed_run, "--resume"))
    assert "last.keras" in line and "best.keras" in line and "without --resume" in line


# --------------------------------------------------------------------------- one writer

@contextlib.contextmanager
def _holding(folder, what):
    """Another process holding ``folder``'s lock as ``what``; yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from data_prep.locks import acquire; "
                               f"acquire({str(folder)!r}, {what!r}); print('held', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_one_run_dir_is_refused_and_the_first_finishes(config, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CXR_NO_HOROVOD="1", CXR_STEP_SLEEP_S="0.1")
    first = subprocess.Popen([sys.executable, "-m", "distributed.train", "--config", str(config),
                              "--set", f"run.dir={run}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "config.yaml").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        t0 = time.monotonic()
        second = _train(config, run)
        line = _one_line_error(second)
        assert f"pid {first.pid} on " in line and "in use by training" in line
        assert time.monotonic() - t0 < 60  # refused at once (TensorFlow's import is most of it)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert _history_phases(run) == FULL


def test_a_second_prep_on_one_folder_is_refused(config, tmp_path):
    from data_prep.config import load_config
    from data_prep.locks import FolderBusy
    from data_prep.prepare import run

    out = tmp_path / "prepared"
    with _holding(out, "prep") as pid:
        with pytest.raises(FolderBusy, match=f"in use by prep \\(pid {pid} on "):
            run(load_config(config, [f"prep.out={out}"]))
        assert sorted(p.name for p in out.iterdir()) == [".cxr-lock"]  # nothing written


# --------------------------------------------------------------------------- full disks

class Disk(type(Path())):
    def resize(self, kb):
        subprocess.run(["mount", "-o", f"remount,size={kb}k", str(self)], check=True)


@pytest.fixture()
def small_disk(tmp_path):
    """A tmpfs of 96 KB at tmp_path/disk (root only); ``resize(kb)`` frees space; always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    try:
        yield Disk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_prep_on_a_full_disk_refuses_first_then_completes(config, small_disk):
    out = small_disk / "prepared"
    args = ["-m", "data_prep", "--config", str(config), "--set", f"prep.out={out}"]
    line = _one_line_error(_run(args))
    assert "prep needs about" in line and str(out) in line and "free" in line
    small_disk.resize(4096)
    _ok(_run(args))
    _ok(_run(["-m", "data_prep", "verify", "--config", str(config), "--set", f"prep.out={out}"]))


def test_prep_running_out_of_space_mid_write_leaves_no_partial_shard(config, small_disk, monkeypatch):
    from data_prep import prepare
    from data_prep.config import load_config

    monkeypatch.setattr(prepare, "check_space", lambda *a: None)  # as if another writer filled the disk meanwhile
    cfg = load_config(config, [f"prep.out={small_disk / 'prepared'}"])
    with pytest.raises(prepare.PrepError,
                       match="no space left on device writing shards into .*complete shards are kept"):
        prepare.run(cfg)
    left = sorted(p.name for p in (small_disk / "prepared").rglob("*") if p.is_file())
    assert left and not [n for n in left if ".tmp" in n] and "manifest.json" not in left
    small_disk.resize(4096)
    m = prepare.run(cfg)
    assert m["timings"]["shards_before"] >= 1  # the complete ones were kept, and are intact:
    from data_prep.manifest import verify_manifest
    assert verify_manifest(small_disk / "prepared")["ok"]


def test_train_on_a_full_disk_is_one_line_then_completes(config, small_disk):
    small_disk.resize(512)
    run = small_disk / "run"
    line = _one_line_error(_train(config, run))
    assert "no space left on device" in line and str(run) in line
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    small_disk.resize(65536)
    _ok(_train(config, run))
    assert _history_phases(run) == FULL


def test_evaluate_is_refused_while_another_process_writes_the_run_dir(config, tmp_path):
    run = tmp_path / "run"
    with _holding(run, "training") as pid:
        line = _one_line_error(_run(["-m", "distributed.evaluate", "--config", str(config), "--set", f"run.dir={run}"]))
        assert f"in use by training (pid {pid} on " in line
        assert sorted(p.name for p in run.iterdir()) == [".cxr-lock"]
