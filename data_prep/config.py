"""Strict, typed configuration shared by every stage.

YAML (``yaml.safe_load``'s rules, without aliases) becomes a tree of frozen dataclasses. Unknown
keys, wrong types, NaN and infinities, and out-of-range values are rejected with the dotted key and
what is allowed, and ``--set dotted.key=value`` overrides are parsed with YAML scalar rules and
then checked the same way. ``save_resolved`` writes the resolved config next to every output.

Nothing here imports TensorFlow, Horovod or mpi4py.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from data_prep.backbones import BACKBONES  # pure data: the one backbone list
from data_prep.backbones import NAMES as BACKBONE_NAMES
from data_prep.cli import UsageError, add_debug_arg, command
from data_prep.fsutil import atomic_write_text


class ConfigError(UsageError, ValueError):
    """A config problem, always naming the dotted key (exit code 2 at the command line)."""


# --------------------------------------------------------------------------- schema
# ``meta`` on a field: ``min``/``max`` bounds (inclusive), ``doc`` for the reference table.

def _f(default, doc: str = "", lo=None, hi=None, **kw):
    meta = {"doc": doc, "min": lo, "max": hi}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def _copy(d):
    if dataclasses.is_dataclass(d):
        return dataclasses.replace(d)
    return type(d)(d)


@dataclass(frozen=True)
class ColumnsConfig:
    image: str = _f("", "csv format: column of the image path relative to data.images (required)")
    patient: str = _f("", "csv format: column of the patient id; empty: the DICOM header's PatientID (DICOM "
                          "images), else each image is its own patient")
    labels: tuple[str, ...] = _f((), "csv format: label columns (1 positive, 0 negative, -1 uncertain, blank "
                                     "unlabelled), one for a binary task or several (required)")
    view: str = _f("", "csv format: optional column of the view (PA, AP, LL, ...)")
    sex: str = _f("", "csv format: optional column of the sex (M/F)")
    age: str = _f("", "csv format: optional column of the age in years")


@dataclass(frozen=True)
class DataConfig:
    format: Literal["nih", "chexpert", "csv"] = _f(
        "nih", "layout of data.csv: nih (ChestX-ray14), chexpert (CheXpert train.csv/valid.csv) or csv "
               "(data.columns); docs/user-guide.md, Your own data")
    csv: str = _f("data/Data_Entry_2017.csv", "metadata CSV (nih: the 2017 or v2020 schema)")
    images: str = _f(
        "data", "root of the images: nih finds them by file name below it (flat images/ or Kaggle's "
                "images_NNN/images/); chexpert: the folder holding CheXpert-v1.0-small; csv: the paths' root")
    image_size: int = _f(384, "side of the square image fed to the network, pixels", 32, 2048)
    task: Literal["binary", "multilabel"] = _f(
        "binary", "binary: positive_label vs negatives; multilabel: the 14 findings")
    positive_label: str = _f("Infiltration", "finding that makes an image positive (binary task)")
    negative_rule: Literal["no_finding", "all_others"] = _f(
        "no_finding", "negatives: only 'No Finding' images (the article) or every image without the positive label")
    official_split: bool = _f(False, "use train_val_list.txt/test_list.txt beside the CSV (or in data.images); "
                                      "a missing one stops prep")
    max_age: int = _f(120, "ages above this are implausible: the image is kept, its age recorded as unknown", 1, 200)
    uncertain: Literal["ignore", "positive", "negative"] = _f(
        "ignore", "uncertain labels (-1; chexpert, csv): ignore masks them out of the loss and the metrics "
                  "(U-Ignore), positive counts them as 1 (U-Ones), negative as 0 (U-Zeros)")
    views: tuple[str, ...] = _f(("PA", "AP"), "views kept (chexpert, and csv with a view column): frontal only "
                                              "by default; add LL (lateral) to keep those")
    columns: ColumnsConfig = _f(ColumnsConfig(), "")
    pseudonymize: Literal["auto", "on", "off"] = _f(
        "auto", "patient ids as a keyed hash (HMAC-SHA256, key in prep.out, 0600); auto: on when the patient "
                "comes from a DICOM header")


@dataclass(frozen=True)
class PrepConfig:
    out: str = _f("prepared", "folder for HDF5 shards and manifest.json")
    shard_size: int = _f(1024, "images per HDF5 shard", 1, 1_000_000)
    train_per_class: int = _f(
        0, "training images per class after balancing (resampling with replacement); 0 = no balancing", 0)
    val_per_class: int = _f(0, "cap on validation images per class, each image at most once; 0 = all", 0)
    test_per_class: int = _f(0, "cap on test images per class, each image at most once; 0 = all", 0)
    val_fraction: float = _f(0.1, "share of patients held out for validation (seeded group split)", 0.0, 0.9)
    test_fraction: float = _f(0.2, "share of patients held out for test (seeded group split)", 0.0, 0.9)
    seed: int = _f(42, "seed for the split, balancing and sampling", 0)
    strict: bool = _f(False, "turn every skipped image into an error")
    overwrite: bool = _f(False, "replace outputs made with a different config instead of refusing")
    limit: int = _f(0, "use only the first N rows of the CSV (smoke tests); 0 = all", 0)
    max_pixels: int = _f(50_000_000, "an image with more pixels is skipped and recorded, never decoded "
                                     "(NIH images: 1 M)", 1, 1_000_000_000)
    stage_to: str = _f("", "node-local folder (e.g. $TMPDIR; ~ and $VARS expanded on each node) to which training "
                           "and evaluation copy the shards they read, once per node, checked against the manifest's "
                           "sha256, then read there; empty = read prep.out directly")


@dataclass(frozen=True)
class ModelConfig:
    backbone: Literal[BACKBONE_NAMES] = _f(
        "vgg16", "tf.keras.applications backbone, without its top; tiny: a small VGG-shaped net for tests and CI only")
    weights: str = _f("imagenet", "imagenet (Keras cache, ~/.keras/models), none, or a path to an .h5 weight file")
    dense_units: int = _f(256, "units of the Dense relu layer of the new head", 1)
    dropout: float = _f(0.5, "dropout before the classifier", 0.0, 0.99)


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = _f(True, "augment training images in-graph")
    horizontal_flip: bool = _f(True, "random left-right flip")
    width_shift: float = _f(0.15, "max horizontal shift, fraction of width", 0.0, 1.0)
    height_shift: float = _f(0.15, "max vertical shift, fraction of height", 0.0, 1.0)
    rotation: float = _f(5.0, "max rotation, degrees", 0.0, 180.0)
    shear: float = _f(
        0.01, "max shear angle in DEGREES as Keras' shear_range: the article's 0.01 is almost none", 0.0, 45.0)
    zoom: float = _f(0.1, "zoom drawn from [1-zoom, 1+zoom]", 0.0, 0.9)


@dataclass(frozen=True)
class WarmupConfig:
    epochs: int = _f(1, "epochs training only the new head (base frozen)", 0, 1000)
    optimizer: Literal["rmsprop", "adam", "sgd"] = _f("rmsprop", "optimizer of the warm-up phase")
    lr: float = _f(1e-3, "learning rate for one rank (scaled by the number of ranks)", 0.0, 10.0)


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = _f(30, "maximum fine-tune epochs", 0, 10000)
    freeze: Literal["first_n", "all_conv", "blocks"] = _f(
        "first_n", "first_n: freeze the first freeze_first layers (the article's option B); all_conv: option A; "
                   "blocks: freeze the input and the backbone's blocks 1..freeze_blocks")
    freeze_first: int = _f(10, "layers of the backbone kept frozen (counted from its input layer)", 0)
    freeze_blocks: int = _f(3, "with freeze: blocks, the backbone's blocks kept frozen, from the first (VGG16: "
                               "block1..block5, ResNet50/DenseNet121: conv1..conv5; 3 = VGG16's 10 layers)", 0)
    optimizer: Literal["sgd", "rmsprop", "adam"] = _f("sgd", "optimizer of the fine-tune phase")
    lr: float = _f(1e-3, "learning rate for one rank (scaled by the number of ranks)", 0.0, 10.0)
    momentum: float = _f(0.9, "SGD momentum", 0.0, 1.0)
    nesterov: bool = _f(True, "Nesterov momentum")
    decay: float = _f(1e-6, "Keras-1 style decay as inverse-time schedule: lr / (1 + decay * step)", 0.0, 1.0)
    patience: int = _f(3, "early stopping after this many epochs without val_loss improvement", 0)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _f(16, "images per rank per step", 1, 4096)
    seed: int = _f(1234, "seed of shuffling, augmentation and initialisation", 0)
    scale_lr: bool = _f(True, "multiply learning rates by the number of ranks (Horovod recipe)")
    lr_warmup_epochs: float = _f(
        1.0, "epochs over which the scaled learning rate ramps up (Horovod recipe)", 0.0, 100.0)
    steps_per_epoch: int = _f(0, "cap on steps per epoch (smoke tests); 0 = the whole training split", 0)
    cache: bool = _f(False, "keep decoded training images in memory after the first epoch")
    allreduce_compression: Literal["none", "fp16"] = _f(
        "none", "Horovod gradient compression for the allreduce: none, or fp16 (halves the bytes sent; for "
                "bandwidth-bound multi-node runs; see BENCHMARKS.md)")
    elastic: bool = _f(False, "Horovod elastic: go on with the ranks that remain when one is lost, grow back "
                              "when hosts return (state committed each epoch; `launch train --elastic`)")
    stop_signals: str = _f("SIGTERM,SIGUSR1,SIGINT", "signals that stop training at the next step all ranks agree "
                           "on, with a checkpoint of that step (exit code 128 + signal; resume with --resume); "
                           "comma-separated, empty = none")
    stop_check_s: float = _f(10.0, "seconds between two checks of the stop flag (one allreduce, about one Horovod "
                                   "cycle); a signal stops training at most this much later; 0 = every step",
                             0.0, 3600.0)
    checkpoint_every_s: float = _f(0.0, "rank 0 writes a step checkpoint when this many seconds passed since the "
                                   "last one (a kill -9 or a lost node costs at most that); 0 = epochs only",
                                   0.0, 1e7)
    record_batches: bool = _f(False, "write run.dir/batches.csv: phase, epoch, step, rank and the SHA-1 of the "
                                     "step's image indices (to check that a resumed run reads what an "
                                     "uninterrupted one would)")
    augment: AugmentConfig = _f(AugmentConfig(), "")
    warmup: WarmupConfig = _f(WarmupConfig(), "")
    finetune: FinetuneConfig = _f(FinetuneConfig(), "")


@dataclass(frozen=True)
class RuntimeConfig:
    onednn: Literal["auto", "on", "off"] = _f("auto", "TF_ENABLE_ONEDNN_OPTS: on, off, or auto = TensorFlow's "
                                                  "default (on only for x86 CPUs with AVX512_VNNI/BF16 or AMX; "
                                                  "measure both, see BENCHMARKS.md)")
    intra_op_threads: int = _f(0, "TensorFlow intra-op threads per rank; 0 = physical cores per local rank", 0)
    inter_op_threads: int = _f(0, "TensorFlow inter-op threads per rank; 0 = auto (the sockets the rank's cores "
                                  "span: 1 for a rank bound within a socket)", 0)
    reserve_cores: int = _f(0, "cores of each rank left to Horovod's and tf.data's threads (intra-op threads = the "
                               "rank's cores minus these, at least 1); 0 until a measurement shows a gain", 0, 64)
    omp_num_threads: int = _f(0, "OMP_NUM_THREADS per rank; 0 = the intra-op threads", 0)
    kmp_affinity: str = _f(
        "granularity=fine,compact,1,0", "KMP_AFFINITY for OpenMP builds (intel-tensorflow); empty = unset")
    kmp_blocktime: int = _f(1, "KMP_BLOCKTIME in ms for OpenMP builds", 0, 10000)
    data_threads: int = _f(0, "tf.data parallelism; 0 = autotune", 0)
    data_autotune: Literal["auto", "on", "off"] = _f("auto", "tf.data autotuning: on, off, or auto (on, but off for "
                                                    "validation on a one-CPU rank: there it delays each pass's end)")
    precision: Literal["auto", "float32", "mixed_bfloat16"] = _f(
        "auto", "compute precision: float32, mixed_bfloat16 (Keras mixed precision: bfloat16 compute, float32 "
                "weights, loss and outputs; oneDNN is turned on for it), or auto = measured on CPUs with bfloat16 "
                "instructions (AVX512_BF16, AMX-BF16) when oneDNN runs: rank 0 times the model's layers in both "
                "and every rank takes mixed_bfloat16 when it is >= 1.15x faster (cached in "
                "$CXR_CACHE_DIR/precision.json, default ~/.cache/cxr-transfer); float32 elsewhere")
    horovod_cycle_ms: float = _f(0.0, "HOROVOD_CYCLE_TIME in ms: how often Horovod's background thread negotiates "
                                 "with the other ranks; 0 = auto (50 ms: CPU steps take seconds, Horovod's 1 ms "
                                 "default is for GPUs)", 0.0, 10000.0)


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _f(32, "images per rank per step", 1, 4096)
    tta: bool = _f(True, "also evaluate with test-time augmentation")
    tta_rounds: int = _f(5, "augmented copies per image, averaged with the plain image (1 + rounds predictions)",
                         1, 100)
    bootstrap: int = _f(1000, "bootstrap resamples (by patient) for the AUC interval", 0, 100000)
    threshold: float = _f(0.5, "probability threshold for the class table", 0.0, 1.0)
    gradcam_per_group: int = _f(8, "images per Grad-CAM grid (true positives, false positives, false negatives)", 0, 64)
    checkpoint: Literal["best", "last", "final"] = _f("best", "which model of the run directory to evaluate")
    checkpoint_phase: Literal["finetune", "any"] = _f(
        "finetune", "checkpoint best: the best val_loss of the fine-tune phase (the article) or of any phase")
    operating_point: str = _f("youden", "rule choosing the threshold on the VALIDATION split, applied to test: "
                                        "youden, sensitivity:S, specificity:S or fixed:T")
    calibrate: Literal["none", "temperature"] = _f(
        "none", "temperature: fit a temperature on validation, saved in run.dir/calibration.json "
                "(cxr-predict applies it)")
    prior_correction: bool = _f(False, "correct probabilities from the training split's class proportions to "
                                       "eval.prevalence, else train+val's natural prevalence (manifest; never "
                                       "test); evaluate and cxr-predict")
    prevalence: float = _f(0.0, "deployment prevalence P: also report PPV/NPV recomputed at P; 0 = off", 0.0, 0.999)
    trust_model: bool = _f(False, "load model files with Keras' own loader (HDF5, Lambda layers: code in the file "
                                  "runs); default: rebuilt by this project, weights only (distributed.safeload)")
    allow_overlap: bool = _f(False, "evaluate a prep other than the run's own although some of its patients were in "
                                    "the model's training split (reported); default: refused, naming the counts")
    out: str = _f("", "folder for the evaluation's outputs; empty = run.dir for the run's own prep, "
                      "run.dir/eval-<prep hash> for another prep (an external evaluation)")


@dataclass(frozen=True)
class RunConfig:
    dir: str = _f("runs/default", "run directory: config, history, checkpoints, model, reports")
    name: str = _f("", "free text shown in reports")


@dataclass(frozen=True)
class TrackingConfig:
    backend: Literal["none", "mlflow"] = _f(
        "none", "experiment tracking: none, or mlflow (rank 0 logs the resolved config, the per-epoch history, the "
                "test metrics with intervals, report.md and the plots; needs requirements-tracking.txt)")
    uri: str = _f("", "MLflow tracking URI; empty = $MLFLOW_TRACKING_URI, else the local file store "
                      "<run.dir>/../mlruns")
    experiment: str = _f("", "MLflow experiment name; empty = cxr-transfer")


@dataclass(frozen=True)
class Config:
    data: DataConfig = _f(DataConfig(), "")
    prep: PrepConfig = _f(PrepConfig(), "")
    model: ModelConfig = _f(ModelConfig(), "")
    train: TrainConfig = _f(TrainConfig(), "")
    runtime: RuntimeConfig = _f(RuntimeConfig(), "")
    eval: EvalConfig = _f(EvalConfig(), "")
    run: RunConfig = _f(RunConfig(), "")
    tracking: TrackingConfig = _f(TrackingConfig(), "")


# --------------------------------------------------------------------------- building

def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "list of str"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _check_scalar(key: str, tp, value, meta):
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r} ({type(value).__name__})")
        return tuple(value)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and "on" in allowed and "off" in allowed:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as true/false
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected one of {', '.join(map(repr, allowed))}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
    elif tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; take it as the number it plainly is.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):  # NaN passes every comparison, so no range check would catch it
            raise ConfigError(f"{key}: {value!r} is not a finite number")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    lo, hi = meta.get("min"), meta.get("max")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"{key}: {value!r} is out of range; allowed {rng}")
    return value


def _build(cls, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=str)
    if unknown:
        raise ConfigError(_unknown_key(cls, prefix, str(unknown[0])))
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if name not in data:
            continue
        value = data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, key)
        else:
            kwargs[name] = _check_scalar(key, tp, value, f.metadata)
    return cls(**kwargs)


def _leaf_keys(cls=None, prefix: str = "") -> list[str]:
    return [key for key, *_ in reference_rows(cls or Config, prefix)]


def _unknown_key(cls, prefix: str, name: str, typed: str | None = None) -> str:
    """``typed: unknown key; ...`` with the keys allowed at ``prefix`` and the closest valid dotted
    key when one is close (``train.batchsize`` -> ``train.batch_size``)."""
    typed = typed or (f"{prefix}.{name}" if prefix else name)
    fields = sorted(f.name for f in dataclasses.fields(cls))
    where = f"'{prefix}' has" if prefix else "sections are"
    if typed != (f"{prefix}.{name}" if prefix else name):  # a deeper key below a name that is not a section
        msg = f"{typed}: unknown key; '{f'{prefix}.{name}' if prefix else name}' is not a section ({where}: " \
              f"{', '.join(fields)})"
    else:
        msg = f"{typed}: unknown key ({where}: {', '.join(fields)})"
    close = difflib.get_close_matches(typed, _leaf_keys(), n=1, cutoff=0.75) or \
        difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        guess = close[0] if "." in close[0] or not prefix else f"{prefix}.{close[0]}"
        msg += f"; did you mean {guess}?"
    return msg


def _set_dotted(tree: dict, dotted: str, raw: str):
    parts = dotted.split(".")
    cls = Config
    node = tree
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        key = ".".join(parts[: i + 1])
        if part not in fields:
            raise ConfigError(_unknown_key(cls, ".".join(parts[:i]), part, typed=dotted) + " (in --set)")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key}: is a section; set one of its keys, e.g. "
                                  f"{key}.{dataclasses.fields(tp)[0].name}=...")
            try:
                value = safe_load(raw) if raw != "" else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
            if tp is str and value is not None and not isinstance(value, str):
                value = raw  # "--set run.name=123" means the string
            node[part] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{key}: is a value, not a section")
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
        cls = tp


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"{item}: --set expects dotted.key=value")
        k, v = item.split("=", 1)
        out.append((k.strip(), v))
    return out


MAX_YAML_BYTES = 1 << 20  # a config, cluster or variant file is a few KB


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (``*name``): a few hundred bytes of nested aliases expand
    to millions of nodes (and an error message quoting them to megabytes); no file of the project needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*name) are not allowed (line {mark.line + 1}, column {mark.column + 1})", mark)
        return super().compose_node(parent, index)


def safe_load(text: str):
    """``yaml.safe_load`` without aliases (:class:`_NoAliasLoader`)."""
    return yaml.load(text, Loader=_NoAliasLoader)


def read_yaml_mapping(path: str | os.PathLike, error=None, what: str = "config") -> dict:
    """``yaml.safe_load`` (without aliases, at most MAX_YAML_BYTES) of a file that must hold a mapping
    (config, cluster and variant files), every problem raised as ``error`` (an exception class) in one sentence."""
    error = error or ConfigError
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} file not found: {p}")
    if p.stat().st_size > MAX_YAML_BYTES:
        raise error(f"{p}: {p.stat().st_size} bytes, more than a {what} file may hold ({MAX_YAML_BYTES})")
    try:
        tree = safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise error(f"<root>: expected a mapping in {p}, got {type(tree).__name__}")
    return tree


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file (or defaults when ``path`` is None) and apply ``--set`` overrides."""
    tree: dict = read_yaml_mapping(path) if path is not None else {}
    for dotted, raw in parse_overrides(overrides):
        _set_dotted(tree, dotted, raw)
    return _check_across(_build(Config, tree, ""))


def _check_across(cfg: Config) -> Config:
    """Checks of one key against another (each key alone was checked by ``_build``)."""
    n, backbone = cfg.train.finetune.freeze_blocks, BACKBONES[cfg.model.backbone]
    if n > len(backbone.blocks):
        raise ConfigError(f"train.finetune.freeze_blocks: {n} is out of range for model.backbone={backbone.name}; "
                          f"allowed 0..{len(backbone.blocks)} ({', '.join(b for b, _ in backbone.blocks)})")
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg, dict_factory=lambda kv: {k: list(v) if isinstance(v, tuple) else v for k, v in kv})


def config_hash(section_dicts: Mapping[str, Any]) -> str:
    """Stable short hash of the parts of a config that decide an output."""
    blob = json.dumps(section_dicts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- stage hashes
# ``launch pipeline`` skips a stage whose output carries the hash of this config; the prep stage
# stores its hash in the manifest and in every shard. Each hash covers the stage's sections and the
# hash of the stage before it, so a change upstream reruns everything after it. A hash covers only
# the values that differ from the defaults (:func:`non_default`), so a new key added with a default
# leaves every existing output's hash as it was; HASH_SCHEMA is bumped instead when a default's
# meaning changes (then every output is made again).

# layout version of the shards and manifest.json (2: `converted` lists every kind; 3: Fletcher-32
# checksums on every dataset; 4: images known by their relative path, string patient ids, label masks and
# findings); a new one invalidates old outputs
SHARD_FORMAT = 4
HASH_SCHEMA = 1   # version of what the defaults mean; a new one invalidates every stage's output
PREP_RUN_KEYS = ("out", "strict", "overwrite", "stage_to")  # where and how prep runs or is read, not what it makes
# how training runs, not what it trains
TRAIN_RUN_KEYS = ("stop_signals", "stop_check_s", "checkpoint_every_s", "record_batches")


def non_default(section, default=None) -> dict:
    """The values of a config section that differ from the section's defaults; a nested section
    as a dict of its own differences (left out when it has none)."""
    default = type(section)() if default is None else default
    out = {}
    for f in dataclasses.fields(section):
        value, base = getattr(section, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            sub = non_default(value, base)
            if sub:
                out[f.name] = sub
        elif value != base:
            out[f.name] = value
    return out


def prep_hash(cfg) -> str:
    """Hash of everything that decides the shards' content (not prep.out/strict/overwrite/stage_to)."""
    prep = {k: v for k, v in non_default(cfg.prep).items() if k not in PREP_RUN_KEYS}
    return config_hash({"schema": HASH_SCHEMA, "format": SHARD_FORMAT, "data": non_default(cfg.data), "prep": prep})


def train_hash(cfg) -> str:
    """Hash of what decides the trained model: the prepared data, the model and train sections."""
    train = {k: v for k, v in non_default(cfg.train).items() if k not in TRAIN_RUN_KEYS}
    return config_hash({"prep": prep_hash(cfg), "model": non_default(cfg.model), "train": train})


def eval_hash(cfg) -> str:
    """Hash of what decides the evaluation report: the trained model and the eval section."""
    return config_hash({"train": train_hash(cfg), "eval": non_default(cfg.eval)})


# The keys that define a training run in run.dir (distributed.rundir): the train hash's keys, less how
# training runs (train.cache, train.elastic, the gradient compression) and how long (epochs and patience
# may grow on a resume): a resume or a rerun with another value of any other key is refused.
RUN_FREE_KEYS = ("train.cache", "train.elastic", "train.allreduce_compression", "train.warmup.epochs",
                 "train.finetune.epochs", "train.finetune.patience")


def _leaves(section, prefix: str) -> dict:
    out = {}
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}.{f.name}"
        out.update(_leaves(value, key) if dataclasses.is_dataclass(value) else {key: value})
    return out


def run_definition(cfg) -> dict:
    """``{dotted key: value}`` of every key that defines the training run in ``run.dir``: the data, the
    prepared data's identity (prep but where and how prep runs), the model and the training recipe."""
    skip = {f"prep.{k}" for k in PREP_RUN_KEYS} | {f"train.{k}" for k in TRAIN_RUN_KEYS} | set(RUN_FREE_KEYS)
    out = {}
    for name in ("data", "prep", "model", "train"):
        out.update({k: list(v) if isinstance(v, tuple) else v  # as read back from config.yaml
                    for k, v in _leaves(getattr(cfg, name), name).items() if k not in skip})
    return out


def run_hash(cfg) -> str:
    """Hash of :func:`run_definition` (the values that differ from the defaults, as the stage hashes)."""
    default = run_definition(Config())
    return config_hash({"schema": HASH_SCHEMA, "run": {k: v for k, v in run_definition(cfg).items()
                                                       if v != default.get(k)}})


def stage_hash(cfg, stage: str) -> str:
    """The hash of ``stage`` (prep, train or evaluate) for ``cfg``."""
    return {"prep": prep_hash, "train": train_hash, "evaluate": eval_hash}[stage](cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg, folder: str | os.PathLike, name: str = "config.yaml", note: str = "") -> Path:
    """Write the resolved config beside an output, atomically; ``note`` becomes leading YAML
    comments (what an ``auto`` value resolved to, which the values themselves keep as ``auto``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in note.splitlines())
    return atomic_write_text(folder / name, head + dump_yaml(cfg))


def reference_rows(cls=Config, prefix: str = ""):
    """(dotted key, type, default, doc) for every leaf: the rows of docs/config-reference.md."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from reference_rows(tp, key)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield key, _type_name(tp), default, f.metadata.get("doc", "")


def add_config_args(parser, required: bool = True):
    """The two arguments every command takes."""
    parser.add_argument("--config", "-c", required=required, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. --set train.batch_size=8 (repeatable)")
    add_debug_arg(parser)
    return parser


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)


@command("python -m data_prep.config")
def _print_main(argv=None) -> int:
    """``python -m data_prep.config --config C [--set k=v]``: print the resolved config."""
    parser = add_config_args(argparse.ArgumentParser(description=_print_main.__doc__), required=False)
    parser.add_argument("--reference", action="store_true",
                        help="print the Markdown reference of every key (docs/config-reference.md)")
    args = parser.parse_args(argv)
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    print(dump_yaml(config_from_args(args)), end="")
    return 0


REFERENCE_HEAD = """# Config reference

Generated from `data_prep/config.py`; do not edit by hand. Regenerate after changing a key:

```bash
python -m data_prep.config --reference > docs/config-reference.md
```

`tests/unit/test_docs.py` fails when this file is stale. Every command takes `--config FILE` and any number
of `--set dotted.key=value`; unknown keys, wrong types and out-of-range values are refused with the dotted key
(and, where there is one, the closest valid key). `python -m data_prep.config --config C --set k=v` prints the
resolved config. Where the keys are used: [user guide](user-guide.md), [cluster guide](cluster-guide.md),
[results guide](results-guide.md).

"""


def reference_markdown() -> str:
    """docs/config-reference.md, generated from the dataclasses (a test keeps the file current)."""
    lines = [REFERENCE_HEAD.rstrip("\n"), "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, doc in reference_rows():
        lines.append(f"| `{key}` | {tp} | `{default!r}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(_print_main())
