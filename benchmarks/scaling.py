"""``python -m benchmarks scaling --np 1,2,... [--config C] [--quick] [--out DIR]``

Fine-tune throughput (images/s over all ranks) for each rank count, started the way
``python -m launch train`` starts training (``horovodrun`` by default, the same layout), in up to
three modes: ``tuned`` (process binding + the project's thread variables per rank),
``untuned`` (no binding, TensorFlow's default thread pools in every rank) and ``independent``
(the tuned layout, but every rank trains alone: no Horovod allreduce, the floor that the machine
itself sets for N processes sharing its caches and memory bandwidth). Each rank runs the article's
fine-tune step (VGG16, frozen first layers, SGD, Horovod's DistributedOptimizer: the gradient
allreduce every step) on random in-memory images with in-graph augmentation. Scaling
efficiency = throughput(N) / (N x throughput(1)) within a mode (independent: against tuned, 1
rank). One rank runs as a plain process.

Runs are interleaved: every repeat is a round that runs each (mode, ranks) once, so slow drift of
a shared machine hits all of them alike; ratios are also computed per round (paired).
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
                                     extrapolate, parse_steps, timed_fit, worker_entry)

MODES = ("tuned", "untuned", "independent")


def rank_worker(spec: dict) -> dict | None:
    """One rank: time W+K fine-tune steps R times; rank 0 returns the result."""
    cfg = bench_config(spec.get("config"), spec.get("overrides", ()), spec.get("quick", False),
                       spec.get("image_size"))
    from distributed import runtime

    plan = None
    alone = spec["mode"] == "independent"  # tuned layout, no Horovod collective while timing
    if spec["mode"] in ("tuned", "independent"):
        plan = runtime.apply(cfg.runtime, log=False)
    import statistics

    import numpy as np
    import tensorflow as tf

    from distributed import data as D
    from distributed import hvd
    from distributed import model as M
    from distributed.trainer import make_optimizer

    if plan is not None:
        runtime.configure_tensorflow(plan)
    if not alone:
        hvd.init()
    size = 1 if alone else hvd.size()
    S, B = cfg.data.image_size, cfg.train.batch_size
    tf.keras.utils.set_random_seed(cfg.train.seed)
    model = M.build_model(cfg.model, S, 2)
    M.set_trainable(model, "finetune", cfg.train.finetune.freeze, cfg.train.finetune.freeze_first)
    steps_epoch = max(1, spec["epoch_images"] // (B * size))
    opt = make_optimizer("finetune", cfg.train.finetune, cfg.train, size, steps_epoch)
    if not alone:
        opt = hvd.DistributedOptimizer(opt)
    model.compile(optimizer=opt, loss="categorical_crossentropy")
    from data_prep.log import env_rank

    rng = np.random.default_rng(env_rank())  # the launcher's rank: Horovod may not be initialised yet
    images = rng.integers(0, 256, (4, B, S, S, 1), dtype=np.uint8)
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (4, B))]
    aug = cfg.train.augment
    ds = D.map_and_prefetch(tf.data.Dataset.from_tensor_slices((images, labels)).repeat(),
                            lambda x, y: (D.augment_images(tf.cast(x, tf.float32), aug), y),
                            cfg.runtime.data_threads, cfg.runtime.data_autotune)  # as training's pipeline
    W, K, R = spec["warmup_steps"], spec["timed_steps"], spec["repeats"]

    steps = [timed_fit(model, ds, W, K) for _ in range(R)]
    if alone:
        hvd.init()  # only now, to gather the results: nothing of Horovod ran while timing
    # With the allreduce the slowest rank sets the pace and rank 0's times are everybody's;
    # independent ranks each report their own.
    med = statistics.median(steps)
    threads = {"step_s": med, "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
               "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
               "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
               "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
               "onednn": runtime.onednn_enabled()}  # what TensorFlow does, not what was asked (auto)
    all_threads = hvd.allgather_object(threads)
    if hvd.rank() != 0:
        return None
    ips = sum(B / r["step_s"] for r in all_threads) if alone else hvd.size() * B / med
    return {"ranks": hvd.size(), "step_s_repeats": steps, "step_s": med,
            "images_per_s": ips, "per_rank": all_threads, "tensorflow": tf.__version__}


def _timeline_summary(path: Path, warmup_steps: int) -> dict:
    from benchmarks import timeline

    try:
        return timeline.summarize(path, skip=warmup_steps)
    except (OSError, ValueError) as e:  # a missing or torn timeline is reported, not fatal
        return {"file": str(path), "error": str(e)}


def merge_rounds(rec: dict, ranks: int, epoch_images: int, batch_size: int) -> dict:
    """``rec``'s medians over its successful rounds (status ok when at least one round is)."""
    import statistics

    ok = [r for r in rec["rounds"] if r.get("status") == "ok"]
    if not ok:
        rec.update(status="failed", error=rec["rounds"][-1].get("error", "failed"))
        return rec
    rec.pop("error", None)
    step = statistics.median(r["step_s"] for r in ok)
    rec.update(status="ok", ranks=ranks, step_s=step,
               images_per_s=statistics.median(r["images_per_s"] for r in ok),
               s_per_epoch=extrapolate(step, epoch_images, batch_size, ranks),
               per_rank=ok[-1].get("per_rank"), tensorflow=ok[-1].get("tensorflow"))
    from benchmarks.timeline import METRICS

    tls = [r["timeline"] for r in ok if r.get("timeline", {}).get("steps_used")]
    if tls:
        rec["timeline"] = {m: statistics.median(t[m] for t in tls) for m in METRICS}
        rec["timeline"].update(rounds=len(tls), tensors=tls[-1]["tensors"])
    return rec


def register(subparsers) -> None:
    p = subparsers.add_parser("scaling", help="fine-tune throughput per number of Horovod ranks",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--np", default="1,2", help="rank counts, e.g. 1,2,4 (default %(default)s)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--modes", default="tuned,untuned,independent",
                   help="any of tuned, untuned, independent (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="64x64, 1+2 steps, 2 repeats (labelled QUICK)")
    p.add_argument("--steps", help="untimed,timed steps per repeat (default 2,5; quick 1,2)")
    p.add_argument("--repeats", type=int, help="rounds; each runs every (mode, ranks) once (default 3)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--epoch-images", type=int, default=EPOCH_IMAGES)
    p.add_argument("--hosts", help="hosts:slots as for python -m launch (default: this node)")
    p.add_argument("--cluster", help="cluster file as for python -m launch")
    p.add_argument("--mpi-launcher", choices=("horovodrun", "mpirun"), default="horovodrun")
    p.add_argument("--out", default="bench-results/scaling")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run")
    p.add_argument("--timeline", action="store_true",
                   help="record a Horovod timeline of every multi-rank tuned/untuned run (OUT/timelines/) and "
                        "report rank skew, allreduce and exposed communication per step (python -m benchmarks "
                        "timeline)")
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
        print("cxr-bench: error: --np takes rank counts like 1,2,4 and --modes any of tuned, untuned, independent",
              file=sys.stderr)
        return 2
    try:
        params = parse_steps(args.steps, args.quick, args.repeats)
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
    rounds = params["repeats"]
    spec_base["repeats"] = 1  # one timed repeat per process; the rounds are the repeats
    plan = [(mode, n) for mode in modes for n in counts if not (mode == "independent" and n == 1)]
    for rnd in range(rounds):
        for mode, n in plan:
            layout = layouts[n]
            if mode == "untuned":
                layout = dataclasses.replace(layout, bind_to="none", map_by="slot", cores_per_rank=0)
            stamp = f"{os.getpid()}-scaling-{mode}-{n}-{int(time.time() * 1000)}"
            spec_file, out_file, log_file = (runs_dir / f"{stamp}.spec.json", runs_dir / f"{stamp}.out.json",
                                             runs_dir / f"{stamp}.log")
            spec_file.write_text(json.dumps({**spec_base, "mode": mode}))
            inner = [sys.executable, "-m", "benchmarks.scaling", "--worker", str(spec_file), str(out_file)]
            run_env = dict(base_env)
            tl_file = None
            if args.timeline and n > 1 and mode != "independent":
                # Horovod's rank 0 writes it; it runs on the first host (normally this one), which inherits
                # this environment under either launcher.
                tl_file = out_dir / "timelines" / f"{mode}-{n}ranks-round{rnd + 1}.json"
                tl_file.parent.mkdir(parents=True, exist_ok=True)
                tl_file.unlink(missing_ok=True)
                run_env["HOROVOD_TIMELINE"] = str(tl_file.resolve())
            cmd = build_command("train", layout, config=args.config, cluster=cluster, launcher=args.mpi_launcher,
                                runtime=cfg.runtime, module_argv=inner, thread_vars=mode != "untuned",
                                hostfile=allocation.hostfile)
            print(f"== round {rnd + 1}/{rounds}, {mode}, {n} rank(s): {cmd.shell()}", flush=True)
            rec = results["runs"][mode].setdefault(str(n), {"command": cmd.shell(), "rounds": []})
            one = {"log": str(log_file)}
            try:
                with open(log_file, "w") as lf:
                    rc = subprocess.run(cmd.argv, env=cmd.process_env(run_env), cwd=ROOT, stdout=lf,
                                        stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if rc == 0 and out_file.exists():
                r = json.loads(out_file.read_text())
                one.update(status="ok", **r)
                print(f"   {r['images_per_s']:.2f} images/s ({r['step_s']:.3f} s/step)", flush=True)
                if tl_file is not None:
                    one["timeline"] = _timeline_summary(tl_file, params["warmup_steps"])
            else:
                from benchmarks.epoch_timing import _tail

                one.update(status="failed", error=f"exit {rc}: {_tail(log_file)}")
                print(f"   failed: {one['error']}", flush=True)
            rec["rounds"].append(one)
            merge_rounds(rec, n, args.epoch_images, cfg.train.batch_size)
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
