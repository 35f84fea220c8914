"""``python -m benchmarks timeline FILE [--skip N]``: where a data-parallel step's time goes, from
a Horovod timeline (``HOROVOD_TIMELINE=FILE``, or ``python -m benchmarks scaling --timeline``).

Horovod's timeline is rank 0's view of every collective: for each gradient tensor a
``NEGOTIATE_ALLREDUCE`` span that opens when the first rank has the gradient ready and closes
when the last rank has it, then the ``ALLREDUCE`` itself (fusion-buffer copies and the MPI or
Gloo reduction). Every tensor is reduced once per step, so the k-th negotiation of each tensor
belongs to step k. Per step this module reports:

* ``skew_ms``: the negotiation of the gradient that was ready last: how long the first rank to
  have it waited for the last one, i.e. the faster ranks' idle time at the end of the step
  (rank imbalance; it includes up to one ``HOROVOD_CYCLE_TIME``);
* ``backward_ms``: first gradient ready (on any rank) to last gradient ready on every rank: the
  window in which the reductions overlap with the backward pass;
* ``allreduce_ms``: wall time with at least one reduction running (union of the spans);
* ``exposed_ms``: from the last gradient being ready on every rank to the end of the last
  reduction: communication the step waits for, not hidden behind computation.

Medians over the steps after the first ``skip`` (the untimed warm-up steps) are the summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from data_prep.cli import add_debug_arg, command

NEGOTIATE = "NEGOTIATE_ALLREDUCE"
REDUCE = "ALLREDUCE"
METRICS = ("skew_ms", "backward_ms", "allreduce_ms", "exposed_ms")


def load_events(path: str | Path) -> list[dict]:
    """The timeline's events. Horovod appends to the file while it runs and may leave it without
    the closing bracket (a killed run) or with a comma before it, so both are repaired."""
    text = Path(path).read_text().strip()
    if not text:
        raise ValueError(f"{path}: empty timeline (did the run use HOROVOD_TIMELINE with 2+ ranks?)")
    if text.endswith("]"):
        text = text[:-1]
    text = text.rstrip().rstrip(",") + "]"
    try:
        events = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a Horovod timeline ({e})") from None
    if not isinstance(events, list):
        raise ValueError(f"{path}: not a Horovod timeline (expected a JSON list of events)")
    return events


def spans(events: list[dict]) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """``{activity: {tensor id: [(begin_us, end_us), ...]}}`` from the B/E pairs, in time order."""
    stacks: dict[int, list[dict]] = defaultdict(list)
    out: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for e in events:
        ph, pid = e.get("ph"), e.get("pid")
        if ph == "B":
            stacks[pid].append(e)
        elif ph == "E" and stacks[pid]:
            b = stacks[pid].pop()
            out[b.get("name", "?")][pid].append((float(b["ts"]), float(e["ts"])))
    for per_tensor in out.values():
        for lst in per_tensor.values():
            lst.sort()
    return out


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for b, e in sorted(intervals):
        if end is None or b > end:
            total += e - b
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


def step_breakdown(events: list[dict]) -> list[dict]:
    """One dict per step (see the module doc) for the allreduced tensors."""
    sp = spans(events)
    neg, red = sp.get(NEGOTIATE, {}), sp.get(REDUCE, {})
    tensors = [t for t in neg if red.get(t)]
    if not tensors:
        return []
    n_steps = min(min(len(neg[t]), len(red[t])) for t in tensors)
    steps = []
    for k in range(n_steps):
        n_k = [neg[t][k] for t in tensors]
        r_k = [red[t][k] for t in tensors]
        first_ready = min(b for b, _ in n_k)
        last_b, all_ready = max(n_k, key=lambda be: be[1])  # the gradient that was ready last
        steps.append({"tensors": len(tensors),
                      "skew_ms": (all_ready - last_b) / 1e3,
                      "backward_ms": (all_ready - first_ready) / 1e3,
                      "allreduce_ms": _union_ms(r_k),
                      "exposed_ms": max(0.0, max(e for _, e in r_k) - all_ready) / 1e3})
    return steps


def summarize(path: str | Path, skip: int = 0, steps: list[dict] | None = None) -> dict:
    """Medians of :func:`step_breakdown` (of ``path``, or the given ``steps``) over the steps
    after the first ``skip``; all of them when there are no more than ``skip``."""
    if steps is None:
        steps = step_breakdown(load_events(path))
    used = steps[skip:] if len(steps) > skip else steps
    out = {"file": str(path), "steps": len(steps), "steps_used": len(used),
           "tensors": used[0]["tensors"] if used else 0}
    for m in METRICS:
        out[m] = statistics.median(s[m] for s in used) if used else None
    return out


def markdown_row(label: str, s: dict, step_s: float | None = None) -> str:
    """``| label | skew | backward | allreduce | exposed | share of the step |`` (ms)."""
    def f(x):
        return "-" if x is None else f"{x:,.0f}"

    share = "-"
    if step_s and s.get("skew_ms") is not None:
        share = f"{100 * (s['skew_ms'] + s['exposed_ms']) / (1e3 * step_s):.1f}%"
    return (f"| {label} | {f(s.get('skew_ms'))} | {f(s.get('backward_ms'))} | {f(s.get('allreduce_ms'))} | "
            f"{f(s.get('exposed_ms'))} | {share} |")


TABLE_HEAD = ["| run | rank skew (ms) | backward window (ms) | allreduce busy (ms) | exposed comm. (ms) "
              "| skew + exposed, % of step |", "|---|---:|---:|---:|---:|---:|"]


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("files", nargs="+", help="Horovod timeline JSON file(s)")
    ap.add_argument("--skip", type=int, default=1, help="leading steps to leave out (default %(default)s)")
    ap.add_argument("--steps", action="store_true", help="also print every step")


@command("cxr-bench timeline")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-bench timeline", description=__doc__.split("\n\n")[0])
    _add_arguments(ap)
    add_debug_arg(ap)
    return run(ap.parse_args(argv))


def run(args) -> int:
    rc = 0
    lines = list(TABLE_HEAD)
    for f in args.files:
        try:
            steps = step_breakdown(load_events(f))
        except (OSError, ValueError) as e:
            print(f"cxr-bench: error: {e}", file=sys.stderr)
            rc = 2
            continue
        if not steps:
            print(f"cxr-bench: error: {f}: no allreduce in the timeline", file=sys.stderr)
            rc = 2
            continue
        s = summarize(f, args.skip, steps)
        lines.append(markdown_row(f"{Path(f).name} ({s['steps_used']} of {s['steps']} steps, "
                                  f"{s['tensors']} tensors)", s))
        if args.steps:
            for i, st in enumerate(steps):
                lines.append(markdown_row(f"  step {i}", st))
    if len(lines) > len(TABLE_HEAD):
        print("\n".join(lines))
    return rc


def register(subparsers) -> None:
    p = subparsers.add_parser("timeline", help="where a data-parallel step's time goes (Horovod timeline)",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(main())
