"""``python -m benchmarks input-pipeline [--prep DIR] [--config C] [--quick] [--out DIR]``

Does the real input pipeline keep up with the training step? The issue's target: the real input
pipeline with augmentation reaches at least 0.95x the throughput of the same steps fed from
in-memory random tensors. In ONE process (one rank, threads as ``distributed.tuning`` sets them
for training), the article's fine-tune step (``distributed.model.build_model``, then
``distributed.trainer.prepare_phase`` "finetune": the freezing, optimizer in Horovod's
DistributedOptimizer, loss and metric training uses; VGG16, weights none) is fed by

* ``real``: ``distributed.data.train_dataset`` over the prep stage's HDF5 shards of the training
  split, called with the arguments ``distributed/train.py`` uses (seed, steps per epoch,
  ``train.augment``, ``runtime.data_threads``, ``train.cache``): generator, h5py reads, in-graph
  augmentation, prefetch;
* ``memory``: random uint8 images of the same shape already in memory (8 batches, repeated),
  through the same map (cast, channel axis, the same stateless in-graph augmentation), the
  same tf.data options and prefetch: the pipeline minus reading.

Each mode: W untimed + K timed steps per repeat (``fit`` of W+K steps, time from the end of step
W to the end of step W+K), R repeats, interleaved real, memory, real, memory, ... so machine
drift hits both. Ratio = real images/s / memory images/s (medians), and the median of the
per-repeat paired ratios; PASS when the ratio of medians is >= 0.95. Also recorded (not part of
the target): each pipeline alone, batches per second without the model.

The data: ``--prep DIR`` (a prep output with manifest.json), or a synthetic set generated with
``data_prep.synthetic`` and prepared with ``python -m data_prep`` (one process) under the
benchmark cache (``$CXR_BENCH_CACHE``, default ~/.cache/cxr-bench), reused by later runs.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import common, machine
from benchmarks.common import (
    CACHE,
    DEFAULT_CONFIG,
    EPOCH_IMAGES,
    ROOT,
    THREAD_VARS,
    bench_config,
    extrapolate,
    tail_text,
    timed_fit,
    worker_entry,
)
from benchmarks.epoch_timing import Variant, variant_env
from benchmarks.report import machine_lines
from data_prep.fsutil import atomic_write_json, atomic_write_text
from data_prep.manifest import load_manifest

TARGET = 0.95
MODES = ("real", "memory")
FULL = {"warmup_steps": 2, "timed_steps": 5, "repeats": 5}  # 5 repeats: the target is a 5% margin
parse_steps = functools.partial(common.parse_steps, full=FULL)  # this benchmark's defaults
# --quick without --prep: a small training split (the config's train_per_class would be 10,000 images).
QUICK_PREP = {"prep.train_per_class": "128", "prep.val_per_class": "16", "prep.test_per_class": "16"}


# --------------------------------------------------------------------------- pure parts

def summarize(results: dict) -> dict:
    """Adds ``summary`` to the results: per mode min/median/max s/step and images/s, the ratio
    real/memory of the medians, the per-repeat paired ratios and their median, PASS/MISS."""
    B = results["setup"]["batch_size"]
    run = results.get("run") or {}
    out: dict = {"target": TARGET, "modes": {}}
    for mode in MODES:
        steps = (run.get("modes") or {}).get(mode, {}).get("step_s") or []
        if not steps:
            continue
        med = statistics.median(steps)
        out["modes"][mode] = {"step_s": {"min": min(steps), "median": med, "max": max(steps)},
                              "images_per_s": B / med if med > 0 else 0.0,
                              "images_per_s_repeats": [B / s if s > 0 else 0.0 for s in steps]}
    if set(out["modes"]) == set(MODES):
        r, m = out["modes"]["real"], out["modes"]["memory"]
        out["ratio"] = r["images_per_s"] / m["images_per_s"] if m["images_per_s"] else None
        pairs = [ms / rs for rs, ms in zip(run["modes"]["real"]["step_s"], run["modes"]["memory"]["step_s"])
                 if rs > 0]
        out["paired_ratios"] = pairs
        out["paired_ratio_median"] = statistics.median(pairs) if pairs else None
        out["pass"] = out["ratio"] is not None and out["ratio"] >= TARGET
        out["s_per_epoch"] = {k: extrapolate(out["modes"][k]["step_s"]["median"],
                                             results["setup"].get("epoch_images", EPOCH_IMAGES), B)
                              for k in MODES}
    results["summary"] = out
    return out


def verdict(summary: dict) -> str:
    if summary.get("ratio") is None:
        return "NO RESULT"
    return "PASS" if summary.get("pass") else "MISS"


def markdown(results: dict) -> str:
    s = results.get("summary") or summarize(results)
    st, m = results["setup"], results.get("machine") or {}
    label = " — QUICK (not the article's setup)" if results.get("quick") else ""
    L = [f"# Input pipeline: real HDF5 pipeline vs in-memory tensors, {st['backbone'].upper()} "
         f"{st['image_size']}x{st['image_size']}, batch {st['batch_size']}, augmentation on{label}", "",
         f"Run {results.get('started', '?')} on {m.get('cpu_model', '?')} ({m.get('sockets')} socket(s), "
         f"{m.get('physical_cores')} physical cores). Command: `{results.get('command', '')}`", ""]
    ratio = s.get("ratio")
    if ratio is not None:
        L.append(f"**Target: real / memory >= {TARGET:.2f}x — measured {ratio:.3f}x: {verdict(s)}** "
                 f"(median of the {len(s.get('paired_ratios', []))} paired per-repeat ratios: "
                 f"{s['paired_ratio_median']:.3f}x)")
    else:
        L.append(f"**Target: real / memory >= {TARGET:.2f}x — no result** "
                 f"({results.get('run', {}).get('error', 'the run failed')})")
    L.append("")
    L.append(f"One process, one rank: the fine-tune step (first {st.get('freeze_first')} backbone layers frozen, "
             f"{st.get('finetune_optimizer')}, Horovod DistributedOptimizer), {st['warmup_steps']} untimed + "
             f"{st['timed_steps']} timed steps per repeat, {st['repeats']} repeats, modes interleaved "
             f"(real, memory, real, ...). 'real': `distributed.data.train_dataset` over the HDF5 shards "
             f"({st.get('train_images', '?')} training images, {st.get('shards', '?')} shard(s), cache "
             f"{'on' if st.get('cache') else 'off'}) with the training arguments; 'memory': random uint8 "
             f"batches in memory through the same cast and augmentation. Ratio = real images/s / memory images/s.")
    lb, le = results.get("loadavg_start"), results.get("loadavg_end")
    L += ["", f"1-minute load average: {lb} at the start, {le} at the end "
              f"({m.get('physical_cores')} physical cores)."]
    if m.get("busy"):
        L.append("**Warning:** the machine was busy: timings are noisy (both modes share the noise; the paired "
                 "ratios show how much).")
    L += ["", "| mode | s/step median (min–max) | images/s | s/epoch (extrapolated) | pipeline alone, images/s |",
          "|---|---:|---:|---:|---:|"]
    alone = (results.get("run") or {}).get("pipeline_alone") or {}
    for mode in MODES:
        r = s["modes"].get(mode)
        if r is None:
            L.append(f"| {mode} | – | – | – | – |")
            continue
        se = (s.get("s_per_epoch") or {}).get(mode)
        a = alone.get(mode, {}).get("images_per_s")
        L.append(f"| {mode} | {r['step_s']['median']:.3f} ({r['step_s']['min']:.3f}–{r['step_s']['max']:.3f}) | "
                 f"{r['images_per_s']:.2f} | {f'{se:,.0f}' if se is not None else '–'} | "
                 f"{f'{a:,.1f}' if a else '–'} |")
    if ratio is not None:
        L += ["", "| | ratio real / memory |", "|---|---:|",
              f"| medians | {ratio:.3f}x |",
              f"| paired per repeat | {', '.join(f'{x:.3f}' for x in s['paired_ratios'])} |",
              f"| median of paired | {s['paired_ratio_median']:.3f}x |",
              f"| target | >= {TARGET:.2f}x: {verdict(s)} |"]
    L += ["", "s/epoch: median s/step x (" + f"{st.get('epoch_images', EPOCH_IMAGES):,}" +
          " images // batch): EXTRAPOLATED. 'Pipeline alone': the dataset iterated without the model "
          "(informational: what the pipeline supplies when it has the cores to itself).", ""]
    run = results.get("run") or {}
    if run.get("threads_effective") or run.get("env"):
        env = " ".join(f"{k}={v}" for k, v in (run.get("env") or {}).items()) or "(none set)"
        te = run.get("threads_effective") or {}
        L += [f"Threads: {env}; TensorFlow intra/inter-op {te.get('intra_op')}/{te.get('inter_op')}; "
              f"tf.data threads {st.get('data_threads') or 'autotune'}; TensorFlow {run.get('tensorflow', '?')}; "
              f"Horovod {'on' if run.get('horovod') else 'off (one process)'}.", ""]
    L.append(f"Data: {st.get('prep', '?')}" + (f" (generated: {st['generated']})" if st.get("generated") else ""))
    L += ["", "## Machine", "", *machine_lines(m), ""]
    return "\n".join(L)


# --------------------------------------------------------------------------- the worker (one process)

def worker(spec: dict) -> dict:
    """Build the fine-tune step once; time it fed by each dataset, interleaved."""
    cfg = bench_config(spec.get("config"), spec.get("overrides", ()), spec.get("quick", False),
                       spec.get("image_size"))
    from distributed import runtime

    plan = runtime.apply(cfg.runtime, log=False)  # BEFORE TensorFlow, as training does
    import numpy as np
    import tensorflow as tf

    from distributed import data as D
    from distributed import hvd
    from distributed import model as M
    from distributed.trainer import prepare_phase

    runtime.configure_tensorflow(plan)
    horovod = hvd.init()
    split = D.load_split(spec["prep"], "train", cache=cfg.train.cache)
    S, B, K, multilabel = split.image_size, cfg.train.batch_size, split.num_classes, split.multilabel
    steps = D.steps_per_epoch(split.n, B, 1, cfg.train.steps_per_epoch)
    tf.keras.utils.set_random_seed(cfg.train.seed)
    model = M.build_model(cfg.model, S, K, multilabel, precision=runtime.configure_precision(plan))
    prepare_phase(cfg, model, "finetune", 1, steps, multilabel)  # the training step (trainer.train_phases')
    threads = cfg.runtime.data_threads

    def real(epoch: int):
        # exactly as distributed/train.py builds it (rank 0 of 1)
        return D.train_dataset(split, batch_size=B, rank=0, size=1, seed=cfg.train.seed, start_epoch=epoch,
                               steps=steps, augment=cfg.train.augment, data_threads=threads,
                               autotune=cfg.runtime.data_autotune)

    rng = np.random.default_rng(cfg.train.seed)
    pool = 8
    images = rng.integers(0, 256, (pool, B, S, S), dtype=np.uint8)
    if multilabel:
        targets = rng.integers(0, 2, (pool, B, K), dtype=np.uint8)
    else:
        targets = np.eye(K, dtype=np.uint8)[rng.integers(0, K, (pool, B))]

    def memory(epoch: int):
        # train_dataset's map on tensors already in memory: no generator, no reads
        prepare = D.batch_preparer(cfg.train.augment, int(cfg.train.seed))
        ds = tf.data.Dataset.zip((tf.data.Dataset.counter(), tf.data.Dataset.from_tensor_slices(images).repeat(),
                                  tf.data.Dataset.from_tensor_slices(targets).repeat()))
        return D.map_and_prefetch(ds, lambda b, x, y: prepare(tf.constant(epoch, tf.int64), b, x, y), threads,
                                  cfg.runtime.data_autotune)

    makers = {"real": real, "memory": memory}
    W, Kt, R = spec["warmup_steps"], spec["timed_steps"], spec["repeats"]

    out = {"modes": {m: {"step_s": []} for m in MODES}, "order": []}
    t0 = time.perf_counter()
    for r in range(R):
        for mode in MODES:
            # a fresh dataset per repeat, epoch r: real reads a different permutation each time
            out["modes"][mode]["step_s"].append(timed_fit(model, makers[mode](r), W, Kt))
            out["order"].append(mode)
    out["timed_s"] = round(time.perf_counter() - t0, 1)
    # Informational: each pipeline alone (no model), after W+2 batches to fill the prefetch buffer.
    out["pipeline_alone"] = {}
    n = max(4 * Kt, 16)
    for mode in MODES:
        it = iter(makers[mode](R))
        for _ in range(W + 2):
            next(it)
        a = time.perf_counter()
        for _ in range(n):
            next(it)
        dt = time.perf_counter() - a
        out["pipeline_alone"][mode] = {"batches": n, "s_per_batch": dt / n, "images_per_s": n * B / dt}
    out.update(
        image_size=S, num_classes=K, multilabel=multilabel, train_images=split.n, shards=len(split.files),
        steps_per_epoch=steps, horovod=horovod, tensorflow=tf.__version__,
        env={k: os.environ[k] for k in THREAD_VARS if k in os.environ},
        threads_effective={"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                           "inter_op": tf.config.threading.get_inter_op_parallelism_threads()},
        plan=plan.describe())
    split.close()
    return out


# --------------------------------------------------------------------------- the driver

def _subprocess_env() -> dict:
    """This interpreter, no inherited thread variables or launcher ranks (epoch_timing's rule)."""
    return variant_env(Variant(name="input-pipeline", python="current"))


def prepare_synthetic(args, cfg, log=print) -> tuple[Path, str]:
    """Generate a synthetic set and run the prep stage on it (one process); both cached.
    Returns (prep output folder, description)."""
    from data_prep import synthetic  # numpy: never at import time in this worker module (tuning comes first)

    S = cfg.data.image_size
    base = CACHE / "input-pipeline"
    data = base / f"synthetic-p{args.patients}-px{S}-seed{args.seed}"
    if not (data / "Data_Entry_2017.csv").exists():
        log(f">> generating {args.patients} synthetic patients at {S} px in {data}")
    summary = synthetic.generate(data, patients=args.patients, image_size=S, seed=args.seed, progress=False,
                                 overwrite_images=False)
    sets = [f"{k}={v}" for k, v in QUICK_PREP.items()] if args.quick else []
    sets += list(args.overrides)
    sets += [f"data.csv={data / 'Data_Entry_2017.csv'}", f"data.images={data}", f"data.image_size={S}"]
    cfg_text = Path(args.config).read_text() if Path(args.config).is_file() else str(args.config)
    key = hashlib.sha256(json.dumps([cfg_text, sets]).encode()).hexdigest()[:12]
    out = base / f"prepared-{key}"
    cmd = [sys.executable, "-m", "data_prep", "--config", str(args.config), *[a for s in sets for a in ("--set", s)],
           "--set", f"prep.out={out}", "--overwrite"]
    logf = base / f"prepared-{key}.log"
    if not (out / "manifest.json").exists():
        log(f">> prep stage (one process) into {out}; log {logf}")
    with open(logf, "w") as lf:
        lf.write("$ " + shlex.join(cmd) + "\n")
        lf.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(), stdout=lf, stderr=subprocess.STDOUT,
                            timeout=args.timeout).returncode
    if rc != 0 or not (out / "manifest.json").exists():
        raise RuntimeError(f"prep stage failed (exit {rc}): {tail_text(logf)} (log {logf})")
    return out, (f"synthetic, {summary['images']} images of {summary['patients']} patients at {S} px "
                 f"(SYNTHETIC, not medical data), prepared with `{shlex.join(cmd)}`")


def register(subparsers) -> None:
    p = subparsers.add_parser("input-pipeline", help="real HDF5 input pipeline vs in-memory tensors (target >= 0.95x)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (also applied to the generated prep), e.g. --set train.batch_size=32")
    p.add_argument("--prep", help="a prep output folder (manifest.json + shards); default: generate a synthetic one")
    p.add_argument("--patients", type=int, default=200, help="synthetic patients when generating (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="synthetic data seed (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="64x64, 1+2 steps, 2 repeats, a small training split: labelled QUICK")
    p.add_argument("--steps", help="untimed,timed steps per repeat (default 2,5; quick 1,2)")
    p.add_argument("--repeats", type=int, help="repeats per mode (default 5; quick 2)")
    p.add_argument("--image-size", type=int, help="image size (default: the config's; quick 64); with --prep: the "
                                                  "prep output's")
    p.add_argument("--epoch-images", type=int, default=EPOCH_IMAGES,
                   help="images per epoch for the extrapolated s/epoch (default %(default)s)")
    p.add_argument("--out", default="bench-results/input-pipeline")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds for the prep and for the timing run")
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        params = parse_steps(args.steps, args.quick, args.repeats)
        if args.patients < 1:
            raise ValueError("--patients must be at least 1")
        cfg = bench_config(args.config, args.overrides, args.quick, args.image_size)
        if args.prep:
            man = load_manifest(args.prep)
            if args.image_size and int(man["image_size"]) != args.image_size:
                raise ValueError(f"--image-size {args.image_size} but {args.prep} holds {man['image_size']} px images")
    except Exception as e:  # noqa: BLE001 - ConfigError, ValueError, missing manifest: one line
        print(f"cxr-bench: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "input-pipeline",
               "command": "python -m benchmarks " + shlex.join(getattr(args, "argv", None) or sys.argv[1:]),
               "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
               "loadavg_start": round(os.getloadavg()[0], 2), "machine": machine.facts()}
    generated = None
    try:
        if args.prep:
            prep = Path(args.prep)
        else:
            prep, generated = prepare_synthetic(args, cfg, log=lambda m: print(m, flush=True))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print(f"cxr-bench: error: {e}", file=sys.stderr)
        return 1
    man = load_manifest(prep)
    S = int(man["image_size"])
    results["setup"] = {"config": str(args.config), "overrides": list(args.overrides), "backbone": cfg.model.backbone,
                        "weights": "none", "image_size": S, "batch_size": cfg.train.batch_size, "augment": True,
                        "freeze_first": cfg.train.finetune.freeze_first,
                        "finetune_optimizer": cfg.train.finetune.optimizer, "cache": cfg.train.cache,
                        "data_threads": cfg.runtime.data_threads, "prep": str(prep), "generated": generated,
                        "train_images": man["splits"]["train"]["count"],
                        "shards": sum(1 for s in man["splits"]["train"]["shards"] if int(s["count"]) > 0),
                        "epoch_images": args.epoch_images, "target": TARGET, **params}
    runs = CACHE / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-input-pipeline-{int(time.time() * 1000)}"
    spec_file, out_file, log_file = runs / f"{stamp}.spec.json", runs / f"{stamp}.out.json", runs / f"{stamp}.log"
    spec_file.write_text(json.dumps({"config": str(args.config), "overrides": list(args.overrides),
                                     "quick": args.quick, "image_size": S, "prep": str(prep), **params}))
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", "--worker", str(spec_file), str(out_file)]
    print(f"== {S} px, batch {cfg.train.batch_size}, {params['warmup_steps']}+{params['timed_steps']} steps x "
          f"{params['repeats']} repeats per mode, real/memory interleaved; log {log_file}", flush=True)
    try:
        with open(log_file, "w") as lf:
            rc = subprocess.run(cmd, cwd=ROOT, env=_subprocess_env(), stdout=lf, stderr=subprocess.STDOUT,
                                timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc == 0 and out_file.exists():
        results["run"] = {"status": "ok", "log": str(log_file), **json.loads(out_file.read_text())}
        results["setup"].update(train_images=results["run"]["train_images"], shards=results["run"]["shards"])
    else:
        results["run"] = {"status": "failed", "error": f"exit {rc}: {tail_text(log_file)}", "log": str(log_file)}
        print(f"   failed: {results['run']['error']}", flush=True)
    spec_file.unlink(missing_ok=True)
    out_file.unlink(missing_ok=True)
    results["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["loadavg_end"] = round(os.getloadavg()[0], 2)
    summarize(results)
    atomic_write_json(out_dir / "input-pipeline.json", results)
    md = markdown(results)
    atomic_write_text(out_dir / "input-pipeline.md", md)
    print(md)
    print(f"wrote {out_dir / 'input-pipeline.json'}, {out_dir / 'input-pipeline.md'}")
    return 0 if results["run"]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(worker_entry(worker, "input-pipeline"))
