"""Pieces of the trainer, in process: learning-rate schedule, validation metrics, run state,
history truncation, atomic checkpoints, optimizer state round trip."""
import logging
import math

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from data_prep.config import load_config  # noqa: E402
from distributed import checkpoints, rundir, schedule, stopping, validation  # noqa: E402
from distributed import model as M  # noqa: E402
from distributed import trainer as T  # noqa: E402


def test_lr_schedule_warms_up_to_size_times_and_decays():
    s = schedule.WarmupInverseTimeDecay(1e-3, size=4, warmup_steps=10, decay=1e-2)
    assert float(s(0)) == pytest.approx(1e-3)  # the one-rank rate at the start
    assert float(s(5)) == pytest.approx(1e-3 * 2.5 / 1.05, rel=1e-5)
    assert float(s(100)) == pytest.approx(4e-3 / 2.0, rel=1e-5)  # x4, then inverse-time decay
    assert float(schedule.WarmupInverseTimeDecay(1e-3, size=4, warmup_steps=0)(0)) == pytest.approx(4e-3)
    assert float(schedule.WarmupInverseTimeDecay(1e-3, size=4, warmup_steps=10, scale=False)(50)) == pytest.approx(1e-3)
    again = tf.keras.optimizers.schedules.deserialize(tf.keras.optimizers.schedules.serialize(s))
    assert float(again(5)) == pytest.approx(float(s(5)))


def test_lr_schedule_of_an_optimizer_saved_before_its_module_moved_still_loads(tmp_path):
    """The schedule lived in distributed.callbacks; its registered name (cxr>...) is what loads it."""
    import json
    import zipfile

    old = {"module": "distributed.callbacks", "class_name": "WarmupInverseTimeDecay",
           "config": {"base_lr": 0.001, "size": 4, "warmup_steps": 10, "decay": 0.01, "scale": True, "name": None},
           "registered_name": "cxr>WarmupInverseTimeDecay"}
    s = tf.keras.optimizers.schedules.deserialize(old)
    assert isinstance(s, schedule.WarmupInverseTimeDecay) and float(s(5)) == pytest.approx(1e-3 * 2.5 / 1.05, rel=1e-5)
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(2)])
    model.compile(optimizer=tf.keras.optimizers.legacy.SGD(schedule.WarmupInverseTimeDecay(1e-3, 4, 10, 1e-2)),
                  loss="mse")
    model.save(tmp_path / "new.keras")
    with zipfile.ZipFile(tmp_path / "new.keras") as z, zipfile.ZipFile(tmp_path / "old.keras", "w") as out:
        for item in z.infolist():  # the same file as a checkpoint written before the move
            data = z.read(item)
            if item.filename == "config.json":
                assert b'"module": "distributed.schedule"' in data
                data = data.replace(b'"module": "distributed.schedule"', b'"module": "distributed.callbacks"')
                assert json.loads(data)
            out.writestr(item, data)
    loaded = tf.keras.models.load_model(tmp_path / "old.keras")
    lr = loaded.optimizer.learning_rate
    assert isinstance(lr, schedule.WarmupInverseTimeDecay) and lr.get_config() == old["config"]


def test_make_optimizer_follows_the_config():
    cfg = load_config(None, [])
    sgd = T.make_optimizer("finetune", cfg.train.finetune, cfg.train, size=2, steps_per_epoch=10)
    assert type(sgd).__name__ == "SGD" and sgd.nesterov and sgd.get_config()["momentum"] == pytest.approx(0.9)
    assert float(sgd.learning_rate(10)) == pytest.approx(2e-3 / (1 + 1e-6 * 10), rel=1e-6)
    rms = T.make_optimizer("warmup", cfg.train.warmup, cfg.train, size=1, steps_per_epoch=10)
    assert type(rms).__name__ == "RMSprop"


def test_auc_and_validation_metrics_match_references():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(rng.uniform(0, 1, 300) * 0.5 + 0.3 * y, 2)  # with ties
    assert validation.auc_score(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert math.isnan(validation.auc_score(np.ones(5), np.arange(5)))
    probs = np.stack([1 - p, p], 1).astype(np.float32)
    onehot = np.eye(2, dtype=np.float32)[y]
    m = validation.classification_metrics(onehot, probs, multilabel=False)
    keras_loss = float(tf.reduce_mean(tf.keras.losses.categorical_crossentropy(onehot, probs)))
    assert m["loss"] == pytest.approx(keras_loss, rel=1e-5)
    assert m["accuracy"] == pytest.approx(np.mean((p > 0.5) == y))
    Y = rng.integers(0, 2, (200, 3)).astype(np.float32)
    P = rng.uniform(0, 1, (200, 3)).astype(np.float32)
    ml = validation.classification_metrics(Y, P, multilabel=True)
    assert ml["loss"] == pytest.approx(float(tf.reduce_mean(tf.keras.losses.binary_crossentropy(Y, P))), rel=1e-4)
    assert ml["auc"] == pytest.approx(np.mean([roc_auc_score(Y[:, k], P[:, k]) for k in range(3)]))


def test_run_state_json_and_history_truncation(tmp_path):
    s = rundir.RunState(phase="finetune", phase_epoch=2, epoch=3)
    d = s.to_json()
    assert d["best_val_loss"] is None  # inf is not JSON
    assert rundir.RunState.from_json(d) == s
    h = tmp_path / "history.csv"
    for e in range(1, 5):
        rundir.append_history(h, {"phase": "finetune", "epoch": e, "loss": 1.0 / e, "val_auc": float("nan")})
    assert rundir.truncate_history(h, 2) == 2
    rows = rundir.read_history(h)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0]["val_auc"] == "nan"
    assert list(rows[0]) == list(rundir.HISTORY_COLUMNS)


def test_checkpoint_is_atomic_and_optimizer_state_round_trips(tmp_path):
    cfg = load_config(None, ["model.backbone=tiny", "model.weights=none", "model.dense_units=8"])
    model = M.build_model(cfg.model, 32, 2)
    M.set_trainable(model, "finetune", "first_n", 10)
    opt = T.make_optimizer("finetune", cfg.train.finetune, cfg.train, 1, 5)
    model.compile(opt, "categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 1)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[[0, 1] * 4]
    model.fit(x, y, epochs=2, verbose=0)
    checkpoints.save_model_atomic(model, tmp_path / "ckpt" / "last.keras")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.keras"]
    T.save_optimizer(opt, tmp_path / "ckpt" / "opt.npz", "finetune")

    fresh = M.build_model(cfg.model, 32, 2)
    M.copy_weights(M.load_model(tmp_path / "ckpt" / "last.keras"), fresh)
    M.set_trainable(fresh, "finetune", "first_n", 10)
    opt2 = T.make_optimizer("finetune", cfg.train.finetune, cfg.train, 1, 5)
    fresh.compile(opt2, "categorical_crossentropy")
    T.build_optimizer(opt2, fresh)
    phase, values = T.read_optimizer(tmp_path / "ckpt" / "opt.npz", logging.getLogger("t"))
    assert phase == "finetune"
    T.assign_optimizer(opt2, values, logging.getLogger("t"))
    assert int(opt2.iterations.numpy()) == int(opt.iterations.numpy()) == 2
    for a, b in zip(T.opt_variables(opt), T.opt_variables(opt2)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_prepare_phase_is_the_step_of_every_way_of_training(monkeypatch):
    """One DistributedOptimizer with the config's compression (elastic training and the benchmarks
    build their step with prepare_phase too: tests/e2e/test_stop_signal.py runs elastic with fp16)."""
    from distributed import hvd

    seen = []
    monkeypatch.setattr(hvd, "DistributedOptimizer", lambda opt, compression="none": seen.append(compression) or opt)
    cfg = load_config(None, ["model.backbone=tiny", "model.weights=none", "model.dense_units=8",
                             "train.allreduce_compression=fp16"])
    model = M.build_model(cfg.model, 32, 3, multilabel=True)
    ph = T.prepare_phase(cfg, model, "warmup", 4, 10, multilabel=True)
    assert seen == ["fp16"] and ph.optimizer is model.optimizer and type(ph.optimizer).__name__ == "RMSprop"
    assert model.loss == "binary_crossentropy" and ph.trainable == len(model.trainable_weights) == 4  # the head
    assert len(T.opt_variables(ph.optimizer)) > 1  # slots made before the first step (restore, broadcast)
    ft = T.prepare_phase(cfg, model, "finetune", 4, 10)
    assert type(ft.optimizer).__name__ == "SGD" and ft.trainable > ph.trainable
    assert float(ft.optimizer.learning_rate(10)) == pytest.approx(4e-3 / (1 + 1e-6 * 10), rel=1e-6)


def test_stop_signals_config_and_batch_record_truncation(tmp_path):
    import signal

    assert stopping.parse_stop_signals("SIGTERM, usr1,SIGINT") == [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT]
    assert stopping.parse_stop_signals("") == []
    with pytest.raises(Exception, match="train.stop_signals: 'SIGKILL'"):
        stopping.parse_stop_signals("SIGKILL")
    assert stopping.Stopped(signal.SIGTERM, "x").exit_code == 143 \
        and stopping.Stopped(signal.SIGUSR1, "x").exit_code == 138
    import os

    before = signal.getsignal(signal.SIGUSR1)
    with stopping.stop_signals("SIGUSR1") as early:  # train.main's, before TensorFlow loads
        os.kill(os.getpid(), signal.SIGUSR1)  # during start-up: kept, not fatal
        with stopping.stop_signals("SIGUSR1") as phases:  # train_phases'
            assert phases is early and phases.got == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    p = tmp_path / "batches.csv"
    rundir.append_batches(p, [("warmup", e, s, r, f"h{e}{s}{r}") for e in (1, 2) for s in (1, 2, 3) for r in (0, 1)])
    rundir.truncate_batches(p, 1, 2)  # the checkpoint: epoch 1 done, 2 steps of epoch 2
    rows = p.read_text().splitlines()
    assert rows[0] == ",".join(rundir.BATCH_COLUMNS) and len(rows) == 1 + 6 + 4 and rows[-1] == "warmup,2,2,1,h221"
