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
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import machine, report, timeline
from benchmarks.common import (
    CACHE,
    DEFAULT_CONFIG,
    EPOCH_IMAGES,
    QUICK,
    ROOT,
    THREAD_VARS,
    bench_config,
    extrapolate,
    parse_steps,
    tail_text,
    timed_fit,
    worker_entry,
)
from data_prep.fsutil import atomic_write_json, atomic_write_text
from data_prep.log import env_rank
from launch.cluster import ClusterConfig, load_cluster, resolve_allocation
from launch.commands import LaunchSpec, Layout, StageCommand, build_command, find_tool, node_topology, plan_layout
from launch.hosts import Allocation, LaunchError

MODES = ("tuned", "untuned", "independent")


def rank_worker(spec: dict) -> dict | None:
    """One rank: time W+K fine-tune steps R times; rank 0 returns the result."""
    cfg = bench_config(spec.get("config"), spec.get("overrides", ()), spec.get("quick", False),
                       spec.get("image_size"))
    from distributed import runtime
    from distributed.precision import plan_precision

    plan = None
    alone = spec["mode"] == "independent"  # tuned layout, no Horovod collective while timing
    if spec["mode"] in ("tuned", "independent"):
        plan = runtime.apply(cfg.runtime, log=False)
    # Only now, after runtime.apply: TensorFlow, numpy and what imports them read the thread variables at load.
    import numpy as np
    import tensorflow as tf

    from distributed import data as D
    from distributed import hvd
    from distributed import model as M
    from distributed.trainer import prepare_phase

    if plan is not None:
        runtime.configure_tensorflow(plan)
    precision = (plan.precision if plan is not None else
                 plan_precision(cfg.runtime.precision, cfg.runtime.onednn, environ=os.environ)).precision
    if not alone:
        hvd.init()
    size = 1 if alone else hvd.size()
    S, B = cfg.data.image_size, cfg.train.batch_size
    tf.keras.utils.set_random_seed(cfg.train.seed)
    model = M.build_model(cfg.model, S, 2, precision=precision)
    steps_epoch = max(1, spec["epoch_images"] // (B * size))
    # the training step itself (trainer.train_phases'); independent ranks: Horovod not initialised, no allreduce
    prepare_phase(cfg, model, "finetune", size, steps_epoch)
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
               "onednn": runtime.onednn_enabled(),  # what TensorFlow does, not what was asked (auto)
               "precision": precision}
    all_threads = hvd.allgather_object(threads)
    if hvd.rank() != 0:
        return None
    ips = sum(B / r["step_s"] for r in all_threads) if alone else hvd.size() * B / med
    return {"ranks": hvd.size(), "step_s_repeats": steps, "step_s": med,
            "images_per_s": ips, "per_rank": all_threads, "tensorflow": tf.__version__}


def _timeline_summary(path: Path, warmup_steps: int) -> dict:
    try:
        return timeline.summarize(path, skip=warmup_steps)
    except (OSError, ValueError) as e:  # a missing or torn timeline is reported, not fatal
        return {"file": str(path), "error": str(e)}


def merge_rounds(rec: dict, ranks: int, epoch_images: int, batch_size: int) -> dict:
    """``rec``'s medians over its successful rounds (status ok when at least one round is)."""
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
    tls = [r["timeline"] for r in ok if r.get("timeline", {}).get("steps_used")]
    if tls:
        rec["timeline"] = {m: statistics.median(t[m] for t in tls) for m in timeline.METRICS}
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


# --------------------------------------------------------------------------- the driver

@dataclasses.dataclass(frozen=True)
class Campaign:
    """What every run of one ``scaling`` command shares."""
    args: argparse.Namespace
    cfg: Any  # the benchmark config (data_prep.config.Config)
    counts: tuple[int, ...]
    modes: tuple[str, ...]
    params: dict  # warmup_steps, timed_steps, repeats (the rounds)
    cluster: ClusterConfig
    allocation: Allocation
    layouts: dict[int, Layout]  # per rank count, as python -m launch train would place the ranks
    out_dir: Path

    def runs(self) -> list[tuple[str, int]]:
        """(mode, ranks) of one round; independent ranks need at least two."""
        return [(mode, n) for mode in self.modes for n in self.counts if not (mode == "independent" and n == 1)]


def plan_campaign(args) -> Campaign:
    """Check the arguments and plan the layouts; ValueError or LaunchError with the message for the user."""
    try:
        counts = tuple(int(x) for x in str(args.np).split(",") if x.strip())
    except ValueError:
        counts = ()
    modes = tuple(m for m in args.modes.split(",") if m)
    if not counts or min(counts) < 1 or set(modes) - set(MODES):
        raise ValueError("--np takes rank counts like 1,2,4 and --modes any of tuned, untuned, independent")
    params = parse_steps(args.steps, args.quick, args.repeats)
    cfg = bench_config(args.config, args.overrides, args.quick, args.image_size)
    cluster = load_cluster(args.cluster)
    allocation = resolve_allocation(cluster, hosts=args.hosts)
    node = node_topology(cluster)
    layouts = {n: plan_layout("train", allocation, cluster, node, n) for n in counts}
    return Campaign(args, cfg, counts, modes, params, cluster, allocation, layouts, Path(args.out))


def new_results(c: Campaign) -> dict:
    args, cfg = c.args, c.cfg
    return {"benchmark": "scaling", "command": "python -m benchmarks " + shlex.join(args.argv or sys.argv[1:]),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "quick": args.quick,
            "launcher": args.mpi_launcher,
            "setup": {"config": args.config, "backbone": cfg.model.backbone, "image_size": cfg.data.image_size,
                      "batch_size": cfg.train.batch_size, "epoch_images": args.epoch_images, **c.params},
            "machine": machine.facts(), "runs": {m: {} for m in c.modes}}


def rank_base_env() -> dict[str, str]:
    """This environment without thread variables (each mode sets its own), with this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_command(c: Campaign, mode: str, n: int, inner: list[str]) -> StageCommand:
    """The launcher's command for ``n`` ranks; untuned: no binding and no thread variables."""
    layout = c.layouts[n]
    if mode == "untuned":
        layout = dataclasses.replace(layout, bind_to="none", map_by="slot", cores_per_rank=0)
    return build_command(LaunchSpec("train", layout, config=c.args.config, cluster=c.cluster,
                                    launcher=c.args.mpi_launcher, runtime=c.cfg.runtime, module_argv=tuple(inner),
                                    thread_vars=mode != "untuned", hostfile=c.allocation.hostfile))


def run_once(c: Campaign, mode: str, n: int, rnd: int, base_env: dict[str, str]) -> tuple[str, dict]:
    """One (mode, ranks) run of round ``rnd``: (its shell command, its round record)."""
    runs_dir = CACHE / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-scaling-{mode}-{n}-{int(time.time() * 1000)}"
    spec_file, out_file, log_file = (runs_dir / f"{stamp}.spec.json", runs_dir / f"{stamp}.out.json",
                                     runs_dir / f"{stamp}.log")
    spec = {"config": c.args.config, "overrides": c.args.overrides, "quick": c.args.quick,
            "image_size": c.args.image_size or (QUICK["image_size"] if c.args.quick else None),
            "epoch_images": c.args.epoch_images, **c.params,
            "repeats": 1,  # one timed repeat per process; the rounds are the repeats
            "mode": mode}
    spec_file.write_text(json.dumps(spec))
    cmd = run_command(c, mode, n, [sys.executable, "-m", "benchmarks.scaling", "--worker", str(spec_file),
                                   str(out_file)])
    run_env = dict(base_env)
    tl_file = None
    if c.args.timeline and n > 1 and mode != "independent":
        # Horovod's rank 0 writes it; it runs on the first host (normally this one), which inherits
        # this environment under either launcher.
        tl_file = c.out_dir / "timelines" / f"{mode}-{n}ranks-round{rnd + 1}.json"
        tl_file.parent.mkdir(parents=True, exist_ok=True)
        tl_file.unlink(missing_ok=True)
        run_env["HOROVOD_TIMELINE"] = str(tl_file.resolve())
    print(f"== round {rnd + 1}/{c.params['repeats']}, {mode}, {n} rank(s): {cmd.shell()}", flush=True)
    one: dict[str, Any] = {"log": str(log_file)}
    try:
        with open(log_file, "w") as lf:
            rc = subprocess.run(cmd.argv, env=cmd.process_env(run_env), cwd=ROOT, stdout=lf,
                                stderr=subprocess.STDOUT, timeout=c.args.timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc == 0 and out_file.exists():
        r = json.loads(out_file.read_text())
        one.update(status="ok", **r)
        print(f"   {r['images_per_s']:.2f} images/s ({r['step_s']:.3f} s/step)", flush=True)
        if tl_file is not None:
            one["timeline"] = _timeline_summary(tl_file, c.params["warmup_steps"])
    else:
        one.update(status="failed", error=f"exit {rc}: {tail_text(log_file)}")
        print(f"   failed: {one['error']}", flush=True)
    spec_file.unlink(missing_ok=True)
    out_file.unlink(missing_ok=True)
    return cmd.shell(), one


def main(args) -> int:
    try:
        c = plan_campaign(args)
    except (LaunchError, ValueError) as e:
        print(f"cxr-bench: error: {e}", file=sys.stderr)
        return 2
    if max(c.counts) > 1 and not find_tool(args.mpi_launcher):
        print(f"cxr-bench: error: {args.mpi_launcher} not found on PATH; build Horovod (`make setup`) or use "
              f"--mpi-launcher mpirun", file=sys.stderr)
        return 2
    c.out_dir.mkdir(parents=True, exist_ok=True)
    results = new_results(c)
    base_env = rank_base_env()
    for rnd in range(c.params["repeats"]):  # interleaved: every round runs each (mode, ranks) once
        for mode, n in c.runs():
            command, one = run_once(c, mode, n, rnd, base_env)
            rec = results["runs"][mode].setdefault(str(n), {"command": command, "rounds": []})
            rec["rounds"].append(one)
            merge_rounds(rec, n, args.epoch_images, c.cfg.train.batch_size)
            report.summarize_scaling(results)
            atomic_write_json(c.out_dir / "scaling.json", results)  # partial results survive an interruption
    results["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    report.summarize_scaling(results)
    atomic_write_json(c.out_dir / "scaling.json", results)
    md = report.scaling_markdown(results)
    atomic_write_text(c.out_dir / "scaling.md", md)
    print(md)
    print(f"wrote {c.out_dir / 'scaling.json'}, {c.out_dir / 'scaling.md'}")
    ok = any(r.get("status") == "ok" for runs in results["runs"].values() for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(worker_entry(rank_worker, "scaling"))
