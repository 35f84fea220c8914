"""runtime.precision: the auto rule per CPU, the environment it sets, and float32 outputs from a
bfloat16 model through conversion, save/load, TTA-style prediction, Grad-CAM and predict."""
import json
import subprocess
import sys

import numpy as np
import pytest

from data_prep.config import load_config
from distributed.precision import cpu_flags, plan_precision

AMX = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_vnni"}
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
AVX2 = {"avx2", "fma"}


@pytest.mark.parametrize("setting,onednn,flags,env,want,onednn_env", [
    ("auto", "auto", AMX, {}, "mixed_bfloat16", "1"),
    ("auto", "on", AMX, {}, "mixed_bfloat16", ""),
    ("auto", "off", AMX, {}, "float32", ""),
    ("auto", "auto", AMX, {"TF_ENABLE_ONEDNN_OPTS": "0"}, "float32", ""),
    ("auto", "auto", AVX512_BF16, {}, "float32", ""),
    ("auto", "auto", AVX2, {}, "float32", ""),
    ("float32", "auto", AMX, {}, "float32", ""),
    ("mixed_bfloat16", "auto", AVX2, {}, "mixed_bfloat16", "1"),
    ("mixed_bfloat16", "off", AMX, {}, "mixed_bfloat16", ""),
])
def test_the_rule(setting, onednn, flags, env, want, onednn_env):
    p = plan_precision(setting, onednn, flags, env)
    assert (p.precision, p.onednn_env) == (want, onednn_env)
    assert p.reason and p.precision in p.describe()


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
