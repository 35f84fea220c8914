"""Tables and charts of the benchmark results (JSON in, Markdown and PNG out). No TensorFlow."""
from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.common import extrapolate
from benchmarks.timeline import TABLE_HEAD, markdown_row

PHASE_TITLES = {"warmup": "warm-up", "finetune": "fine-tune"}
FLOP_CONVENTION = ("FLOPs count convolutions and dense layers only, 1 multiply-accumulate = 2 FLOPs. Training "
                   "FLOPs per image = forward of the whole model + 2 x forward of the trainable part (every layer "
                   "from the first one with trainable weights to the output: the backward pass costs about twice "
                   "the forward); frozen layers before it run forward only. So warm-up (backbone frozen) costs about "
                   "1x forward, a fully trainable model 3x. MFU = achieved GFLOP/s / the best matmul GFLOP/s "
                   "of the row's compute type (float32, or bfloat16 for mixed_bfloat16 rows) measured on this machine "
                   "in the same run (over square shapes, by every variant's own framework: TensorFlow's MatMul, "
                   "PyTorch's torch.mm; the best of them).")


def _fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float) and abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{nd}f}"


def summarize_epoch(results: dict) -> dict:
    """Adds ``summary`` (per variant and phase) and ``peak_gflops`` to the results, and returns it."""
    setup = results["setup"]
    B, N = setup["batch_size"], setup["epoch_images"]
    ok = [v for v in results["variants"] if v.get("status") == "ok"]
    peak = max((v.get("matmul", {}).get("gflops", 0.0) for v in ok), default=0.0)
    peak_bf16 = max((v.get("matmul_bf16", {}).get("gflops", 0.0) for v in ok), default=0.0)
    results["peak_gflops"] = peak
    results["peak_gflops_bf16"] = peak_bf16
    base = next((v for v in ok if v["name"] == results.get("baseline")), None)
    summary = {}
    for v in results["variants"]:
        row = {"status": v.get("status"), "error": v.get("error", ""), "precision": v.get("precision", "float32")}
        # MFU against the peak of the variant's compute type: bfloat16 rows against the bfloat16 matmul
        v_peak = peak_bf16 if row["precision"] == "mixed_bfloat16" else peak
        for phase, ph in (v.get("phases") or {}).items():
            steps = ph["step_s"]
            med = statistics.median(steps)
            ips = B / med if med > 0 else 0.0
            flops_img = ph["flops"]["training_flops"]
            gflops = flops_img * ips / 1e9
            r = {
                "step_s": {"min": min(steps), "median": med, "max": max(steps)},
                "s_per_epoch": {"min": extrapolate(min(steps), N, B), "median": extrapolate(med, N, B),
                                "max": extrapolate(max(steps), N, B)},
                "images_per_s": ips,
                "train_gflop_per_image": flops_img / 1e9,
                "forward_gflop_per_image": ph["flops"]["forward_flops"] / 1e9,
                "gflops": gflops,
                "mfu": gflops / v_peak if v_peak else None,
            }
            if base and phase in (base.get("phases") or {}):
                b = statistics.median(base["phases"][phase]["step_s"])
                r["speedup"] = b / med if med > 0 else None
            row[phase] = r
        summary[v["name"]] = row
    results["summary"] = summary
    return summary


def _title(results) -> str:
    s = results["setup"]
    label = " — QUICK (not the article's setup)" if results.get("quick") else ""
    if results.get("fake"):
        label += " — FAKE WORKLOAD (tests)"
    return (f"# Epoch timing: {s['backbone'].upper()} {s['image_size']}x{s['image_size']}, batch {s['batch_size']}, "
            f"augmentation on{label}")


def epoch_markdown(results: dict) -> str:
    summary = results.get("summary") or summarize_epoch(results)
    s, m = results["setup"], results["machine"]
    phases = [p for p in ("warmup", "finetune") if any(p in (row or {}) for row in summary.values())] or \
        ["warmup", "finetune"]
    L = [_title(results), ""]
    L.append(f"Run {results.get('started', '?')} on {m.get('cpu_model', '?')} ({m.get('sockets')} socket(s), "
             f"{m.get('physical_cores')} physical cores). Command: `{results.get('command', '')}`")
    L.append("")
    rounds = s.get("rounds", 1)
    L.append(f"Seconds per epoch are EXTRAPOLATED: median seconds per step over {s['repeats']} repeats"
             + (f" x {rounds} interleaved rounds" if rounds > 1 else "") + " of "
             f"{s['timed_steps']} timed steps (after {s['warmup_steps']} untimed), times {s['steps_per_epoch']} "
             f"steps = {s['epoch_images']:,} images // batch {s['batch_size']}. One process, input from memory "
             f"(random images, in-graph augmentation as in training), weights none.")
    if m.get("busy"):
        L += ["", f"**Warning:** the machine was busy (1-minute load {m.get('loadavg_1m')} on "
                  f"{m.get('physical_cores')} cores at the start, {results.get('machine_end_loadavg_1m', '?')} at "
                  f"the end): timings are noisy."]
    L += ["", "| variant | precision | " + " | ".join(f"{PHASE_TITLES[p]} s/epoch" for p in phases) + " | " +
          " | ".join(f"speedup {PHASE_TITLES[p]}" for p in phases) + " |",
          "|---|---|" + "---:|" * (2 * len(phases))]
    for name, row in summary.items():
        if row["status"] != "ok":
            L.append(f"| {name} | {row['precision']} | "
                     + " | ".join([f"{row['status']}"] + ["–"] * (2 * len(phases) - 1)) + " |")
            continue
        cells = [_fmt(row[p]["s_per_epoch"]["median"], 0) if p in row else "–" for p in phases]
        cells += [f"{row[p]['speedup']:.2f}x" if p in row and row[p].get("speedup") else "–" for p in phases]
        L.append(f"| {name} | {row['precision']} | " + " | ".join(cells) + " |")
    L += ["", f"Speedup: the baseline ({results.get('baseline')}) median s/epoch over the variant's.", "",
          "## Details", "",
          "| variant | phase | s/step min / median / max | s/epoch min / median / max | images/s | "
          "train GFLOP/image | GFLOP/s | MFU |",
          "|---|---|---|---|---:|---:|---:|---:|"]
    for name, row in summary.items():
        for p in phases:
            if p not in row:
                continue
            r = row[p]
            st, se = r["step_s"], r["s_per_epoch"]
            L.append(f"| {name} | {PHASE_TITLES[p]} | {st['min']:.3f} / {st['median']:.3f} / {st['max']:.3f} | "
                     f"{_fmt(se['min'], 0)} / {_fmt(se['median'], 0)} / {_fmt(se['max'], 0)} | "
                     f"{r['images_per_s']:.2f} | {r['train_gflop_per_image']:.1f} | {r['gflops']:.1f} | "
                     + (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–") + " |")
    peaks = f"{results.get('peak_gflops', 0):.1f} GFLOP/s float32"
    if results.get("peak_gflops_bf16"):
        peaks += (f", {results['peak_gflops_bf16']:.1f} GFLOP/s bfloat16 (the MFU of the mixed_bfloat16 rows is "
                  f"against it)")
    L += ["", f"Matmul peaks in this run (best over square shapes): {peaks}. {FLOP_CONVENTION}",
          "", "## Variants", ""]
    for v in results["variants"]:
        L.append(f"- **{v['name']}**: {v.get('description', '')}. Threads: {v.get('threads')}; precision "
                 f"{v.get('precision', 'float32')}; rounds {v.get('rounds', 1)}"
                 + (f"; oneDNN {'on' if v['onednn'] else 'off'}" if v.get("onednn") is not None else "") + ".")
        if v.get("status") != "ok":
            L.append(f"  - {v.get('status')}: {v.get('error', '')}")
            continue
        vers = ", ".join(f"{k} {val}" for k, val in (v.get("versions") or {}).items())
        env = " ".join(f"{k}={val}" for k, val in (v.get("env") or {}).items()) or "(none set)"
        L.append(f"  - {v.get('install', '')}; {vers}")
        L.append(f"  - environment: {env}; thread pools intra/inter-op = "
                 f"{v.get('threads_effective', {}).get('intra_op')}/{v.get('threads_effective', {}).get('inter_op')} "
                 f"(0 = the framework's default); matmul {v.get('matmul', {}).get('gflops', 0):.1f} GFLOP/s"
                 + (f" float32, {v['matmul_bf16']['gflops']:.1f} bfloat16" if v.get("matmul_bf16") else ""))
    L += ["", "## Machine", "", *machine_lines(m), ""]
    return "\n".join(L)


def machine_lines(m: dict) -> list[str]:
    pk = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items())
    return [f"- CPU: {m.get('cpu_model')} ({m.get('vendor')}), {m.get('sockets')} socket(s), "
            f"{m.get('physical_cores')} physical cores, {m.get('logical_cpus')} logical CPUs, "
            f"{m.get('numa_nodes')} NUMA node(s){', virtual machine' if m.get('virtualized') else ''}",
            f"- flags: {' '.join(m.get('cpu_flags') or []) or '–'}",
            f"- memory: {m.get('memory_gib')} GiB; {m.get('os')}; Python {m.get('python')}",
            f"- packages (benchmark driver): {pk or '–'}; MPI: {m.get('mpi') or '–'}",
            f"- 1-minute load average at start: {m.get('loadavg_1m')}; host {m.get('hostname')}; {m.get('date')}"]


def epoch_chart(results: dict, path) -> Path | None:
    """Grouped bars: median s/epoch per variant and phase, min-max as error bars."""
    summary = results.get("summary") or summarize_epoch(results)
    if not any(r["status"] == "ok" for r in summary.values()):
        return None
    rows = list(summary.items())
    # matplotlib only when a chart is drawn, and its Agg backend chosen before pyplot loads (no display needed)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = [p for p in ("warmup", "finetune") if any(p in r for _, r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows) + 2), 4.2), dpi=110)
    width = 0.8 / max(1, len(phases))
    for i, p in enumerate(phases):
        xs, ys, lo, hi = [], [], [], []
        for j, (_, r) in enumerate(rows):
            if p not in r:
                continue
            se = r[p]["s_per_epoch"]
            xs.append(j + (i - (len(phases) - 1) / 2) * width)
            ys.append(se["median"])
            lo.append(se["median"] - se["min"])
            hi.append(se["max"] - se["median"])
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=PHASE_TITLES[p])
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:,.0f}", (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom", fontsize=7,
                        xytext=(0, 2), textcoords="offset points")
    for j, (_, r) in enumerate(rows):
        if r["status"] != "ok":
            ax.annotate(r["status"], (j, 0), ha="center", va="bottom", fontsize=8, color="gray", rotation=90,
                        xytext=(0, 4), textcoords="offset points")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([n for n, _ in rows], rotation=15)
    ax.set_ylabel("seconds per epoch (extrapolated)")
    s = results["setup"]
    title = f"{s['backbone'].upper()} {s['image_size']}px, batch {s['batch_size']}, {s['epoch_images']:,} images/epoch"
    if results.get("quick"):
        title += " — QUICK"
    if results.get("fake"):
        title += " — FAKE"
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- scaling

def summarize_scaling(results: dict) -> dict:
    """Throughput per (mode, ranks), speedup and efficiency vs the 1-rank run of the same mode
    (independent ranks: vs tuned's 1 rank), and the per-round (paired) speedups."""
    out = {}
    for mode, runs in results["runs"].items():
        base_runs = results["runs"].get("tuned", {}) if mode == "independent" else runs
        ok = {int(n): r for n, r in runs.items() if r.get("status") == "ok"}
        base_ok = {int(n): r for n, r in base_runs.items() if r.get("status") == "ok"}
        base = base_ok.get(1) or (base_ok[min(base_ok)] if base_ok else None)
        base_per_rank = (base["images_per_s"] / base["ranks"]) if base else None
        rows = {}
        for n, r in sorted(ok.items()):
            ips = r["images_per_s"]
            paired = []
            if base:
                for mine, theirs in zip(r.get("rounds", []), base.get("rounds", [])):
                    if mine.get("status") == theirs.get("status") == "ok":
                        paired.append(mine["images_per_s"] / theirs["images_per_s"] * base["ranks"])
            rows[n] = {"images_per_s": ips, "step_s": r["step_s"],
                       "speedup": ips / base["images_per_s"] * base["ranks"] if base else None,
                       "efficiency": ips / (n * base_per_rank) if base_per_rank else None,
                       "round_speedups": paired,
                       "round_speedup_median": statistics.median(paired) if paired else None,
                       "s_per_epoch": r.get("s_per_epoch")}
        out[mode] = rows
    results["summary"] = out
    return out


def timeline_lines(results: dict) -> list[str]:
    """The ``--timeline`` section: per (mode, ranks) the medians over rounds of the per-step
    breakdown from Horovod's timeline (``benchmarks.timeline``)."""
    rows = [(mode, n, r) for mode, runs in results["runs"].items() for n, r in runs.items() if r.get("timeline")]
    if not rows:
        return []
    L = ["", "Where a multi-rank step's time goes (Horovod timeline, rank 0's view; per step, median over the "
         "timed steps and the rounds): *rank skew* = how long the first rank to have the last gradient waited for "
         "the last rank (imbalance, includes up to one cycle), *backward window* = first to last gradient ready, "
         "*allreduce busy* = time with a reduction running (overlapped with the backward pass), *exposed* = last "
         "gradient ready on all ranks to its reduction done. Files: `timelines/` beside this report "
         "(open in chrome://tracing; summarise with `python -m benchmarks timeline FILE`).", "", *TABLE_HEAD]
    for mode, n, r in rows:
        L.append(markdown_row(f"{mode}, {n} ranks ({r['timeline']['rounds']} round(s))", r["timeline"],
                              r.get("step_s")))
    return L


def onednn_lines(results: dict) -> list[str]:
    """Whether the ranks of each mode ran TensorFlow's oneDNN ops, as they reported it: ``auto``
    leaves it to TensorFlow, which turns it off on AVX2-only CPUs, and it moves step times a lot."""
    seen = {}
    for mode, runs in results.get("runs", {}).items():
        states = {r.get("onednn") for run in runs.values() for r in (run.get("per_rank") or [])}
        if states:
            seen[mode] = "/".join(sorted("?" if x is None else ("on" if x else "off") for x in states))
    precisions = sorted({r.get("precision") or "float32" for runs in results.get("runs", {}).values()
                         for run in runs.values() for r in (run.get("per_rank") or [])})
    out = []
    if seen:
        out += ["", "oneDNN custom ops, as TensorFlow reported them in the ranks: "
                + ", ".join(f"{mode} {state}" for mode, state in seen.items()) + "."]
    if precisions:
        out += ["", f"Compute precision of the ranks: {', '.join(precisions)} (runtime.precision)."]
    return out


def scaling_markdown(results: dict) -> str:
    summary = results.get("summary") or summarize_scaling(results)
    s, m = results["setup"], results["machine"]
    label = " — QUICK" if results.get("quick") else ""
    L = [f"# Scaling: fine-tune throughput per rank count ({s['backbone'].upper()} {s['image_size']}px, "
         f"batch {s['batch_size']} per rank){label}", "",
         f"Run {results.get('started', '?')} on {m.get('cpu_model', '?')} ({m.get('sockets')} socket(s), "
         f"{m.get('physical_cores')} physical cores). Command: `{results.get('command', '')}`", "",
         f"Each rank count runs under {results.get('launcher', 'horovodrun')} with the launcher's layout "
         f"({s['warmup_steps']} untimed + {s['timed_steps']} timed steps per run, median of {s['repeats']} "
         f"interleaved rounds, allreduce of the gradients every step). 'tuned': binding and the project's thread "
         f"variables per rank (incl. HOROVOD_CYCLE_TIME); 'untuned': no binding, TensorFlow's and Horovod's "
         f"defaults in every rank; 'independent': the tuned layout with every rank training alone (no allreduce): "
         f"the machine's own limit for N processes. Efficiency = throughput / (ranks x 1-rank throughput of the "
         f"same mode; independent: of tuned). Per-round speedups pair each round's run with the same round's "
         f"1-rank run.", ""]
    if m.get("busy"):
        L += [f"**Warning:** busy machine (1-minute load {m.get('loadavg_1m')}): timings are noisy.", ""]
    L += ["| mode | ranks | images/s | s/step (median) | s/epoch (extrapolated) | speedup | per-round speedups "
          "| efficiency |",
          "|---|---:|---:|---:|---:|---:|---|---:|"]
    for mode, rows in summary.items():
        for n, r in rows.items():
            rounds = ", ".join(f"{x:.2f}" for x in r.get("round_speedups") or [])
            L.append(f"| {mode} | {n} | {r['images_per_s']:.2f} | {r['step_s']:.3f} | "
                     f"{_fmt(r.get('s_per_epoch'), 0)} | {_fmt(r['speedup'], 2)}x | {rounds} | "
                     f"{_fmt(None if r['efficiency'] is None else 100 * r['efficiency'], 0)}% |")
        for n, r in results["runs"][mode].items():
            if r.get("status") != "ok":
                L.append(f"| {mode} | {n} | {r.get('status')}: {r.get('error', '')} | | | | | |")
    L += onednn_lines(results)
    L += timeline_lines(results)
    L += ["", "Commands:", ""]
    for mode, runs in results["runs"].items():
        for n, r in runs.items():
            if r.get("command"):
                L.append(f"- {mode}, {n} rank(s): `{r['command']}`")
    L += ["", "## Machine", "", *machine_lines(m), ""]
    return "\n".join(L)
