"""``python -m data_prep verify`` under ``mpirun -np 2``: the shards shared among the ranks, every damaged
one listed."""
import json
import os
import subprocess
import sys

import h5py
import pytest
import yaml

from data_prep import synthetic

pytestmark = pytest.mark.needs_mpirun
MPIRUN = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "--mca", "btl_vader_single_copy_mechanism",
          "none"]


def test_verify_under_mpirun_lists_each_damaged_shard(tmp_path, root):
    synthetic.generate(tmp_path / "data", patients=20, image_size=64, seed=5, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"csv": str(tmp_path / "data" / "Data_Entry_2017.csv"), "images": str(tmp_path / "data"),
                 "image_size": 32},
        "prep": {"out": str(tmp_path / "prepared"), "shard_size": 8}}))
    env = {**os.environ, "PYTHONPATH": str(root)}
    run = lambda *a: subprocess.run([*a], cwd=root, env=env, capture_output=True, text=True, timeout=300)  # noqa
    assert run(sys.executable, "-m", "data_prep", "--config", str(cfg)).returncode == 0
    ok = run(*MPIRUN, sys.executable, "-m", "data_prep", "verify", "--config", str(cfg))
    assert ok.returncode == 0 and "intact" in ok.stderr and "on 2 rank(s)" in ok.stderr, ok.stderr[-3000:]
    m = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    files = [s["file"] for sp in ("train", "val", "test") for s in m["splits"][sp]["shards"]]
    for rel in files[:2]:  # one shard of each rank (rank r takes shards r, r + 2, ...)
        with h5py.File(tmp_path / "prepared" / rel, "r") as h:
            off = h["images"].id.get_chunk_info(1).byte_offset
        with open(tmp_path / "prepared" / rel, "r+b") as f:
            f.seek(off)
            f.write(b"\xff" * 512)
    bad = run(*MPIRUN, sys.executable, "-m", "data_prep", "verify", "--config", str(cfg))
    errors = [ln for ln in bad.stderr.splitlines() if "error:" in ln]
    assert bad.returncode != 0 and len(errors) == 1, bad.stderr[-3000:]
    assert files[0] in errors[0] and files[1] in errors[0] and "Fletcher32" in errors[0]
