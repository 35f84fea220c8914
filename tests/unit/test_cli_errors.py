"""Every command answers bad input with one line on stderr and an exit code, never a traceback
(data_prep.cli); ``--debug`` brings the traceback back."""
import os
import subprocess
import sys

import pytest

# (name, python -m arguments before --config): every console script and python -m entry with a config
CONFIG_COMMANDS = [
    ("prep", ["-m", "data_prep"]),
    ("train", ["-m", "distributed.train"]),
    ("evaluate", ["-m", "distributed.evaluate"]),
    ("tracking", ["-m", "distributed.tracking"]),
    ("launch", ["-m", "launch", "pipeline", "--dry-run"]),
    ("config", ["-m", "data_prep.config"]),
    ("bench epoch-timing", ["-m", "benchmarks", "epoch-timing"]),
    ("bench scaling", ["-m", "benchmarks", "scaling"]),
    ("bench input-pipeline", ["-m", "benchmarks", "input-pipeline"]),
]
BAD_CONFIG = [
    ("unknown key", ["--set", "no.such.key=1"], 2, "no.such.key: unknown key; 'no' is not a section"),
    ("wrong type", ["--set", "train.batch_size=abc"], 2, "train.batch_size: expected an integer, got 'abc'"),
    ("missing file", ["--config", "no/such/config.yaml"], 2, "config file not found: no/such/config.yaml"),
]


def _run(args, root, env=None):
    e = {k: v for k, v in os.environ.items() if k != "CXR_DEBUG"}
    return subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**e, **(env or {})})


def _one_error_line(p, code: int, words: str):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert len(lines) == 1 and "error: " in lines[0] and words in lines[0], p.stderr


@pytest.mark.parametrize("bad", BAD_CONFIG, ids=[b[0] for b in BAD_CONFIG])
@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=[c[0] for c in CONFIG_COMMANDS])
def test_bad_config_is_one_line(command, bad, root):
    _, args = command
    _, extra, code, words = bad
    config = [] if "--config" in extra else ["--config", "configs/demo.yaml"]
    _one_error_line(_run([*args, *config, *extra], root), code, words)


def test_synth_unwritable_output_is_one_line(tmp_path, root):
    (tmp_path / "file").write_text("x")
    p = _run(["-m", "data_prep.synthetic", "--out", str(tmp_path / "file" / "data"), "--patients", "1",
              "--image-size", "16", "--no-progress"], root)
    _one_error_line(p, 1, str(tmp_path / "file"))


@pytest.mark.parametrize("content", [None, b"not a model"], ids=["missing", "not a model"])
def test_predict_bad_model_is_one_line(tmp_path, root, fixtures, content):
    model = tmp_path / "model.keras"
    if content is not None:
        model.write_bytes(content)
    p = _run(["-m", "distributed.predict", "--model", str(model), str(fixtures / "00000001_000.png")], root)
    _one_error_line(p, 1, str(model))


def test_bench_timeline_missing_file_is_one_line(tmp_path, root):
    _one_error_line(_run(["-m", "benchmarks", "timeline", str(tmp_path / "none.json")], root), 2, "none.json")


def test_debug_shows_the_traceback(root):
    args = ["-m", "distributed.train", "--config", "configs/demo.yaml", "--set", "no.such.key=1"]
    for p in (_run([*args, "--debug"], root), _run(args, root, env={"CXR_DEBUG": "1"})):
        assert p.returncode != 0 and "Traceback" in p.stderr and "ConfigError: no.such.key" in p.stderr


@pytest.mark.parametrize("environ, argv, level", [
    ({}, [], "2"),                            # default: TensorFlow's warnings echo errors stated in one line
    ({}, ["--debug"], "1"),                   # --debug keeps its warnings
    ({"CXR_DEBUG": "1"}, [], "1"),
    ({"TF_CPP_MIN_LOG_LEVEL": "0"}, [], "0"),  # the user's own level is kept
])
def test_tensorflow_notices_level(environ, argv, level, monkeypatch):
    from data_prep.cli import quiet_tensorflow

    monkeypatch.delenv("CXR_DEBUG", raising=False)
    environ = dict(environ)
    if "CXR_DEBUG" in environ:
        monkeypatch.setenv("CXR_DEBUG", environ.pop("CXR_DEBUG"))
    quiet_tensorflow(environ, argv)
    assert environ["TF_CPP_MIN_LOG_LEVEL"] == level
