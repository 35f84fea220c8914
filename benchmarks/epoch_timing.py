"""``python -m benchmarks epoch-timing --variants FILE [--config C] [--quick] [--out DIR]``

The article's table: seconds per epoch of the warm-up and the fine-tune phase for several
TensorFlow builds and settings ("variants", see ``configs/bench/variants.yaml``). Each variant
runs in its own process (its own interpreter or a cached venv, its own environment):

* the model of the article's setup (``distributed.model.build_model``: VGG16, 384x384, weights
  none: the weights do not change the cost), the phase's freezing (``set_trainable``) and
  optimizer (``distributed.trainer.prepare_phase``), the config's batch size;
* input: random images kept in memory, augmented in-graph exactly as in training
  (``distributed.data.augment_images``), so disk I/O is not timed;
* per phase: W untimed steps, then K timed steps, repeated R times (``fit`` of W+K steps; the
  time of the K steps from the end of step W to the end of step W+K);
* s/epoch = median s/step x steps of an epoch of ``--epoch-images`` (10,000: the article's
  training set) // batch size: EXTRAPOLATED, labelled so; min/median/max over the repeats;
* images/s, model FLOPs per image (``benchmarks.flops``) and achieved GFLOP/s as a fraction of
  the machine's float32 matmul peak measured in the same run (MFU).

``--quick``: 64x64 images, 1+2 steps, 2 repeats: every installable variant end to end in a few
minutes; its numbers are labelled QUICK and are not the article's setup.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import machine, report
from benchmarks.common import (
    CACHE,
    DEFAULT_CONFIG,
    EPOCH_IMAGES,
    QUICK,
    ROOT,
    THREAD_VARS,
    bench_config,
    parse_steps,
    steps_per_epoch,
    tail_text,
    timed_fit,
    worker_entry,
)
from data_prep.cli import UsageError
from data_prep.config import read_yaml_mapping
from data_prep.fsutil import atomic_write_json, atomic_write_text

DEFAULT_VARIANTS = ROOT / "configs" / "bench" / "variants.yaml"
PHASES = ("warmup", "finetune")


class VariantError(UsageError, ValueError):
    """A variants file problem, naming the variant and key."""


# --------------------------------------------------------------------------- variants file

@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    description: str = ""
    python: str = ""  # "current", a path, or "" when requirements are given
    requirements: tuple[str, ...] = ()
    pip_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    threads: str = "default"  # default | tuned
    precision: str = "float32"  # float32 | mixed_bfloat16 (runtime.precision of the timed model)
    framework: str = "tensorflow"  # tensorflow | pytorch (the peer in benchmarks/torch_peer.py)

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


_VARIANT_KEYS = {"description", "python", "requirements", "pip_args", "env", "threads", "precision", "framework"}
# The module whose --worker times a variant: the TensorFlow step here, or the PyTorch peer (imported
# only in its own process, so it costs nothing unless a pytorch variant is asked for).
WORKERS = {"tensorflow": "benchmarks.epoch_timing", "pytorch": "benchmarks.torch_peer"}


def _str_list(v, where) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise VariantError(f"{where}: expected a list of strings, got {v!r}")
    return tuple(v)


def load_variants(path) -> tuple[list[Variant], str, tuple[str, ...]]:
    """(variants in file order, baseline name, common requirements)."""
    p = Path(path)
    tree = read_yaml_mapping(p, VariantError, "variants")
    if not isinstance(tree.get("variants"), dict) or not tree["variants"]:
        raise VariantError(f"{p}: expected a mapping with a non-empty 'variants:' mapping")
    unknown = set(tree) - {"variants", "baseline", "common_requirements"}
    if unknown:
        raise VariantError(f"{p}: unknown key '{sorted(unknown)[0]}'; allowed: variants, baseline, common_requirements")
    common = _str_list(tree.get("common_requirements") or [], f"{p}: common_requirements")
    out = []
    for name, spec in tree["variants"].items():
        where = f"{p}: variants.{name}"
        spec = spec or {}
        if not isinstance(spec, dict):
            raise VariantError(f"{where}: expected a mapping")
        bad = set(spec) - _VARIANT_KEYS
        if bad:
            raise VariantError(f"{where}.{sorted(bad)[0]}: unknown key; allowed: {', '.join(sorted(_VARIANT_KEYS))}")
        python = spec.get("python") or ""
        reqs = _str_list(spec.get("requirements") or [], f"{where}.requirements")
        if bool(python) == bool(reqs):
            raise VariantError(f"{where}: give exactly one of python (an interpreter or 'current') and requirements")
        env = spec.get("env") or {}
        if not isinstance(env, dict):
            raise VariantError(f"{where}.env: expected a mapping of variables")
        threads = spec.get("threads", "default")
        if threads not in ("default", "tuned"):
            raise VariantError(f"{where}.threads: expected default or tuned, got {threads!r}")
        precision = spec.get("precision", "float32")
        if precision not in ("float32", "mixed_bfloat16"):
            raise VariantError(f"{where}.precision: expected float32 or mixed_bfloat16, got {precision!r}")
        framework = spec.get("framework", "tensorflow")
        if framework not in WORKERS:
            raise VariantError(f"{where}.framework: expected {' or '.join(WORKERS)}, got {framework!r}")
        out.append(Variant(name=str(name), description=str(spec.get("description", "")), python=str(python),
                           requirements=reqs, pip_args=_str_list(spec.get("pip_args") or [], f"{where}.pip_args"),
                           env=tuple((str(k), str(v)) for k, v in env.items()), threads=threads,
                           precision=precision, framework=framework))
    baseline = str(tree.get("baseline") or out[0].name)
    if baseline not in {v.name for v in out}:
        raise VariantError(f"{p}: baseline {baseline!r} is not a variant")
    return out, baseline, common


# --------------------------------------------------------------------------- environments

def _pinned(req: str) -> tuple[str, str] | None:
    req = req.split(";")[0].strip()
    if "==" not in req or any(c in req for c in "<>~!,"):
        return None
    name, ver = req.split("==", 1)
    return name.split("[")[0].strip(), ver.strip()


def _req_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def current_satisfies(reqs) -> bool:
    """True when this interpreter has exactly the ``name==version`` pins (and no extras are asked)."""
    for r in reqs:
        pin = _pinned(r)
        if pin is None or "[" in r:
            return False
        try:
            if metadata.version(pin[0]) != pin[1]:
                return False
        except metadata.PackageNotFoundError:
            return False
    return True


def venv_key(reqs, pip_args) -> str:
    blob = json.dumps({"reqs": sorted(reqs), "pip_args": list(pip_args),
                       "python": f"{sys.version_info.major}.{sys.version_info.minor}"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_env(variant: Variant, common=(), cache: Path = CACHE, log=print) -> tuple[str, str]:
    """(interpreter path, how it was obtained) for a variant; raises RuntimeError if it cannot be installed."""
    if variant.python:
        if variant.python == "current":
            return sys.executable, "current interpreter"
        py = shutil.which(variant.python) or variant.python
        if not Path(py).exists():
            raise RuntimeError(f"interpreter {variant.python} not found")
        return py, "given interpreter"
    if not variant.pip_args and current_satisfies(variant.requirements):
        return sys.executable, "current interpreter (has the pinned requirements)"
    reqs = list(variant.requirements) + [c for c in common if _req_name(c) not in
                                         {_req_name(r) for r in variant.requirements}]
    key = venv_key(reqs, variant.pip_args)
    venv = cache / "venvs" / key
    py = venv / "bin" / "python"
    if (venv / ".complete").exists() and py.exists():
        return str(py), f"cached venv {venv}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"venv-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two benchmark runs never build the same venv at once
        if (venv / ".complete").exists() and py.exists():
            return str(py), f"cached venv {venv}"
        shutil.rmtree(venv, ignore_errors=True)
        logfile = cache / "venvs" / f"{key}.log"
        log(f"[{variant.name}] building a venv for {' '.join(reqs)} in {venv} (log {logfile})")
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "w") as lf:
            def step(cmd):
                lf.write("$ " + shlex.join(cmd) + "\n")
                lf.flush()
                r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, text=True)
                return r.returncode

            if step([sys.executable, "-m", "venv", "--without-pip", str(venv)]) != 0:
                raise RuntimeError(f"cannot create a venv in {venv}; see {logfile}")
            pip = [sys.executable, "-m", "pip", "--python", str(py), "--disable-pip-version-check"]
            if step(pip + ["install", *variant.pip_args, *reqs]) != 0:
                raise RuntimeError(f"pip cannot install {' '.join(variant.requirements)}: "
                                   f"{_last_error(logfile)} (log {logfile})")
            # Editable (this checkout's code, no copy to go stale; the worker also runs with cwd=ROOT).
            if step(pip + ["install", "--no-deps", *variant.pip_args, "-e", str(ROOT)]) != 0:
                # No build backend reachable: make the project importable with a .pth instead.
                site = next((venv / "lib").glob("python3*/site-packages"))
                (site / "cxr_transfer_src.pth").write_text(str(ROOT) + "\n")
                lf.write(f"project not installed by pip; {site}/cxr_transfer_src.pth points at {ROOT}\n")
        (venv / ".complete").write_text(json.dumps({"requirements": reqs, "built": time.time()}) + "\n")
    return str(py), f"venv {venv} (built now)"


def _last_error(logfile: Path) -> str:
    try:
        lines = [ln.strip() for ln in logfile.read_text().splitlines() if ln.strip()]
    except OSError:
        return "see the log"
    errs = [ln for ln in lines if ln.startswith("ERROR:")]
    return (errs[0] if errs else (lines[-1] if lines else "no output"))[:300]


def variant_env(variant: Variant, base=None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for k in THREAD_VARS:
        env.pop(k, None)
    env.update(variant.env_dict)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for k in [k for k in env if k.startswith(("OMPI_COMM_WORLD", "HOROVOD_", "PMI_", "PMIX_"))]:
        env.pop(k)  # one process alone, not a rank of whatever launched us
    return env


# --------------------------------------------------------------------------- the worker (in the variant's process)

def worker(spec: dict) -> dict:
    """Time the phases in this process (the variant's interpreter and environment)."""
    t_start = time.perf_counter()
    cfg = bench_config(spec.get("config"), spec.get("overrides", ()), spec.get("quick", False),
                       spec.get("image_size"))
    out: dict[str, Any] = {"python": sys.executable, "pid": os.getpid(), "phases": {},
                           "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ}}
    plan = None
    if spec.get("threads") == "tuned":
        from distributed import runtime

        plan = runtime.apply(cfg.runtime, local_ranks=1, log=False)
        out["env"] = {k: os.environ[k] for k in THREAD_VARS if k in os.environ}
    if spec.get("fake"):
        return _fake_worker(spec, cfg, out)
    # Only now, after runtime.apply: TensorFlow, numpy and what imports them read the thread variables at load.
    import numpy as np
    import tensorflow as tf

    from benchmarks.flops import count_flops
    from distributed import data as D
    from distributed import model as M
    from distributed.trainer import prepare_phase

    if plan is not None:
        from distributed import runtime

        runtime.configure_tensorflow(plan)
    itex = None
    try:
        import intel_extension_for_tensorflow as itex_mod  # noqa: F401 - registers itself when present

        itex = getattr(itex_mod, "__version__", "?")
    except Exception:  # noqa: BLE001 - absent, or present but unusable here: both recorded
        pass
    out["versions"] = {"tensorflow": tf.__version__, **machine.package_versions(),
                       **({"itex_loaded": itex} if itex else {})}
    out["threads_effective"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                                "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    out["onednn_env"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset: TensorFlow's default)")
    precision = spec.get("precision", "float32")
    out["precision"] = precision
    # MFU's denominator: the best matmul over several shapes, in the variant's compute type.
    out["matmul"] = machine.matmul_peak_over_shapes("float32", seconds=spec.get("peak_seconds", 1.5))
    if precision == "mixed_bfloat16":
        out["matmul_bf16"] = machine.matmul_peak_over_shapes("bfloat16", seconds=spec.get("peak_seconds", 1.5))
    out["onednn"] = runtime_onednn()

    S, B = cfg.data.image_size, cfg.train.batch_size
    tf.keras.utils.set_random_seed(cfg.train.seed)
    model = M.build_model(cfg.model, S, 2, precision=precision)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, B, S, S, 1), dtype=np.uint8)
    labels = np.eye(2, dtype=np.float32)[rng.integers(0, 2, (4, B))]
    aug = cfg.train.augment

    def prepare(x, y):
        return D.augment_images(tf.cast(x, tf.float32), aug), y

    ds = D.map_and_prefetch(tf.data.Dataset.from_tensor_slices((images, labels)).repeat(), prepare,
                            cfg.runtime.data_threads, cfg.runtime.data_autotune)  # as training's pipeline
    W, K, R = spec["warmup_steps"], spec["timed_steps"], spec["repeats"]

    for phase in spec.get("phases", PHASES):
        # the training step itself: freezing, optimizer, loss and metric as trainer.train_phases builds them
        ntrain = prepare_phase(cfg, model, phase, 1, max(1, spec["epoch_images"] // B)).trainable
        flops = count_flops(model)
        steps = []
        for _ in range(R):
            steps.append(timed_fit(model, ds, W, K))
        out["phases"][phase] = {"step_s": steps, "trainable_weight_tensors": ntrain,
                                "flops": flops.summary()}
    out["worker_s"] = round(time.perf_counter() - t_start, 1)
    return out


def runtime_onednn():
    """Whether TensorFlow runs oneDNN in this worker (None: cannot say)."""
    from distributed.runtime import onednn_enabled  # after the thread variables: see worker()

    return onednn_enabled()


def _fake_worker(spec, cfg, out) -> dict:
    """Tests: the same protocol without TensorFlow (a sleep per step, fixed FLOPs)."""
    step = float(spec.get("fake_step_s", 0.01))
    out["versions"] = {"python": platform.python_version(), "fake": True}
    out["matmul"] = {"gflops": 100.0, "n": 0, "dtype": "float32"}
    for phase in spec.get("phases", PHASES):
        times = []
        for _ in range(spec["repeats"]):
            for _ in range(spec["warmup_steps"]):
                time.sleep(step)
            t0 = time.perf_counter()
            for _ in range(spec["timed_steps"]):
                time.sleep(step)
            times.append((time.perf_counter() - t0) / spec["timed_steps"])
        fwd = 1_000_000_000
        out["phases"][phase] = {"step_s": times, "trainable_weight_tensors": 2,
                                "flops": {"forward_macs": fwd // 2, "forward_flops": fwd,
                                          "trainable_tail_macs": fwd // 4, "training_flops": 2 * fwd,
                                          "convention": "fake"}}
    out["worker_s"] = 0.0
    return out


# --------------------------------------------------------------------------- the driver

def run_variant(variant: Variant, spec: dict, common=(), timeout: float = 4 * 3600, log=print) -> dict:
    rec: dict[str, Any] = {"name": variant.name, "description": variant.description, "threads": variant.threads,
                           "precision": variant.precision, "framework": variant.framework,
                           "requirements": list(variant.requirements), "env_set": variant.env_dict}
    t0 = time.perf_counter()
    try:
        py, how = ensure_env(variant, common, log=log)
    except Exception as e:  # noqa: BLE001 - any install failure is a result, not a crash
        rec.update(status="not installable", error=str(e))
        log(f"[{variant.name}] not installable: {e}")
        return rec
    rec["install"] = how
    rec["install_s"] = round(time.perf_counter() - t0, 1)
    tmp = CACHE / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{variant.name}-{int(time.time() * 1000)}"
    spec_file, out_file, log_file = tmp / f"{stamp}.spec.json", tmp / f"{stamp}.out.json", tmp / f"{stamp}.log"
    spec_file.write_text(json.dumps({**spec, "threads": variant.threads, "precision": variant.precision}))
    cmd = [py, "-m", WORKERS[variant.framework], "--worker", str(spec_file), str(out_file)]
    log(f"[{variant.name}] running in {py} ({how}); log {log_file}")
    try:
        with open(log_file, "w") as lf:
            r = subprocess.run(cmd, cwd=ROOT, env=variant_env(variant), stdout=lf, stderr=subprocess.STDOUT,
                               timeout=timeout)
        rc = r.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if rc != 0 or not out_file.exists():
        rec.update(status="failed", error=f"exit {rc}: {tail_text(log_file)}", log=str(log_file))
        log(f"[{variant.name}] failed: {rec['error']}")
        return rec
    rec.update(status="ok", **json.loads(out_file.read_text()))
    rec["log"] = str(log_file)
    for f in (spec_file, out_file):
        f.unlink(missing_ok=True)
    return rec


def register(subparsers) -> None:
    p = subparsers.add_parser("epoch-timing", help="s/epoch of warm-up and fine-tune per TensorFlow variant",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=str(DEFAULT_VARIANTS), help="variants file (default %(default)s)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config: batch size, image size, phases "
                                                                 "(default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set train.batch_size=32")
    p.add_argument("--only", action="append", default=[], metavar="VARIANT", help="run only these variants")
    p.add_argument("--quick", action="store_true", help="64x64, 1+2 steps, 2 repeats: a few minutes, labelled QUICK")
    p.add_argument("--steps", help="untimed,timed steps per repeat (default 2,5; quick 1,2)")
    p.add_argument("--repeats", type=int, help="repeats (default 3; quick 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the variants this many times in turn (A B C A B C ...), each round in fresh "
                        "processes; the repeats of all rounds are pooled (default %(default)s)")
    p.add_argument("--image-size", type=int, help="override the image size (default: the config's)")
    p.add_argument("--epoch-images", type=int, default=EPOCH_IMAGES,
                   help="images per epoch for the extrapolation (default %(default)s: the article's)")
    p.add_argument("--phases", default="warmup,finetune")
    p.add_argument("--out", default="bench-results/epoch-timing", help="output folder (JSON, Markdown, PNG)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per variant")
    p.add_argument("--fake-workload", type=float, default=None, help=argparse.SUPPRESS)  # tests: s/step, no TF
    p.set_defaults(func=main)


def main(args) -> int:
    try:
        variants, baseline, common = load_variants(args.variants)
    except VariantError as e:
        print(f"cxr-bench: error: {e}", file=sys.stderr)
        return 2
    if args.only:
        missing = sorted(set(args.only) - {v.name for v in variants})
        if missing:
            print(f"cxr-bench: error: no variant {missing[0]!r} in {args.variants}", file=sys.stderr)
            return 2
        variants = [v for v in variants if v.name in args.only]
    try:
        params = parse_steps(args.steps, args.quick, args.repeats)
        if args.timeout <= 0:
            raise ValueError("--timeout must be positive")
    except ValueError as e:
        print(f"cxr-bench: error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = bench_config(args.config, args.overrides, args.quick, args.image_size)
    except Exception as e:  # noqa: BLE001 - ConfigError: one line
        print(f"cxr-bench: error: {e}", file=sys.stderr)
        return 2
    spec = {"config": args.config, "overrides": args.overrides, "quick": args.quick,
            "image_size": args.image_size or (QUICK["image_size"] if args.quick else None),
            "phases": [p for p in args.phases.split(",") if p], "epoch_images": args.epoch_images,
            "fake": args.fake_workload is not None, "fake_step_s": args.fake_workload or 0.0, **params}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now().astimezone()
    results = {
        "benchmark": "epoch-timing",
        "command": "python -m benchmarks " + shlex.join(getattr(args, "argv", None) or sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"),
        "quick": args.quick,
        "fake": spec["fake"],
        "setup": {"config": args.config, "overrides": args.overrides, "backbone": cfg.model.backbone,
                  "weights": "none", "image_size": cfg.data.image_size, "batch_size": cfg.train.batch_size,
                  "augment": True, "freeze_first": cfg.train.finetune.freeze_first,
                  "warmup_optimizer": cfg.train.warmup.optimizer, "finetune_optimizer": cfg.train.finetune.optimizer,
                  "epoch_images": args.epoch_images,
                  "steps_per_epoch": steps_per_epoch(args.epoch_images, cfg.train.batch_size),
                  "extrapolated": True, **params},
        "baseline": baseline,
        "machine": machine.facts(),
        "variants": [],
    }
    if args.rounds < 1:
        print("cxr-bench: error: --rounds must be at least 1", file=sys.stderr)
        return 2
    results["setup"]["rounds"] = args.rounds
    for r in range(args.rounds):
        for v in variants:  # interleaved: a slow spell of the machine hits every variant alike
            print(f"== round {r + 1}/{args.rounds}, {v.name}: {v.description}", flush=True)
            rec = run_variant(v, spec, common, timeout=args.timeout, log=lambda m: print(m, flush=True))
            _pool(results["variants"], rec)
            _write(results, out_dir)  # partial results survive an interrupted run
    results["finished"] = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["machine_end_loadavg_1m"] = round(os.getloadavg()[0], 2)
    paths = _write(results, out_dir, final=True)
    print(report.epoch_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0 if any(v.get("status") == "ok" for v in results["variants"]) else 1


def _pool(records: list, rec: dict) -> None:
    """Add a variant's round to ``records``: a new record, or its step times appended to the
    record of the same variant from an earlier round (a failed round is noted, not pooled)."""
    old = next((x for x in records if x["name"] == rec["name"]), None)
    if old is None:
        rec["rounds"] = 1 if rec.get("status") == "ok" else 0
        records.append(rec)
        return
    if rec.get("status") != "ok":
        old.setdefault("failed_rounds", []).append(rec.get("error", rec.get("status")))
        return
    if old.get("status") != "ok":
        rec["rounds"] = 1
        records[records.index(old)] = rec
        return
    old["rounds"] = old.get("rounds", 1) + 1
    for phase, ph in rec.get("phases", {}).items():
        if phase in old["phases"]:
            old["phases"][phase]["step_s"] += ph["step_s"]
        else:
            old["phases"][phase] = ph
    for key in ("matmul", "matmul_bf16"):
        if rec.get(key, {}).get("gflops", 0) > old.get(key, {}).get("gflops", 0):
            old[key] = rec[key]


def _write(results, out_dir: Path, final: bool = False):
    report.summarize_epoch(results)
    j = atomic_write_json(out_dir / "epoch-timing.json", results)
    m = atomic_write_text(out_dir / "epoch-timing.md", report.epoch_markdown(results))
    paths = [j, m]
    if final:
        png = report.epoch_chart(results, out_dir / "epoch-timing.png")
        if png:
            paths.append(png)
    return paths


if __name__ == "__main__":
    sys.exit(worker_entry(worker, "epoch-timing"))
