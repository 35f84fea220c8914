"""Reading shards as shared file systems at HPC sites allow it: HDF5 opens without file locking,
a bounded number of open shards, and ``prep.stage_to`` (node-local copies, checked, made once).

Shards are written here per ARCHITECTURE.md with every image's index in its pixels, and a manifest
carrying their real sha256, so a test can tell which images were read and from which copy.
"""
import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data_prep import manifest as M  # noqa: E402
from data_prep import stage as ST  # noqa: E402
from data_prep.config import SHARD_FORMAT, eval_hash, load_config, prep_hash, train_hash  # noqa: E402
from data_prep.fsutil import sha256_file  # noqa: E402
from distributed import data as D  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
S = 8


def _encode(i):
    img = np.zeros((S, S), np.uint8)
    img[:, : S // 2] = i % 256
    img[:, S // 2:] = i // 256
    return img


def _decode(b):
    b = np.asarray(b).astype(np.int64)
    return b[:, 0, 0] + 256 * b[:, 0, -1]


def _write_prepared(root: Path, sizes=(("train", (3,) * 12), ("val", (4, 4)), ("test", (2,)))) -> Path:
    splits, offset = {}, 0
    for split, counts in sizes:
        (root / split).mkdir(parents=True, exist_ok=True)
        shards, total, lc = [], 0, {"No Finding": 0, "Infiltration": 0}
        for k, n in enumerate(counts):
            f = f"{split}/shard-{k:05d}-of-{len(counts):05d}.h5"
            idx = np.arange(offset + total, offset + total + n)
            label = (idx % 2).astype(np.int64)
            counts_k = {"No Finding": int((label == 0).sum()), "Infiltration": int((label == 1).sum())}
            with h5py.File(root / f, "w") as h:
                h.create_dataset("images", data=np.stack([_encode(i) for i in idx]), chunks=(1, S, S), fletcher32=True)
                h.create_dataset("label", data=label)
                h.create_dataset("targets", data=np.eye(2, dtype=np.uint8)[label])
                st = h5py.string_dtype()
                h.create_dataset("image_index",
                                 data=np.array([f"{i:08d}_000.png" for i in idx], dtype=object), dtype=st)
                h.create_dataset("patient_id", data=idx)
                h.create_dataset("view", data=np.array(["PA"] * n, dtype=object), dtype=st)
                h.create_dataset("age", data=np.full(n, 40, np.int16))
                h.create_dataset("sex", data=np.array(["F"] * n, dtype=object), dtype=st)
                h.attrs["config_hash"] = "t"
                h.attrs["label_counts"] = json.dumps(counts_k)
            for c, v in counts_k.items():
                lc[c] += v
            shards.append({"file": f, "count": n, "sha256": sha256_file(root / f)})
            total += n
        splits[split] = {"count": total, "label_counts": lc, "patients": total, "shards": shards}
        offset += total
    manifest = {"format": SHARD_FORMAT, "config_hash": "t", "config": {}, "task": "binary",
                "classes": ["No Finding", "Infiltration"], "image_size": S, "splits": splits,
                "mean": 0.0, "std": 1.0, "skipped": [], "converted": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture()
def prepared(tmp_path):
    return _write_prepared(tmp_path / "prepared")


def _without_hdf5_locks(monkeypatch, kwarg_supported=True):
    """h5py.File as on a file system where HDF5's file lock fails (Lustre noflock, NFS without lockd):
    a read-only open that would lock raises ENOLCK, as HDF5's 'unable to lock file' does."""
    real = h5py.File
    refused = []

    def file(name, mode="r", *a, **kw):
        if "locking" in kw and not kwarg_supported:
            raise ValueError("HDF5 version >= 1.12.1 or 1.10.x >= 1.10.7 required for file locking options.")
        if (isinstance(name, (str, os.PathLike)) and mode == "r" and kw.get("locking") is not False
                and os.environ.get("HDF5_USE_FILE_LOCKING") != "FALSE"):  # a file object has no lock to take
            refused.append(str(name))
            raise OSError(errno.ENOLCK, f"Unable to synchronously open file (unable to lock file, errno = 37, "
                                        f"error message = 'No locks available') {name}")
        return real(name, mode, *a, **kw)

    monkeypatch.setattr(h5py, "File", file)
    monkeypatch.setattr(M, "_LOCKING_KW", None)
    return refused


# --------------------------------------------------------------------------- HDF5 without file locking

@pytest.mark.parametrize("kwarg_supported", [True, False], ids=["locking=False", "HDF5_USE_FILE_LOCKING"])
def test_shards_are_read_where_hdf5_file_locking_fails(prepared, monkeypatch, kwarg_supported):
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    refused = _without_hdf5_locks(monkeypatch, kwarg_supported)
    f = prepared / "train" / "shard-00000-of-00012.h5"
    with pytest.raises(OSError, match="unable to lock file"):
        h5py.File(f, "r")  # the patch bites: a plain open fails
    tr = D.SplitData(prepared, "train")
    idx = np.array([35, 0, 17, 4, 4, 22])
    assert list(_decode(tr.read(idx))) == list(idx)
    batches = list(D.eval_dataset(tr, batch_size=8, autotune="off"))
    got = np.concatenate([_decode(np.asarray(x)[..., 0].round()) for x, _ in batches])
    assert list(got) == list(range(36))
    assert M.verify_manifest(prepared)["shards"] == 15  # verify reads the same way
    assert M._LOCKING_KW is kwarg_supported
    assert "HDF5_USE_FILE_LOCKING" not in os.environ  # set for each open only, then restored
    assert refused == [str(f)]
    with h5py.File(prepared / "w.h5", "w") as h:  # writes are untouched
        h["x"] = 1


# --------------------------------------------------------------------------- a bounded number of open shards

def test_open_shards_are_bounded_and_each_is_checked_once(prepared, monkeypatch):
    checked = []
    real_check = D.check_shard
    monkeypatch.setattr(D, "check_shard",
                        lambda h, entry, *a: (checked.append(entry["file"]), real_check(h, entry, *a)))
    tr = D.SplitData(prepared, "train", max_open=4)
    assert len(tr.files) == 12 and tr.opens == 12 and tr.peak_open == 4  # labels read once from each shard
    rng = np.random.default_rng(0)
    for _ in range(3):  # three epochs of random batches over all 12 shards
        for b in rng.permutation(36).reshape(-1, 6):
            assert list(_decode(tr.read(b))) == list(b)
            assert len(tr._handles) <= 4
    meta = tr.metadata()
    assert list(meta["image_index"][:2]) == ["00000000_000.png", "00000001_000.png"]
    assert tr.peak_open == 4 and tr.opens > 24  # reopened after the LRU closed them
    assert sorted(checked) == sorted(e["file"] for e in tr.entries)  # once per shard, never on a reopen
    tr.close()
    assert not tr._handles and D.MAX_OPEN_SHARDS == 64
    assert D.SplitData(prepared, "train").peak_open == 12  # under the default bound: all stay open


# --------------------------------------------------------------------------- prep.stage_to

def test_stage_to_changes_no_stage_hash():
    base = load_config(None, [])
    staged = load_config(None, ["prep.stage_to=$TMPDIR/cxr"])
    assert staged.prep.stage_to == "$TMPDIR/cxr"
    assert (prep_hash(staged), train_hash(staged), eval_hash(staged)) == (prep_hash(base), train_hash(base),
                                                                           eval_hash(base))
    assert prep_hash(load_config(None, ["prep.shard_size=7"])) != prep_hash(base)  # a content key still counts


def _garble(path: Path, at: int = 2048):
    time.sleep(0.05)  # later than the copy, as between two runs (file times have a clock tick's resolution)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xa5" * 64)


def test_staged_copies_are_made_once_reused_and_read(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path / "node"))
    tr = D.SplitData(prepared, "train", stage_to="$NODE_SCRATCH/stage")
    folder = Path(tr.staged["folder"])
    assert folder.parent == tmp_path / "node" / "stage" and folder.name.startswith("cxr-t-")
    assert (tr.staged["shards"], tr.staged["copied"], tr.staged["reused"]) == (12, 12, 0)
    assert all(f.is_relative_to(folder) for f in tr.files)
    inodes = [f.stat().st_ino for f in tr.files]
    for e in tr.entries:  # the sources garbled after staging: reads come from the copies
        _garble(prepared / e["file"])
    again = D.SplitData(prepared, "train", stage_to="$NODE_SCRATCH/stage")
    assert (again.staged["copied"], again.staged["reused"]) == (0, 12)
    assert [f.stat().st_ino for f in again.files] == inodes
    assert list(_decode(again.read(np.arange(36)))) == list(range(36))
    assert sorted(p.name for p in folder.iterdir()) == [".stage-lock", ".staged.json", "train"]


def test_a_damaged_staged_copy_is_copied_again(prepared, tmp_path, caplog_cxr):
    D.SplitData(prepared, "val", stage_to=str(tmp_path / "node"))
    folder = ST.stage_folder(str(tmp_path / "node"), M.load_manifest(prepared))
    _garble(folder / "val" / "shard-00001-of-00002.h5")
    va = D.SplitData(prepared, "val", stage_to=str(tmp_path / "node"))
    assert (va.staged["copied"], va.staged["reused"], va.staged["recopied"]) == (1, 1, 1)
    assert sha256_file(va.files[1]) == va.entries[1]["sha256"]
    assert list(_decode(va.read(np.arange(8)))) == list(range(36, 44))
    assert any("shard-00001-of-00002.h5 differs from the manifest" in m for m in caplog_cxr)
    assert any(m.startswith("val: staged 2 shards (") and "(1 reused, 1 damaged copies made again)" in m
               for m in caplog_cxr), caplog_cxr


def test_a_copy_damaged_in_transit_is_made_again_once_then_refused(prepared, tmp_path, monkeypatch):
    real_copy, calls = ST._copy, []

    def flaky(src, dst):  # the first copy of each file arrives damaged
        real_copy(src, dst)
        calls.append(dst.name)
        if calls.count(dst.name) == 1:
            _garble(dst)

    monkeypatch.setattr(ST, "_copy", flaky)
    te = D.SplitData(prepared, "test", stage_to=str(tmp_path / "node"))
    assert te.staged["copied"] == 1 and calls == ["shard-00000-of-00001.h5"] * 2
    assert sha256_file(te.files[0]) == te.entries[0]["sha256"]
    _garble(prepared / "val" / "shard-00000-of-00002.h5")  # a damaged source: every copy differs
    with pytest.raises(ST.StageError) as e:
        D.SplitData(prepared, "val", stage_to=str(tmp_path / "node"))
    msg = str(e.value)
    assert "\n" not in msg and "val/shard-00000-of-00002.h5 differs from the manifest's sha256 twice" in msg
    assert "data_prep verify" in msg
    assert not (Path(te.staged["folder"]) / "val" / "shard-00000-of-00002.h5").exists()


def test_a_damaged_copy_of_a_damaged_source_is_copied_once_then_refused(prepared, tmp_path, monkeypatch):
    D.SplitData(prepared, "val", stage_to=str(tmp_path / "node"))
    folder = ST.stage_folder(str(tmp_path / "node"), M.load_manifest(prepared))
    _garble(folder / "val" / "shard-00000-of-00002.h5")
    _garble(prepared / "val" / "shard-00000-of-00002.h5")
    real_copy, calls = ST._copy, []
    monkeypatch.setattr(ST, "_copy", lambda src, dst: (calls.append(dst.name), real_copy(src, dst)))
    with pytest.raises(ST.StageError, match=r"val/shard-00000-of-00002.h5 differs from the manifest's sha256 again "):
        D.SplitData(prepared, "val", stage_to=str(tmp_path / "node"))
    assert calls == ["shard-00000-of-00002.h5"]  # made again once
    assert not (folder / "val" / "shard-00000-of-00002.h5").exists()


def test_stage_to_bad_input_is_one_line(prepared, monkeypatch, tmp_path):
    monkeypatch.delenv("CXR_NO_SUCH_SCRATCH", raising=False)
    with pytest.raises(ST.StageError,
                       match=r"prep.stage_to '\$CXR_NO_SUCH_SCRATCH/x': \$CXR_NO_SUCH_SCRATCH is not set"):
        D.SplitData(prepared, "test", stage_to="$CXR_NO_SUCH_SCRATCH/x")
    m = json.loads((prepared / "manifest.json").read_text())
    m["splits"]["test"]["shards"][0]["sha256"] = "x"
    with pytest.raises(ST.StageError, match="has no sha256 for shard test/shard-00000-of-00001.h5; rerun prep"):
        D.SplitData(prepared, "test", manifest=m, stage_to=str(tmp_path / "node"))


@pytest.fixture()
def caplog_cxr(cxr_log):
    return cxr_log(logging.INFO)


# --------------------------------------------------------------------------- training: both at once

TRAIN = """
import errno, os, sys, h5py
real = h5py.File
def file(name, mode="r", *a, **kw):  # HDF5's file lock unavailable (Lustre noflock, NFS without lockd)
    if (isinstance(name, (str, os.PathLike)) and mode == "r" and kw.get("locking") is not False
            and os.environ.get("HDF5_USE_FILE_LOCKING") != "FALSE"):  # (Keras reads a .keras zip's weights as a file object)
        raise OSError(errno.ENOLCK, "unable to lock file, errno = 37, error message = 'No locks available'")
    return real(name, mode, *a, **kw)
h5py.File = file
try:
    h5py.File(sys.argv[1], "r")
    sys.exit("the patch does not bite")
except OSError:
    pass
from distributed.train import main
sys.exit(main(sys.argv[2:]))
"""  # noqa: E501 - the text of a program run as is


def test_training_passes_stage_to_and_reads_without_hdf5_locks(tmp_path):
    """A tiny training (1 process, tiny backbone, 2 steps per epoch) with prep.stage_to and HDF5's
    file locking unavailable: it stages train and val, and trains from the copies."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CXR_NO_HOROVOD="1", TF_CPP_MIN_LOG_LEVEL="2")
    synth = subprocess.run([sys.executable, "-m", "data_prep.synthetic", "--out", str(tmp_path / "data"), "--patients",
                            "30", "--image-size", "32", "--seed", "3", "--no-progress"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert synth.returncode == 0, synth.stderr[-2000:]
    sets = [f"data.csv={tmp_path / 'data' / 'Data_Entry_2017.csv'}", f"data.images={tmp_path / 'data'}",
            "data.image_size=32", f"prep.out={tmp_path / 'prepared'}", "prep.shard_size=16",
            "model.backbone=tiny", "model.weights=none", "model.dense_units=8", "train.batch_size=4",
            "train.steps_per_epoch=2", "train.warmup.epochs=1", "train.finetune.epochs=1",
            f"run.dir={tmp_path / 'run'}", f"prep.stage_to={tmp_path / 'node'}"]
    (tmp_path / "c.yaml").write_text("{}\n")
    args = ["--config", str(tmp_path / "c.yaml"), *(a for s in sets for a in ("--set", s))]
    prep = subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    m = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    shard = tmp_path / "prepared" / m["splits"]["train"]["shards"][0]["file"]
    p = subprocess.run([sys.executable, "-c", TRAIN, str(shard), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    n_train, n_val = (len([s for s in m["splits"][k]["shards"] if s["count"]]) for k in ("train", "val"))
    assert f"train: staged {n_train} shards (" in p.stderr and f"val: staged {n_val} shards (" in p.stderr, p.stderr
    assert "one writer by flock" in p.stderr
    (folder,) = (tmp_path / "node").iterdir()
    staged = json.loads((folder / ".staged.json").read_text())["files"]
    assert len(staged) == n_train + n_val and (tmp_path / "run" / "model.keras").is_file()
