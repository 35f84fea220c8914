"""The config loader rejects what it does not know, naming the dotted key."""
import dataclasses
import subprocess
import sys

import pytest
import yaml

from data_prep.config import (
    ConfigError,
    config_hash,
    dump_yaml,
    load_config,
    reference_rows,
    save_resolved,
    to_dict,
)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_paper_and_demo_load(root):
    paper = load_config(root / "configs/paper.yaml")
    assert paper.data.image_size == 384
    assert paper.model.backbone == "vgg16" and paper.model.weights == "imagenet"
    assert paper.train.warmup.epochs == 1 and paper.train.warmup.optimizer == "rmsprop"
    ft = paper.train.finetune
    assert (ft.optimizer, ft.lr, ft.momentum, ft.nesterov, ft.decay) == ("sgd", 1e-3, 0.9, True, 1e-6)
    assert (ft.epochs, ft.patience, ft.freeze_first) == (30, 3, 10)
    aug = paper.train.augment
    assert (aug.width_shift, aug.height_shift, aug.rotation, aug.zoom) == (0.15, 0.15, 5.0, 0.1)
    # 5,000 training images per class resampled (the article's 10,000 per epoch); the test split at the
    # natural prevalence (no per-class cap), the evaluation's threshold and calibration from validation
    assert paper.prep.train_per_class == 5000 and paper.prep.test_per_class == 0
    assert (paper.eval.checkpoint, paper.eval.checkpoint_phase, paper.eval.operating_point) == \
        ("best", "finetune", "youden")
    assert paper.eval.prior_correction is True and paper.eval.calibrate == "temperature"
    demo = load_config(root / "configs/demo.yaml")
    assert demo.model.weights == "none"
    assert demo.data.image_size <= 128


def test_defaults_are_frozen():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.image_size = 3


def test_unknown_key_names_dotted_key(tmp_path):
    p = write(tmp_path, "train:\n  warmup:\n    epochz: 2\n")
    with pytest.raises(ConfigError, match=r"train\.warmup\.epochz: unknown key.*epochs"):
        load_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError,
                       match=r"^trian: unknown key \(sections are: data, eval, model.*; did you mean train\?$"):
        load_config(write(tmp_path, "trian: {}\n"))


@pytest.mark.parametrize("override, message", [
    ("no.such.key=1", r"^no\.such\.key: unknown key; 'no' is not a section \(sections are: data, eval, model, prep, "
                      r"run, runtime, tracking, train\) \(in --set\)$"),
    ("train.batchsize=8", r"^train\.batchsize: unknown key \('train' has: .*\); did you mean train\.batch_size\? "),
    ("trian.seed=1", r"^trian\.seed: unknown key; 'trian' is not a section .*; did you mean train\.seed\?"),
    ("train.warmup.lrr=1", r"did you mean train\.warmup\.lr\?"),
])
def test_unknown_key_names_what_was_typed_and_the_closest_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  batch_size: big\n", r"train\.batch_size: expected an integer, got 'big'"),
    ("train:\n  finetune:\n    nesterov: 1\n", r"train\.finetune\.nesterov: expected true or false"),
    ("data: 3\n", r"data: expected a mapping"),
    ("model:\n  dropout: 1.5\n", r"model\.dropout: 1\.5 is out of range; allowed \[0\.0, 0\.99\]"),
    ("model:\n  backbone: alexnet\n", r"model\.backbone: 'alexnet' is not allowed; expected one of 'vgg16'"),
], ids=["int", "bool", "mapping", "range", "choice"])
def test_bad_value_names_dotted_key(tmp_path, yaml_text, message):
    """Wrong types, values out of range and unknown choices are rejected with the dotted key."""
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, yaml_text))


def test_set_overrides_are_typed():
    cfg = load_config(None, ["train.batch_size=8", "train.finetune.lr=2e-3", "model.weights=none",
                             "run.name=123", "train.finetune.nesterov=false"])
    assert cfg.train.batch_size == 8
    assert cfg.train.finetune.lr == pytest.approx(2e-3)
    assert cfg.model.weights == "none"
    assert cfg.run.name == "123"
    assert cfg.train.finetune.nesterov is False


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=eight", r"train\.batch_size: expected an integer"),
    ("train.batchsize=8", r"train\.batchsize: unknown key .*\(in --set\)"),
    ("train.finetune=3", r"train\.finetune: is a section"),
    ("train.batch_size.x=3", r"train\.batch_size: is a value"),
    ("train.batch_size", r"train\.batch_size: --set expects dotted\.key=value"),
    ("data.image_size=0", r"data\.image_size: 0 is out of range"),
])
def test_bad_set(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_resolved_config_round_trips(tmp_path, root):
    cfg = load_config(root / "configs/paper.yaml", ["train.batch_size=4"])
    path = save_resolved(cfg, tmp_path / "out")
    assert path.name == "config.yaml"
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(dump_yaml(cfg))["train"]["batch_size"] == 4
    assert config_hash(to_dict(cfg)) == config_hash(to_dict(again))
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic write left no temporary file


def test_reference_covers_required_keys():
    keys = {row[0] for row in reference_rows()}
    for k in ["data.csv", "data.images", "data.image_size", "prep.out", "run.dir", "model.backbone",
              "model.weights", "train.batch_size", "train.warmup.epochs", "train.finetune.epochs"]:
        assert k in keys


def test_cli_error_is_one_sentence(tmp_path, root):
    """A bad config on the command line ends with a message, not a traceback."""
    p = write(tmp_path, "train:\n  batch_size: big\n")
    r = subprocess.run([sys.executable, "-m", "data_prep.config", "--config", str(p)],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 2
    assert "train.batch_size: expected an integer" in r.stderr
    assert "Traceback" not in r.stderr


def test_float_written_without_dot(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  finetune:\n    lr: 1e-3\n"))
    assert cfg.train.finetune.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"train\.finetune\.lr: expected a number, got 'fast'"):
        load_config(write(tmp_path, "train:\n  finetune:\n    lr: fast\n"))


def test_readme_reference_in_sync(root):
    """docs/config-reference.md is generated from the dataclasses: regenerate it when a key changes
    (python -m data_prep.config --reference > docs/config-reference.md)."""
    from data_prep.config import reference_markdown

    readme = (root / "docs" / "config-reference.md").read_text()
    missing = [line for line in reference_markdown().splitlines() if line not in readme]
    assert not missing, f"docs/config-reference.md is stale, e.g. {missing[0]}"


def test_every_config_key_is_read_somewhere(root):
    """Each key of the reference is read by product code (``.leaf`` or ``"leaf"``) outside the schema:
    a key that nothing reads is a promise the program does not keep."""
    from data_prep.config import reference_rows

    code = "\n".join(p.read_text() for pkg in ("data_prep", "distributed", "launch")
                     for p in (root / pkg).rglob("*.py") if p.name != "config.py")
    unused = [key for key, *_ in reference_rows()
              if f".{key.rsplit('.', 1)[-1]}" not in code and f'"{key.rsplit(".", 1)[-1]}"' not in code]
    assert unused == []


def test_stage_hashes_ignore_defaults_so_a_new_defaulted_key_changes_no_hash():
    import dataclasses

    from data_prep import config as C

    cfg = load_config(None, ["train.batch_size=8", "model.backbone=tiny", "eval.tta=false"])
    # the same config in a schema with one more train key (at its default), as a future version adds one
    Train = dataclasses.make_dataclass("TrainConfig", [("new_key", int, dataclasses.field(default=7))],
                                       bases=(C.TrainConfig,), frozen=True)
    Cfg = dataclasses.make_dataclass("Config", [("train", Train, dataclasses.field(default_factory=Train))],
                                     bases=(C.Config,), frozen=True)
    shallow = lambda d: {f.name: getattr(d, f.name) for f in dataclasses.fields(d)}  # noqa: E731
    newer = Cfg(**{**shallow(cfg), "train": Train(**shallow(cfg.train))})
    for stage in ("prep", "train", "evaluate"):
        assert C.stage_hash(newer, stage) == C.stage_hash(cfg, stage), stage
    changed = Cfg(**{**shallow(cfg), "train": Train(**shallow(cfg.train), new_key=8)})
    assert C.train_hash(changed) != C.train_hash(cfg) and C.prep_hash(changed) == C.prep_hash(cfg)
    # what only decides how a run runs changes no hash; a default spelled out is a default
    assert C.train_hash(load_config(None, ["train.batch_size=8", "model.backbone=tiny", "train.record_batches=true",
                                           "train.checkpoint_every_s=600", "train.stop_signals=SIGUSR1"])) == \
        C.train_hash(load_config(None, ["train.batch_size=8", "model.backbone=tiny", "train.seed=1234"]))
    assert C.non_default(cfg.train) == {"batch_size": 8}
    assert C.non_default(load_config(None, ["train.finetune.lr=0.01"]).train) == {"finetune": {"lr": 0.01}}


def test_freeze_blocks_is_checked_against_the_backbones_blocks():
    cfg = load_config(None, ["train.finetune.freeze=blocks", "train.finetune.freeze_blocks=5"])
    assert (cfg.train.finetune.freeze, cfg.train.finetune.freeze_blocks) == ("blocks", 5)
    with pytest.raises(ConfigError, match=r"^train.finetune.freeze_blocks: 6 is out of range for "
                                          r"model.backbone=vgg16; allowed 0..5 \(block1, .*block5\)$"):
        load_config(None, ["train.finetune.freeze_blocks=6"])
    with pytest.raises(ConfigError, match="conv1, conv2"):
        load_config(None, ["model.backbone=resnet50", "train.finetune.freeze_blocks=9"])
