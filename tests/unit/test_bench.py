"""Benchmarks: FLOP counting, extrapolation arithmetic, variants file, a variant that cannot be installed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.common import extrapolate, steps_per_epoch, tail_text
from benchmarks.epoch_timing import Variant, VariantError, current_satisfies, load_variants, variant_env

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- FLOPs

def test_vgg16_224_with_top_is_the_published_15_5_gmac():
    tf = pytest.importorskip("tensorflow")
    from benchmarks.flops import count_flops

    c = count_flops(tf.keras.applications.VGG16(include_top=True, weights=None))
    assert abs(c.macs / 15.5e9 - 1) < 0.02, c.macs
    assert c.forward_flops == 2 * c.macs
    assert len([layer for layer in c.layers if layer.kind == "conv"]) == 13
    assert len([layer for layer in c.layers if layer.kind == "dense"]) == 3
    # everything trainable: training = 3 x forward
    assert c.training_flops == 3 * c.forward_flops


def test_small_model_exact_counts_and_training_convention():
    tf = pytest.importorskip("tensorflow")
    from benchmarks.flops import count_flops

    x = tf.keras.Input((8, 8, 2))
    h = tf.keras.layers.Conv2D(4, 3, padding="same", name="c1")(x)          # 8*8*4 * 3*3*2 = 4608
    h = tf.keras.layers.Conv2D(6, 3, strides=2, padding="valid", name="c2")(h)  # 3*3*6 * 3*3*4 = 1944
    h = tf.keras.layers.GlobalAveragePooling2D()(h)
    y = tf.keras.layers.Dense(10, name="d")(h)                                  # 6*10 = 60
    m = tf.keras.Model(x, y)
    c = count_flops(m)
    assert [(lc.name, lc.macs) for lc in c.layers] == [("c1", 4608), ("c2", 1944), ("d", 60)]
    m.get_layer("c1").trainable = False
    c = count_flops(m)
    assert c.trainable_tail_macs() == 1944 + 60
    assert c.training_flops == 2 * (4608 + 1944 + 60) + 2 * 2 * (1944 + 60)
    for layer in m.layers:
        layer.trainable = False
    assert count_flops(m).training_flops == count_flops(m).forward_flops


# --------------------------------------------------------------------------- extrapolation

def test_extrapolation_arithmetic():
    assert steps_per_epoch(10_000, 16) == 625
    assert steps_per_epoch(10_000, 16, ranks=2) == 312  # full global batches, as training
    assert steps_per_epoch(10_000, 48) == 208
    assert extrapolate(2.0, 10_000, 16) == 1250.0
    assert extrapolate(0.5, 10_000, 32) == 0.5 * 312


def test_summary_numbers():
    results = {
        "setup": {"batch_size": 16, "epoch_images": 10_000},
        "baseline": "stock",
        "variants": [
            {"name": "stock", "status": "ok", "matmul": {"gflops": 100.0},
             "phases": {"finetune": {"step_s": [4.0, 2.0, 3.0],
                                     "flops": {"training_flops": 10e9, "forward_flops": 5e9}}}},
            {"name": "fast", "status": "ok", "matmul": {"gflops": 200.0},
             "phases": {"finetune": {"step_s": [1.0, 1.0, 1.5],
                                     "flops": {"training_flops": 10e9, "forward_flops": 5e9}}}},
            {"name": "broken", "status": "not installable", "error": "no such wheel"},
        ],
    }
    s = report.summarize_epoch(results)
    st = s["stock"]["finetune"]
    assert st["step_s"] == {"min": 2.0, "median": 3.0, "max": 4.0}
    assert st["s_per_epoch"] == {"min": 1250.0, "median": 1875.0, "max": 2500.0}
    assert st["images_per_s"] == pytest.approx(16 / 3)
    assert st["gflops"] == pytest.approx(10 * 16 / 3)
    assert results["peak_gflops"] == 200.0  # the best matmul of the run is the MFU denominator
    assert st["mfu"] == pytest.approx(10 * 16 / 3 / 200)
    assert s["fast"]["finetune"]["speedup"] == pytest.approx(3.0)
    assert s["broken"]["status"] == "not installable"
    md = report.epoch_markdown({**results, "machine": {}, "setup": {
        **results["setup"], "backbone": "vgg16", "image_size": 384, "repeats": 3, "timed_steps": 5,
        "warmup_steps": 2, "steps_per_epoch": 625}})
    assert "| broken | float32 | not installable |" in md and "EXTRAPOLATED" in md and "3.00x" in md


# --------------------------------------------------------------------------- variants

def test_shipped_variants_file():
    variants, baseline, common = load_variants(ROOT / "configs/bench/variants.yaml")
    by = {v.name: v for v in variants}
    assert list(by) == ["stock", "onednn", "onednn-tuned", "intel-tensorflow", "itex", "onednn-bf16",
                        "intel-tensorflow-bf16", "itex-bf16", "pytorch", "pytorch-bf16"]
    assert {v.name for v in variants if v.precision == "mixed_bfloat16"} == {"onednn-bf16", "intel-tensorflow-bf16",
                                                                            "itex-bf16", "pytorch-bf16"}
    assert {v.name for v in variants if v.framework == "pytorch"} == {"pytorch", "pytorch-bf16"}
    assert by["pytorch"].requirements == by["pytorch-bf16"].requirements == ("torch==2.13.0",)
    assert baseline == "stock"
    assert by["stock"].env_dict == {"TF_ENABLE_ONEDNN_OPTS": "0"} and by["stock"].threads == "default"
    assert by["onednn"].env_dict == {"TF_ENABLE_ONEDNN_OPTS": "1"} and by["onednn"].threads == "default"
    assert by["onednn-tuned"].threads == "tuned"
    assert by["stock"].requirements == by["onednn"].requirements == ("tensorflow-cpu==2.15.1",)
    assert by["intel-tensorflow"].requirements == ("intel-tensorflow==2.14.0",)
    assert "intel-extension-for-tensorflow[cpu]==2.15.0.0" in by["itex"].requirements
    assert any(c.startswith("numpy==1.") for c in common)


@pytest.mark.parametrize("text,match", [
    ("variants: {a: {python: current, colour: red}}", "variants.a.colour: unknown key"),
    ("variants: {a: {python: current, requirements: [x==1]}}", "exactly one of python"),
    ("variants: {a: {python: current, threads: many}}", "threads"),
    ("variants: {}", "non-empty"),
    ("baseline: z\nvariants: {a: {python: current}}", "baseline 'z'"),
    ("variants: {a: {python: current, framework: jax}}", "variants.a.framework: expected tensorflow or pytorch"),
])
def test_variants_file_errors(tmp_path, text, match):
    p = tmp_path / "v.yaml"
    p.write_text(text)
    with pytest.raises(VariantError, match=match):
        load_variants(p)


def test_current_interpreter_reused_only_for_exact_pins():
    import numpy

    assert current_satisfies([f"numpy=={numpy.__version__}"])
    assert not current_satisfies(["numpy>=1"])
    assert not current_satisfies(["numpy==0.0.1"])
    assert not current_satisfies(["cxr-no-such-package==1.0"])


def test_variant_env_clears_thread_variables():
    env = variant_env(Variant("v", python="current", env=(("TF_ENABLE_ONEDNN_OPTS", "0"),)),
                      base={"OMP_NUM_THREADS": "7", "KMP_AFFINITY": "x", "HOME": "/h", "OMPI_COMM_WORLD_RANK": "1"})
    assert env["TF_ENABLE_ONEDNN_OPTS"] == "0" and env["HOME"] == "/h"
    assert "OMP_NUM_THREADS" not in env and "KMP_AFFINITY" not in env and "OMPI_COMM_WORLD_RANK" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_variant_that_cannot_be_installed_is_reported_and_others_run(tmp_path):
    variants = tmp_path / "variants.yaml"
    variants.write_text(
        "variants:\n"
        "  here:\n    description: this interpreter\n    python: current\n"
        "  bogus:\n    description: does not exist\n    requirements: [cxr-bench-no-such-package==0.0.0]\n"
        "    pip_args: [--no-index]\n"
        "  here-tuned:\n    python: current\n    env: {TF_ENABLE_ONEDNN_OPTS: '1'}\n    threads: tuned\n")
    out = tmp_path / "out"
    env = {**os.environ, "CXR_BENCH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "benchmarks", "epoch-timing", "--variants", str(variants),
                        "--fake-workload", "0.002", "--quick", "--rounds", "2", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "epoch-timing.json").read_text())
    status = {v["name"]: v["status"] for v in res["variants"]}
    assert status == {"here": "ok", "bogus": "not installable", "here-tuned": "ok"}
    bogus = next(v for v in res["variants"] if v["name"] == "bogus")
    assert "cxr-bench-no-such-package" in bogus["error"]
    tuned = next(v for v in res["variants"] if v["name"] == "here-tuned")
    assert tuned["env"]["TF_ENABLE_ONEDNN_OPTS"] == "1" and "OMP_NUM_THREADS" in tuned["env"]
    here = next(v for v in res["variants"] if v["name"] == "here")
    assert "OMP_NUM_THREADS" not in here["env"]  # default threads: nothing set
    assert here["rounds"] == 2 and len(here["phases"]["finetune"]["step_s"]) == 2 * res["setup"]["repeats"]
    assert res["quick"] and res["setup"]["image_size"] == 64 and res["setup"]["extrapolated"]
    assert set(res["summary"]["here"]) >= {"warmup", "finetune"}
    md = (out / "epoch-timing.md").read_text()
    assert "| bogus | float32 | not installable |" in md and "QUICK" in md
    assert (out / "epoch-timing.png").stat().st_size > 1000
    assert "machine" in res and res["machine"]["physical_cores"] >= 1


def test_cli_lists_the_three_benchmarks():
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for name in ("epoch-timing", "scaling", "prep"):
        assert name in r.stdout


def test_scaling_summary_pairs_rounds_and_uses_tuned_as_independent_base():
    from benchmarks import report
    from benchmarks.scaling import merge_rounds

    def rec(n, ips_per_round):
        r = {"rounds": [{"status": "ok", "images_per_s": x, "step_s": 16 * n / x} for x in ips_per_round]}
        return merge_rounds(r, n, 10000, 16)

    results = {"runs": {"tuned": {"1": rec(1, [5.0, 4.0, 6.0]), "2": rec(2, [4.5, 4.0, 5.4])},
                        "independent": {"2": rec(2, [4.0, 3.6, 4.8])}},
               "setup": {"backbone": "vgg16", "image_size": 128, "batch_size": 16, "warmup_steps": 2,
                         "timed_steps": 5, "repeats": 3},
               "machine": {"cpu_model": "x", "sockets": 1, "physical_cores": 2}}
    s = report.summarize_scaling(results)
    t2 = s["tuned"][2]
    assert t2["images_per_s"] == pytest.approx(4.5) and t2["speedup"] == pytest.approx(0.9)
    assert t2["round_speedups"] == pytest.approx([0.9, 1.0, 0.9]) and t2["round_speedup_median"] == pytest.approx(0.9)
    assert t2["efficiency"] == pytest.approx(0.45)
    assert s["independent"][2]["speedup"] == pytest.approx(0.8)  # against tuned's 1 rank
    assert results["runs"]["tuned"]["2"]["step_s"] == pytest.approx(32 / 4.5)
    md = report.scaling_markdown(results)
    assert "| tuned | 2 | 4.50 |" in md and "0.90, 1.00, 0.90" in md and "| independent | 2 |" in md
    assert "oneDNN custom ops" not in md  # no rank said
    results["runs"]["tuned"]["2"]["per_rank"] = [{"onednn": True}, {"onednn": True}]
    results["runs"]["independent"]["2"]["per_rank"] = [{"onednn": False}, {"onednn": None}]
    md = report.scaling_markdown(results)
    assert "oneDNN custom ops, as TensorFlow reported them in the ranks: tuned on, independent ?/off." in md


def test_scaling_round_failures_are_kept_and_a_mode_fails_only_when_every_round_did():
    from benchmarks.scaling import merge_rounds

    r = merge_rounds({"rounds": [{"status": "failed", "error": "exit 1: boom"}]}, 2, 100, 16)
    assert r["status"] == "failed" and "boom" in r["error"]
    r["rounds"].append({"status": "ok", "images_per_s": 3.0, "step_s": 10.0})
    merge_rounds(r, 2, 100, 16)
    assert r["status"] == "ok" and r["step_s"] == 10.0 and "error" not in r


def test_scaling_timeline_medians_over_rounds_and_report_section():
    from benchmarks import report
    from benchmarks.scaling import merge_rounds

    def tl(skew, exposed):
        return {"steps": 7, "steps_used": 5, "tensors": 16, "skew_ms": skew, "backward_ms": 3800.0,
                "allreduce_ms": 90.0, "exposed_ms": exposed}

    rounds = [{"status": "ok", "images_per_s": 4.0, "step_s": 8.0, "timeline": tl(500.0, 10.0)},
              {"status": "ok", "images_per_s": 4.0, "step_s": 8.0, "timeline": tl(300.0, 30.0)},
              {"status": "ok", "images_per_s": 4.0, "step_s": 8.0, "timeline": tl(400.0, 20.0)},
              {"status": "ok", "images_per_s": 4.0, "step_s": 8.0, "timeline": {"error": "torn file"}}]
    rec = merge_rounds({"rounds": rounds}, 2, 10000, 16)
    assert rec["timeline"]["skew_ms"] == 400.0 and rec["timeline"]["exposed_ms"] == 20.0
    assert rec["timeline"]["rounds"] == 3 and rec["timeline"]["tensors"] == 16  # the torn one left out
    one = merge_rounds({"rounds": [{"status": "ok", "images_per_s": 2.0, "step_s": 8.0}]}, 1, 10000, 16)
    assert "timeline" not in one
    results = {"runs": {"tuned": {"1": one, "2": rec}},
               "setup": {"backbone": "vgg16", "image_size": 128, "batch_size": 16, "warmup_steps": 2,
                         "timed_steps": 5, "repeats": 4},
               "machine": {"cpu_model": "x", "sockets": 1, "physical_cores": 2}}
    md = report.scaling_markdown(results)
    # (400 + 20) ms waiting of an 8 s step
    assert "| tuned, 2 ranks (3 round(s)) | 400 | 3,800 | 90 | 20 | 5.2% |" in md
    assert "Where a multi-rank step's time goes" not in report.scaling_markdown(
        {**results, "runs": {"tuned": {"1": one}}})


def test_tail_text_prefers_the_last_error_line(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("starting\nValueError: first\n\nstill going\nRuntimeError: " + "x" * 400 + "\nbye\n\n")
    assert tail_text(log) == ("RuntimeError: " + "x" * 400)[:300]
    assert tail_text(log, 12) == "RuntimeError"
    log.write_text("one\ntwo\n")
    assert tail_text(log) == "two"
    assert tail_text(tmp_path / "missing.log") == "no log"


def test_scaling_plans_layouts_and_refuses_bad_arguments(capsys):
    from benchmarks.__main__ import build_parser
    from benchmarks.scaling import main, plan_campaign

    args = build_parser().parse_args(["scaling", "--np", "1,2", "--modes", "tuned,independent", "--quick",
                                      "--set", "model.backbone=tiny", "--hosts", "localhost:2"])
    c = plan_campaign(args)
    assert c.counts == (1, 2) and c.params == {"warmup_steps": 1, "timed_steps": 2, "repeats": 2}
    assert [lay.np for lay in c.layouts.values()] == [1, 2] and c.allocation.source == "hosts"
    assert c.runs() == [("tuned", 1), ("tuned", 2), ("independent", 2)]  # independent needs two ranks
    for bad in (["--np", "0"], ["--np", "a"], ["--modes", "fast"]):
        args = build_parser().parse_args(["scaling", *bad])
        args.argv = ["scaling", *bad]
        assert main(args) == 2
        assert "--np takes rank counts" in capsys.readouterr().err


def test_bfloat16_rows_get_their_mfu_from_the_bfloat16_peak():
    flops = {"training_flops": 10e9, "forward_flops": 4e9}
    results = {"setup": {"batch_size": 16, "epoch_images": 10000}, "baseline": "f32", "variants": [
        {"name": "f32", "status": "ok", "precision": "float32", "matmul": {"gflops": 200.0},
         "phases": {"finetune": {"step_s": [2.0], "flops": flops}}},
        {"name": "bf16", "status": "ok", "precision": "mixed_bfloat16", "matmul": {"gflops": 190.0},
         "matmul_bf16": {"gflops": 1000.0}, "phases": {"finetune": {"step_s": [0.5], "flops": flops}}}]}
    s = report.summarize_epoch(results)
    assert results["peak_gflops"] == 200.0 and results["peak_gflops_bf16"] == 1000.0
    assert s["f32"]["finetune"]["mfu"] == pytest.approx(10 * 8 / 200)
    assert s["bf16"]["finetune"]["mfu"] == pytest.approx(10 * 32 / 1000)
    assert s["bf16"]["finetune"]["speedup"] == pytest.approx(4.0)


def test_rounds_pool_the_repeats_of_each_variant():
    from benchmarks.epoch_timing import _pool

    recs: list = []
    _pool(recs, {"name": "a", "status": "ok", "matmul": {"gflops": 1.0}, "phases": {"finetune": {"step_s": [1.0]}}})
    _pool(recs, {"name": "b", "status": "failed", "error": "x"})
    _pool(recs, {"name": "a", "status": "ok", "matmul": {"gflops": 3.0}, "phases": {"finetune": {"step_s": [2.0]}}})
    _pool(recs, {"name": "b", "status": "ok", "phases": {"warmup": {"step_s": [5.0]}}})
    _pool(recs, {"name": "a", "status": "failed", "error": "late"})
    a, b = recs
    assert a["phases"]["finetune"]["step_s"] == [1.0, 2.0] and a["rounds"] == 2 and a["matmul"]["gflops"] == 3.0
    assert a["failed_rounds"] == ["late"]
    assert b["status"] == "ok" and b["rounds"] == 1 and b["phases"]["warmup"]["step_s"] == [5.0]


def test_variant_precision_is_checked(tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("variants:\n  x:\n    python: current\n    precision: float16\n")
    with pytest.raises(VariantError, match="variants.x.precision"):
        load_variants(f)


# --------------------------------------------------------------------------- the PyTorch peer (no torch needed)

def test_torch_peer_freezes_and_counts_as_the_keras_model():
    """The peer's frozen convolutions per phase and its FLOPs per image are those of the Keras model."""
    tf = pytest.importorskip("tensorflow")
    from benchmarks.flops import count_flops
    from benchmarks.torch_peer import frozen_convs, vgg16_flops
    from data_prep.config import load_config
    from distributed import model as M

    cfg = load_config(None, ["model.backbone=vgg16", "model.weights=none", "model.dense_units=64"])
    model = M.build_model(cfg.model, 64, 2)
    for phase, freeze, first in [("warmup", "first_n", 10), ("finetune", "first_n", 10), ("finetune", "first_n", 4),
                                 ("finetune", "all_conv", 10)]:
        M.set_trainable(model, phase, freeze, first)
        convs = [layer for layer in model.layers if isinstance(layer, tf.keras.layers.Conv2D)]
        n = frozen_convs(phase, freeze, first)
        assert n == sum(not c.trainable for c in convs), (phase, freeze, first)
        want = count_flops(model).summary()
        got = vgg16_flops(64, 64, 2, n)
        assert {k: got[k] for k in want} == want, (phase, freeze, first)
    assert frozen_convs("finetune") == 7  # the article's first 10 layers: 7 of VGG16's 13 convolutions


def test_pytorch_variant_runs_through_its_own_worker_and_costs_nothing_unless_asked(tmp_path):
    """A pytorch variant's rows come from benchmarks.torch_peer in the same table; one not in --only
    builds no venv and starts no process."""
    variants = tmp_path / "variants.yaml"
    variants.write_text(
        "variants:\n"
        "  tf:\n    python: current\n"
        "  pt:\n    python: current\n    framework: pytorch\n    precision: mixed_bfloat16\n"
        "  pt-unbuilt:\n    framework: pytorch\n    requirements: [cxr-bench-no-such-torch==0.0.0]\n")
    out, cache = tmp_path / "out", tmp_path / "cache"
    r = subprocess.run([sys.executable, "-m", "benchmarks", "epoch-timing", "--variants", str(variants),
                        "--only", "tf", "--only", "pt", "--fake-workload", "0.002", "--quick", "--out", str(out)],
                       cwd=ROOT, env={**os.environ, "CXR_BENCH_CACHE": str(cache)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "epoch-timing.json").read_text())
    by = {v["name"]: v for v in res["variants"]}
    assert set(by) == {"tf", "pt"} and by["pt"]["status"] == "ok"
    assert by["pt"]["framework"] == "pytorch" and by["tf"]["framework"] == "tensorflow"
    assert by["pt"]["worker"] == "benchmarks.torch_peer" and "worker" not in by["tf"]
    assert "| pt | mixed_bfloat16 |" in (out / "epoch-timing.md").read_text()
    assert not (cache / "venvs").exists()  # the unrequested pytorch variant built nothing
