"""``python -m benchmarks reliability [--config C] [--set k=v] [--repeats N] [--out FILE]``

What stopping and periodic checkpoints cost (train.stop_signals, train.checkpoint_every_s):

* ``checkpoint``: one step checkpoint as training writes it (``distributed.trainer.save_step_checkpoint``:
  weights, optimizer state, run state, into a temporary folder renamed into place) of the config's
  model in the fine-tune phase (default VGG16, ``model.weights: none``: the size is what counts),
  seconds and MB, median of ``--repeats``;
* ``flag``: the stop flag's allreduce after every step (``distributed.run_control.StepControl``),
  microseconds per call, median over 200 back-to-back calls after 20 untimed ones, and over 40
  calls each after 0.2-0.4 s idle (as after a step's compute): run it with 2 ranks,
  ``horovodrun --gloo -np 2 -H localhost:2 python -m benchmarks reliability``.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from data_prep.config import load_config


def measure(cfg, repeats: int = 3, args_dir: str | None = None) -> dict | None:
    from distributed import runtime

    plan = runtime.apply(cfg.runtime, log=False)  # BEFORE TensorFlow, as training does
    import numpy as np

    from distributed import hvd
    from distributed import model as M
    from distributed import trainer as T
    from distributed.rundir import RunState

    runtime.configure_tensorflow(plan)
    hvd.init()
    for _ in range(20):
        hvd.allreduce(np.int32(0), op="max", name="cxr_stop")
    flag, after = [], []
    for _ in range(200):
        t = time.perf_counter()
        hvd.allreduce(np.int32(0), op="max", name="cxr_stop")  # exactly StepControl's call
        flag.append(time.perf_counter() - t)
    rng = np.random.default_rng(0)
    for _ in range(40):  # after a step's compute: the call waits for Horovod's next cycle
        time.sleep(float(rng.uniform(0.2, 0.4)))
        t = time.perf_counter()
        hvd.allreduce(np.int32(0), op="max", name="cxr_stop")
        after.append(time.perf_counter() - t)
    out = {"ranks": hvd.size(), "flag_us": round(statistics.median(flag) * 1e6, 1),
           "flag_after_idle_us": round(statistics.median(after) * 1e6, 1),
           "horovod_cycle_ms": os.environ.get("HOROVOD_CYCLE_TIME", "")}
    if not hvd.is_root():
        return None
    model = M.build_model(cfg.model, cfg.data.image_size, 2, precision=runtime.configure_precision(plan))
    ph = T.prepare_phase(cfg, model, "finetune", hvd.size(), 100)
    state = RunState(phase="finetune", epoch=3, step=211)
    with tempfile.TemporaryDirectory(dir=args_dir) as d:
        times, size = [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            size = T.save_step_checkpoint(Path(d), model, ph.optimizer, state)
            times.append(time.perf_counter() - t)
    out.update(backbone=cfg.model.backbone, params=int(model.count_params()),
               checkpoint_s=round(statistics.median(times), 2),
               checkpoint_s_all=[round(x, 2) for x in times], checkpoint_mb=round(size / 2**20, 1))
    return out


def run(args) -> int:
    cfg = load_config(args.config, ["model.weights=none", *args.overrides])  # the size is what counts
    res = measure(cfg, args.repeats, args.dir or None)
    if res is not None:
        text = json.dumps(res)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("reliability", help="cost of a step checkpoint and of the stop flag per step",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", default=None, help="YAML config (default: the defaults: VGG16, 384 px)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="")
    p.add_argument("--dir", default="", help="folder on the disk the checkpoints go to (default: the temp folder)")
    p.set_defaults(func=run)

