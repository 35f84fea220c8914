"""``python -m benchmarks scaling --np 1,2,... [--config C] [--quick] [--out DIR]``

Fine-tune throughput (images/s over all ranks) for each rank count, started the way
``python -m launch train`` starts training (``horovodrun`` by default, the same layout), in two
modes: ``tuned`` (process binding + the project's thread variables per rank) and ``untuned`` (no
binding, TensorFlow's default thread pools in every rank). Each rank runs the article's
fine-tune step (VGG16, frozen first layers, SGD, Horovod's DistributedOptimizer: the gradient
allreduce every step) on random in-memory images with in-graph augmentation. Scaling
efficiency = throughput(N) / (N x throughput(1)) within a mode. One rank runs as a plain process.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.epoch_timing import (CACHE, DEFAULT_CONFIG, EPOCH_IMAGES, QUICK, ROOT, THREAD_VARS, bench_config,
                                     extrapolate, worker_entry)

MODES = ("tuned", "untuned")


def rank_worker(spec: dict) -> dict | None:
    """One rank: time W+K fine-tune steps R times; rank 0 returns the result."""
    cfg = bench_config(spec.get("config"), spec.get("overrides", ()), spec.get("quick", False),
                       spec.get("image_size"))
    plan = None
    if spec["mode"] == "tuned":
        from distributed import tuning

        plan = tuning.apply(cfg.runtime, log=False)
    import numpy as np
    import tensorflow as tf

    from distributed import data as D
    from distributed import hvd
    from distributed import model as M
    from distributed.train import make_optimizer

    if plan is not None:
        from distributed import tuning

        tuning.configure_tensorflow(plan)
    hvd.init()
    S, B = cfg.data.image_size, cfg.train.batch_size
    tf.keras.utils.set_random_seed(cfg.train.seed)
    model = M.build_model(cfg.model, S, 2)
    M.set_trainable(model, "finetune", cfg.train.finetune.freeze, cfg.train.finetune.freeze_first)
    steps_epoch = max(1, spec["epoch_images"] // (B * hvd.size()))
    opt = hvd.DistributedOptimizer(make_optimizer("finetune", cfg.train.finetune, cfg.train, hvd.size(), steps_epoch))
    model.compile(optimizer=opt, loss="categorical_crossentropy")
    rng = np.random.default_rng(hvd.rank())
    images = rng.integers(0, 256, (4, B, S, S, 1), dtype=np.uint8)
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (4, B))]
    aug = cfg.train.augment
    ds = (tf.data.Dataset.from_tensor_slices((images, labels)).repeat()
          .map(lambda x, y: (D.augment_images(tf.cast(x, tf.float32), aug), y), num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE))
    W, K, R = spec["warmup_steps"], spec["timed_steps"], spec["repeats"]

    class Timer(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    steps = []
    for _ in range(R):
        timer = Timer()
        timer.ends = []
        model.fit(ds, steps_per_epoch=W + K, epochs=1, verbose=0, callbacks=[timer])
        steps.append((timer.ends[W + K - 1] - timer.ends[W - 1]) / K if W else
                     (timer.ends[-1] - timer.ends[0]) / max(1, K - 1))
    # The slowest rank decides the pace; report rank 0's times, which the allreduce synchronises.
    threads = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
               "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
               "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    all_threads = hvd.allgather_object(threads)
    if hvd.rank() != 0:
        return None
    import statistics

    med = statistics.median(steps)
    return {"ranks": hvd.size(), "step_s_repeats": steps, "step_s": med,
            "images_per_s": hvd.size() * B / med, "per_rank": all_threads, "tensorflow": tf.__version__}


def register(subparsers) -> None:
    p = subparsers.add_parser("scaling", help="fine-tune throughput per number of Horovod ranks",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--np", default="1,2", help="rank counts, e.g. 1,2,4 (default %(default)s)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--modes", default="tuned,untuned", help="tuned, untuned or both (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="64x64, 1+2 steps, 2 repeats (labelled QUICK)")
    p.add_argument("--steps", help="untimed,timed steps per repeat (default 2,5; quick 1,2)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--epoch-images", type=int, default=EPOCH_IMAGES)
    p.add_argument("--hosts", help="hosts:slots as for python -m launch (default: this node)")
    p.add_argument("--cluster", help="cluster file as for python -m launch")
    p.add_argument("--mpi-launcher", choices=("horovodrun", "mpirun"), default="horovodrun")
    p.add_argument("--out", default="bench-results/scaling")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    p.set_defaults(func=main)


def main(args) -> int:
    from benchmarks import machine, report
    from data_prep.fsutil import atomic_write_json, atomic_write_text
    from launch.__main__ import resolve_allocation
    from launch.cluster import load_cluster
    from launch.commands import build_command, find_tool, node_topology, plan_layout
    from launch.hosts import LaunchError

    try:
        counts = [int(x) for x in str(args.np).split(",") if x.strip()]
        modes = [m for m in args.modes.split(",") if m]
        if not counts or min(counts) < 1 or set(modes) - set(MODES):
            raise ValueError
    except ValueError:
        print("cxr-bench: error: --np takes rank counts like 1,2,4 and --modes tuned and/or untuned", file=sys.stderr)
        return 2
    params = dict(QUICK) if args.quick else {"warmup_steps": 2, "timed_steps": 5, "repeats": 3}
    params.pop("image_size", None)
    if args.steps:
        w, k = (int(x) for x in args.steps.split(","))
        params.update(warmup_steps=w, timed_steps=k)
    if args.repeats:
        params["repeats"] = args.repeats
    try:
        cfg = bench_config(args.config, args.overrides, args.quick, args.image_size)
        cluster = load_cluster(args.cluster)
        ns = argparse.Namespace(hosts=args.hosts, hostfile=None)
        allocation = resolve_allocation(ns, cluster)
        node = node_topology(cluster)
        layouts = {n: plan_layout("train", allocation, cluster, node, n) for n in counts}
    except (LaunchError, ValueError) as e:
        print(f"cxr-bench: error: {e}", file=sys.stderr)
        return 2
    if max(counts) > 1 and not find_tool(args.mpi_launcher):
        print(f"cxr-bench: error: {args.mpi_launcher} not found on PATH; build Horovod (`make setup`) or use "
              f"--mpi-launcher mpirun", file=sys.stderr)
        return 2
    spec_base = {"config": args.config, "overrides": args.overrides, "quick": args.quick,
                 "image_size": args.image_size or (QUICK["image_size"] if args.quick else None),
                 "epoch_images": args.epoch_images, **params}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = CACHE / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results = {"benchmark": "scaling", "command": "python -m benchmarks " + shlex.join(args.argv or sys.argv[1:]),
               "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
               "launcher": args.mpi_launcher,
               "setup": {"config": args.config, "backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
                         "batch_size": cfg.train.batch_size, "epoch_images": args.epoch_images, **params},
               "machine": machine.facts(), "runs": {m: {} for m in modes}}
    base_env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    base_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + base_env["PYTHONPATH"] if base_env.get("PYTHONPATH") else "")
    base_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for mode in modes:
        for n in counts:
            layout = layouts[n]
            if mode == "untuned":
                layout = dataclasses.replace(layout, bind_to="none", map_by="slot", cores_per_rank=0)
            stamp = f"{os.getpid()}-scaling-{mode}-{n}-{int(time.time() * 1000)}"
            spec_file, out_file, log_file = (runs_dir / f"{stamp}.spec.json", runs_dir / f"{stamp}.out.json",
                                             runs_dir / f"{stamp}.log")
            spec_file.write_text(json.dumps({**spec_base, "mode": mode}))
            inner = [sys.executable, "-m", "benchmarks.scaling", "--worker", str(spec_file), str(out_file)]
            cmd = build_command("train", layout, config=args.config, cluster=cluster, launcher=args.mpi_launcher,
                                runtime=cfg.runtime, module_argv=inner, thread_vars=mode == "tuned",
                                hostfile=allocation.hostfile)
            print(f"== {mode}, {n} rank(s): {cmd.shell()}", flush=True)
            rec = {"command": cmd.shell(), "log": str(log_file)}
            try:
                with open(log_file, "w") as lf:
                    rc = subprocess.run(cmd.argv, env={**base_env, **cmd.env}, cwd=ROOT, stdout=lf,
                                        stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc == 0 and out_file.exists():
                r = json.loads(out_file.read_text())
                r["s_per_epoch"] = extrapolate(r["step_s"], args.epoch_images, cfg.train.batch_size, n)
                rec.update(status="ok", **r)
                print(f"   {r['images_per_s']:.2f} images/s ({r['step_s']:.3f} s/step)", flush=True)
            else:
                from benchmarks.epoch_timing import _tail

                rec.update(status="failed", error=f"exit {rc}: {_tail(log_file)}")
                print(f"   failed: {rec['error']}", flush=True)
            results["runs"][mode][str(n)] = rec
            spec_file.unlink(missing_ok=True)
            out_file.unlink(missing_ok=True)
            report.summarize_scaling(results)
            atomic_write_json(out_dir / "scaling.json", results)
    results["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    report.summarize_scaling(results)
    atomic_write_json(out_dir / "scaling.json", results)
    md = report.scaling_markdown(results)
    atomic_write_text(out_dir / "scaling.md", md)
    print(md)
    print(f"wrote {out_dir / 'scaling.json'}, {out_dir / 'scaling.md'}")
    ok = any(r.get("status") == "ok" for runs in results["runs"].values() for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(worker_entry(rank_worker, "scaling"))
