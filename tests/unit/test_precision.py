"""runtime.precision: the auto rule per CPU (measured where the CPU has bfloat16 instructions, cached,
shared from rank 0), the environment it sets, and float32 outputs from a bfloat16 model through
conversion, save/load, TTA-style prediction, Grad-CAM and predict."""
import json
import subprocess
import sys

import numpy as np
import pytest

from data_prep.config import load_config
from distributed import precision as P
from distributed import runtime
from distributed.precision import cpu_flags, cpu_model, decide, plan_precision

AMX = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_vnni"}
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
AVX2 = {"avx2", "fma"}


@pytest.mark.parametrize("setting,onednn,flags,env,want,onednn_env,measure", [
    ("auto", "auto", AMX, {}, "float32", "1", True),  # measured after TensorFlow loads (oneDNN on for it)
    ("auto", "on", AMX, {}, "float32", "", True),
    ("auto", "off", AMX, {}, "float32", "", False),
    ("auto", "auto", AMX, {"TF_ENABLE_ONEDNN_OPTS": "0"}, "float32", "", False),
    ("auto", "auto", AVX512_BF16, {}, "float32", "1", True),
    ("auto", "auto", AVX2, {}, "float32", "", False),  # no bfloat16 instructions: nothing to measure
    ("float32", "auto", AMX, {}, "float32", "", False),
    ("mixed_bfloat16", "auto", AVX2, {}, "mixed_bfloat16", "1", False),
    ("mixed_bfloat16", "off", AMX, {}, "mixed_bfloat16", "", False),
])
def test_the_rule(setting, onednn, flags, env, want, onednn_env, measure):
    p = plan_precision(setting, onednn, flags, env)
    assert (p.precision, p.onednn_env, p.measure) == (want, onednn_env, measure)
    assert p.reason and p.reason in p.describe()
    assert (p.precision in p.describe()) != measure  # "precision auto: to be measured (...)" until decided


@pytest.mark.parametrize("ratio,source,flags,want,reason", [
    (1.9, "measured", AVX512_BF16, "mixed_bfloat16", "auto: measured 1.90x float32 on this CPU"),
    (1.9, "cached", AVX512_BF16, "mixed_bfloat16", "auto: cached measurement, 1.90x float32 on this CPU"),
    (5.3, "shared", AMX, "mixed_bfloat16", "auto: rank 0 measured 5.30x float32"),
    (1.10, "measured", AVX512_BF16, "float32", "auto: measured bfloat16 1.10x float32 on this CPU, below the 1.15x"),
    (0.6, "measured", AMX, "float32", "below the 1.15x margin"),  # a net too small to gain, even on AMX
    (None, "measured", AMX, "mixed_bfloat16", "not measured"),
    (None, "measured", AVX512_BF16, "float32", "not measured"),
])
def test_decide_by_the_measured_ratio(ratio, source, flags, want, reason):
    pending = plan_precision("auto", "auto", flags, {})
    got = decide(pending, ratio, source, figures={"ratio": ratio}, flags=flags)
    assert got.precision == want and reason in got.reason and not got.measure
    assert got.onednn_env == "1" and dict(got.figures) == {"ratio": ratio}
    forced = plan_precision("float32", "auto", flags, {})
    assert decide(forced, 9.0) is forced  # a plan that waits for nothing is left alone


def test_cpu_model_names_family_and_model(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                 "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_model(f) == "AMD EPYC (family 25, model 17)"


def _masked_cpuinfo(tmp_path, drop):
    """This machine's /proc/cpuinfo with the flags in ``drop`` removed."""
    text = open("/proc/cpuinfo").read()
    lines = [" ".join(w for w in ln.split(" ") if w not in drop) if ln.startswith("flags") else ln
             for ln in text.splitlines()]
    f = tmp_path / "cpuinfo"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_no_calibration_without_bfloat16_instructions(tmp_path, monkeypatch):
    """The bfloat16 flags masked from cpuinfo: auto is float32 and nothing is measured."""
    masked = _masked_cpuinfo(tmp_path, {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"})
    real = P.cpu_flags
    monkeypatch.setattr(P, "cpu_flags", lambda cpuinfo=masked: real(cpuinfo))
    monkeypatch.setattr(runtime, "_probe", lambda *a: pytest.fail("calibrated without bfloat16 instructions"))
    cfg = load_config(None, ["runtime.precision=auto"])
    plan = runtime.apply(cfg.runtime, local_ranks=1, environ={}, log=False)
    assert not plan.precision.measure and "no bfloat16 instructions" in plan.precision.reason
    assert runtime.settle_precision(plan, cfg) is plan and plan.precision.precision == "float32"


@pytest.mark.parametrize("flags,ratio,want", [(AMX, 5.3, "mixed_bfloat16"), (AVX512_BF16, 1.9, "mixed_bfloat16"),
                                              (AVX512_BF16, 0.93, "float32")])
def test_settle_takes_root_figures_on_every_rank(monkeypatch, flags, ratio, want):
    """Root measures once; the others take its figures through ``share`` (Horovod's broadcast)."""
    monkeypatch.setattr(P, "cpu_flags", lambda cpuinfo=None: frozenset(flags))
    monkeypatch.setattr(runtime, "cpu_flags", lambda cpuinfo=None: frozenset(flags))
    cfg = load_config(None, ["runtime.precision=auto"])
    plan = runtime.apply(cfg.runtime, local_ranks=1, environ={}, log=False)
    assert plan.precision.measure
    calls, sent = [], []
    fig = {"ratio": ratio, "float32_ms": 10.0, "bfloat16_ms": 10.0 / ratio, "batch": 1, "layers": 15,
           "method": "layers", "calibration_s": 1.0, "source": "measured", "cache": "x"}
    monkeypatch.setattr(runtime, "_probe", lambda *a: calls.append(1) or dict(fig))
    root = runtime.settle_precision(plan, cfg, share=lambda obj: sent.append(obj) or obj, root=True)
    other = runtime.settle_precision(plan, cfg, share=lambda obj: sent[0], root=False)
    assert len(calls) == 1 and sent[0]["ratio"] == ratio  # only root measured
    assert root.precision.precision == other.precision.precision == want
    assert "measured" in root.precision.reason and "rank 0 measured" in other.precision.reason
    assert want in root.describe()


def test_cache_entries_are_validated_and_merged(tmp_path):
    from distributed import precision_probe as C

    path = tmp_path / "precision.json"
    path.write_text("{not json")
    assert C.read_cached("k", path) is None  # unreadable: measured again
    C.store("a", {"precision": "float32", "ratio": 0.9}, path)
    C.store("b", {"precision": "mixed_bfloat16", "ratio": 1.9}, path)
    assert C.read_cached("a", path)["ratio"] == 0.9 and C.read_cached("b", path)["precision"] == "mixed_bfloat16"
    tree = json.loads(path.read_text())
    tree["entries"]["c"] = {"precision": "float16", "ratio": 2}
    path.write_text(json.dumps(tree))
    assert C.read_cached("c", path) is None
    assert C.cache_file({"CXR_CACHE_DIR": str(tmp_path)}) == path
    assert C.cache_file({}).parts[-3:] == (".cache", "cxr-transfer", "precision.json")


def test_calibration_method_by_model_size():
    from distributed import precision_probe as C

    small = [{"kind": "conv", "macs": 10_000_000}] * 5      # 0.1 GFLOP forward per image
    big = [{"kind": "conv", "macs": 1_500_000_000}] * 13    # VGG16-sized
    assert C.method(small, 16) == ("step", 16)
    assert C.method(big, 16) == ("layers", 1)
    assert C.row_scale(big, 1) < 1 and C.row_scale(small, 16) == 1.0


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="runtime.precision"):
        plan_precision("float16", "auto", AMX)
    with pytest.raises(Exception, match="runtime.precision"):
        load_config(None, ["runtime.precision=float16"])


def test_cpu_flags_reads_the_flags_line(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(f) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_apply_turns_onednn_on_for_bfloat16_and_logs_it():
    """In a fresh process: runtime.apply with mixed_bfloat16 sets TF_ENABLE_ONEDNN_OPTS=1 before
    TensorFlow loads, TensorFlow then runs oneDNN, and the plan says why."""
    code = (
        "import os, json; os.environ.pop('TF_ENABLE_ONEDNN_OPTS', None)\n"
        "from data_prep.config import load_config\nfrom distributed import runtime\n"
        "cfg = load_config(None, ['runtime.precision=mixed_bfloat16'])\n"
        "plan = runtime.apply(cfg.runtime, log=False)\n"
        "env = os.environ.get('TF_ENABLE_ONEDNN_OPTS')\n"
        "import tensorflow as tf\n"
        "print(json.dumps({'env': env, 'onednn': runtime.onednn_enabled(), 'chosen': runtime.configure_precision(plan),"
        " 'describe': plan.describe()}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["env"] == "1" and out["onednn"] is True and out["chosen"] == "mixed_bfloat16"
    assert "precision mixed_bfloat16 (runtime.precision)" in out["describe"]


# --------------------------------------------------------------------------- the model under the policy

tf = pytest.importorskip("tensorflow")


@pytest.mark.skipif(not (cpu_flags() & {"avx512_bf16", "amx_bf16"}), reason="this CPU has no bfloat16 instructions")
def test_real_calibration_is_cached_and_reused(tmp_path, monkeypatch, caplog):
    """On this CPU: the tiny net is measured once (figures, a cache entry), the next start reads it."""
    from distributed import precision_probe as C

    monkeypatch.setenv("CXR_CACHE_DIR", str(tmp_path))
    cfg = load_config(None, ["runtime.precision=auto", "model.backbone=tiny", "model.weights=none",
                             "data.image_size=32", "train.batch_size=8"])
    plan = runtime.apply(cfg.runtime, local_ranks=1, environ={}, log=False)
    if runtime.onednn_enabled() is False:
        pytest.skip("oneDNN is off in this test process")
    first = runtime.settle_precision(plan, cfg)
    figs = dict(first.precision.figures)
    assert figs["method"] == "step" and figs["ratio"] > 0 and figs["float32_ms"] > 0
    entries = json.loads((tmp_path / "precision.json").read_text())["entries"]
    (key, entry), = entries.items()
    assert cpu_model() in key and f"tensorflow {tf.__version__}" in key and "tiny 32px batch 8" in key
    assert entry["precision"] == first.precision.precision and entry["calibration_s"] < 30
    monkeypatch.setattr(C, "measure_step", lambda *a, **k: pytest.fail("measured again"))
    again = runtime.settle_precision(plan, cfg)
    assert "cached measurement" in again.precision.reason
    assert again.precision.precision == first.precision.precision
from distributed import model as M  # noqa: E402

S = 32


@pytest.fixture(scope="module")
def models():
    cfg = load_config(None, ["model.backbone=tiny", "model.weights=none", "model.dense_units=8"]).model
    tf.keras.utils.set_random_seed(3)
    bf = M.build_model(cfg, S, 2, precision="mixed_bfloat16")
    f32 = M.convert_precision(bf, "float32")
    x = np.random.default_rng(0).uniform(0, 255, (6, S, S, 1)).astype(np.float32)
    return bf, f32, x


def test_bfloat16_model_keeps_inputs_and_outputs_float32(models):
    bf, f32, x = models
    assert M.precision_of(bf) == "mixed_bfloat16" and M.precision_of(f32) == "float32"
    pol = {layer.name: layer.dtype_policy.name for layer in bf.layers}
    assert pol["gray_to_rgb"] == pol["preprocess"] == pol["predictions"] == "float32"
    assert pol["block1_conv1"] == pol["head_dense"] == "mixed_bfloat16"
    assert all(v.dtype == tf.float32 for v in bf.variables)  # Horovod reduces float32 gradients
    assert tf.keras.mixed_precision.global_policy().name == "float32"  # building left no global state
    out = bf(x, training=False)
    assert out.dtype == tf.float32
    p = out.numpy()
    assert np.all((p >= 0) & (p <= 1)) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert np.abs(p - f32(x, training=False).numpy()).max() < 0.02


def test_conversion_copies_weights_exactly(models):
    bf, f32, _ = models
    back = M.convert_precision(f32, "mixed_bfloat16")
    for a, b in zip(bf.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert M.convert_precision(bf, "mixed_bfloat16") is bf


def test_save_load_converts_on_request(models, tmp_path):
    bf, _, x = models
    bf.save(tmp_path / "m.keras")
    assert M.precision_of(M.load_model(tmp_path / "m.keras")) == "mixed_bfloat16"
    loaded = M.load_model(tmp_path / "m.keras", precision="float32")
    assert M.precision_of(loaded) == "float32"
    assert np.abs(loaded(x).numpy() - bf(x).numpy()).max() < 0.02


def test_gradcam_of_a_bfloat16_model_is_the_float32_map(models):
    from distributed.gradcam import GradCAM

    bf, f32, x = models
    heat_bf = GradCAM(bf)(x[:3].astype(np.uint8), np.array([1, 1, 0]))
    heat_32 = GradCAM(f32)(x[:3].astype(np.uint8), np.array([1, 1, 0]))
    assert heat_bf.dtype == np.float32 and np.all((heat_bf >= 0) & (heat_bf <= 1))
    np.testing.assert_allclose(heat_bf, heat_32, atol=1e-6)


def test_tta_predictor_gives_float32_probabilities(models):
    from distributed.evaluate import Predictor

    bf, _, x = models
    aug = load_config(None, []).train.augment
    pred = Predictor(bf, aug, tta_rounds=2, seed=1)
    u8 = x.astype(np.uint8)
    plain = pred._plain(tf.constant(u8, tf.float32)).numpy()
    tta = pred._augmented(tf.constant(u8, tf.float32), tf.constant(pred.seeds(np.arange(len(u8)), 0))).numpy()
    for p in (plain, tta):
        assert p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))


def test_predict_command_in_bfloat16(models, tmp_path, fixtures, capsys):
    from distributed import predict

    _, f32, _ = models
    f32.save(tmp_path / "model.keras")
    img = str(fixtures / "00000001_000.png")
    res = {}
    for prec in ("float32", "mixed_bfloat16"):
        rc = predict.main(["--model", str(tmp_path / "model.keras"), img, "--json", "--image-size", str(S),
                           "--precision", prec])
        assert rc == 0
        res[prec] = json.loads(capsys.readouterr().out)["results"][0]["probability"]
    assert 0.0 <= res["mixed_bfloat16"] <= 1.0
    assert abs(res["mixed_bfloat16"] - res["float32"]) < 0.02
