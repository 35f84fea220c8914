"""tf.data input from contract-shaped HDF5 shards, and the in-graph augmentation.

Shards are written here directly per ARCHITECTURE.md, with every image's index encoded in its
pixels, so the test can tell exactly which images each rank read.
"""
import json
import math
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data_prep.config import SHARD_FORMAT, load_config  # noqa: E402
from distributed import data as D  # noqa: E402

S = 16


def _encode(i: int) -> np.ndarray:
    img = np.full((S, S), 128, np.uint8)
    img[:, : S // 2] = i % 256
    img[:, S // 2:] = i // 256
    return img


def _decode(batch) -> np.ndarray:
    b = np.asarray(batch)
    if b.ndim == 4:
        b = b[..., 0]
    b = np.rint(b).astype(np.int64)
    return b[:, 0, 0] + 256 * b[:, 0, -1]


def _write_prepared(root: Path, counts=(("train", (40, 40, 17)), ("val", (23,)), ("test", (5,)))):
    splits, offset = {}, 0
    for split, sizes in counts:
        (root / split).mkdir(parents=True, exist_ok=True)
        shards, total = [], 0
        for k, n in enumerate(sizes):
            f = f"{split}/shard-{k:05d}-of-{len(sizes):05d}.h5"
            idx = np.arange(total, total + n)
            label = (idx % 3 == 0).astype(np.int64)
            with h5py.File(root / f, "w") as h:
                h.create_dataset("images", data=np.stack([_encode(i) for i in idx]), chunks=(1, S, S), fletcher32=True)
                h.create_dataset("label", data=label)
                h.create_dataset("targets", data=np.eye(2, dtype=np.uint8)[label])
                st = h5py.string_dtype()
                h.create_dataset("image_index",
                                 data=np.array([f"{offset + i:08d}_000.png" for i in idx], dtype=object), dtype=st)
                h.create_dataset("patient_id", data=idx // 2)
                h.create_dataset("view", data=np.array(["PA"] * n, dtype=object), dtype=st)
                h.create_dataset("age", data=np.full(n, 40, np.int16))
                h.create_dataset("sex", data=np.array(["F"] * n, dtype=object), dtype=st)
            shards.append({"file": f, "count": n, "sha256": "x"})
            total += n
        offset += total
        splits[split] = {"count": total, "label_counts": {}, "patients": total // 2, "shards": shards}
    manifest = {"format": SHARD_FORMAT, "config_hash": "t", "config": {}, "task": "binary",
                "classes": ["No Finding", "Infiltration"], "image_size": S, "splits": splits,
                "mean": 0.0, "std": 1.0, "skipped": [], "converted": []}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return _write_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def aug():
    return load_config(None, []).train.augment


def test_split_reads_images_in_requested_order(prepared):
    tr = D.load_split(prepared, "train")
    assert (tr.n, tr.num_classes, tr.image_size) == (97, 2, S)
    idx = [96, 3, 45, 3, 0, 80, 41]  # across shards, unsorted, with a repeat
    assert list(_decode(tr.read(idx))) == idx
    cached = D.load_split(prepared, "train", cache=True)
    np.testing.assert_array_equal(cached.read(idx), tr.read(idx))
    meta = tr.metadata()
    assert meta["image_index"][45] == "00000045_000.png" and meta["patient_id"][45] == "22"  # str since format 4
    np.testing.assert_array_equal(tr.targets[:, 1], (np.arange(97) % 3 == 0))


def test_epoch_indices_disjoint_per_rank_and_reshuffled():
    n, b, size, steps = 97, 8, 3, D.steps_per_epoch(97, 8, 3)
    assert steps == 4
    parts = [D.epoch_indices(n, b, r, size, seed=7, epoch=2, steps=steps) for r in range(size)]
    flat = np.concatenate([p.ravel() for p in parts])
    assert len(flat) == len(set(flat)) == steps * b * size
    np.testing.assert_array_equal(parts[1], D.epoch_indices(n, b, 1, size, seed=7, epoch=2, steps=steps))
    assert not np.array_equal(parts[0], D.epoch_indices(n, b, 0, size, seed=7, epoch=3, steps=steps))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        D.steps_per_epoch(10, 8, 2)
    assert D.steps_per_epoch(97, 8, 1, cap=3) == 3


def test_train_dataset_ranks_read_disjoint_parts_each_epoch(prepared, aug):
    tr = D.load_split(prepared, "train")
    size, b = 2, 8
    steps = D.steps_per_epoch(tr.n, b, size)
    seen = {}
    for r in range(size):
        ds = D.train_dataset(tr, batch_size=b, rank=r, size=size, seed=3, start_epoch=0, steps=steps,
                             augment=replace(aug, enabled=False))
        it = iter(ds)
        for epoch in range(2):
            ids = []
            for _ in range(steps):
                x, y = next(it)
                assert x.shape == (b, S, S, 1) and x.dtype == tf.float32 and y.shape == (b, 2)
                got = _decode(x)
                np.testing.assert_array_equal(y.numpy()[:, 1], got % 3 == 0)  # targets travel with images
                ids.append(got)
            seen[r, epoch] = np.concatenate(ids)
            np.testing.assert_array_equal(
                seen[r, epoch], D.epoch_indices(tr.n, b, r, size, 3, epoch, steps).ravel())
    for epoch in range(2):
        assert not set(seen[0, epoch]) & set(seen[1, epoch])
    assert set(seen[0, 0]) != set(seen[0, 1])  # reshuffled between epochs


def test_train_dataset_resumes_exactly_with_augmentation(prepared, aug):
    tr = D.load_split(prepared, "train")
    kw = dict(batch_size=8, rank=1, size=2, seed=5, steps=3, augment=aug)
    full = iter(D.train_dataset(tr, start_epoch=0, **kw))
    batches = [next(full)[0].numpy() for _ in range(6)]
    resumed = next(iter(D.train_dataset(tr, start_epoch=1, **kw)))[0].numpy()
    np.testing.assert_array_equal(resumed, batches[3])
    assert not np.array_equal(batches[0], batches[3])


def test_eval_dataset_shards_cover_split_once(prepared):
    va = D.load_split(prepared, "val")
    ids, imgs = [], []
    for r in range(3):
        for x, _y, i in D.eval_dataset(va, batch_size=4, rank=r, size=3, with_index=True):
            ids.append(i.numpy())
            imgs.append(_decode(x))
    ids, imgs = np.concatenate(ids), np.concatenate(imgs)
    assert sorted(ids) == list(range(23))
    np.testing.assert_array_equal(ids, imgs)


def test_autotune_rule_is_off_for_evaluation_on_one_cpu_only():
    assert D.autotune_enabled("auto", cpus=1, finite=True) is False   # validation on a rank bound to one core
    assert D.autotune_enabled("auto", cpus=1, finite=False) is True   # training keeps it (faster steps)
    assert D.autotune_enabled("auto", cpus=2, finite=True) is True
    assert D.autotune_enabled("auto", cpus=56, finite=True) is True
    assert D.autotune_enabled("on", cpus=1, finite=True) is True      # the config wins
    assert D.autotune_enabled("off", cpus=56) is False
    with pytest.raises(ValueError, match="runtime.data_autotune"):
        D.autotune_enabled("maybe")
    assert D.available_cpus() == len(__import__("os").sched_getaffinity(0))


def test_auto_follows_this_process_affinity(prepared):
    """eval_dataset with ``auto`` reads the process's CPUs: bound to one, autotuning is off."""
    import os

    va = D.load_split(prepared, "val")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        one = D.eval_dataset(va, batch_size=4)
        train = D.train_dataset(D.load_split(prepared, "train"), batch_size=8, steps=2)
    finally:
        os.sched_setaffinity(0, before)
    assert one.options().autotune.enabled is False
    assert train.options().autotune.enabled is True
    assert D.eval_dataset(va, batch_size=4).options().autotune.enabled is (len(before) > 1)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_pipelines_carry_the_autotune_setting(prepared, aug, setting):
    tr, va = D.load_split(prepared, "train"), D.load_split(prepared, "val")
    made = [D.train_dataset(tr, batch_size=8, steps=2, augment=aug, autotune=setting),
            D.eval_dataset(va, batch_size=4, autotune=setting, data_threads=2)]
    for ds in made:
        opts = ds.options()
        assert opts.autotune.enabled is (setting == "on")
        assert opts.deterministic is True
    assert made[1].options().threading.private_threadpool_size == 2


def test_autotune_off_reads_the_same_batches(prepared, aug):
    """Only parallelism changes with the setting: same images, same augmentation, same order."""
    tr = D.load_split(prepared, "train")
    kw = dict(batch_size=8, rank=1, size=2, seed=5, steps=3, augment=aug)
    on, off = (iter(D.train_dataset(tr, autotune=a, **kw)) for a in ("on", "off"))
    for _ in range(4):
        (xa, ya), (xb, yb) = next(on), next(off)
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_random_transforms_respect_the_ranges_in_degrees(aug):
    a = replace(aug, horizontal_flip=False, width_shift=0.0, height_shift=0.0, zoom=0.0, shear=0.0)
    t = D.random_transforms(2000, 64, 64, a, seed=[1, 2]).numpy()
    theta = np.degrees(np.arctan2(t[:, 3], t[:, 0]))
    assert np.abs(theta).max() <= 5.0 + 1e-4 and np.abs(theta).max() > 4.5  # up to 5 degrees, not radians
    z = replace(a, rotation=0.0, zoom=0.1)
    t = D.random_transforms(2000, 64, 64, z, seed=[3, 4]).numpy()
    assert 0.9 - 1e-6 <= t[:, 0].min() < 0.91 and 1.09 < t[:, 0].max() <= 1.1 + 1e-6
    assert not np.allclose(t[:, 0], t[:, 4])  # x and y zoom drawn independently
    sh = replace(a, rotation=0.0, shear=0.01)  # the article's value: degrees, so almost nothing
    t = D.random_transforms(2000, 64, 64, sh, seed=[5, 6]).numpy()
    assert np.abs(t[:, 1]).max() <= math.sin(math.radians(0.01)) + 1e-7
    s = replace(a, rotation=0.0, width_shift=0.15, height_shift=0.15)
    t = D.random_transforms(2000, 64, 64, s, seed=[7, 8]).numpy()
    assert np.abs(t[:, 2]).max() <= 0.15 * 64 + 1e-4 and np.abs(t[:, 2]).max() > 0.13 * 64
    assert np.abs(t[:, 5]).max() <= 0.15 * 64 + 1e-4


def test_augment_identity_flip_and_nearest_fill(aug):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (6, 20, 24, 1)).astype(np.float32)
    none = replace(aug, horizontal_flip=False, width_shift=0.0, height_shift=0.0, rotation=0.0, shear=0.0, zoom=0.0)
    np.testing.assert_allclose(D.augment_images(x, none, seed=[1, 1]).numpy(), x, atol=1e-4)
    flip = D.augment_images(x, replace(none, horizontal_flip=True), seed=[2, 2]).numpy()
    flipped = [np.allclose(flip[k], x[k][:, ::-1], atol=1e-4) for k in range(6)]
    kept = [np.allclose(flip[k], x[k], atol=1e-4) for k in range(6)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    # a big shift fills with the nearest edge pixels, never with zeros
    shifted = D.augment_images(x + 10.0, replace(none, width_shift=0.5, height_shift=0.5), seed=[3, 3]).numpy()
    assert shifted.min() >= 10.0 - 1e-3
    # one image (H, W, C) and a random (unseeded) draw work too (test-time augmentation)
    assert D.augment_images(x[0], aug).shape == (20, 24, 1)


def test_augment_is_reproducible_with_a_seed_and_differs_per_image(aug):
    x = np.repeat(np.random.default_rng(1).uniform(0, 255, (1, 32, 32, 1)).astype(np.float32), 4, axis=0)
    a = D.augment_images(x, aug, seed=[9, 9]).numpy()
    np.testing.assert_array_equal(a, D.augment_images(x, aug, seed=[9, 9]).numpy())
    assert not np.allclose(a[0], a[1])  # one transform per image


def test_random_dataset_shapes():
    x, y = next(iter(D.random_dataset(batch_size=4, image_size=S, num_classes=2)))
    assert x.shape == (4, S, S, 1) and y.shape == (4, 2)
