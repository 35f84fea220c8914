"""NIH stays the default format and gives the same splits as before the dataset adapters, for the same seed.

The digests were recorded with the code before ``data_prep.datasets`` existed (images known by their
basename, integer patient ids): the order and content of every split must not change."""
import hashlib
import os

import pytest

from data_prep import metadata as md
from data_prep import prepare, synthetic
from data_prep.config import load_config


def digest(items) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]


# seed 7, val 0.1, test 0.2, binary Infiltration vs No Finding; train balanced to 300, val capped at 100
FIXTURE = {"train": (600, "c623c4168c28df9a", "a6792f9efdde2050"),
           "val": (200, "36ab834da024859c", "23d478098adbab96"),
           "test": (15956, "3d620756a93a10a8", "9d30efbc215dfda5")}
# synthetic set (30 patients, seed 3), prep.seed 5, train balanced to 20 per class
SYNTHETIC = {"train": (40, "afb79cde60303635", "8ed3bdad7d1a8cc2", "b2c8c0f57ae006ea"),
             "val": (8, "2c6bb321bd8eaee6", "61d66e620ac9a488", "0b78ae2940ed11a6"),
             "test": (20, "8514c601fae21984", "73f17e19fa727179", "3e12e5a5ba1499b1")}


def _fixture_rows(fixtures):
    frame, _ = md.read_metadata(fixtures / "Data_Entry_2017_v2020.csv.gz")
    return md.select_task(frame, "binary", "Infiltration", "no_finding")


def test_fixture_csv_splits_unchanged(fixtures):
    df = _fixture_rows(fixtures)
    split, _ = md.split_patients(df, 0.1, 0.2, 7)
    for name, per_class in (("train", 300), ("val", 100), ("test", 0)):
        rows = md.sample_split(df.loc[split == name], name, "binary", per_class, 7)
        got = (len(rows), digest(os.path.basename(x) for x in rows["image"]), digest(rows["patient"]))
        assert got == FIXTURE[name], name


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("nih")
    synthetic.generate(d, patients=30, image_size=32, seed=3, progress=False)
    return d


def test_synthetic_plan_unchanged(synth, tmp_path):
    cfg = load_config(None, [f"data.csv={synth}/Data_Entry_2017.csv", f"data.images={synth}",
                             f"prep.out={tmp_path / 'p'}", "prep.train_per_class=20", "prep.seed=5"])
    plan = prepare.make_plan(cfg)
    for name, s in plan["splits"].items():
        got = (len(s["image"]), digest(os.path.basename(x) for x in s["image"]), digest(s["patient"]),
               digest(s["label"].tolist()))
        assert got == SYNTHETIC[name], name
