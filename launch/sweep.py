"""``python -m launch sweep --config C --seeds 0,1,2 [--resplit] [pipeline options]``: one run per seed.

Each seed is a whole ``launch pipeline`` (prep, train and evaluate across all ranks), one after the
other, with ``train.seed`` set to the seed and ``run.dir`` to ``<run.dir>/seed-<s>/``; ``--resplit``
also sets ``prep.seed`` (so the patient split and the balancing vary too) and ``prep.out`` to
``<prep.out>-seed-<s>``. Then ``<run.dir>/sweep.json``::

    {"config": "c.yaml", "overrides": ["train.lr=..."], "varied": ["train.seed", "run.dir"],
     "seeds": [0, 1], "resplit": false, "runs": [{"seed": 0, "auc": ..., "auc_ci": {"low", "high"},
     "overrides": [...], "run_dir": ...}, ...], "auc_mean": ..., "auc_sd": ...}

and ``sweep.md`` (a table of the same, with the base config, every ``--set`` override and the varied
keys: two sweeps of different options never look alike; values escaped for Markdown). ``auc_sd`` is
given only with two or more seeds (else null, "n/a" in ``sweep.md`` and the log). A seed whose evaluation is complete for its config is skipped,
so rerunning the same command after an interruption continues with the next unfinished seed (and
``pipeline`` itself resumes a seed's interrupted training). The spread over seeds is the sample
standard deviation of the plain (primary) test AUCs. No numpy: ``launch`` stays light.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

from data_prep.config import load_config
from data_prep.fsutil import atomic_write_json, atomic_write_text
from data_prep.textsafe import console, md, md_code
from distributed import rundir
from launch import pipeline as pl
from launch.hosts import LaunchError


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train and evaluate one run per seed (each a whole "
                                "`launch pipeline`), then summarise the test AUCs in run.dir/sweep.json and sweep.md. "
                                "Other options (--np, --hosts, --cluster, ...) go to each pipeline.")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key (repeatable)")
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--resplit", action="store_true",
                   help="also vary prep.seed (the patient split and balancing), with prep.out <prep.out>-seed-<s>")
    return p


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LaunchError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise LaunchError(f"--seeds {text!r}: expected distinct non-negative integers, e.g. 0,1,2")
    return seeds


def seed_overrides(cfg, seed: int, resplit: bool) -> list[str]:
    """The ``--set`` lines that make the run of ``seed`` from the base config ``cfg``."""
    sets = [f"train.seed={seed}", f"run.dir={Path(cfg.run.dir) / f'seed-{seed}'}"]
    if resplit:
        sets += [f"prep.seed={seed}", f"prep.out={cfg.prep.out}-seed-{seed}"]
    return sets


def seed_done(cfg) -> str | None:
    """Why the seed's run is complete (trained and evaluated for this config), or None."""
    if not (Path(cfg.run.dir) / rundir.METRICS).is_file():
        return None
    for stage in ("train", "evaluate"):
        st = pl.stage_status(stage, cfg)
        if not st.complete:
            return None
    return f"{Path(cfg.run.dir) / rundir.METRICS} is complete for this config"


def seed_result(cfg, seed: int, overrides: Sequence[str] = ()) -> dict:
    m = json.loads((Path(cfg.run.dir) / rundir.METRICS).read_text())
    plain = m.get("plain") or {}
    auc = plain.get("auc") if m.get("task") == "binary" else plain.get("mean_auc")
    ci = plain.get("auc_ci") or {}
    return {"seed": seed, "prep_seed": cfg.prep.seed, "auc": auc,
            "auc_ci": {"low": ci.get("low"), "high": ci.get("high")}, "overrides": list(overrides),
            "selected_checkpoint": m.get("selected_checkpoint"), "run_dir": str(cfg.run.dir)}


def varied_keys(resplit: bool) -> list[str]:
    """The config keys a sweep sets per seed (the others are the base config with its ``--set`` overrides)."""
    return ["train.seed", "run.dir"] + (["prep.seed", "prep.out"] if resplit else [])


def summary(seeds: Sequence[int], runs: list[dict], resplit: bool, config: str = "",
            overrides: Sequence[str] = ()) -> dict:
    aucs = [r["auc"] for r in runs if r["auc"] is not None]
    return {"config": str(config), "overrides": list(overrides), "varied": varied_keys(resplit),
            "seeds": list(seeds), "resplit": resplit, "runs": runs,
            "auc_mean": statistics.fmean(aucs) if aucs else None,
            "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else None,
            "auc_sd_ddof": 1, "auc_n": len(aucs)}


def _num(x, d: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def sweep_markdown(s: dict, config: str) -> str:
    f = (lambda x: "–" if x is None else f"{x:.3f}")
    rows = [f"| {r['seed']} | {md(r['prep_seed'])} | {f(r['auc'])} | {f(r['auc_ci']['low'])} – "
            f"{f(r['auc_ci']['high'])} | {md_code(r['run_dir'])} |" for r in s["runs"]]
    varied = "train.seed and prep.seed (the split)" if s["resplit"] else "train.seed (one split: prep.seed fixed)"
    sets = s.get("overrides") or []
    return "\n".join([f"# Seed sweep of {md_code(config)}", "",
                      f"Base config {md_code(config)}; overrides (`--set`) for every seed: "
                      + (", ".join(md_code(o) for o in sets) if sets else "none") + ".",
                      f"Varied per seed: {', '.join(md_code(k) for k in s.get('varied') or varied_keys(s['resplit']))} "
                      f"({varied}). Test ROC AUC of the plain (primary) evaluation of each run, with its "
                      "patient-bootstrap 95% interval.", "",
                      "| seed | prep.seed | ROC AUC | 95% CI | run |", "| ---: | ---: | ---: | :--- | :--- |", *rows, "",
                      f"Mean {_num(s['auc_mean'])}, standard deviation {_num(s['auc_sd'])} (sample, over "
                      f"{len(s['runs'])} seed(s); n/a with fewer than 2): the spread from seeds"
                      + (" and splits" if s["resplit"] else "") + ", beside each run's sampling interval.", ""])


def cli(argv: Sequence[str], prog: str, run_pipeline: Callable[[list[str]], int]) -> int:
    """``run_pipeline(argv)``: ``launch``'s own main for ``pipeline ...`` (one seed's stages)."""
    args, rest = build_parser(prog).parse_known_args(list(argv))
    seeds = parse_seeds(args.seeds)
    base = load_config(args.config, args.overrides)
    say = (lambda m: print(f"[sweep] {m}", file=sys.stderr))
    runs = []
    for seed in seeds:
        sets = [*args.overrides, *seed_overrides(base, seed, args.resplit)]
        cfg = load_config(args.config, sets)
        why = seed_done(cfg)
        if why and "--force" not in rest:
            say(console(f"skip seed {seed}: {why}"))
        else:
            say(console(f"seed {seed}: {' '.join(seed_overrides(base, seed, args.resplit))}"))
            rc = run_pipeline(["pipeline", "--config", args.config, *sum([["--set", s] for s in sets], []), *rest])
            if rc != 0:
                print(f"{prog}: error: seed {seed} failed (exit code {rc}); rerun the same command to continue",
                      file=sys.stderr)
                return rc
            if "--dry-run" in rest:
                continue
        runs.append(seed_result(cfg, seed, sets))
    if "--dry-run" in rest:
        return 0
    s = summary(seeds, runs, args.resplit, args.config, args.overrides)
    out = Path(base.run.dir)
    atomic_write_json(out / "sweep.json", s)
    atomic_write_text(out / "sweep.md", sweep_markdown(s, args.config))
    say(console(f"{len(runs)} run(s): AUC mean {_num(s['auc_mean'])}, sd {_num(s['auc_sd'])}; {out / 'sweep.json'}, "
                f"{out / 'sweep.md'}"))
    return 0
