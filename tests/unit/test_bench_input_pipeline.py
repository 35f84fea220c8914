"""``python -m benchmarks input-pipeline``: argument parsing, the ratio and PASS/MISS arithmetic, the
Markdown, and one --quick run end to end (tiny backbone, 32 px, a tiny generated set)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common
from benchmarks import input_pipeline as ip
from benchmarks.__main__ import build_parser
from benchmarks.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- arguments

def test_parser_registers_the_subcommand_with_its_options():
    args = build_parser().parse_args(["input-pipeline", "--quick", "--steps", "1,3", "--repeats", "4", "--prep", "P",
                                      "--set", "model.backbone=tiny", "--image-size", "48", "--out", "O"])
    assert args.func is ip.main and args.quick and args.prep == "P" and args.out == "O"
    assert args.overrides == ["model.backbone=tiny"] and args.image_size == 48
    assert ip.parse_steps(args.steps, args.quick, args.repeats) == {"warmup_steps": 1, "timed_steps": 3, "repeats": 4}
    assert "input-pipeline" in build_parser().format_help()
    d = build_parser().parse_args(["input-pipeline"])
    assert d.config.endswith("configs/paper.yaml") and d.out == "bench-results/input-pipeline" and d.prep is None


def test_step_defaults_and_errors():
    assert ip.parse_steps(None, quick=True) == {"warmup_steps": 1, "timed_steps": 2, "repeats": 2}
    assert ip.parse_steps(None) == ip.FULL
    assert ip.parse_steps("0,3", repeats=1) == {"warmup_steps": 0, "timed_steps": 3, "repeats": 1}
    for bad in ("3", "a,b", "1,0", "0,1", "1,2,3"):
        with pytest.raises(ValueError):
            ip.parse_steps(bad)
    with pytest.raises(ValueError):
        ip.parse_steps(None, repeats=0)


def test_cli_refuses_bad_steps_and_a_missing_prep_output(tmp_path, capsys):
    assert bench_main(["input-pipeline", "--steps", "5", "--out", str(tmp_path / "o")]) == 2
    assert "--steps" in capsys.readouterr().err
    assert bench_main(["input-pipeline", "--prep", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_step_time_from_batch_end_times():
    ends = [1.0, 3.0, 4.0, 5.5]
    assert common.step_time(ends, 1, 3) == pytest.approx((5.5 - 1.0) / 3)
    assert common.step_time(ends, 0, 4) == pytest.approx((5.5 - 1.0) / 3)  # no untimed step: from step 1's end


# --------------------------------------------------------------------------- arithmetic and Markdown

def _results(real, memory, quick=False):
    return {"command": "python -m benchmarks input-pipeline", "quick": quick, "started": "today",
            "loadavg_start": 0.1, "loadavg_end": 0.2,
            "machine": {"cpu_model": "cpu", "sockets": 1, "physical_cores": 2},
            "setup": {"backbone": "vgg16", "image_size": 384, "batch_size": 16, "warmup_steps": 2, "timed_steps": 5,
                      "repeats": len(real), "epoch_images": 10_000, "train_images": 10_000, "shards": 10},
            "run": {"status": "ok", "modes": {"real": {"step_s": real}, "memory": {"step_s": memory}},
                    "pipeline_alone": {"real": {"images_per_s": 300.0}, "memory": {"images_per_s": 900.0}}}}


def test_ratio_of_medians_paired_ratios_and_miss():
    res = _results([2.0, 1.0, 1.5], [1.0, 1.0, 1.5])
    s = ip.summarize(res)
    assert s["modes"]["real"]["step_s"] == {"min": 1.0, "median": 1.5, "max": 2.0}
    assert s["modes"]["real"]["images_per_s"] == pytest.approx(16 / 1.5)
    assert s["modes"]["memory"]["images_per_s"] == pytest.approx(16.0)
    assert s["ratio"] == pytest.approx(1.0 / 1.5)  # real images/s over memory images/s
    assert s["paired_ratios"] == pytest.approx([0.5, 1.0, 1.0])  # memory s/step / real s/step, repeat by repeat
    assert s["paired_ratio_median"] == pytest.approx(1.0)
    assert s["pass"] is False and ip.verdict(s) == "MISS"
    assert s["s_per_epoch"]["real"] == pytest.approx(1.5 * 625)


@pytest.mark.parametrize("real_step,ok", [(1.0 / 0.96, True), (1.0 / 0.94, False), (0.9, True)])
def test_pass_threshold_is_095(real_step, ok):
    s = ip.summarize(_results([real_step], [1.0]))
    assert s["pass"] is ok and ip.verdict(s) == ("PASS" if ok else "MISS")


def test_markdown_has_the_table_and_the_target_line():
    res = _results([1.0, 1.1, 1.0], [1.0, 1.0, 0.98], quick=True)
    md = ip.markdown(res)
    assert "**Target: real / memory >= 0.95x — measured" in md and ": PASS**" in md
    assert "| mode | s/step median (min–max) | images/s |" in md
    assert "| real | 1.000 (1.000–1.100) | 16.00 |" in md and "| memory |" in md
    assert "| median of paired |" in md and "QUICK" in md
    assert "0.1 at the start, 0.2 at the end" in md and "## Machine" in md


def test_markdown_of_a_failed_run_says_no_result():
    res = _results([1.0], [1.0])
    res["run"] = {"status": "failed", "error": "exit 1: boom"}
    md = ip.markdown(res)
    assert "no result" in md and "boom" in md and ip.verdict(res["summary"]) == "NO RESULT"


# --------------------------------------------------------------------------- end to end

def test_quick_run_end_to_end_tiny(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("h5py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM_WORLD", "HOROVOD_", "SLURM_"))}
    env.update(CXR_BENCH_CACHE=str(tmp_path / "cache"), TF_CPP_MIN_LOG_LEVEL="2")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "input-pipeline", "--quick", "--set", "model.backbone=tiny",
                        "--image-size", "32", "--patients", "30", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "input-pipeline.json").read_text())
    assert res["quick"] and res["setup"]["backbone"] == "tiny" and res["setup"]["image_size"] == 32
    assert res["run"]["status"] == "ok" and res["run"]["order"] == ["real", "memory", "real", "memory"]
    for mode in ("real", "memory"):
        assert len(res["run"]["modes"][mode]["step_s"]) == 2
        assert res["summary"]["modes"][mode]["images_per_s"] > 0
        assert res["run"]["pipeline_alone"][mode]["images_per_s"] > 0
    assert res["summary"]["ratio"] > 0 and len(res["summary"]["paired_ratios"]) == 2
    assert isinstance(res["summary"]["pass"], bool)
    assert res["setup"]["train_images"] > 0 and res["loadavg_end"] >= 0
    assert (Path(res["setup"]["prep"]) / "manifest.json").is_file()
    md = (out / "input-pipeline.md").read_text()
    assert "QUICK" in md and "| real |" in md and "| memory |" in md and "Target: real / memory >= 0.95x" in md
