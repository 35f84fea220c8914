"""Two ranks under ``horovodrun -np 2`` on damaged shards: every rank stops with one line naming a shard,
in bounded time."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.needs_horovod
BOUND_S = 180  # TensorFlow's start on 2 busy cores is most of it


def test_damaged_training_shards_stop_every_rank_with_one_line(tmp_path):
    env = dict(os.environ)
    env.pop("CXR_NO_HOROVOD", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the user's default: the project's level, not the test's
    run = lambda cmd, **kw: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, **kw)  # noqa
    assert run([sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path / "data"), "--patients", "60",
                "--image-size", "32", "--seed", "5", "--no-progress"]).returncode == 0
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"csv": str(tmp_path / "data" / "Data_Entry_2017.csv"), "images": str(tmp_path / "data"),
                 "image_size": 32},
        "prep": {"out": str(tmp_path / "prepared"), "shard_size": 64},
        "model": {"backbone": "tiny", "weights": "none", "dense_units": 8},
        "train": {"batch_size": 8, "warmup": {"epochs": 1}, "finetune": {"epochs": 1}},
        "run": {"dir": str(tmp_path / "run")}}))
    assert run([sys.executable, "-m", "data_prep", "--config", str(cfg)]).returncode == 0
    m = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    for sh in m["splits"]["train"]["shards"]:  # one image in the middle of every training shard: found mid-epoch
        path = tmp_path / "prepared" / sh["file"]
        with h5py.File(path, "r") as h:
            off = h["images"].id.get_chunk_info(h["images"].shape[0] // 2).byte_offset
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(b"\x00\xff" * 16)
    t0 = time.monotonic()
    p = run(["horovodrun", "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, "-m", "distributed.train",
             "--config", str(cfg)], timeout=BOUND_S + 60)
    took = time.monotonic() - t0
    errors = [ln for ln in p.stderr.splitlines() + p.stdout.splitlines() if "cxr-train" in ln and "error:" in ln]
    assert p.returncode != 0 and took < BOUND_S, (took, p.stderr[-3000:])
    damaged = []
    for rank in (0, 1):  # one line per rank: the shard it found damaged, or that another rank ended
        mine = [ln for ln in errors if f"[rank {rank}]" in ln]
        assert len(mine) == 1, errors
        if "is damaged" in mine[0]:
            assert "train/shard-" in mine[0] and "--overwrite" in mine[0], errors
            damaged.append(rank)
        else:
            assert "another rank ended and Horovod shut down" in mine[0], errors
    assert damaged, errors
    # no TensorFlow traceback of the generator (issue 30): besides its line and log lines a rank prints nothing
    # (horovodrun's shell may add "Terminated" for a rank it stopped; Horovod may note a lost peer in one line)
    ranks_out = [ln for ln in p.stderr.splitlines()
                 if ln.startswith(("[0]", "[1]"))]  # horovodrun's own traceback aside
    assert not [ln for ln in ranks_out if "Traceback" in ln or 'File "' in ln or "script_ops.py" in ln]
    for rank in (0, 1):
        own = [ln.split(":", 1)[1] for ln in p.stderr.splitlines() if ln.startswith(f"[{rank}]<stderr>:")]
        rest = [ln for ln in own if not re.match(r"\d\d:\d\d:\d\d (\[rank \d+\] )?(INFO|WARNING) ", ln)
                and "cxr-train:" not in ln and ln.strip() != "Terminated"]
        assert all("Horovod background loop" in ln for ln in rest), rest
