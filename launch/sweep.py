"""``python -m launch sweep --config C --seeds 0,1,2 [--resplit] [pipeline options]``: one run per seed.

Each seed is a whole ``launch pipeline`` (prep, train and evaluate across all ranks), one after the
other, with ``train.seed`` set to the seed and ``run.dir`` to ``<run.dir>/seed-<s>/``; ``--resplit``
also sets ``prep.seed`` (so the patient split and the balancing vary too) and ``prep.out`` to
``<prep.out>-seed-<s>``. Then ``<run.dir>/sweep.json``::

    {"config": "c.yaml", "overrides": ["train.lr=..."], "varied": ["train.seed", "run.dir"],
     "seeds": [0, 1], "resplit": false, "runs": [{"seed": 0, "auc": ..., "auc_ci": {"low", "high"},
     "overrides": [...], "run_dir": ...}, ...], "auc_n": 2, "auc_min": ..., "auc_max": ..., "auc_mean": ...,
     "auc_sd": ..., "auc_sd_ddof": 1, "without_auc": [{"seed": 2, "why": ...}]}

and ``sweep.md`` (a table of the same, with the base config, every ``--set`` override and the varied
keys: two sweeps of different options never look alike; values escaped for Markdown). The summary is
of the runs with a value: ``auc_n`` counts them (not the seeds), a run without an AUC is listed in
``without_auc`` with the reason; each run's value, the range (min-max) and the mean are given, and
``auc_sd``, the sample standard deviation (ddof 1) of the ``auc_n`` values, only when ``auc_n >= 2``
(else null): a description of the spread between runs, not an interval (with 3 runs the true sd lies
anywhere in about 0.52-6.3 times it). A seed whose evaluation is complete for its config is skipped,
so rerunning the same command after an interruption continues with the next unfinished seed (and
``pipeline`` itself resumes a seed's interrupted training). The values are the plain (primary) test
ROC AUCs (multilabel: the mean AUROC). No numpy: ``launch`` stays light. ``--grid`` and ``--preset``
(configurations compared on the same test patients) are :mod:`launch.grid`'s, which hands a sweep with
``--seeds`` alone to :func:`cli`.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

from data_prep.config import load_config
from data_prep.fsutil import atomic_write_json, atomic_write_text
from data_prep.textsafe import console, md, md_code
from distributed import results, rundir
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
                   help="also vary prep.seed (the patient split and balancing), with prep.out <prep.out>-seed-<s> "
                        "(with --grid/--preset: <prep.out>-<prep hash>)")
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
    m = results.read(Path(cfg.run.dir) / rundir.METRICS)
    auc = getattr(m.plain, "auc" if m.task == "binary" else "mean_auc", None)
    ci = getattr(m.plain, "auc_ci", None)
    why = None if auc is not None else str(getattr(m.plain, "note", None) or
                                            "metrics.json holds no test AUC for this run")
    return {"seed": seed, "prep_seed": cfg.prep.seed, "auc": auc, "why_no_auc": why,
            "auc_ci": {"low": getattr(ci, "low", None), "high": getattr(ci, "high", None)},
            "overrides": list(overrides),
            "selected_checkpoint": m.selected_checkpoint.to_json() if m.selected_checkpoint else None,
            "run_dir": str(cfg.run.dir)}


def varied_keys(resplit: bool) -> list[str]:
    """The config keys a sweep sets per seed (the others are the base config with its ``--set`` overrides)."""
    return ["train.seed", "run.dir"] + (["prep.seed", "prep.out"] if resplit else [])


def summary(seeds: Sequence[int], runs: list[dict], resplit: bool, config: str = "",
            overrides: Sequence[str] = ()) -> dict:
    aucs = [r["auc"] for r in runs if r["auc"] is not None]
    return {"config": str(config), "overrides": list(overrides), "varied": varied_keys(resplit),
            "seeds": list(seeds), "resplit": resplit, "runs": runs, "auc_n": len(aucs),
            "auc_min": min(aucs) if aucs else None, "auc_max": max(aucs) if aucs else None,
            "auc_mean": statistics.fmean(aucs) if aucs else None,
            "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else None, "auc_sd_ddof": 1,
            "without_auc": [{"seed": r["seed"], "why": r.get("why_no_auc") or "no AUC"} for r in runs
                            if r["auc"] is None]}


def _num(x, d: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


# n -> the 95% interval of a normal population's sd as multiples of the sample sd: sqrt((n-1)/chi2(0.975, n-1))
# to sqrt((n-1)/chi2(0.025, n-1)); with few runs the sample sd is itself uncertain.
SD_CI_FACTORS = {2: (0.45, 31.9), 3: (0.52, 6.3), 4: (0.57, 3.7), 5: (0.60, 2.9)}


def spread_text(s: dict) -> str:
    """n, range, mean and (n >= 2) the sample sd of the runs with a value, as ``sweep.md`` and the log say it."""
    n, runs = s["auc_n"], len(s["runs"])
    of = f"n = {n} run(s) with a test ROC AUC" + (f" of {runs}" if n != runs else "")
    if not n:
        return of + ": no range, mean or standard deviation"
    sd = (f"sample standard deviation of the {n} runs {_num(s['auc_sd'])} (ddof 1; a description of the spread "
          "between runs, not a confidence interval)" if s["auc_sd"] is not None else
          "no standard deviation (fewer than 2 runs with a value)")
    return f"{of}: range {_num(s['auc_min'])} – {_num(s['auc_max'])} (min – max), mean {_num(s['auc_mean'])}; {sd}"


def sweep_markdown(s: dict, config: str) -> str:
    def f(x):
        return "–" if x is None else f"{x:.3f}"

    rows = [f"| {r['seed']} | {md(r['prep_seed'])} | "
            f"{f(r['auc']) if r['auc'] is not None else 'none: ' + md(r.get('why_no_auc') or 'no AUC')} | "
            f"{f(r['auc_ci']['low'])} – {f(r['auc_ci']['high'])} | {md_code(r['run_dir'])} |" for r in s["runs"]]
    lo, hi = SD_CI_FACTORS.get(s["auc_n"] if s["auc_sd"] is not None else 0, (None, None))
    few = (f" With n = {s['auc_n']} a standard deviation says little: a 95% interval for the true one spans "
           f"about {lo}–{hi} times the sample's (chi-square, normal values).") if lo else ""
    varied = "train.seed and prep.seed (the split)" if s["resplit"] else "train.seed (one split: prep.seed fixed)"
    sets = s.get("overrides") or []
    return "\n".join([f"# Seed sweep of {md_code(config)}", "",
                      f"Base config {md_code(config)}; overrides (`--set`) for every seed: "
                      + (", ".join(md_code(o) for o in sets) if sets else "none") + ".",
                      f"Varied per seed: {', '.join(md_code(k) for k in s.get('varied') or varied_keys(s['resplit']))} "
                      f"({varied}). Test ROC AUC of the plain (primary) evaluation of each run, with its "
                      "patient-bootstrap 95% interval.", "",
                      "| seed | prep.seed | ROC AUC | 95% CI | run |", "| ---: | ---: | ---: | :--- | :--- |",
                      *rows, "",
                      spread_text(s) + ". The spread is from the seeds" + (" and splits" if s["resplit"] else "")
                      + "; each run's own sampling uncertainty is its 95% interval above." + few, ""])


def run_arm(cfg, config: str, sets: Sequence[str], label: str, shown: Sequence[str], rest: Sequence[str], prog: str,
            run_pipeline: Callable[[list[str]], int], say: Callable[[str], None], failed: str = "") -> int:
    """One arm of a sweep (a seed, a grid point's seed): its whole ``launch pipeline`` with ``sets``, unless
    its evaluation is complete for ``cfg`` (``--force`` runs it anyway); the pipeline's exit code, 0 when
    skipped. ``label`` names it in the log (``shown``: the overrides it adds), ``failed`` in the error."""
    why = seed_done(cfg)
    if why and "--force" not in rest:
        say(console(f"skip {label}: {why}"))
        return 0
    say(console(f"{label}: {' '.join(shown)}"))
    rc = run_pipeline(["pipeline", "--config", config, *sum([["--set", s] for s in sets], []), *rest])
    if rc != 0:
        print(f"{prog}: error: {failed or label} failed (exit code {rc}); rerun the same command to continue",
              file=sys.stderr)
    return rc


def cli(argv: Sequence[str], prog: str, run_pipeline: Callable[[list[str]], int]) -> int:
    """``run_pipeline(argv)``: ``launch``'s own main for ``pipeline ...`` (one seed's stages)."""
    args, rest = build_parser(prog).parse_known_args(list(argv))
    seeds = parse_seeds(args.seeds)
    base = load_config(args.config, args.overrides)

    def say(m):
        print(f"[sweep] {m}", file=sys.stderr)

    runs = []
    for seed in seeds:
        sets = [*args.overrides, *seed_overrides(base, seed, args.resplit)]
        cfg = load_config(args.config, sets)
        rc = run_arm(cfg, args.config, sets, f"seed {seed}", seed_overrides(base, seed, args.resplit), rest, prog,
                     run_pipeline, say)
        if rc != 0:
            return rc
        if "--dry-run" not in rest:
            runs.append(seed_result(cfg, seed, sets))
    if "--dry-run" in rest:
        return 0
    s = summary(seeds, runs, args.resplit, args.config, args.overrides)
    out = Path(base.run.dir)
    atomic_write_json(out / "sweep.json", s)
    atomic_write_text(out / "sweep.md", sweep_markdown(s, args.config))
    say(console(f"{len(runs)} run(s); {spread_text(s)}; {out / 'sweep.json'}, {out / 'sweep.md'}"))
    return 0
