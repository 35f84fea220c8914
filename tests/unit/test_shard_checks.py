"""A shard is checked against its manifest entry when opened, before any data is read; manifest paths
stay inside prep.out."""
import json

import h5py
import numpy as np
import pytest

from data_prep.config import SHARD_FORMAT
from data_prep.manifest import ManifestError, check_shard, load_manifest

S = 8


def _shard(path, n=4, fletcher32=True, dtype=np.uint8, size=S):
    with h5py.File(path, "w") as h:
        h.create_dataset("images", data=np.zeros((n, size, size), dtype), chunks=(1, size, size), fletcher32=fletcher32)
        for name, dt in (("label", np.int64), ("patient_id", np.int64), ("age", np.int16)):
            h.create_dataset(name, data=np.zeros(n, dt))
        h.create_dataset("targets", data=np.zeros((n, 2), np.uint8))
        for name in ("image_index", "view", "sex"):
            h.create_dataset(name, data=np.array(["x"] * n, dtype=object), dtype=h5py.string_dtype())


@pytest.mark.parametrize("kwargs, entry_count, why", [
    ({}, 5, "images are uint8 (4, 8, 8), the manifest says uint8 (5, 8, 8)"),
    ({"dtype": np.uint16}, 4, "images are uint16"),
    ({"size": 16}, 4, "(4, 16, 16)"),
    ({"fletcher32": False}, 4, "no Fletcher-32 checksums"),
])
def test_a_mismatched_shard_is_named_with_the_fix(tmp_path, kwargs, entry_count, why):
    _shard(tmp_path / "s.h5", **kwargs)
    with h5py.File(tmp_path / "s.h5", "r") as h, pytest.raises(ManifestError) as e:
        check_shard(h, {"file": "s.h5", "count": entry_count}, {"image_size": S}, tmp_path / "s.h5")
    msg = str(e.value)
    assert why in msg and str(tmp_path / "s.h5") in msg and "--overwrite" in msg and "verify" in msg


def test_a_good_shard_passes(tmp_path):
    _shard(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r") as h:
        check_shard(h, {"file": "s.h5", "count": 4}, {"image_size": S}, "s.h5")


@pytest.mark.parametrize("rel", ["../outside.h5", "/etc/passwd", "train/../../outside.h5", "link.h5"])
def test_manifest_paths_must_stay_inside_prep_out(tmp_path, rel):
    out = tmp_path / "prepared"
    (out / "train").mkdir(parents=True)
    _shard(tmp_path / "outside.h5")
    (out / "link.h5").symlink_to(tmp_path / "outside.h5")
    split = {"count": 4, "label_counts": {}, "shards": [{"file": rel, "count": 4, "sha256": "x"}]}
    empty = {"count": 0, "label_counts": {}, "shards": []}
    (out / "manifest.json").write_text(json.dumps({
        "format": SHARD_FORMAT, "config_hash": "h", "task": "binary", "classes": ["a", "b"], "image_size": S,
        "splits": {"train": split, "val": empty, "test": empty}, "mean": 0, "std": 1, "skipped": [], "converted": []}))
    with pytest.raises(ManifestError, match="relative path inside|outside"):
        load_manifest(out)
