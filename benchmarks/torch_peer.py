"""The PyTorch peer of ``epoch-timing``: the article's VGG16 step written in PyTorch, timed the same way.

A variant with ``framework: pytorch`` (``configs/bench/variants.yaml``: ``pytorch``, ``pytorch-bf16``)
runs ``python -m benchmarks.torch_peer --worker SPEC OUT`` in its own venv (``torch==2.13.0``,
built once and cached like every variant's); its result has the TensorFlow worker's shape, so
its rows land in the same table (s/epoch, speedup, MFU). What is the same:

* the network: VGG16's 13 convolutions (3x3, padding 1, ReLU) and 5 max-pools, then the project's
  head: global average pooling, Dense ``model.dense_units`` ReLU, Dropout ``model.dropout``, Dense 2
  (softmax + categorical cross-entropy = ``CrossEntropyLoss`` on the logits); gray input made RGB
  and caffe-preprocessed (BGR minus the ImageNet mean) in the model, as ``distributed.model`` does;
* per phase the same frozen layers (warm-up: every convolution; fine-tune: the convolutions among
  the first ``train.finetune.freeze_first`` layers of Keras' VGG16, counted from its input layer:
  7 of 13 for the default 10), optimizer (RMSprop with Keras' rho 0.9 and epsilon 1e-7; SGD with
  the config's momentum and Nesterov) and learning rate, the config's batch size;
* channels-last tensors; ``mixed_bfloat16`` rows run forward and loss under
  ``torch.autocast("cpu", torch.bfloat16)`` (weights and gradients float32, as Keras' policy);
* the timing protocol (W untimed + K timed steps, R repeats, ``--rounds``), FLOPs per image by
  the convention of ``benchmarks/flops.py`` (:func:`vgg16_flops`, checked against the Keras
  count in the tests) and matmul peaks of its own (``torch.mm``), float32 and bfloat16.

What differs: the input is random images from memory WITHOUT the in-graph augmentation of the
TensorFlow rows (there tf.data runs it beside the step, a few ms per batch), and the default
thread pools are PyTorch's. Nothing here imports torch at module level: product code never
imports this module, and ``--only`` without a pytorch variant never starts it.
"""
from __future__ import annotations

import os
import platform
import sys
import time

from benchmarks.common import bench_config, step_time, worker_entry

# Keras' VGG16 (include_top=False), layer by layer from its input layer: "input", "conv", "pool".
VGG16_WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_LAYERS = ("input",) + tuple("pool" if w == "M" else "conv" for w in VGG16_WIDTHS)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
PEAK_SHAPES = (1536, 2048, 4096)
PHASES = ("warmup", "finetune")


def frozen_convs(phase: str, freeze: str = "first_n", freeze_first: int = 10) -> int:
    """How many of VGG16's 13 convolutions ``distributed.model.set_trainable`` freezes for ``phase``."""
    convs = VGG16_LAYERS.count("conv")
    if phase == "warmup" or freeze == "all_conv":
        return convs
    if freeze != "first_n":
        raise ValueError(f"freeze: {freeze!r} is not first_n or all_conv")
    return VGG16_LAYERS[:max(0, freeze_first)].count("conv")


def vgg16_flops(image_size: int, dense_units: int = 256, classes: int = 2, frozen: int = 13) -> dict:
    """FLOPs per image of the peer's network by ``benchmarks.flops``' convention (conv and dense
    MACs; training = forward + 2 x forward of the tail from the first trainable layer), with the
    first ``frozen`` convolutions frozen. The same numbers as ``count_flops`` of the Keras model."""
    macs, size, cin = [], image_size, 3
    for w in VGG16_WIDTHS:
        if w == "M":
            size //= 2
            continue
        macs.append(size * size * 3 * 3 * cin * w)
        cin = w
    macs += [cin * dense_units, dense_units * classes]
    fwd = sum(macs)
    tail = sum(macs[frozen:])  # the first trainable layer: conv number frozen+1, or the head's dense
    return {"forward_macs": fwd, "forward_flops": 2 * fwd, "trainable_tail_macs": tail,
            "training_flops": 2 * fwd + 4 * tail,
            "convention": "1 MAC = 2 FLOPs; conv+dense only; train = fwd + 2 x fwd(trainable tail)"}


# --------------------------------------------------------------------------- in the variant's process (torch)

def _model(torch, dense_units: int, dropout: float, classes: int = 2):
    nn = torch.nn
    layers, cin = [], 3
    for w in VGG16_WIDTHS:
        if w == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]
            cin = w

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1))
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, dense_units),
                                      nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dense_units, classes))

        def forward(self, gray):  # (B, 1, S, S) in [0, 255], as the Keras model's input
            x = gray.expand(-1, 3, -1, -1) - self.mean  # gray to RGB; BGR of a gray image is itself
            return self.head(self.features(x.contiguous(memory_format=torch.channels_last)))

    return Net()


def _freeze(net, frozen: int) -> int:
    """requires_grad off for the first ``frozen`` convolutions; returns the trainable tensors."""
    import torch

    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    for i, conv in enumerate(convs):
        for p in conv.parameters():
            p.requires_grad_(i >= frozen)
    return sum(1 for p in net.parameters() if p.requires_grad)


def _optimizer(torch, phase: str, cfg, params):
    pcfg = cfg.train.warmup if phase == "warmup" else cfg.train.finetune
    if pcfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=pcfg.lr, momentum=getattr(pcfg, "momentum", 0.0),
                               nesterov=bool(getattr(pcfg, "nesterov", False)))
    if pcfg.optimizer == "rmsprop":  # Keras' legacy RMSprop: rho 0.9, epsilon 1e-7
        return torch.optim.RMSprop(params, lr=pcfg.lr, alpha=0.9, eps=1e-7)
    if pcfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=pcfg.lr, eps=1e-7)
    raise ValueError(f"train.{phase}.optimizer: {pcfg.optimizer!r}")


def matmul_peak(torch, dtype, n: int, seconds: float) -> float:
    """Best sustained GFLOP/s of an n x n ``torch.mm`` (as ``benchmarks.machine.matmul_peak``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best, reps, t_end, dt = 0.0, 1, time.perf_counter() + seconds, 0.0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        dt = time.perf_counter() - t0
        if dt < 0.3:
            reps *= 2
            continue
        best = max(best, 2.0 * n**3 * reps / dt / 1e9)
    return round(best or 2.0 * n**3 * reps / dt / 1e9, 2)


def _peak(torch, dtype, name: str, seconds: float) -> dict:
    by = {str(n): matmul_peak(torch, dtype, n, seconds) for n in PEAK_SHAPES}
    n = max(by, key=by.get)
    return {"gflops": by[n], "n": int(n), "dtype": name, "by_shape": by, "library": "torch.mm"}


def worker(spec: dict) -> dict:
    """Time the phases in this process (the pytorch variant's venv), in the TensorFlow worker's format."""
    t_start = time.perf_counter()
    cfg = bench_config(spec.get("config"), spec.get("overrides", ()), spec.get("quick", False),
                       spec.get("image_size"))
    out = {"python": sys.executable, "pid": os.getpid(), "phases": {}, "framework": "pytorch",
           "worker": "benchmarks.torch_peer",
           "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}
    if spec.get("fake"):
        from benchmarks.epoch_timing import _fake_worker  # tests: the same protocol without torch

        return _fake_worker(spec, cfg, out)
    if cfg.model.backbone != "vgg16":
        raise SystemExit(f"the PyTorch peer builds VGG16 only, not model.backbone={cfg.model.backbone}")
    import torch  # only here, in the variant's own process and venv

    if spec.get("threads") == "tuned":
        from distributed.tuning import detect_topology, plan_threads

        plan = plan_threads(detect_topology(), 1, cfg.runtime)
        torch.set_num_threads(plan.intra_op)
    precision = spec.get("precision", "float32")
    bf16 = precision == "mixed_bfloat16"
    out.update(precision=precision, onednn=bool(torch.backends.mkldnn.is_available()),
               onednn_env="(PyTorch: oneDNN through torch.backends.mkldnn)",
               versions={"torch": torch.__version__, "python": platform.python_version()},
               threads_effective={"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()})
    seconds = spec.get("peak_seconds", 1.5)
    out["matmul"] = _peak(torch, torch.float32, "float32", seconds)
    if bf16:
        out["matmul_bf16"] = _peak(torch, torch.bfloat16, "bfloat16", seconds)

    S, B = cfg.data.image_size, cfg.train.batch_size
    torch.manual_seed(cfg.train.seed)
    net = _model(torch, cfg.model.dense_units, cfg.model.dropout).to(memory_format=torch.channels_last)
    net.train()
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (B, 1, S, S), generator=g).float() for _ in range(4)]
    labels = [torch.randint(0, 2, (B,), generator=g) for _ in range(4)]
    loss_fn = torch.nn.CrossEntropyLoss()
    W, K, R = spec["warmup_steps"], spec["timed_steps"], spec["repeats"]
    ft = cfg.train.finetune
    for phase in spec.get("phases", PHASES):
        frozen = frozen_convs(phase, ft.freeze, ft.freeze_first)
        ntrain = _freeze(net, frozen)
        opt = _optimizer(torch, phase, cfg, [p for p in net.parameters() if p.requires_grad])
        steps = []
        for _ in range(R):
            ends = []
            for i in range(W + K):
                x, y = images[i % 4], labels[i % 4]
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = loss_fn(net(x), y)
                loss.backward()  # gradients of the float32 weights, as under Keras' mixed policy
                opt.step()
                ends.append(time.perf_counter())
            steps.append(step_time(ends, W, K))
        out["phases"][phase] = {"step_s": steps, "trainable_weight_tensors": ntrain,
                                "flops": vgg16_flops(S, cfg.model.dense_units, 2, frozen)}
    out["worker_s"] = round(time.perf_counter() - t_start, 1)
    return out


if __name__ == "__main__":
    sys.exit(worker_entry(worker, "epoch-timing"))
