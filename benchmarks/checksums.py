"""What the shards' Fletcher-32 checksums cost: shard writing and the input pipeline's reads, with vs without.

``python -m benchmarks checksums [--size 384] [--images 256] [--repeat 5]`` builds, in one process and
one run, the same shard twice (the prep stage's layout: ``images`` uint8 (N, S, S) in (1, S, S)
chunks, built in memory with HDF5's core driver and written with plain I/O, as
``data_prep.prepare.write_shard`` does), once with the Fletcher-32 filter and once without, and times

* ``write``: building and writing the shard (random pixels, so the images are already decoded: the
  filter's share of prep without the PNG decoding, which is most of prep's time);
* ``read batches``: the training reads of ``distributed.data.SplitData.read`` (batches of 32 sorted
  random indices, h5py fancy selection), the file in the page cache (the worst case for the filter);
* ``read all``: the whole images dataset in one ``read_direct`` (``train.cache: true``).

Rounds interleave the two variants; the best round of each counts; ratio = with / without (time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from data_prep.cli import add_debug_arg, command
from data_prep.fsutil import atomic_write_bytes


def register(subparsers):
    p = subparsers.add_parser("checksums", help="Fletcher-32 on the shards: write and read time with vs without",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=384, help="image side (the article's 384)")
    p.add_argument("--images", type=int, default=256, help="images in the shard")
    p.add_argument("--batch", type=int, default=32, help="images per read batch")
    p.add_argument("--repeat", type=int, default=5, help="rounds per variant; the best counts")
    p.add_argument("--out", default="", help="also write the figures to this JSON file")
    p.set_defaults(func=run)


def write_shard(path: Path, images: np.ndarray, fletcher32: bool) -> float:
    t0 = time.perf_counter()
    n, s, _ = images.shape
    with h5py.File(path.name, "w", driver="core", backing_store=False, libver="earliest", track_order=False) as h:
        ds = h.create_dataset("images", shape=(n, s, s), dtype=np.uint8, chunks=(1, s, s), fletcher32=fletcher32,
                              track_times=False)
        for i in range(0, n, 64):  # prep's write batches
            ds[i:i + 64] = images[i:i + 64]
        h.flush()
        image = h.id.get_file_image()
    atomic_write_bytes(path, image)
    return time.perf_counter() - t0


def read_batches(path: Path, batches: list[np.ndarray]) -> float:
    with h5py.File(path, "r") as h:
        ds = h["images"]
        t0 = time.perf_counter()
        for idx in batches:
            ds[idx]
        return time.perf_counter() - t0


def read_all(path: Path) -> float:
    with h5py.File(path, "r") as h:
        ds = h["images"]
        out = np.empty(ds.shape, ds.dtype)
        t0 = time.perf_counter()
        ds.read_direct(out)
        return time.perf_counter() - t0


def run(args) -> int:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, args.size, args.size), dtype=np.uint8)
    batches = [np.sort(rng.choice(args.images, args.batch, replace=False))
               for _ in range(4 * args.images // args.batch)]
    best = {v: {"write": np.inf, "read batches": np.inf, "read all": np.inf} for v in ("with", "without")}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-checksums-") as d:
        files = {v: Path(d) / f"shard-{v}.h5" for v in best}
        for _ in range(args.repeat):
            for v in ("with", "without"):  # interleaved: drift hits both
                b = best[v]
                b["write"] = min(b["write"], write_shard(files[v], images, v == "with"))
                b["read batches"] = min(b["read batches"], read_batches(files[v], batches))
                b["read all"] = min(b["read all"], read_all(files[v]))
        sizes = {v: files[v].stat().st_size for v in files}
    mb = images.nbytes / 2**20
    rows = {}
    for k in ("write", "read batches", "read all"):
        n_bytes = len(batches) * args.batch * args.size ** 2 / 2**20 if k == "read batches" else mb
        rows[k] = {"with_s": best["with"][k], "without_s": best["without"][k],
                   "with_mb_s": n_bytes / best["with"][k], "without_mb_s": n_bytes / best["without"][k],
                   "ratio": best["with"][k] / best["without"][k]}
    result = {"command": "python -m benchmarks " + " ".join(getattr(args, "argv", []) or ["checksums"]),
              "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load": os.getloadavg()[0], "images": args.images, "size": args.size,
              "bytes_with": sizes["with"], "bytes_without": sizes["without"], "rows": rows}
    print(f"{'':14} {'with MB/s':>10} {'without MB/s':>13} {'time ratio':>11}")
    for k, r in rows.items():
        print(f"{k:14} {r['with_mb_s']:10.0f} {r['without_mb_s']:13.0f} {r['ratio']:10.3f}x")
    print(f"file size: {sizes['with']} vs {sizes['without']} bytes "
          f"(+{(sizes['with'] - sizes['without']) / sizes['without'] * 100:.2f}%); load {result['load']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


@command("cxr-bench checksums")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.checksums")
    sub = ap.add_subparsers(dest="command", required=True)
    register(sub)
    add_debug_arg(sub.choices["checksums"])
    args = ap.parse_args(["checksums", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
