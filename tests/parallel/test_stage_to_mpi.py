"""``prep.stage_to`` under ``mpirun -np 2`` (two ranks on one node): each shard copied once per node,
a damaged copy made again, and the ranks read the copies (the sources are garbled in between)."""
import hashlib
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from data_prep import synthetic

pytestmark = pytest.mark.needs_mpirun
MPIRUN = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "--mca", "btl_vader_single_copy_mechanism",
          "none"]
RANK = """
import hashlib, json, sys
import numpy as np
from mpi4py import MPI
from data_prep.log import env_rank
from data_prep.manifest import load_manifest
from distributed.data import SplitData
prep, stage_to, out = sys.argv[1:4]
m = load_manifest(prep)
res = {}
MPI.COMM_WORLD.Barrier()  # both ranks stage at the same moment (each copy takes CXR_STAGE_THROTTLE_S)
for split in ("train", "val"):
    d = SplitData(prep, split, manifest=m, stage_to=stage_to)  # what training loads (distributed.trainer.setup)
    images = d.read(np.arange(d.n))
    res[split] = {k: d.staged[k] for k in ("copied", "reused", "recopied", "folder")}
    res[split]["files"] = [str(f) for f in d.files]
    res[split]["digest"] = hashlib.sha256(images.tobytes()).hexdigest()
with open(f"{out}/rank{env_rank()}.json", "w") as f:
    json.dump(res, f)
"""


def _garble(path, at=4096):
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\x5a" * 256)


def test_two_ranks_stage_each_shard_once_and_read_the_copies(tmp_path, root):
    synthetic.generate(tmp_path / "data", patients=24, image_size=64, seed=5, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"csv": str(tmp_path / "data" / "Data_Entry_2017.csv"), "images": str(tmp_path / "data"),
                 "image_size": 32},
        "prep": {"out": str(tmp_path / "prepared"), "shard_size": 8}}))
    env = {**os.environ, "PYTHONPATH": str(root), "TF_CPP_MIN_LOG_LEVEL": "2", "CXR_STAGE_THROTTLE_S": "0.1"}
    run = lambda *a: subprocess.run([*a], cwd=root, env=env, capture_output=True, text=True, timeout=300)  # noqa
    assert run(sys.executable, "-m", "data_prep", "--config", str(cfg)).returncode == 0
    prep = tmp_path / "prepared"
    m = json.loads((prep / "manifest.json").read_text())
    shards = {s: [e["file"] for e in m["splits"][s]["shards"] if e["count"]] for s in ("train", "val")}
    assert len(shards["train"]) >= 3 and shards["val"]
    expected = {}
    for split, files in shards.items():  # what the sources hold, before anything is staged
        images = []
        for f in files:
            with h5py.File(prep / f, "r") as h:
                images.append(h["images"][:])
        expected[split] = hashlib.sha256(np.concatenate(images).tobytes()).hexdigest()
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    node = tmp_path / "node"

    def ranks(tag):
        out = tmp_path / tag
        out.mkdir()
        p = run(*MPIRUN, sys.executable, str(script), str(prep), str(node), str(out))
        assert p.returncode == 0, p.stderr[-3000:]
        return p, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    p, first = ranks("first")
    folder = first[0]["train"]["folder"]
    for split in ("train", "val"):
        assert sum(r[split]["copied"] for r in first) == len(shards[split])  # once per node, not once per rank
        assert sum(r[split]["reused"] for r in first) == len(shards[split])  # the other rank found them made
        for r in first:
            assert r[split]["files"] == [os.path.join(folder, f) for f in shards[split]]
            assert r[split]["digest"] == expected[split]
    assert f"train: staged {len(shards['train'])} shards (" in p.stderr and f" to {folder} in " in p.stderr
    inodes = {f: os.stat(os.path.join(folder, f)).st_ino for f in shards["train"]}

    damaged, garbled = shards["train"][0], shards["train"][1]
    _garble(os.path.join(folder, damaged))  # a staged copy damaged between two runs
    _garble(prep / garbled)  # a source garbled: a rank reading it instead of its copy gets other bytes
    p, second = ranks("second")
    assert sum(r["train"]["copied"] for r in second) == 1 and sum(r["train"]["recopied"] for r in second) == 1
    assert sum(r["val"]["copied"] for r in second) == 0
    assert "differs from the manifest (sha256): copying it again" in p.stderr
    for r in second:
        assert r["train"]["digest"] == expected["train"] and r["val"]["digest"] == expected["val"]
    now = {f: os.stat(os.path.join(folder, f)).st_ino for f in shards["train"]}
    assert [f for f in shards["train"] if now[f] != inodes[f]] == [damaged]  # only the damaged one copied again
