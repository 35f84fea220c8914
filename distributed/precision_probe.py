"""``runtime.precision: auto`` by measurement: is bfloat16 faster than float32 for THIS model on
THIS CPU, with this rank's threads?

:func:`probe` times the model in float32 and in bfloat16 (Keras' ``mixed_bfloat16`` policy,
its casts included), alternating, the best of a few passes each, with oneDNN as the process runs
it, one of two ways by the model's size:

* ``step`` (small networks: a training step at the training batch costs at most ``TARGET_GFLOP``):
  the model's own forward and backward pass (the fine-tune phase's trainable layers) at the
  training batch. Here the many small kernels, casts and batch norms decide, not the
  convolutions, so a small net can be no faster in bfloat16 although its convolutions are.
* ``layers`` (large networks): a forward pass over each of the model's convolution and dense
  layers on its real input shape, the batch shrunk so it costs about ``TARGET_GFLOP`` (at least
  one image; beyond that, every convolution's input rows cut by the same factor: width, channels
  and kernel, what oneDNN blocks over, stay the model's). There the convolutions are the step, so this
  pass's ratio stands for the fine-tune step's, and it costs seconds where a training step would cost
  more (measured ratios and costs: BENCHMARKS.md).

The speed ratio decides (:func:`distributed.precision.decide`); the figures are cached in
``precision.json`` of ``$CXR_CACHE_DIR`` (default ``~/.cache/cxr-transfer``), one entry per CPU
model, thread count, TensorFlow version and layer shapes, so later starts measure nothing.
Imported after ``distributed.runtime.apply``: TensorFlow is imported inside the functions.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

from data_prep.fsutil import atomic_write_json
from distributed.precision import PRECISIONS, cpu_model

__all__ = ["probe", "cache_file", "cache_key", "read_cached", "store", "layer_specs", "measure_layers",
           "measure_step", "TARGET_GFLOP"]

TARGET_GFLOP = 20.0  # float32 FLOPs of one calibration pass (about 0.1 s at 200 GFLOP/s; batch, then rows, cut to it)
PASSES = 2           # timed passes per type, after one untimed pass each (3 for the cheap step pass)


def cache_file(environ=None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("CXR_CACHE_DIR") or str(Path.home() / ".cache" / "cxr-transfer")
    return Path(base) / "precision.json"


def cache_key(threads: int, tf_version: str, shapes_id: str, cpu: str | None = None) -> str:
    return f"{cpu or cpu_model()} | {threads} thread(s) | tensorflow {tf_version} | {shapes_id}"


def _valid(entry) -> bool:
    """A cache entry as :func:`store` writes it (the file is read, never trusted)."""
    return (isinstance(entry, dict) and entry.get("precision") in PRECISIONS
            and isinstance(entry.get("ratio"), (int, float)) and 0 < float(entry["ratio"]) < 1000)


def _read(path: Path) -> dict:
    try:
        tree = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = tree.get("entries") if isinstance(tree, dict) else None
    return entries if isinstance(entries, dict) else {}


def read_cached(key: str, path: Path | None = None) -> dict | None:
    """The cached measurement for ``key``, or None (absent, unreadable or malformed: measure again)."""
    entry = _read(path or cache_file()).get(key)
    return entry if _valid(entry) else None


def store(key: str, entry: dict, path: Path | None = None) -> Path:
    """Add ``entry`` under ``key`` (locked read-modify-write, atomic replace: several jobs on a node)."""
    path = path or cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = {k: v for k, v in _read(path).items() if _valid(v)}
        entries[key] = entry
        return atomic_write_json(path, {"format": 1, "entries": entries})


def layer_specs(model) -> list[dict]:
    """The model's Conv2D and Dense layers, in order, with what a pass needs to run them alone:
    input shape (without the batch), kernel shape, strides, padding, activation."""
    import tensorflow as tf  # after runtime.apply (module docstring)

    out = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D) and type(layer) is tf.keras.layers.Conv2D:
            inp = tuple(int(d) for d in layer.input_shape[1:])
            out.append({"kind": "conv", "input": inp, "kernel": tuple(layer.kernel_size) + (inp[-1], layer.filters),
                        "strides": tuple(layer.strides), "padding": layer.padding.upper(),
                        "dilation": tuple(layer.dilation_rate), "bias": layer.use_bias,
                        "relu": layer.activation is tf.keras.activations.relu,
                        "macs": int(layer.output_shape[1] * layer.output_shape[2] * layer.filters
                                    * layer.kernel_size[0] * layer.kernel_size[1] * inp[-1])})
        elif isinstance(layer, tf.keras.layers.Dense):
            inp = tuple(int(d) for d in layer.input_shape[1:])
            out.append({"kind": "dense", "input": inp, "kernel": (inp[-1], layer.units), "bias": layer.use_bias,
                        "relu": layer.activation is tf.keras.activations.relu,
                        "macs": int(inp[-1] * layer.units)})
    return out


def shapes_id(name: str, image_size: int, specs: list[dict], batch: int) -> str:
    """A readable name plus a digest of every layer shape: two networks that differ in any layer
    (or batch) get their own cache entries."""
    blob = json.dumps([[s["kind"], s["input"], s["kernel"], s.get("strides")] for s in specs] + [batch])
    return f"{name} {image_size}px batch {batch} #{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def pass_batch(specs: list[dict], batch_size: int, target_gflop: float = TARGET_GFLOP) -> int:
    gflop_per_image = 2 * sum(s["macs"] for s in specs) / 1e9
    if gflop_per_image <= 0:
        return max(1, batch_size)
    return max(1, min(batch_size, int(target_gflop // gflop_per_image) or 1))


def method(specs: list[dict], batch_size: int, target_gflop: float = TARGET_GFLOP) -> tuple[str, int]:
    """("step", training batch) when a training step (about 3x the forward FLOPs) at the training
    batch costs at most ``target_gflop``, else ("layers", :func:`pass_batch`)."""
    step_gflop = 3 * 2 * sum(s["macs"] for s in specs) * batch_size / 1e9
    if step_gflop <= target_gflop:
        return "step", batch_size
    return "layers", pass_batch(specs, batch_size, target_gflop)


def _best(runs: dict, passes: int) -> dict:
    """Best seconds per call of each function, alternating, after one untimed call each."""
    def timed(fn):
        t = time.perf_counter()
        fn()  # eager call of a tf.function: returns once every output is computed
        return time.perf_counter() - t

    for fn in runs.values():  # untimed: tracing, oneDNN primitive creation
        timed(fn)
    best: dict = {}
    for _ in range(passes):
        for name, fn in runs.items():
            best[name] = min(best.get(name, float("inf")), timed(fn))
    return best


def _figures(best: dict, gflop: float, batch: int, layers: int, how: str, t0: float) -> dict:
    return {"ratio": round(best["float32"] / best["bfloat16"], 3), "method": how,
            "float32_ms": round(1000 * best["float32"], 1), "bfloat16_ms": round(1000 * best["bfloat16"], 1),
            "float32_gflops": round(gflop / best["float32"], 1), "bfloat16_gflops": round(gflop / best["bfloat16"], 1),
            "batch": batch, "layers": layers, "pass_gflop": round(gflop, 2),
            "calibration_s": round(time.perf_counter() - t0, 2),
            "measured": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}


def measure_step(model_cfg, image_size: int, batch: int, freeze: str = "first_n", freeze_first: int = 10,
                 passes: int = PASSES + 1, seed: int = 0, freeze_blocks: int = 0) -> dict:
    """Seconds of the model's forward and backward pass (gradients of the fine-tune phase's
    trainable weights) at ``batch`` in float32 and in mixed_bfloat16, and their ratio."""
    import tensorflow as tf  # after runtime.apply (module docstring)

    from distributed import model as M

    t0 = time.perf_counter()
    x = tf.random.stateless_uniform((batch, image_size, image_size, 1), (seed, 1), 0, 255)
    y = tf.one_hot(tf.random.stateless_uniform((batch,), (seed, 2), 0, 2, tf.int32), 2)
    loss = tf.keras.losses.CategoricalCrossentropy()
    runs, gflop, layers = {}, 0.0, 0
    for precision in ("float32", "mixed_bfloat16"):
        model = M.build_model(dataclasses.replace(model_cfg, weights="none"), image_size, 2, precision=precision)
        M.set_trainable(model, "finetune", freeze, freeze_first, freeze_blocks)
        specs = layer_specs(model)
        gflop, layers = 3 * 2 * batch * sum(s["macs"] for s in specs) / 1e9, len(specs)

        @tf.function
        def step(model=model):
            with tf.GradientTape() as tape:
                out = loss(y, model(x, training=True))
            return tape.gradient(out, model.trainable_variables)

        runs["float32" if precision == "float32" else "bfloat16"] = step
    return _figures(_best(runs, passes), gflop, batch, layers, "step", t0)


def row_scale(specs: list[dict], batch: int, target_gflop: float = TARGET_GFLOP) -> float:
    """The factor (<= 1) by which :func:`measure_layers` cuts every convolution's input rows so
    that one pass at ``batch`` costs about ``target_gflop``."""
    gflop = 2 * batch * sum(s["macs"] for s in specs) / 1e9
    return 1.0 if gflop <= target_gflop else round(target_gflop / gflop, 3)


def _rows(s: dict, scale: float) -> dict:
    if s["kind"] != "conv" or scale >= 1.0:
        return s
    h, w, c = s["input"]
    rows = min(h, max(s["kernel"][0] + 1, round(h * scale)))
    return {**s, "input": (rows, w, c), "macs": int(s["macs"] * rows / h)}


def measure_layers(specs: list[dict], batch: int, passes: int = PASSES, seed: int = 0,
                   target_gflop: float = TARGET_GFLOP) -> dict:
    """Seconds of one forward pass over ``specs`` (each layer on its own input of its real shape,
    rows cut by :func:`row_scale`) in float32 and in bfloat16, and their ratio. bfloat16 runs as
    Keras' ``mixed_bfloat16`` policy computes: bfloat16 activations, float32 variables cast each call."""
    import tensorflow as tf  # after runtime.apply (module docstring)

    t0 = time.perf_counter()
    scale = row_scale(specs, batch, target_gflop)
    specs = [_rows(s, scale) for s in specs]
    rng = tf.random.Generator.from_seed(seed)
    weights = [(tf.Variable(rng.normal(s["kernel"]) * 0.05), tf.Variable(tf.zeros(s["kernel"][-1])))
               for s in specs]

    def layer(s, x, w, b, dtype):
        w, b = tf.cast(w, dtype), tf.cast(b, dtype)
        if s["kind"] == "conv":
            y = tf.nn.conv2d(x, w, strides=s["strides"], padding=s["padding"], dilations=s["dilation"])
        else:
            y = tf.matmul(x, w)
        if s["bias"]:
            y = tf.nn.bias_add(y, b)
        return tf.nn.relu(y) if s["relu"] else y

    runs = {}
    for dtype in (tf.float32, tf.bfloat16):
        inputs = [tf.cast(rng.uniform((batch,) + tuple(s["input"])), dtype) for s in specs]

        @tf.function
        def one_pass(inputs=inputs, dtype=dtype):
            # each layer on its own input of its real shape; all outputs returned, so none is pruned
            return [layer(s, x, w, b, dtype) for s, x, (w, b) in zip(specs, inputs, weights)]

        runs[dtype.name] = one_pass
    gflop = 2 * batch * sum(s["macs"] for s in specs) / 1e9
    return {**_figures(_best(runs, passes), gflop, batch, len(specs), "layers", t0), "row_scale": scale}


def probe(cfg, threads: int, decide_fn, path: Path | None = None) -> dict:
    """The calibration figures of ``cfg``'s model (``model``, ``data.image_size``,
    ``train.batch_size``, ``train.finetune`` freezing) with ``threads``: cached, else measured and
    cached (``decide_fn(ratio)`` gives the precision stored with them). ``source`` says which;
    ``cache`` the file."""
    import tensorflow as tf  # after runtime.apply (module docstring)

    from distributed import model as M

    t0 = time.perf_counter()
    S = cfg.data.image_size
    probe = M.build_model(dataclasses.replace(cfg.model, weights="none"), S, 2)
    specs = layer_specs(probe)
    del probe
    how, batch = method(specs, cfg.train.batch_size)
    path = path or cache_file()
    key = cache_key(threads, tf.__version__, f"{how} " + shapes_id(cfg.model.backbone, S, specs, batch))
    cached = read_cached(key, path)
    if cached is not None:
        return {**cached, "source": "cached", "cache": str(path), "key": key}
    ft = cfg.train.finetune
    got = (measure_step(cfg.model, S, batch, ft.freeze, ft.freeze_first, freeze_blocks=ft.freeze_blocks)
           if how == "step" else measure_layers(specs, batch))
    got["calibration_s"] = round(time.perf_counter() - t0, 2)  # the probe's build included
    got["precision"] = decide_fn(got["ratio"])
    got["cache"], got["key"] = str(path), key
    try:
        store(key, {k: v for k, v in got.items() if k not in ("cache", "key")}, path)
    except OSError as e:  # a read-only home: measured again next time
        got["cache_error"] = str(e)
    return {**got, "source": "measured"}
