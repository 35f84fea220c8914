"""``cxr-synth`` and ``cxr-predict`` take ``--config``/``--set`` like every other command: the config names
the folder to generate (``data.images``) and the run to predict with (``run.dir``); the command line wins."""

import pytest

from data_prep import synthetic
from distributed import predict


def _cfg(tmp_path, images, csv):
    c = tmp_path / "c.yaml"
    c.write_text(f"data: {{images: {images}, csv: {csv}}}\nrun: {{dir: {tmp_path}/run}}\n"
                 "runtime: {precision: float32}\neval: {trust_model: false}\n")
    return str(c)


def test_synth_writes_where_the_config_reads(tmp_path):
    data = tmp_path / "data"
    cfg = _cfg(tmp_path, data, data / "Data_Entry_2017.csv")
    assert synthetic.main(["--config", cfg, "--patients", "3", "--image-size", "16", "--no-progress"]) == 0
    assert (data / "Data_Entry_2017.csv").is_file() and len(list((data / "images").glob("*.png"))) >= 3


def test_synth_refuses_a_config_whose_csv_it_would_not_write(tmp_path, capsys):
    cfg = _cfg(tmp_path, tmp_path / "data", tmp_path / "elsewhere.csv")
    assert synthetic.main(["--config", cfg, "--patients", "3", "--image-size", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.csv:" in err[0] and "elsewhere.csv" in err[0], err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv, message", [
    (["--patients", "3"], "--out (or --config"),
    (["--out", "x", "--set", "data.image_size=8"], "--set needs --config"),
])
def test_synth_without_a_place_to_write_is_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_predict_takes_the_run_and_settings_from_the_config(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, tmp_path / "data", tmp_path / "data" / "Data_Entry_2017.csv")
    a = predict.parse_args(["--config", cfg, "x.png"])
    assert (a.model, a.precision, a.trust_model) == (f"{tmp_path}/run", "float32", False)
    a = predict.parse_args(["--config", cfg, "--set", "runtime.precision=mixed_bfloat16", "--model", "m.keras",
                            "--trust-model", "x.png"])
    assert (a.model, a.precision, a.trust_model) == ("m.keras", "mixed_bfloat16", True)
    a = predict.parse_args(["--model", "m.keras", "x.png"])
    assert (a.model, a.precision, a.trust_model) == ("m.keras", "auto", False)


def test_predict_needs_a_model_or_a_config(capsys):
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["x.png"])
    assert e.value.code == 2 and "--model (or --config" in capsys.readouterr().err
