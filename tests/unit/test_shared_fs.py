"""Reading shards as shared file systems at HPC sites allow it: HDF5 opens without file locking,
a bounded number of open shards.

Shards are written here per ARCHITECTURE.md with every image's index in its pixels, and a manifest
carrying their real sha256, so a test can tell which images were read and from which copy.
"""
import errno
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data_prep import manifest as M  # noqa: E402
from data_prep.config import SHARD_FORMAT  # noqa: E402
from data_prep.fsutil import sha256_file  # noqa: E402
from distributed import data as D  # noqa: E402

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
                h.create_dataset("image_index", data=np.array([f"{i:08d}_000.png" for i in idx], dtype=object), dtype=st)
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
    monkeypatch.setattr(D, "check_shard", lambda h, entry, *a: (checked.append(entry["file"]), real_check(h, entry, *a)))
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
