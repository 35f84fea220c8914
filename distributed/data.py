"""tf.data input from the prep stage's HDF5 shards, and the in-graph augmentation.

* :class:`SplitData` reads one split: labels and metadata in memory, images on demand with h5py
  (a batch's indices sorted and read shard by shard), or all of them in memory (``cache``). Shards
  open lazily, without HDF5 file locking, at most :data:`MAX_OPEN_SHARDS` at once (LRU); with
  ``prep.stage_to`` from node-local copies (``data_prep.stage``).
* Training: every epoch ``e`` a permutation of the whole training split seeded by
  ``(seed, e)`` is cut into ``size`` disjoint, equal parts; rank ``r`` reads part ``r`` in
  batches (:func:`epoch_indices`). Every rank takes the same number of steps, as Horovod's
  allreduce needs. The epoch number travels in the pipeline, so a resumed run reads exactly
  what the uninterrupted run would have read.
* Augmentation (:func:`augment_images`): one random affine transform per image, drawn as the
  article's Keras ``ImageDataGenerator`` draws it (flip, shifts, rotation and shear in degrees,
  independent x/y zoom, nearest fill), applied in one ``ImageProjectiveTransformV3`` call per
  batch inside ``Dataset.map`` (parallel, no Python per image). Seeds are stateless, per
  (seed, rank, epoch, batch). The evaluator reuses it for test-time augmentation.
* Images leave the pipeline as (B, S, S, 1) float32 in [0, 255]: gray-to-RGB and the backbone's
  preprocessing live inside the model.
* Parallelism (:func:`map_and_prefetch`, the one place every pipeline here and in ``benchmarks``
  gets its map/prefetch/options): tf.data's autotuning, except for the finite evaluation
  pipelines of a rank that may run on one CPU only (``runtime.data_autotune: auto``). There the
  autotuner's model thread sleeps through ever longer optimisation periods and each iterator's
  teardown waits for it to wake: seconds idle at the end of every validation pass, none with
  autotuning off. Training keeps it: its steps are slower without it (BENCHMARKS.md), which costs
  more than one wait per phase. Off: ``data_threads`` (or the process's CPUs) map calls and a
  prefetch buffer of 2.

No Horovod here: rank and size are arguments.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import tensorflow as tf

from data_prep.cli import deferred
from data_prep.log import get_logger
from data_prep.manifest import check_shard, damaged, load_manifest, open_shard_read

__all__ = ["SplitData", "load_split", "steps_per_epoch", "epoch_indices", "shard_indices",
           "random_transforms", "augment_images", "train_dataset", "eval_dataset", "random_dataset",
           "autotune_enabled", "map_and_prefetch", "available_cpus"]

AUTOTUNE = tf.data.AUTOTUNE
_SEED_MIX = np.int64(1_000_003)


MAX_OPEN_SHARDS = 64  # shard files one SplitData keeps open at most (least recently used closed first)
MASKED = 255  # a masked label in the uint8 targets fed to the model; -1 once cast (distributed.model.masked_loss)


class SplitData:
    """One split of ``<prep.out>``: shards, targets and metadata (in memory), images on demand.

    Shards are opened when first read, without HDF5's file locking (``open_shard_read``), and at most
    ``max_open`` (:data:`MAX_OPEN_SHARDS`) stay open: the least recently used is closed, and opened
    again when needed. Each shard is checked against the manifest (``check_shard``) at its first open
    only. ``opens`` counts the opens, ``peak_open`` the most handles open at once. ``stage_to``
    (``prep.stage_to``): read node-local copies of the shards (``data_prep.stage``)."""

    def __init__(self, prep_out, split: str, manifest: dict | None = None, cache: bool = False,
                 stage_to: str = "", max_open: int | None = None):
        self.prep_out = Path(prep_out)
        self.split = split
        self.manifest = manifest or load_manifest(self.prep_out)
        m = self.manifest
        self.task = m["task"]
        self.multilabel = self.task == "multilabel"
        self.classes = list(m["classes"])
        self.image_size = int(m["image_size"])
        shards = self.entries = [s for s in m["splits"][split]["shards"] if int(s["count"]) > 0]
        self.files = [self.prep_out / s["file"] for s in shards]
        self.staged: dict | None = None
        if stage_to and shards:
            from data_prep.stage import stage

            self.files, self.staged = stage(self.prep_out, shards, m, stage_to, label=split)
        self.counts = np.array([int(s["count"]) for s in shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.cache = cache
        self.max_open = int(max_open or MAX_OPEN_SHARDS)
        self._handles: OrderedDict[int, object] = OrderedDict()  # least recently used first
        self._checked: set[int] = set()
        self._lock = threading.RLock()  # a handle is not closed while another thread reads it
        self.opens = 0
        self.peak_open = 0
        self._images: np.ndarray | None = None
        self._meta: dict | None = None
        targets, labels, masks = [], [], []
        for i in range(len(self.files)):
            with self._lock:
                h = self._file(i)
                targets.append(np.asarray(h["targets"][:], dtype=np.uint8))
                labels.append(np.asarray(h["label"][:], dtype=np.int64))
                masks.append(np.asarray(h["mask"][:], dtype=np.uint8) if "mask" in h else np.ones_like(targets[-1]))
        k = len(self.classes) if self.multilabel else max(2, len(self.classes))
        self.targets = np.concatenate(targets) if targets else np.zeros((0, k), np.uint8)
        self.labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
        self.mask = np.concatenate(masks) if masks else np.ones_like(self.targets)
        # labels masked out of the loss (data.uncertain: ignore, blank labels): MASKED in what the model is fed
        self.masked = bool((self.mask == 0).any())
        self.fed_targets = np.where(self.mask > 0, self.targets, MASKED).astype(np.uint8) if self.masked \
            else self.targets
        self.num_classes = int(self.targets.shape[1]) if self.targets.ndim == 2 and self.n else k

    def __len__(self):
        return self.n

    def _file(self, i: int):
        """Shard ``i``'s open file; call with ``self._lock`` held while using it."""
        h = self._handles.get(i)
        if h is not None:
            self._handles.move_to_end(i)
            return h
        while len(self._handles) >= self.max_open:
            _, old = self._handles.popitem(last=False)
            old.close()
        try:
            h = open_shard_read(self.files[i])
        except OSError as e:
            raise deferred(damaged(self.files[i], e)) from None
        self.opens += 1
        if i not in self._checked:  # once per shard: shapes, dtypes, counts, checksums on
            try:
                check_shard(h, self.entries[i], self.manifest, self.files[i])
            except OSError as e:
                h.close()
                raise deferred(damaged(self.files[i], e)) from None
            except BaseException:
                h.close()
                raise
            self._checked.add(i)
        self._handles[i] = h
        self.peak_open = max(self.peak_open, len(self._handles))
        return h

    def close(self):
        with self._lock:
            for h in self._handles.values():
                try:
                    h.close()
                except Exception:  # noqa: BLE001
                    pass
            self._handles.clear()

    def load_all(self) -> np.ndarray:
        """Every image of the split in memory (uint8 (N, S, S)), read shard by shard, once."""
        if self._images is None:
            S = self.image_size
            out = np.empty((self.n, S, S), dtype=np.uint8)
            for i in range(len(self.files)):
                try:  # Fletcher-32: a damaged chunk is an OSError here
                    with self._lock:
                        self._file(i)["images"].read_direct(out, dest_sel=np.s_[self.offsets[i]:self.offsets[i + 1]])
                except OSError as e:
                    raise deferred(damaged(self.files[i], e)) from None
            self._images = out
            get_logger().info("%s: %d images (%.0f MB) cached in memory", self.split, self.n, out.nbytes / 2**20)
        return self._images

    def read(self, indices) -> np.ndarray:
        """Images (uint8 (k, S, S)) at global ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.cache:
            return self.load_all()[indices]
        S = self.image_size
        out = np.empty((len(indices), S, S), dtype=np.uint8)
        order = np.argsort(indices, kind="stable")
        sidx = indices[order]
        shard = np.searchsorted(self.offsets, sidx, side="right") - 1
        for s in np.unique(shard):
            sel = shard == s
            local = sidx[sel] - self.offsets[s]
            uniq, inv = np.unique(local, return_inverse=True)  # h5py wants increasing, unique indices
            try:  # Fletcher-32: a damaged chunk is an OSError here (inside tf.data: deferred, see data_prep.cli)
                with self._lock:
                    images = self._file(int(s))["images"]
                    block = images[uniq] if len(uniq) > 1 else images[int(uniq[0])][None]
            except OSError as e:
                raise deferred(damaged(self.files[int(s)], e)) from None
            out[order[sel]] = block[inv]
        return out

    def metadata(self) -> dict:
        """Per-image columns in split order: image_index, patient_id (str), view, age, sex, findings (the image's
        positive findings joined by ``|``), label."""
        if self._meta is None:
            cols = {k: [] for k in ("image_index", "patient_id", "view", "age", "sex", "findings")}
            for i in range(len(self.files)):
                for k in cols:
                    with self._lock:
                        h = self._file(i)
                        v = h[k][:] if k in h else np.array([""] * int(self.counts[i]), dtype=object)
                    if v.dtype.kind in ("O", "S"):
                        v = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in v], dtype=object)
                    cols[k].append(v)
            self._meta = {k: (np.concatenate(v) if v else np.array([])) for k, v in cols.items()}
            self._meta["patient_id"] = np.array([str(x) for x in self._meta["patient_id"]], dtype=object)
            self._meta["label"] = self.labels
        return self._meta


def load_split(prep_out, split: str, cache: bool = False, manifest: dict | None = None,
               stage_to: str = "") -> SplitData:
    return SplitData(prep_out, split, manifest=manifest, cache=cache, stage_to=stage_to)


# --------------------------------------------------------------------------- which rank reads what

def steps_per_epoch(n: int, batch_size: int, size: int, cap: int = 0) -> int:
    """Full global batches in ``n`` images (the remainder is dropped, a different one each epoch)."""
    steps = n // (batch_size * size)
    if steps < 1:
        raise ValueError(f"the training split has {n} images, fewer than one global batch "
                         f"(train.batch_size {batch_size} x {size} rank(s)); lower the batch size or use fewer ranks")
    return min(steps, cap) if cap else steps


def epoch_indices(n: int, batch_size: int, rank: int, size: int, seed: int, epoch: int, steps: int) -> np.ndarray:
    """(steps, batch_size) indices rank ``rank`` reads in ``epoch``: its part of a permutation of
    range(n) seeded by (seed, epoch), the same permutation on every rank, disjoint parts."""
    perm = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
    per_rank = steps * batch_size
    if per_rank * size > n:
        raise ValueError(f"{steps} steps x {batch_size} x {size} ranks > {n} images")
    return perm[rank * per_rank:(rank + 1) * per_rank].reshape(steps, batch_size)


def shard_indices(n: int, rank: int, size: int) -> np.ndarray:
    """Evaluation sharding: rank ``r`` takes images r, r+size, ... (all images, once)."""
    return np.arange(rank, n, size, dtype=np.int64)


# --------------------------------------------------------------------------- augmentation

def _uniform(shape, lo, hi, seed):
    if seed is None:
        return tf.random.uniform(shape, lo, hi)
    return tf.random.stateless_uniform(shape, seed=seed, minval=lo, maxval=hi)


def random_transforms(batch: int | tf.Tensor, height: int, width: int, aug, seed=None) -> tf.Tensor:
    """(batch, 8) projective transforms (output -> input pixel) for ImageProjectiveTransformV3,
    one random affine per image, drawn like Keras' ImageDataGenerator with ``aug``
    (the config's ``train.augment``): horizontal flip, width/height shift as fractions of the
    size, rotation and shear in DEGREES, zoom x and y independently in [1-zoom, 1+zoom].
    ``seed``: a shape-[2] int tensor for stateless (reproducible) draws, or None."""
    seeds = [None] * 7 if seed is None else list(tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=7)))
    shape = tf.stack([batch])
    deg = math.pi / 180.0
    theta = _uniform(shape, -aug.rotation * deg, aug.rotation * deg, seeds[0]) if aug.rotation else tf.zeros(shape)
    shear = _uniform(shape, -aug.shear * deg, aug.shear * deg, seeds[1]) if aug.shear else tf.zeros(shape)
    zx = _uniform(shape, 1.0 - aug.zoom, 1.0 + aug.zoom, seeds[2]) if aug.zoom else tf.ones(shape)
    zy = _uniform(shape, 1.0 - aug.zoom, 1.0 + aug.zoom, seeds[3]) if aug.zoom else tf.ones(shape)
    tx = _uniform(shape, -aug.width_shift, aug.width_shift, seeds[4]) * width if aug.width_shift else tf.zeros(shape)
    ty = (_uniform(shape, -aug.height_shift, aug.height_shift, seeds[5]) * height if aug.height_shift
          else tf.zeros(shape))
    if aug.horizontal_flip:
        flip = _uniform(shape, 0.0, 1.0, seeds[6]) < 0.5
    else:
        flip = tf.zeros(shape, tf.bool)
    fs = tf.where(flip, -1.0, 1.0)                       # x -> (W-1) - x when flipped
    fo = tf.where(flip, float(width - 1), 0.0)
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    # A = rotation . shear . zoom about the centre: [[cos t zx, -sin(t+s) zy], [sin t zx, cos(t+s) zy]]
    a00, a01 = tf.cos(theta) * zx, -tf.sin(theta + shear) * zy
    a10, a11 = tf.sin(theta) * zx, tf.cos(theta + shear) * zy
    # input = A . (flip(out) - c) + c + shift
    off_x = a00 * (fo - cx) - a01 * cy + cx + tx
    off_y = a10 * (fo - cx) - a11 * cy + cy + ty
    zero = tf.zeros(shape)
    return tf.stack([a00 * fs, a01, off_x, a10 * fs, a11, off_y, zero, zero], axis=1)


def augment_images(images, aug, seed=None, interpolation: str = "BILINEAR") -> tf.Tensor:
    """Augment a batch (B, H, W, C) (or one image (H, W, C)) of float pixels with one random
    affine transform per image, nearest fill. Reusable for test-time augmentation:
    ``augment_images(x, cfg.train.augment)`` (random) or with ``seed=[a, b]`` (reproducible)."""
    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    if single:
        images = images[None]
    if images.dtype != tf.float32:
        images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    h, w = images.shape[1], images.shape[2]
    transforms = random_transforms(shape[0], h, w, aug, seed)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.stack([h, w]), fill_value=0.0,
        interpolation=interpolation, fill_mode="NEAREST")
    out.set_shape(images.shape)
    return out[0] if single else out


# --------------------------------------------------------------------------- datasets

def available_cpus() -> int:
    """CPUs this process may run on (its affinity: a rank bound by ``mpirun --bind-to core``
    sees its own cores only)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def autotune_enabled(setting: str = "auto", cpus: int | None = None, finite: bool = False) -> bool:
    """``runtime.data_autotune``: ``on``, ``off``, or ``auto`` = on, except for a ``finite``
    (evaluation) pipeline in a process that may run on one CPU only (the module docstring says why)."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"runtime.data_autotune must be auto, on or off, not {setting!r}")
    if setting != "auto":
        return setting == "on"
    return not finite or (available_cpus() if cpus is None else cpus) > 1


def _options(data_threads: int, autotune: bool = True) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    if data_threads:
        opts.threading.private_threadpool_size = data_threads
    opts.autotune.enabled = autotune
    return opts


def map_and_prefetch(ds: tf.data.Dataset, fn, data_threads: int = 0, autotune: str = "auto",
                     finite: bool = False) -> tf.data.Dataset:
    """``ds.map(fn)`` in parallel, then prefetch, with this project's options: deterministic order,
    ``data_threads`` (0 = tf.data's choice), ``autotune`` as :func:`autotune_enabled`."""
    on = autotune_enabled(autotune, finite=finite)
    calls = data_threads or (AUTOTUNE if on else available_cpus())
    ds = ds.map(fn, num_parallel_calls=calls)
    return ds.prefetch(AUTOTUNE if on else 2).with_options(_options(data_threads, on))


def fed(y):
    """uint8 targets as the model's float targets: a masked label (``MASKED``) becomes -1."""
    y = tf.cast(y, tf.float32)
    return tf.where(y > 1.5, -tf.ones_like(y), y)


def batch_preparer(augment, seed: int, rank: int = 0):
    """The training map: (epoch, batch, uint8 images (B,S,S), uint8 targets) -> (float32 images
    (B,S,S,1), float32 targets), augmented when ``augment`` is set (None or ``enabled: false``:
    not). The augmentation seed is stateless per (seed, rank, epoch, batch): the same draws after
    a resume."""
    augment = augment if (augment is not None and getattr(augment, "enabled", True)) else None

    def prepare(epoch, b, x, y):
        x = tf.cast(x, tf.float32)[..., None]
        if augment is not None:
            s = tf.stack([tf.constant(seed, tf.int64) * _SEED_MIX + rank, tf.cast(epoch, tf.int64) * _SEED_MIX + b])
            x = augment_images(x, augment, seed=s)
        return x, fed(y)

    return prepare


def train_dataset(data: SplitData, *, batch_size: int, rank: int = 0, size: int = 1, seed: int = 0,
                  start_epoch: int = 0, start_step: int = 0, steps: int | None = None, augment=None,
                  data_threads: int = 0, autotune: str = "auto", record: dict | None = None) -> tf.data.Dataset:
    """Infinite dataset of (images (B,S,S,1) float32, targets (B,K) float32): ``steps`` batches
    of epoch ``start_epoch`` (from its batch ``start_step``: a resumed epoch), then of the next
    epoch, ... Use with ``fit(steps_per_epoch=steps)`` (``steps - start_step`` for the first).
    ``augment``: the config's ``train.augment`` section (None or ``enabled: false``: none).
    ``record``: a dict that gets ``{(epoch, batch): SHA-1 of the batch's indices}`` as batches are read."""
    steps = steps or steps_per_epoch(data.n, batch_size, size)
    S, K = data.image_size, data.num_classes

    def batches(epoch):
        epoch = int(epoch)
        idx = epoch_indices(data.n, batch_size, rank, size, seed, epoch, steps)
        for b in range(start_step if epoch == start_epoch else 0, steps):
            if record is not None:
                record[(epoch, b)] = hashlib.sha1(np.ascontiguousarray(idx[b], dtype=np.int64).tobytes()).hexdigest()
            yield np.int64(b), data.read(idx[b]), data.fed_targets[idx[b]]

    spec = (tf.TensorSpec((), tf.int64), tf.TensorSpec((batch_size, S, S), tf.uint8),
            tf.TensorSpec((batch_size, K), tf.uint8))

    def one_epoch(epoch):
        ds = tf.data.Dataset.from_generator(batches, args=(epoch,), output_signature=spec)
        return ds.map(lambda b, x, y: (epoch, b, x, y))

    ds = tf.data.Dataset.counter(start_epoch).flat_map(one_epoch)
    return map_and_prefetch(ds, batch_preparer(augment, seed, rank), data_threads, autotune)


def eval_dataset(data: SplitData, *, batch_size: int, rank: int = 0, size: int = 1, with_index: bool = False,
                 augment=None, seed: int | None = None, data_threads: int = 0,
                 autotune: str = "auto") -> tf.data.Dataset:
    """Finite dataset over rank ``rank``'s share (:func:`shard_indices`) of the split:
    (images, targets) or, ``with_index``, (images, targets, global indices) so that gathered
    predictions can be put back in split order. ``augment`` for test-time augmentation
    (``seed`` makes it reproducible)."""
    idx = shard_indices(data.n, rank, size)
    S, K = data.image_size, data.num_classes
    nb = math.ceil(len(idx) / batch_size)

    def batches():
        for b in range(nb):
            sel = idx[b * batch_size:(b + 1) * batch_size]
            yield np.int64(b), data.read(sel), data.fed_targets[sel], sel

    spec = (tf.TensorSpec((), tf.int64), tf.TensorSpec((None, S, S), tf.uint8),
            tf.TensorSpec((None, K), tf.uint8), tf.TensorSpec((None,), tf.int64))

    def prepare(b, x, y, i):
        x = tf.cast(x, tf.float32)[..., None]
        if augment is not None:
            s = None if seed is None else tf.stack([tf.constant(seed, tf.int64) * _SEED_MIX + rank, b])
            x = augment_images(x, augment, seed=s)
        y = fed(y)
        return (x, y, i) if with_index else (x, y)

    ds = tf.data.Dataset.from_generator(batches, output_signature=spec)
    ds = ds.apply(tf.data.experimental.assert_cardinality(nb))
    return map_and_prefetch(ds, prepare, data_threads, autotune, finite=True)


def random_dataset(*, batch_size: int, image_size: int, num_classes: int, seed: int = 0,
                   batches: int = 8) -> tf.data.Dataset:
    """In-memory random tensors of the training pipeline's shapes, repeated forever: the
    baseline for measuring the input pipeline's overhead (benchmarks)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (batches, batch_size, image_size, image_size, 1)).astype(np.float32)
    y = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, (batches, batch_size))]
    return tf.data.Dataset.from_tensor_slices((x, y)).cache().repeat().prefetch(AUTOTUNE)
