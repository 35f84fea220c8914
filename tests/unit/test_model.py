"""The model: in-model preprocessing, flat backbone, head, freezing, weights, save/load."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data_prep.backbones import block_names, frozen_through_block  # noqa: E402
from data_prep.config import load_config  # noqa: E402
from distributed import model as M  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cfg(*sets):
    return load_config(None, ["model.weights=none", *sets]).model


@pytest.fixture(scope="module")
def vgg16():
    return M.build_model(_cfg(), 32, 2)


@pytest.fixture(scope="module")
def tiny():
    return M.build_model(_cfg("model.backbone=tiny"), 32, 2)


def test_head_and_io(tiny):
    assert tiny.input_shape == (None, 32, 32, 1) and tiny.input.name.startswith("image")
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 1)).astype(np.float32)
    p = tiny(x).numpy()
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)  # softmax
    assert [tiny.get_layer(n).__class__.__name__ for n in M.HEAD_LAYERS] == \
        ["GlobalAveragePooling2D", "Dense", "Dropout", "Dense"]
    assert tiny.get_layer("head_dense").units == 256 and tiny.get_layer("head_dropout").rate == 0.5
    ml = M.build_model(_cfg("model.backbone=tiny", "model.dense_units=8"), 32, 14, multilabel=True)
    q = ml(x).numpy()
    assert q.shape == (3, 14) and not np.allclose(q.sum(1), 1.0)  # sigmoid, independent outputs
    assert ml.get_layer("predictions").activation.__name__ == "sigmoid"


def test_vgg16_is_flat_with_in_model_preprocessing(vgg16):
    assert not any(isinstance(layer, tf.keras.Model) for layer in vgg16.layers)  # no nested model
    names = [layer.name for layer in vgg16.layers]
    assert names[:4] == ["image", "gray_to_rgb", "preprocess", "block1_conv1"]
    assert M.last_conv_layer(vgg16) == "block5_conv3"
    gray = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    rgb = vgg16.get_layer("gray_to_rgb")(gray)
    ours = vgg16.get_layer("preprocess")(rgb).numpy()
    ref = tf.keras.applications.vgg16.preprocess_input(np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_tiny_has_vgg_shape_and_findable_last_conv(tiny):
    assert M.last_conv_layer(tiny) == "block5_relu3"  # the last conv's activated feature map
    assert tiny.get_layer("block5_conv3") is not None
    assert tiny.count_params() < 500_000


@pytest.mark.parametrize("backbone", ["vgg16", "vgg19", "resnet50", "densenet121", "tiny"])
def test_backbone_registry_describes_the_built_network(backbone):
    b = M.BACKBONES[backbone]
    m = M.build_model(_cfg(f"model.backbone={backbone}"), 32, 2)
    assert M.last_conv_layer(m) == b.gradcam_layer
    assert m.get_layer("preprocess").mode == b.preprocess
    assert any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in m.layers) == b.batch_norm
    assert b.freeze_counts.startswith(f"{len(M.backbone_layers(m))} layers of ")
    names = [layer.name for layer in M.backbone_layers(m)]
    ends = [frozen_through_block(backbone, names, n) for n in range(len(b.blocks) + 1)]
    assert ends[0] == 0 and ends[-1] == len(names) and ends == sorted(set(ends))  # each block adds layers
    for (block, prefixes), end in zip(b.blocks[:-1], ends[1:]):
        assert names[end - 1].startswith(prefixes) and not names[end].startswith(prefixes), block
    assert block_names(backbone) == (["block1", "block2", "block3", "block4", "block5"] if "vgg" in backbone
                                     or backbone == "tiny" else ["conv1", "conv2", "conv3", "conv4", "conv5"])
    if b.weights_file:
        assert M.imagenet_weights_file(backbone) == (b.weights_file, b.weights_url)
        assert b.weights_url.endswith("/" + b.weights_file)


def test_config_allows_exactly_the_registered_backbones():
    import typing

    from data_prep.config import ModelConfig

    assert typing.get_args(typing.get_type_hints(ModelConfig)["backbone"]) == tuple(M.BACKBONES)
    assert all(isinstance(b, M.Backbone) and b.name == k for k, b in M.BACKBONES.items())


def test_freezing_phases(vgg16):
    bl = M.backbone_layers(vgg16)
    assert [layer.name for layer in bl[:10]][-1] == "block3_conv3"  # VGG16().layers[:10]: the article's option B
    M.set_trainable(vgg16, "warmup")
    assert {w.name.split("/")[0] for w in vgg16.trainable_weights} == {"head_dense", "predictions"}
    M.set_trainable(vgg16, "finetune", "first_n", 10)
    trainable = {layer.name for layer in vgg16.layers if layer.trainable and layer.weights}
    assert "block3_conv3" not in trainable and "block4_conv1" in trainable and "predictions" in trainable
    assert "block1_conv1" not in trainable
    M.set_trainable(vgg16, "finetune", "all_conv", 10)
    assert {w.name.split("/")[0] for w in vgg16.trainable_weights} == {"head_dense", "predictions"}
    M.set_trainable(vgg16, "finetune", "first_n", 0)
    assert len(vgg16.trainable_weights) == len(vgg16.weights)


def test_freezing_by_block_is_the_articles_option_b_on_vgg16_and_means_the_same_on_tiny(vgg16, tiny):
    M.set_trainable(vgg16, "finetune", "first_n", 10)
    by_layers = {w.name for w in vgg16.trainable_weights}
    M.set_trainable(vgg16, "finetune", "blocks", freeze_blocks=3)  # blocks 1-3: the article's 10 layers
    assert {w.name for w in vgg16.trainable_weights} == by_layers
    assert [la.name for la in M.backbone_layers(vgg16) if not la.trainable][-1] == "block3_pool"
    for n, first_trained in [(1, "block2_conv1"), (2, "block3_conv1"), (4, "block5_conv1")]:
        M.set_trainable(tiny, "finetune", "blocks", freeze_blocks=n)
        trained = [la.name for la in M.backbone_layers(tiny) if la.trainable]
        assert trained[0] == first_trained and all(not t.startswith(f"block{n}_") for t in trained)
    M.set_trainable(tiny, "finetune", "blocks", freeze_blocks=5)
    assert {w.name.split("/")[0] for w in tiny.trainable_weights} == {"head_dense", "predictions"}
    M.set_trainable(tiny, "finetune", "blocks", freeze_blocks=0)
    assert len(tiny.trainable_weights) == len(tiny.weights) - 2 * 13  # all but batch norms' moving statistics
    with pytest.raises(ValueError, match="train.finetune.freeze_blocks: 6 is out of range"):
        M.set_trainable(tiny, "finetune", "blocks", freeze_blocks=6)


def test_save_load_roundtrip_keeps_custom_layers(tiny, tmp_path):
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 1)).astype(np.float32)
    tiny.save(tmp_path / "m.keras")
    loaded = M.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(x).numpy(), tiny(x).numpy(), rtol=1e-5, atol=1e-6)
    assert M.last_conv_layer(loaded) == M.last_conv_layer(tiny)
    with pytest.raises(FileNotFoundError):
        M.load_model(tmp_path / "missing.keras")


def test_imagenet_weights_from_keras_cache_and_from_a_path(tmp_path, monkeypatch):
    base = tf.keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    fname, _ = M.imagenet_weights_file("vgg16")
    (tmp_path / "models").mkdir()
    base.save_weights(str(tmp_path / "models" / fname))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    m = M.build_model(load_config(None, []).model, 32, 2)  # weights: imagenet (the default)
    ref = base.get_layer("block5_conv3").get_weights()[0]
    np.testing.assert_array_equal(m.get_layer("block5_conv3").get_weights()[0], ref)
    by_path = M.build_model(_cfg(f"model.weights={tmp_path / 'models' / fname}"), 32, 2)
    np.testing.assert_array_equal(by_path.get_layer("block5_conv3").get_weights()[0], ref)


def test_missing_imagenet_weights_say_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*a, **k):
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(tf.keras.utils, "get_file", offline)
    with pytest.raises(M.WeightsUnavailable) as e:
        M.build_model(load_config(None, []).model, 32, 2)
    msg = str(e.value)
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg and str(tmp_path / "models") in msg
    with pytest.raises(M.WeightsUnavailable, match="no such file"):
        M.build_model(_cfg(f"model.weights={tmp_path / 'nope.h5'}"), 32, 2)
    with pytest.raises(M.WeightsUnavailable, match="tiny"):
        M.build_model(load_config(None, ["model.backbone=tiny"]).model, 32, 2)


def test_model_and_data_never_import_horovod_or_mpi():
    code = ("import sys; import distributed.model, distributed.data, distributed.checkpoints, distributed.train, "
            "distributed.trainer, distributed.evaluate, distributed.predict; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('horovod', 'mpi4py')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    for f in ("model.py", "data.py"):
        src = (ROOT / "distributed" / f).read_text()
        assert "import horovod" not in src and "mpi4py" not in src


def test_masked_losses_leave_masked_labels_out():
    from distributed.data import MASKED, fed

    y8 = np.array([[1, 0, MASKED], [MASKED, MASKED, MASKED]], np.uint8)
    y = fed(tf.constant(y8)).numpy()
    assert y.tolist() == [[1, 0, -1], [-1, -1, -1]]
    p = np.array([[0.8, 0.4, 0.99], [0.1, 0.2, 0.3]], np.float32)
    got = M.masked_binary_crossentropy(tf.constant(y), tf.constant(p)).numpy()
    hand = (-np.log(0.8) - np.log(0.6)) / 2  # the masked third output and the all-masked image add nothing
    np.testing.assert_allclose(got, [hand, 0.0], rtol=1e-5)
    np.testing.assert_allclose(M.masked_accuracy(tf.constant(y), tf.constant(p)).numpy(), [1.0, 0.0])
    # without masked labels the stock Keras loss, as before
    assert M.training_loss(True) == "binary_crossentropy" and M.training_metrics() == ["accuracy"]
    assert M.training_loss(True, masked=True) is M.masked_binary_crossentropy
    # the validation metrics mask the same labels
    from distributed.validation import classification_metrics
    m = classification_metrics(y[:1], p[:1], multilabel=True)
    assert m["loss"] == pytest.approx(hand, rel=1e-6) and m["accuracy"] == 1.0
