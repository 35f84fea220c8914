"""The prep stage: NIH metadata + PNGs -> HDF5 shards + manifest.json, on one or many MPI ranks.

Flow (the same code with one process or under ``mpirun -np N``):

1. rank 0 plans: reads the CSV, finds the images, picks the task's rows, splits by patient,
   samples (balancing only in train) and cuts every split into shards of ``prep.shard_size``
   rows. The plan depends only on the config and the data, never on the number of ranks. Rank 0
   also checks what is already in ``prep.out`` (a different config is refused unless
   ``prep.overwrite``) and removes temporary files of killed runs. The plan is broadcast.
2. rank 0 hands out shards on request, largest first (a rank on a busier core simply does
   fewer; a shard's content never depends on which rank writes it). A shard is decoded with
   ``imaging.load_xray`` and written to a temporary file beside its final name, then renamed:
   a shard file that exists is complete.
   A rerun keeps every shard whose stored config hash matches and writes only the missing ones.
   Images that cannot be decoded are dropped from their shard and listed (``--strict``: error).
   A skipped image of a balanced training split is NOT replaced (it may have had resampled
   copies; all are dropped): the manifest's counts are always the real ones.
3. ranks send progress counts to rank 0 (one tqdm bar) and, at the end, per-shard results
   (count, sha256, label counts, patients, pixel sums). The training mean/std come from the
   pixel sums reduced over ranks (stored in each shard's attributes, so resumed shards are not
   re-decoded), as exact integers: identical for any number of ranks.
4. rank 0 writes ``manifest.json`` last and atomically, and ``config.yaml`` beside it. Its ``flow``
   (``data_prep.flow``) counts images and patients per class from the CSV rows to the written shards:
   the plan's steps, and the written images (each shard's planned rows but those it skipped).

mpi4py is imported only when the launcher says there is more than one rank.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from collections import deque
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep import config as cfgmod
from data_prep import datasets as ds
from data_prep import flow as fl
from data_prep import locks, testhooks
from data_prep import metadata as md
from data_prep.cli import UserError
from data_prep.datasets import patients
from data_prep.fsutil import atomic_write_bytes, atomic_write_json, sha256_file
from data_prep.imaging import ImageError, load_xray
from data_prep.log import env_size, get_logger
from data_prep.manifest import FORMAT_NOTES, conversion_counts, open_shard_read

FORMAT = cfgmod.SHARD_FORMAT
MANIFEST = "manifest.json"
_TAG_PROGRESS, _TAG_RESULT, _TAG_REQUEST, _TAG_ASSIGN = 11, 12, 13, 14
_POLL_S = 0.005
_WRITE_BATCH = 32
_LEVELS = np.arange(256, dtype=np.int64)
_LEVELS2 = _LEVELS * _LEVELS


class PrepError(UserError, RuntimeError):
    """The stage refuses or fails; the message says why and what to do.
    ``echo`` is True on ranks that only relay rank 0's error (the CLI does not log it twice)."""

    def __init__(self, msg: str, echo: bool = False):
        super().__init__(msg)
        self.echo = echo


def shard_name(index: int, of: int) -> str:
    return f"shard-{index:05d}-of-{of:05d}.h5"


# --------------------------------------------------------------------------- plan (rank 0)

def make_plan(cfg, log=None) -> dict:
    """Everything the ranks need, as plain picklable data. Deterministic for a config."""
    log = log or get_logger()
    t0 = time.perf_counter()
    d, p = cfg.data, cfg.prep
    classes = ds.task_classes(d)
    table = ds.read(d, p.limit)
    frame, issues = table.frame, table.issues
    log.info("metadata (%s): %d usable rows of %s (%d rows skipped, %d notes)", d.format, len(frame), d.csv,
             len(issues.skipped), len(issues.notes))
    names = fl.class_names(d.task, classes)
    positive = classes[1] if d.task == "binary" else d.positive_label

    def step(name, rows, split_name=None):
        cls = fl.row_classes(rows, d.task, classes, positive, d.negative_rule)
        return fl.count(name, rows["image"], rows["patient"], cls, names, split_name)
    flow = [fl.csv_step(table.rows, p.limit), step("usable", frame)]
    df, masked = ds.select_task(table, d)
    flow.append(step("task", df))
    # files: below data.images, by relative path (NIH: by file name); missing and empty files are skipped here
    refused: list[dict] = []  # symlink loops and links leaving data.images (fsutil.walk_tree)
    df = df.copy()
    paths = ds.locate(df, table, d.images, exclude=[p.out], refused=refused)
    missing = paths.isna()
    by_name = {os.path.basename(r["image"]): r["reason"] for r in refused}
    linked = missing & df["image"].map(os.path.basename).isin(by_name)
    issues.skip_rows(df, linked, df["image"].map(os.path.basename).map(by_name))
    issues.skip_rows(df, missing & ~linked, "file not found below data.images")
    if refused:
        log.warning("data.images: %d symlink(s) not followed (loops, or leading outside %s), e.g. %s: %s",
                    len(refused), d.images, refused[0]["image"], refused[0]["reason"])
    df = df.loc[~missing].copy()
    df["path"] = paths.loc[df.index]
    sizes = np.fromiter((_size(x) for x in df["path"]), dtype=np.int64, count=len(df))
    empty = sizes == 0
    issues.skip_rows(df, empty, "zero-byte file")
    df = df.loc[~empty]
    dup = df["image"].duplicated(keep="first")  # two names of one file
    issues.skip_rows(df, dup, "the same file as an earlier row")
    df = df.loc[~dup]
    df, pseudo = patients.resolve(df, d, p.out, log)
    flow.append(step("files", df))
    # split by patient
    official, split_method = None, "seeded"
    if d.official_split:
        lists = md.official_lists(d.csv, d.images)  # a missing list stops prep, naming it
        official = (md.read_list(lists[0]), md.read_list(lists[1]))
        split_method = f"official ({lists[0]}, {lists[1]})"
    split, split_issues = md.split_patients(df, p.val_fraction, p.test_fraction, p.seed, official)
    issues.extend(split_issues)
    if d.task == "multilabel" and (p.train_per_class or p.val_per_class or p.test_per_class):
        log.warning("prep.*_per_class apply to the binary task only; ignored for multilabel")
    splits, shards, capped = {}, [], []
    for name in md.SPLITS:
        per_class = {"train": p.train_per_class, "val": p.val_per_class, "test": p.test_per_class}[name]
        rows = md.sample_split(df.loc[split == name], name, d.task, per_class, p.seed)
        flow.append(step("split", df.loc[split == name], name))
        capped.append(step("capped", rows, name))
        tgt, mask = ds.targets(rows, d.task, classes)
        splits[name] = {
            "image": rows["image"].tolist(), "path": rows["path"].tolist(),
            "label": rows["label"].to_numpy(np.int64), "targets": tgt, "mask": mask,
            "findings": ds.findings_text(rows, table.findings),
            "patient": rows["patient"].astype(str).to_numpy(object), "view": rows["view"].tolist(),
            "age": rows["age"].to_numpy(np.int16), "sex": rows["sex"].tolist(),
            "available": ds.label_counts(df.loc[split == name], d.task, classes),
            "masked": ds.masked_counts(rows, d.task, classes),
        }
        n = len(rows)
        m = math.ceil(n / p.shard_size)
        for i in range(m):
            shards.append({"split": name, "index": i, "of": m, "file": f"{name}/{shard_name(i, m)}",
                           "start": i * p.shard_size, "stop": min(n, (i + 1) * p.shard_size)})
    if not shards:
        why = "; ".join(f"{k}: {v}" for k, v in _reason_counts(issues.skipped).items()) or "no rows of the task"
        raise PrepError(f"nothing to prepare from {d.csv} for task {d.task!r} ({why})")
    if not len(splits["train"]["image"]):
        log.warning("the training split is empty")
    plan = {"config_hash": cfgmod.prep_hash(cfg), "task": d.task, "classes": classes, "image_size": d.image_size,
            "splits": splits, "shards": shards, "skipped": issues.skipped,
            "notes": issues.notes + refused,
            "max_pixels": p.max_pixels,
            "split_method": split_method, "flow": {"classes": names, "steps": flow + capped},
            "labels": {"format": d.format, **table.policy, **masked, **pseudo},
            "plan_s": time.perf_counter() - t0}
    for name in md.SPLITS:
        s = splits[name]
        log.info("plan %-5s: %6d images, %5d patients, %d shards", name, len(s["image"]),
                 len(np.unique(s["patient"])), sum(sh["split"] == name for sh in shards))
    return plan


def _reason_counts(skipped: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in skipped:
        out[it["reason"]] = out.get(it["reason"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:5])


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def check_existing(out: Path, plan: dict, overwrite: bool, log) -> dict:
    """Refuse (or, with overwrite, clear) outputs of another config; drop temporary leftovers.
    Returns ``{"kept": n, "removed": n}``."""
    want = {sh["file"] for sh in plan["shards"]}
    conflicts, stale = [], []
    man = out / MANIFEST
    if man.exists():
        try:
            old = json.loads(man.read_text()).get("config_hash")
        except (OSError, ValueError):
            old = "<unreadable>"
        if old != plan["config_hash"]:
            conflicts.append((man, f"manifest config hash {old}"))
    kept = 0
    for name in md.SPLITS:
        folder = out / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.name.startswith(".shard-") and ".tmp" in f.name:
                stale.append(f)
                continue
            if not (f.name.startswith("shard-") and f.name.endswith(".h5")):
                continue
            rel = f"{name}/{f.name}"
            try:
                with open_shard_read(f) as h:
                    h_hash = h.attrs.get("config_hash")
                    h_hash = h_hash.decode() if isinstance(h_hash, bytes) else h_hash
                    h_format = int(h.attrs.get("format", 0))
            except Exception:  # noqa: BLE001 - a broken file of ours is rewritten
                h_hash, h_format = None, FORMAT
            if h_hash is not None and h_format != FORMAT:
                conflicts.append((f, f"shard format {h_format}, this code writes format {FORMAT}: "
                                     f"{FORMAT_NOTES.get(FORMAT, 'a newer layout')}"))
                continue
            if h_hash is None or (h_hash == plan["config_hash"] and rel in want):
                if h_hash is None:
                    stale.append(f)
                else:
                    kept += 1
                continue
            conflicts.append((f, f"config hash {h_hash}" if h_hash != plan["config_hash"] else "not in this plan"))
    if conflicts and not overwrite:
        first = "; ".join(f"{f} ({why})" for f, why in conflicts[:3])
        raise PrepError(
            f"{out} holds prep output made with a different config (this config's hash is {plan['config_hash']}): "
            f"{first}{'; ...' if len(conflicts) > 3 else ''}. Rerun with --overwrite (prep.overwrite=true) "
            "to replace it, "
            f"or choose another prep.out.")
    for f, _ in conflicts:
        log.warning("overwrite: removing %s", f)
        f.unlink()
    for f in stale:
        f.unlink()
    if kept:
        log.info("resume: %d of %d shards already complete in %s", kept, len(want), out)
    return {"kept": kept, "removed": len(conflicts) + len(stale)}


# --------------------------------------------------------------------------- one shard

def _str_dtype():
    return h5py.string_dtype("utf-8")


def _attr_str(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def _result_from_file(path: Path, shard: dict, plan: dict) -> dict:
    """Result of a complete shard already on disk (resume): attributes only, no decoding."""
    with open_shard_read(path) as h:
        a = h.attrs
        res = {"file": shard["file"], "split": shard["split"], "count": int(a["count"]),
               "pixel_sum": int(a["pixel_sum"]), "pixel_sumsq": int(a["pixel_sumsq"]),
               "pixel_count": int(a["pixel_count"]),
               "skipped": json.loads(_attr_str(a["skipped"])), "converted": json.loads(_attr_str(a["converted"])),
               "label_counts": json.loads(_attr_str(a["label_counts"])),
               "patients": sorted({_attr_str(x) for x in h["patient_id"][...].tolist()}), "resumed": True}
    res["sha256"] = sha256_file(path)
    return res


def write_shard(plan: dict, shard: dict, out: Path, tick=None) -> dict:
    """Decode and write one shard (or pick it up when complete); returns its result dict."""
    path = out / shard["file"]
    if path.exists():
        try:
            return _result_from_file(path, shard, plan)
        except Exception:  # noqa: BLE001 - unreadable: write it again
            path.unlink()
    sp = plan["splits"][shard["split"]]
    lo, hi = shard["start"], shard["stop"]
    S = int(plan["image_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    keep, skipped, converted = [], [], []
    psum = psq = 0
    try:
        # Built in memory (HDF5's core driver), written with plain file I/O: a full disk is then an
        # OSError (ENOSPC) here, not HDF5 failing inside its own writes (that ended in a segfault).
        with h5py.File(tmp.name, "w", driver="core", backing_store=False, libver="earliest",
                       track_order=False) as h:
            ds = h.create_dataset("images", shape=(hi - lo, S, S), maxshape=(None, S, S), dtype=np.uint8,
                                  chunks=(1, S, S), fletcher32=True, track_times=False)  # checksum per image
            buf, k = [], 0
            throttle = testhooks.prep_throttle_s()  # tests only
            for i in range(lo, hi):
                if throttle:
                    time.sleep(throttle)
                name = sp["image"][i]
                try:
                    arr, info = load_xray(sp["path"][i], S, max_pixels=plan["max_pixels"])
                except ImageError as e:
                    skipped.append({"image": name, "reason": e.reason})
                else:
                    keep.append(i)
                    buf.append(arr)
                    hist = np.bincount(arr.ravel(), minlength=256).astype(np.int64)  # exact, one pass
                    psum += int(hist @ _LEVELS)
                    psq += int(hist @ _LEVELS2)
                    converted += [{"image": name, **c} for c in info["conversions"]]  # on record for audits
                if len(buf) >= _WRITE_BATCH or (i == hi - 1 and buf):
                    ds[k:k + len(buf)] = np.stack(buf)
                    k += len(buf)
                    buf = []
                if tick is not None:
                    tick(1)
            n = len(keep)
            ds.resize(n, axis=0)
            idx = np.asarray(keep, dtype=np.int64)
            st = _str_dtype()
            opts = {"track_times": False}
            # numbers checksummed (HDF5 filters cannot take variable-length strings)
            nums = {**opts, "fletcher32": n > 0}
            h.create_dataset("label", data=sp["label"][idx], dtype=np.int64, **nums)
            h.create_dataset("targets", data=sp["targets"][idx].reshape(n, -1), dtype=np.uint8, **nums)
            h.create_dataset("image_index", data=np.array([sp["image"][i] for i in keep], dtype=object), dtype=st,
                             **opts)
            h.create_dataset("patient_id", data=np.array([sp["patient"][i] for i in keep], dtype=object), dtype=st,
                             **opts)
            h.create_dataset("mask", data=sp["mask"][idx].reshape(n, -1), dtype=np.uint8, **nums)
            h.create_dataset("findings", data=np.array([sp["findings"][i] for i in keep], dtype=object), dtype=st,
                             **opts)
            h.create_dataset("view", data=np.array([sp["view"][i] for i in keep], dtype=object), dtype=st, **opts)
            h.create_dataset("age", data=sp["age"][idx], dtype=np.int16, **nums)
            h.create_dataset("sex", data=np.array([sp["sex"][i] for i in keep], dtype=object), dtype=st, **opts)
            rows = {"label": sp["label"][idx], "targets": sp["targets"][idx], "mask": sp["mask"][idx]}
            lc = _label_counts(rows, plan)
            a = h.attrs
            a["format"] = FORMAT
            a["config_hash"] = plan["config_hash"]
            a["split"] = shard["split"]
            a["shard"] = shard["index"]
            a["of"] = shard["of"]
            a["count"] = n
            a["image_size"] = S
            a["task"] = plan["task"]
            a["classes"] = json.dumps(plan["classes"])
            a["pixel_sum"] = np.int64(psum)
            a["pixel_sumsq"] = np.int64(psq)
            a["pixel_count"] = np.int64(n * S * S)
            a["label_counts"] = json.dumps(lc)
            a["skipped"] = json.dumps(skipped)
            a["converted"] = json.dumps(converted)
            h.flush()
            image = h.id.get_file_image()
        atomic_write_bytes(path, image)  # temporary name beside it, fsync, rename; removed on ENOSPC
        digest = hashlib.sha256(image).hexdigest()
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"file": shard["file"], "split": shard["split"], "count": n, "sha256": digest,
            "pixel_sum": psum, "pixel_sumsq": psq, "pixel_count": n * S * S, "skipped": skipped,
            "converted": converted, "label_counts": lc,
            "patients": sorted({sp["patient"][i] for i in keep}), "resumed": False}


def _label_counts(rows: dict, plan: dict) -> dict:
    if plan["task"] == "multilabel":
        t = rows["targets"] & rows["mask"]
        out = {f: int(t[:, j].sum()) for j, f in enumerate(plan["classes"])}
        out[md.NO_FINDING] = int((t.sum(axis=1) == 0).sum()) if len(t) else 0
        return out
    lab = rows["label"]
    return {plan["classes"][0]: int((lab == 0).sum()), plan["classes"][1]: int((lab == 1).sum())}


# --------------------------------------------------------------------------- ranks

class _Serial:
    """Stands in for an MPI communicator with one rank."""
    rank, size = 0, 1

    def bcast(self, obj, root=0):
        return obj

    def reduce(self, obj, op=None, root=0):
        return obj

    def Abort(self, code=1):  # noqa: N802 - MPI's spelling
        os._exit(code)


def _warm_imports():
    """Load Pillow's common format plugins before the timed write phase, on every rank."""
    Image.preinit()


def get_comm():
    """``MPI.COMM_WORLD`` under a multi-rank launcher, else a one-rank stand-in (no mpi4py import)."""
    if env_size() <= 1:
        return _Serial()
    try:
        from mpi4py import MPI  # only with more than one rank: importing mpi4py initialises MPI
    except ImportError as e:
        raise PrepError(f"launched with {env_size()} ranks but mpi4py cannot be imported: {e}") from None
    return MPI.COMM_WORLD


class _Coordinator:
    """Rank 0 hands out shards on request and keeps the one tqdm bar; every rank asks for its
    next shard when it is free, so a rank on a busier core simply does fewer shards (what a
    shard holds never depends on who writes it). Workers send progress counts with
    non-blocking sends; rank 0 serves requests and counts between its own images."""

    def __init__(self, comm, order: list[int], total: int, initial: int):
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.queue = deque(order) if self.rank == 0 else deque()
        self.results: dict[int, dict] = {}
        self.pending, self.reqs = 0, []
        self.last = time.monotonic()
        self.bar = None
        if self.rank == 0:
            self.bar = tqdm(total=total, initial=initial, desc="prep", unit="img", file=sys.stderr,
                            mininterval=0.5 if sys.stderr.isatty() else 5.0, dynamic_ncols=True)

    # -- work
    def next_shard(self) -> int | None:
        if self.rank == 0:
            self.poll()
            return self.queue.popleft() if self.queue else None
        self._flush()
        self.reqs.append(self.comm.isend(None, dest=0, tag=_TAG_REQUEST))
        while not self.comm.iprobe(source=0, tag=_TAG_ASSIGN):
            time.sleep(_POLL_S / 5)
        idx = self.comm.recv(source=0, tag=_TAG_ASSIGN)
        return None if idx < 0 else idx

    # -- progress
    def tick(self, n: int = 1):
        if self.rank == 0:
            if self.bar is not None:
                self.bar.update(n)
            self.poll()
            return
        self.pending += n
        now = time.monotonic()
        if now - self.last > 0.5:
            self._flush()
            self.last = now

    def _flush(self):
        if self.pending:
            self.reqs.append(self.comm.isend(self.pending, dest=0, tag=_TAG_PROGRESS))
            self.pending = 0

    # -- rank 0
    def poll(self):
        if self.size == 1:
            return
        from mpi4py import MPI  # more than one rank: get_comm has initialised MPI already
        st = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=st):
            src, tag = st.Get_source(), st.Get_tag()
            msg = self.comm.recv(source=src, tag=tag)
            if tag == _TAG_PROGRESS:
                if self.bar is not None:
                    self.bar.update(msg)
            elif tag == _TAG_REQUEST:
                idx = self.queue.popleft() if self.queue else -1
                self.reqs.append(self.comm.isend(idx, dest=src, tag=_TAG_ASSIGN))
            elif tag == _TAG_RESULT:
                self.results[src] = msg

    def finish(self, mine: dict) -> dict[int, dict] | None:
        """Workers send their results; rank 0 collects everyone's (in rank order). Waiting
        sleeps between polls instead of spinning in MPI (ranks that finish early leave the
        cores to the ones still decoding)."""
        if self.rank != 0:
            self._flush()
            self.reqs.append(self.comm.isend(mine, dest=0, tag=_TAG_RESULT))
        else:
            self.results[0] = mine
            while len(self.results) < self.size:
                self.poll()
                if len(self.results) < self.size:
                    time.sleep(_POLL_S)
            if self.bar is not None:
                self.bar.close()
        if self.size > 1:
            from mpi4py import MPI  # more than one rank: get_comm has initialised MPI already
            while not MPI.Request.testall(self.reqs):
                time.sleep(_POLL_S)
        return dict(sorted(self.results.items())) if self.rank == 0 else None


def work_order(plan: dict, out: Path) -> list[int]:
    """Shards to write, largest first (better balance at the end), then the finished ones."""
    def key(i):
        sh = plan["shards"][i]
        return ((out / sh["file"]).exists(), -(sh["stop"] - sh["start"]), i)
    return sorted(range(len(plan["shards"])), key=key)


def quiet_barrier(comm):
    """A barrier that sleeps while it waits (MPI's blocking calls busy-poll a core)."""
    if comm.size == 1:
        return
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(_POLL_S)


# --------------------------------------------------------------------------- the stage

def versions() -> dict:
    """Versions of what made the shards (package metadata: nothing is imported, mpi4py included)."""
    out = {"python": platform.python_version(), "format": FORMAT}
    for dist in ("numpy", "pillow", "h5py", "pandas", "mpi4py", "cxr-transfer"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _kinds_note(converted: list[dict]) -> str:
    counts = conversion_counts(converted)
    return f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""


def _dedupe(items: list[dict]) -> list[dict]:
    seen, out = set(), []
    for it in items:
        key = json.dumps(it, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(it)
    return out


def run(cfg, comm=None) -> dict | None:
    """Run the stage on this rank. Returns the manifest on rank 0, None elsewhere.
    Raises ``PrepError`` (every rank) when it refuses or fails."""
    t_start = time.perf_counter()
    comm = comm or get_comm()
    rank, size = comm.rank, comm.size
    log = get_logger()
    out = Path(cfg.prep.out)
    plan, plan_error = None, None
    _warm_imports()
    if rank == 0:
        try:
            plan = make_plan(cfg, log)
            if cfg.prep.strict and plan["skipped"]:
                raise PrepError(_strict_message(plan["skipped"]))
            out.mkdir(parents=True, exist_ok=True)
            locks.acquire(out, "prep")  # one prep per folder: a second one is refused (data_prep.locks)
            log.info("%s: one writer by %s", out, locks.kind(out))
            check_existing(out, plan, cfg.prep.overwrite, log)
            check_space(out, plan, log)
        except Exception as e:  # noqa: BLE001 - every rank must learn that planning failed
            plan_error = e
            plan = {"error": f"{type(e).__name__}: {e}"}
    if size > 1:
        quiet_barrier(comm)  # the others sleep while rank 0 plans
        plan = comm.bcast(plan, root=0)
    if "error" in plan:
        if rank == 0:
            raise plan_error
        raise PrepError(plan["error"], echo=True)
    t_plan = time.perf_counter()
    done_before = sum((out / sh["file"]).exists() for sh in plan["shards"])
    total = sum(sh["stop"] - sh["start"] for sh in plan["shards"])
    initial = sum(sh["stop"] - sh["start"] for sh in plan["shards"] if (out / sh["file"]).exists())
    coord = _Coordinator(comm, work_order(plan, out) if rank == 0 else [], total, initial)
    results, error = [], None
    cpu0 = time.process_time()
    try:
        while (idx := coord.next_shard()) is not None:
            sh = plan["shards"][idx]
            existed = (out / sh["file"]).exists()
            results.append(write_shard(plan, sh, out, tick=None if existed else coord.tick))
    except Exception as e:  # noqa: BLE001 - reported to rank 0, which fails the stage
        # this rank asks for nothing more; the others write the remaining shards
        error = f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
    t_write = time.perf_counter()
    train_sums = np.array([sum(r[k] for r in results if r["split"] == "train")
                           for k in ("pixel_sum", "pixel_sumsq", "pixel_count")], dtype=np.int64)
    mine_msg = {"results": results, "error": error, "write_s": t_write - t_plan,
                "write_cpu_s": time.process_time() - cpu0,
                "written": sum(not r["resumed"] for r in results)}
    gathered = coord.finish(mine_msg)
    if size > 1:
        from mpi4py import MPI  # more than one rank: get_comm has initialised MPI already
        train_sums = comm.reduce(train_sums, op=MPI.SUM, root=0)  # exact int64, element-wise
    status, failure, manifest = None, None, None
    if rank == 0:
        try:
            timings = {"plan_s": round(plan["plan_s"], 3),
                       "check_outputs_and_bcast_s": round(t_plan - t_start - plan["plan_s"], 3),
                       "ranks": size, "shards_before": done_before}
            manifest = _finish(cfg, plan, gathered, train_sums, out, log, timings)
            manifest["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
            atomic_write_json(out / MANIFEST, manifest)
            cfgmod.save_resolved(cfg, out)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - every rank must learn it
            failure, status = e, f"{type(e).__name__}: {e}"
    if size > 1:
        quiet_barrier(comm)  # the others sleep while rank 0 writes the manifest
        status = comm.bcast(status, root=0)
    if failure is not None:
        raise failure
    if status != "ok":
        raise PrepError(status, echo=True)
    return manifest


def written_flow(plan: dict, results: dict, splits: dict) -> list[dict]:
    """The flow's ``written`` step of each split: the planned rows of every shard but the images that shard
    skipped (``data_prep.flow``); their number is the split's count, else an internal error."""
    out = []
    for name in md.SPLITS:
        sp = plan["splits"][name]
        keep = np.ones(len(sp["image"]), bool)
        for sh in (s for s in plan["shards"] if s["split"] == name):
            bad = {s["image"] for s in results[sh["file"]]["skipped"]}
            keep[sh["start"]:sh["stop"]] = [n not in bad for n in sp["image"][sh["start"]:sh["stop"]]]
        cls = fl.label_classes(sp["label"][keep], sp["targets"][keep], plan["task"], plan["classes"])
        out.append(fl.count("written", np.asarray(sp["image"], dtype=object)[keep], sp["patient"][keep], cls,
                            plan["flow"]["classes"], name))
        if out[-1].get("rows", out[-1]["images"]) != splits[name]["count"]:
            raise PrepError(f"internal error: the flow counts {out[-1]['images']} written {name} images, the shards "
                            f"{splits[name]['count']}")
    return out


def _strict_message(skipped: list[dict]) -> str:
    first = "; ".join(f"{s['image']}: {s['reason']}" for s in skipped[:5])
    return f"--strict: {len(skipped)} image(s) would be skipped: {first}{' ...' if len(skipped) > 5 else ''}"


def estimate_bytes(plan: dict, out: Path) -> int:
    """Bytes the shards not yet in ``out`` will take (images plus HDF5 and column overhead, rounded up)."""
    S = int(plan["image_size"])
    todo = [sh for sh in plan["shards"] if not (out / sh["file"]).exists()]
    return sum((sh["stop"] - sh["start"]) * (S * S + 256) + SHARD_OVERHEAD for sh in todo)


SHARD_OVERHEAD = 32 << 10  # HDF5 superblock, B-trees, columns and attributes of one shard (measured 25 KB at 32 images)


def check_space(out: Path, plan: dict, log) -> None:
    """Refuse before writing when ``out``'s file system clearly lacks the room for the shards."""
    need = estimate_bytes(plan, out)
    free = shutil.disk_usage(out).free
    if need > free:
        raise PrepError(f"prep needs about {_mb(need)} in {out} and only {_mb(free)} is free; free space there "
                        f"or choose another prep.out, then rerun (complete shards are kept)")
    log.info("space: about %s of shards to write, %s free in %s", _mb(need), _mb(free), out)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


_NO_SPACE = ("No space left on device", "Disk quota exceeded")


def _finish(cfg, plan, gathered, train_sums, out, log, timings) -> dict:
    errors = [m["error"] for m in gathered.values() if m["error"]]
    full = next((s for s in _NO_SPACE for e in errors if s in e), None)
    if full:
        raise PrepError(f"{full.lower()} writing shards into {out} (about {_mb(estimate_bytes(plan, out))} still "
                        f"to write); free space there or choose another prep.out, then rerun: complete shards "
                        f"are kept, the unfinished ones were removed")
    if errors:
        raise PrepError("shard writing failed; rerun to resume:\n" + "\n".join(errors))
    results = {r["file"]: r for m in gathered.values() for r in m["results"]}
    psum, psq, pcount = (int(v) for v in train_sums)
    tr = [r for r in results.values() if r["split"] == "train"]
    if (psum, pcount) != (sum(r["pixel_sum"] for r in tr), sum(r["pixel_count"] for r in tr)):
        raise PrepError("internal error: reduced pixel sums disagree with the shard results")
    skipped = list(plan["skipped"])
    converted = []
    splits = {}
    for name in md.SPLITS:
        shards = [results[sh["file"]] for sh in plan["shards"] if sh["split"] == name]
        lc: dict[str, int] = {}
        patients = set()
        for r in shards:
            for k, v in r["label_counts"].items():
                lc[k] = lc.get(k, 0) + v
            patients.update(r["patients"])
            skipped += [dict(s, split=name) for s in r["skipped"]]
            converted += r["converted"]
        if not lc:
            lc = {c: 0 for c in plan["classes"]} if plan["task"] == "binary" else {}
        splits[name] = {"count": sum(r["count"] for r in shards), "planned": len(plan["splits"][name]["image"]),
                        "masked": plan["splits"][name]["masked"],
                        "label_counts": lc, "available": plan["splits"][name]["available"],
                        "patients": len(patients),
                        "shards": [{"file": r["file"], "count": r["count"], "sha256": r["sha256"]} for r in shards]}
    if cfg.prep.strict and len(skipped) > len(plan["skipped"]):
        raise PrepError(_strict_message(skipped[len(plan["skipped"]):]))
    mean = psum / pcount if pcount else 0.0
    var = max(psq / pcount - mean * mean, 0.0) if pcount else 0.0
    write_s = [m["write_s"] for m in gathered.values()]
    timings.update({"write_s_max": round(max(write_s), 3), "write_s_per_rank": [round(w, 3) for w in write_s],
                    "write_cpu_s_per_rank": [round(m["write_cpu_s"], 3) for m in gathered.values()],
                    "shards_per_rank": [len(m["results"]) for m in gathered.values()],
                    "shards_written": sum(m["written"] for m in gathered.values())})
    manifest = {
        "format": FORMAT, "config_hash": plan["config_hash"], "config": cfgmod.to_dict(cfg),
        "task": plan["task"], "classes": plan["classes"], "image_size": plan["image_size"],
        "split_method": plan["split_method"], "splits": splits, "labels": plan["labels"],
        "mean": mean, "std": math.sqrt(var), "pixel_count": pcount,
        "skipped": _dedupe(skipped), "converted": _dedupe(converted), "notes": plan["notes"],
        "flow": {**plan["flow"], "steps": plan["flow"]["steps"] + written_flow(plan, results, splits)},
        "versions": versions(), "timings": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for name in md.SPLITS:
        s = splits[name]
        log.info("%-5s: %6d images (%s), %d patients, %d shards", name, s["count"],
                 ", ".join(f"{k} {v}" for k, v in s["label_counts"].items()), s["patients"], len(s["shards"]))
    log.info("skipped %d, converted %d%s, notes %d; train mean %.2f std %.2f; manifest %s",
             len(manifest["skipped"]), len(manifest["converted"]), _kinds_note(manifest["converted"]),
             len(manifest["notes"]), mean, manifest["std"], out / MANIFEST)
    return manifest
