"""``launch sweep --grid KEY=V1,V2 [--grid ...] [--seeds 0,1] [--resplit] [--reference POINT]`` and
``launch sweep --preset transfer-options``: configurations compared on the same test patients.

A **grid point** is one value per ``--grid`` key (the cartesian product of the grids) or one row of a
preset; an **arm** is a grid point with one seed (``--seeds``; without it the config's own
``train.seed``). Each arm is a whole ``launch pipeline`` in ``<run.dir>/<arm>/``, named from its values
(``freeze_first-2_seed-0``), one after another; an arm whose evaluation is complete for its config is
skipped, so the same command continues an interrupted sweep. Arms that share the prep config share the
prep output: ``prep.out`` is the base config's for every arm whose prep hash is the base's, and
``<prep.out>-<prep hash>`` for each other distinct prep config (a grid over ``prep.*``/``data.*`` keys or
``--resplit``), so prep runs once per distinct prep config, not once per arm.

Then ``<run.dir>/sweep.json``, ``sweep.md`` and ``sweep.png`` (:mod:`distributed.sweep_plot`, run as
its own process: launch loads no matplotlib): per arm its overrides, trainable parameters and frozen
layers (the run's ``trained_layers.json``), median seconds per epoch of the warm-up and the fine-tune
(the run's ``history.csv``), the validation AUC of the evaluated model (``val_predictions.csv``), the
test AUC with its patient-bootstrap interval (``metrics.json``), and its test AUC minus the reference
arm's of the same seed by a paired patient bootstrap on the same test patients (:mod:`launch.paired`;
only arms that share a prep are paired); per grid point the mean and sd over seeds. The best grid
point is the one with the highest mean **validation** AUC, never the test AUC.

The preset ``transfer-options`` is the article's question: option A trains the new head only (the
backbone frozen in both phases, ``train.finetune.freeze=all_conv``), option B also fine-tunes the top of
the backbone, frozen through block k for every block boundary (``freeze=blocks``,
``freeze_blocks=1..n-1``; VGG16: 4, 7, 10, 14 frozen layers of the article, blocks 1-4).
"""
from __future__ import annotations

import itertools
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from data_prep import backbones
from data_prep import config as cfgmod
from data_prep.fsutil import atomic_write_json, atomic_write_text
from data_prep.textsafe import console, md, md_code
from distributed import rundir
from launch import paired
from launch import sweep as seeds_sweep
from launch.hosts import LaunchError

PRESETS = ("transfer-options",)
PER_ARM_KEYS = ("run.dir", "prep.out")  # set by the sweep for each arm


@dataclass(frozen=True)
class Point:
    """One grid point: its name (a safe file name), its ``(key, value)`` settings, and for a preset the
    row's option label."""
    name: str
    sets: tuple[tuple[str, str], ...]
    option: str = ""


@dataclass
class Arm:
    point: Point
    seed: int | None
    name: str
    overrides: list[str] = field(default_factory=list)  # the --set lines of the arm (base --set first)


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["KEY=V1,V2", ...]`` to ``[(key, [values])]``; one-line LaunchError naming the bad item."""
    out: list[tuple[str, list[str]]] = []
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",")] if eq else []
        if not key or not vals or any(v == "" for v in vals):
            raise LaunchError(f"--grid {item!r}: expected KEY=V1,V2,... (a dotted config key and comma-separated "
                              f"values), e.g. train.finetune.freeze_first=2,6")
        if len(set(vals)) != len(vals):
            raise LaunchError(f"--grid {item!r}: a value is repeated")
        if key in [k for k, _ in out]:
            raise LaunchError(f"--grid {key}: given twice; list its values in one --grid")
        if key in PER_ARM_KEYS:
            raise LaunchError(f"--grid {key}: the sweep sets {key} per arm (<run.dir>/<arm>, prep.out per prep "
                              f"config); vary another key")
        out.append((key, vals))
    return out


def safe_name(text: str) -> str:
    """``text`` as a file name: letters, digits, ``.``, ``_`` and ``-`` kept, anything else ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".")
    return name or "_"


def grid_points(grid: list[tuple[str, list[str]]]) -> list[Point]:
    """The cartesian product of the grids, in the order given (the first key varies slowest). A point is
    named from its values with each key's last part (``freeze_first-2``), the whole key when two keys
    share their last part."""
    leaves = [k.rpartition(".")[2] for k, _ in grid]
    labels = [k if leaves.count(leaf) > 1 else leaf for (k, _), leaf in zip(grid, leaves)]
    points = []
    for values in itertools.product(*[vals for _, vals in grid]):
        name = "__".join(safe_name(f"{label}-{v}") for label, v in zip(labels, values))
        points.append(Point(name, tuple((k, v) for (k, _), v in zip(grid, values))))
    _unique([p.name for p in points], "grid points")
    return points


def preset_points(preset: str, backbone: str) -> list[Point]:
    """The arms of a preset for ``backbone`` (``transfer-options``: option A, then option B frozen through
    each block boundary)."""
    if preset != "transfer-options":
        raise LaunchError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    blocks = backbones.block_names(backbone)
    points = [Point("A-head-only", (("train.finetune.freeze", "all_conv"),), "A: train the head only")]
    for k in range(1, len(blocks)):
        points.append(Point(f"B-frozen-{safe_name(blocks[k - 1])}",
                            (("train.finetune.freeze", "blocks"), ("train.finetune.freeze_blocks", str(k))),
                            f"B: fine-tune above {blocks[k - 1]}"))
    return points


def _unique(names: list[str], what: str) -> None:
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LaunchError(f"two {what} get the same folder name {dup[0]!r}; use values that differ in letters "
                          f"or digits")


def make_arms(config: str, overrides: Sequence[str], points: list[Point], seeds: list[int] | None,
              resplit: bool) -> list[Arm]:
    """Every arm's ``--set`` lines, each checked through the config loader (a bad key or value: one line
    naming the grid item)."""
    base = _load(config, overrides, "")
    if seeds is not None and any(k == "train.seed" for p in points for k, _ in p.sets):
        raise LaunchError("--grid train.seed: use --seeds for seeds")
    arms = []
    for point in points:
        for seed in (seeds if seeds is not None else [None]):
            name = point.name + (f"_seed-{seed}" if seed is not None else "")
            sets = [f"{k}={v}" for k, v in point.sets]
            if seed is not None:
                sets.append(f"train.seed={seed}")
                if resplit:
                    sets.append(f"prep.seed={seed}")
            sets.append(f"run.dir={Path(base.run.dir) / name}")
            cfg = _load(config, [*overrides, *sets], point.name)
            h = cfgmod.prep_hash(cfg)
            if h != cfgmod.prep_hash(base):  # another prep config: its own folder, shared by its arms
                sets.append(f"prep.out={base.prep.out}-{h[:12]}")
            arms.append(Arm(point, seed, name, [*overrides, *sets]))
    _unique([a.name for a in arms], "arms")
    return arms


def _load(config: str, overrides: Sequence[str], point: str):
    try:
        return cfgmod.load_config(config, overrides)
    except cfgmod.ConfigError as e:
        raise LaunchError(f"grid point {point}: {str(e).replace('(in --set)', '(in --grid or --set)')}" if point
                          else str(e)) from None


# --------------------------------------------------------------------------- one arm's results

def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def seconds_per_epoch(run_dir) -> dict:
    """Median seconds of the warm-up and the fine-tune epochs in the run's ``history.csv``."""
    out: dict[str, list[float]] = {"warmup": [], "finetune": []}
    for row in rundir.read_history(Path(run_dir) / rundir.HISTORY):
        try:
            s = float(row.get("seconds") or "nan")
        except ValueError:
            continue
        if row.get("phase") in out and s == s:
            out[row["phase"]].append(s)
    return {k: _median(v) for k, v in out.items()}


def layers_of(run_dir) -> dict:
    """Trainable parameters and frozen/trained backbone layers per phase (``trained_layers.json``)."""
    rec = rundir.read_trained_layers(run_dir) or {}
    out = {}
    for phase in ("warmup", "finetune"):
        r = rec.get(phase) if isinstance(rec.get(phase), dict) else None
        out[phase] = None if r is None else {
            "trainable_params": r.get("trainable_params"), "non_trainable_params": r.get("non_trainable_params"),
            "backbone_layers": r.get("backbone_layers"), "frozen_layers": len(r.get("frozen") or []),
            "trained_layers": len(r.get("trained") or [])}
    return out


def arm_result(cfg, arm: Arm) -> dict:
    run = Path(cfg.run.dir)
    s = seeds_sweep.seed_result(cfg, arm.seed if arm.seed is not None else cfg.train.seed, arm.overrides)
    val = run / rundir.VAL_PREDICTIONS
    try:
        val_auc = paired.auc_of(val) if val.is_file() else None
    except paired.NotPaired:
        val_auc = None
    return {"arm": arm.name, "point": arm.point.name, "option": arm.point.option, "seed": arm.seed,
            "train_seed": cfg.train.seed,
            "values": dict(arm.point.sets), "overrides": arm.overrides, "run_dir": str(run),
            "prep_out": str(cfg.prep.out), "prep_hash": cfgmod.prep_hash(cfg), "layers": layers_of(run),
            "s_per_epoch": seconds_per_epoch(run), "val_auc": val_auc, "auc": s["auc"], "auc_ci": s["auc_ci"],
            "why_no_auc": s["why_no_auc"], "predictions": str(run / rundir.PREDICTIONS)}


# --------------------------------------------------------------------------- the summary

def _mean_sd(xs: list) -> tuple[float | None, float | None, int]:
    xs = [x for x in xs if x is not None]
    return (statistics.fmean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def compare(arms: list[dict], reference: str, n_boot: int, seed: int = 0,
            difference: Callable = paired.paired_difference) -> None:
    """Add ``vs_reference`` to each arm: its test AUC minus the reference point's arm of the same seed,
    paired on the same test patients (arms of the same prep), or why not."""
    refs = {a["seed"]: a for a in arms if a["point"] == reference}
    for a in arms:
        ref = refs.get(a["seed"])
        if a["point"] == reference:
            a["vs_reference"] = None
        elif ref is None:
            a["vs_reference"] = {"why": f"no arm of {reference} with seed {a['seed']}"}
        elif ref["prep_hash"] != a["prep_hash"]:
            a["vs_reference"] = {"why": "another prep (other test patients): not paired"}
        elif not (Path(ref["predictions"]).is_file() and Path(a["predictions"]).is_file()):
            a["vs_reference"] = {"why": f"no {rundir.PREDICTIONS}"}
        else:
            try:
                a["vs_reference"] = {"reference_arm": ref["arm"], **difference(ref["predictions"], a["predictions"],
                                                                               n_boot=n_boot, seed=seed)}
            except (paired.NotPaired, OSError) as e:
                a["vs_reference"] = {"why": str(e)}


def summarise(arms: list[dict], points: list[Point], reference: str, **head) -> dict:
    rows = []
    for p in points:
        mine = [a for a in arms if a["point"] == p.name]
        if not mine:
            continue
        t_mean, t_sd, t_n = _mean_sd([a["auc"] for a in mine])
        v_mean, v_sd, v_n = _mean_sd([a["val_auc"] for a in mine])
        d_mean, _, d_n = _mean_sd([(a.get("vs_reference") or {}).get("auc_diff") for a in mine])
        first = mine[0]["layers"].get("finetune") or {}
        rows.append({"point": p.name, "option": p.option, "values": dict(p.sets), "arms": [a["arm"] for a in mine],
                     "seeds": [a["seed"] for a in mine], "auc_mean": t_mean, "auc_sd": t_sd, "auc_n": t_n,
                     "val_auc_mean": v_mean, "val_auc_sd": v_sd, "val_auc_n": v_n,
                     "auc_diff_mean": d_mean, "auc_diff_n": d_n,
                     "trainable_params": {ph: (mine[0]["layers"].get(ph) or {}).get("trainable_params")
                                          for ph in ("warmup", "finetune")},
                     "frozen_layers": first.get("frozen_layers"), "backbone_layers": first.get("backbone_layers"),
                     "s_per_epoch": {ph: _mean_sd([a["s_per_epoch"][ph] for a in mine])[0]
                                     for ph in ("warmup", "finetune")},
                     "reference": p.name == reference, "best": False})
    scored = [r for r in rows if r["val_auc_mean"] is not None]
    best = max(scored, key=lambda r: r["val_auc_mean"]) if scored else None  # first of equals: max keeps it
    if best:
        best["best"] = True
    return {**head, "reference": reference, "best": best["point"] if best else None,
            "best_by": "highest mean validation ROC AUC over seeds (the test AUC never chooses)",
            "points": rows, "arms": arms}


def _f(x, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def _params(n) -> str:
    return "–" if n is None else f"{n:,}"


def _diff_text(a: dict) -> str:
    v = a.get("vs_reference")
    if v is None:
        return "reference"
    if v.get("auc_diff") is None:
        return "n/a: " + md(v.get("why") or "no difference (one class only)")
    return f"{v['auc_diff']:+.3f} [{_f(v['low'])}, {_f(v['high'])}]"


def _sd(x) -> str:
    return f" (sd {_f(x)})" if x is not None else ""


def _point_row(r: dict, arms: dict) -> str:
    """A grid point's row: one seed's test AUC with its interval, several seeds' mean (sd)."""
    mark = (" **best**" if r["best"] else "") + (" (reference)" if r["reference"] else "")
    frozen = "–" if r["frozen_layers"] is None else f"{r['frozen_layers']} of {r['backbone_layers']}"
    what = r["option"] or ", ".join(f"{k}={v}" for k, v in r["values"].items())
    one = arms.get(r["arms"][0]) if len(r["arms"]) == 1 else None
    test = (f"{_f(one['auc'])} [{_f(one['auc_ci']['low'])}, {_f(one['auc_ci']['high'])}]" if one and one["auc"]
            is not None else f"{_f(r['auc_mean'])}{_sd(r['auc_sd'])}")
    return (f"| {md_code(r['point'])}{mark} | {md(what)} | {frozen} | {_params(r['trainable_params']['finetune'])} "
            f"| {_f(r['s_per_epoch']['warmup'], 1)} | {_f(r['s_per_epoch']['finetune'], 1)} "
            f"| {_f(r['val_auc_mean'])}{_sd(r['val_auc_sd'])} | {test} "
            f"| {'–' if r['reference'] else _f(r['auc_diff_mean'])} |")


def sweep_markdown(s: dict) -> str:
    preset = s.get("preset")
    title = f"# Sweep `{preset}` of {md_code(s['config'])}" if preset else f"# Grid sweep of {md_code(s['config'])}"
    sets = s.get("overrides") or []
    grid = "; ".join(f"{md_code(k)} in {', '.join(md_code(v) for v in vs)}"
                     for k, vs in (s.get("grid") or {}).items())
    lines = [title, "",
             f"Base config {md_code(s['config'])}; overrides (`--set`) for every arm: "
             + (", ".join(md_code(o) for o in sets) if sets else "none") + ".",
             (f"Grid: {grid}. " if grid else "") + "Seeds: "
             + (", ".join(str(x) for x in s["seeds"]) if s.get("seeds") else "the config's train.seed")
             + (" (with prep.seed: one split per seed)" if s.get("resplit") else "") + ".", "",
             "## Grid points", "",
             "Mean (sd) over seeds; one seed: its test AUC [95% CI]. Trainable parameters in the fine-tune phase "
             "(warm-up: the head only); "
             "frozen: backbone layers from its input (of all); s/epoch: median seconds per epoch of the run's "
             "history. The best point (**best**) is chosen on the validation AUC, never on the test AUC; "
             "Δ test AUC is the mean over seeds of each arm's paired difference to the reference.", "",
             "| point | option | frozen layers (of backbone) | trainable params | s/epoch warm-up "
             "| s/epoch fine-tune | val AUC | test AUC | Δ test AUC vs reference |",
             "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [_point_row(r, {a["arm"]: a for a in s["arms"]}) for r in s["points"]]
    paired_head = s.get("paired") or {}
    lines += ["", "## Arms", "",
              f"Test ROC AUC of the plain evaluation with its patient-bootstrap 95% interval; Δ: test AUC minus "
              f"the reference arm's of the same seed, paired patient bootstrap on the same test patients "
              f"({paired_head.get('n_boot')} resamples, percentile 95% interval; only arms of the same prep).", "",
              "| arm | seed | trainable params | val AUC | test AUC [95% CI] | Δ vs reference [95% CI] | run |",
              "| :--- | ---: | ---: | ---: | :--- | :--- | :--- |"]
    for a in s["arms"]:
        test = (f"{_f(a['auc'])} [{_f(a['auc_ci']['low'])}, {_f(a['auc_ci']['high'])}]" if a["auc"] is not None
                else "none: " + md(a.get("why_no_auc") or "no AUC"))
        ft = (a["layers"].get("finetune") or {}).get("trainable_params")
        lines.append(f"| {md_code(a['arm'])} | {md(a['train_seed'])} | {_params(ft)} | {_f(a['val_auc'])} | {test} "
                     f"| {_diff_text(a)} | {md_code(a['run_dir'])} |")
    lines += ["", "How to read it: choose on the validation column; the test column and its interval say how "
              "well the chosen configuration does on patients it never saw, and a Δ interval that excludes 0 is "
              "a difference the test patients support. Differences between seeds of one point are the "
              "training's own spread.", ""]
    return "\n".join(lines)


def plot(sweep_json: Path, say) -> None:
    """``sweep.png`` by :mod:`distributed.sweep_plot` in its own process (matplotlib); a failure is said."""
    r = subprocess.run([sys.executable, "-m", "distributed.sweep_plot", str(sweep_json)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        say(console(f"no sweep.png: {(r.stderr.strip().splitlines() or ['exit ' + str(r.returncode)])[-1]}"))


# --------------------------------------------------------------------------- the command

def build_parser(prog: str):
    p = seeds_sweep.build_parser(prog)
    p.description = ("Train and evaluate one run per arm (each a whole `launch pipeline`): per seed (--seeds), or "
                     "per grid point (--grid, --preset) and seed, then summarise them in run.dir/sweep.json, sweep.md "
                     "(and sweep.png for a grid). Other options (--np, --hosts, --cluster, ...) go to each pipeline.")
    for action in p._actions:
        if action.dest == "seeds":
            action.required = False
            action.help = "comma-separated seeds, e.g. 0,1,2 (needed without --grid/--preset)"
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="vary a config key over these values (repeatable: the cartesian product of the grids)")
    p.add_argument("--preset", choices=PRESETS,
                   help="transfer-options: option A (head only) and option B frozen through each block boundary")
    p.add_argument("--reference", metavar="POINT",
                   help="grid point every other is compared with on the same test patients (default: the first)")
    return p


def cli(argv: Sequence[str], prog: str, run_pipeline: Callable[[list[str]], int]) -> int:
    """``launch sweep``: a grid or preset sweep, or (only --seeds) the seed sweep of :mod:`launch.sweep`."""
    args, rest = build_parser(prog).parse_known_args(list(argv))
    if not args.grid and not args.preset:
        if args.reference:
            raise LaunchError("--reference needs --grid or --preset")
        return seeds_sweep.cli(argv, prog, run_pipeline)
    return run(args, rest, prog, run_pipeline)


def run(args, rest: list[str], prog: str, run_pipeline: Callable[[list[str]], int]) -> int:
    """The grid/preset sweep (``args``: :func:`build_parser`'s)."""
    def say(m):
        print(f"[sweep] {m}", file=sys.stderr)

    seeds = seeds_sweep.parse_seeds(args.seeds) if args.seeds else None
    base = _load(args.config, args.overrides, "")
    if args.preset:
        if args.grid:
            raise LaunchError("--preset and --grid: give one of them")
        points = preset_points(args.preset, base.model.backbone)
        grid = None
    else:
        grid = parse_grid(args.grid)
        points = grid_points(grid)
    reference = args.reference or points[0].name
    if reference not in [p.name for p in points]:
        raise LaunchError(f"--reference {reference!r}: not a grid point; expected one of "
                          f"{', '.join(p.name for p in points)}")
    arms = make_arms(args.config, args.overrides, points, seeds, args.resplit)
    results = []
    for arm in arms:
        cfg = cfgmod.load_config(args.config, arm.overrides)
        rc = seeds_sweep.run_arm(cfg, args.config, arm.overrides, arm.name, arm.overrides[len(args.overrides):],
                                 rest, prog, run_pipeline, say, failed=f"arm {arm.name}")
        if rc != 0:
            return rc
        if "--dry-run" not in rest:
            results.append(arm_result(cfg, arm))
    if "--dry-run" in rest:
        return 0
    n_boot = base.eval.bootstrap
    compare(results, reference, n_boot)
    s = summarise(results, points, reference, kind="preset" if args.preset else "grid", config=str(args.config),
                  overrides=list(args.overrides), preset=args.preset, backbone=base.model.backbone,
                  grid={k: v for k, v in grid} if grid else None, seeds=seeds, resplit=args.resplit,
                  paired={"n_boot": n_boot, "seed": 0, "interval": "percentile", "by": "patient",
                          "method": "launch.paired.paired_difference"})
    out = Path(base.run.dir)
    atomic_write_json(out / "sweep.json", s)
    atomic_write_text(out / "sweep.md", sweep_markdown(s))
    plot(out / "sweep.json", say)
    best = s["best"] or "none (no validation AUC)"
    say(console(f"{len(results)} arm(s), {len(s['points'])} grid point(s); best on validation: {best}; "
                f"{out / 'sweep.json'}, {out / 'sweep.md'}"))
    return 0
