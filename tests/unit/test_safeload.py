"""A model file is data: Lambda layers, HDF5 and foreign networks are refused without running anything."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data_prep.config import load_config  # noqa: E402
from distributed import model as M  # noqa: E402
from distributed import predict  # noqa: E402
from distributed.safeload import UntrustedModel  # noqa: E402

S = 32


def _tiny(**kw):
    cfg = load_config(None, ["model.backbone=tiny", "model.weights=none", "model.dense_units=8"]).model
    return M.build_model(cfg, S, 2, **kw)


def _evil(marker):
    """The tiny network with a Lambda whose code writes ``marker`` when the layer is (re)built."""
    base = _tiny()
    x = tf.keras.layers.Lambda(lambda t, p=str(marker): (open(p, "w").write("ran"), t)[1], name="evil")(base.output)
    return tf.keras.Model(base.input, x, name="cxr_tiny")


@pytest.fixture()
def evil_files(tmp_path):
    marker = tmp_path / "pwned"
    m = _evil(marker)
    m.save(tmp_path / "evil.h5")
    m.save(tmp_path / "evil.keras")
    (tmp_path / "h5-named.keras").write_bytes((tmp_path / "evil.h5").read_bytes())
    marker.unlink()
    return marker, tmp_path


@pytest.mark.parametrize("name", ["evil.h5", "evil.keras", "h5-named.keras"])
def test_a_lambda_that_writes_a_file_is_refused_and_does_not_run(evil_files, name):
    marker, d = evil_files
    with pytest.raises(UntrustedModel, match="trust-model") as e:
        M.load_model(d / name)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_the_marker_does_run_under_trust_so_the_test_can_fail(evil_files):
    marker, d = evil_files
    M.load_model(d / "evil.h5", trust=True)
    assert marker.read_text() == "ran"


def test_predict_refuses_in_one_line(evil_files, fixtures, capsys):
    marker, d = evil_files
    rc = predict.main(["--model", str(d / "evil.h5"), str(fixtures / "00000001_000.png"), "--precision", "float32"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "HDF5" in err and "--trust-model" in err
    assert not marker.exists()


def test_a_foreign_network_is_refused(tmp_path):
    inp = tf.keras.Input((S, S, 1), name="image")
    tf.keras.Model(inp, tf.keras.layers.Dense(2)(tf.keras.layers.Flatten()(inp)), name="cxr_tiny") \
        .save(tmp_path / "other.keras")
    with pytest.raises(UntrustedModel, match="not a network built by distributed.model"):
        M.load_model(tmp_path / "other.keras")


def test_weights_and_trainable_flags_come_back_exactly(tmp_path):
    tf.keras.utils.set_random_seed(3)
    m = _tiny(multilabel=True)
    M.set_trainable(m, "warmup")
    m.save(tmp_path / "m.keras")
    loaded = M.load_model(tmp_path / "m.keras")
    x = np.random.default_rng(0).uniform(0, 255, (2, S, S, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), m(x).numpy())
    flags = [(lay.name, lay.trainable) for lay in m.layers if lay.weights]
    assert [(lay.name, lay.trainable) for lay in loaded.layers if lay.weights] == flags
    assert not dict(flags)["block1_conv1"] and dict(flags)["predictions"]
    assert loaded.layers[-1].get_config()["activation"] == "sigmoid"


def test_a_damaged_keras_file_is_one_line(tmp_path):
    _tiny().save(tmp_path / "m.keras")
    data = bytearray((tmp_path / "m.keras").read_bytes())
    (tmp_path / "cut.keras").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(UntrustedModel):
        M.load_model(tmp_path / "cut.keras")
