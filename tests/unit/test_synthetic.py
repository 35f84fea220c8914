import gzip
import hashlib

import numpy as np
import pytest
from PIL import Image

from data_prep import synthetic
from data_prep.imaging import load_xray
from data_prep.metadata import ALL_LABELS, read_metadata


def _digest_tree(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    a = tmp_path_factory.mktemp("synth_a")
    b = tmp_path_factory.mktemp("synth_b")
    assert synthetic.main(["--out", str(a), "--patients", "12", "--image-size", "64", "--seed", "7",
                           "--no-progress"]) == 0
    synthetic.generate(b, patients=12, image_size=64, seed=7, progress=False)
    return a, b


def test_same_seed_is_byte_identical(twice):
    a, b = twice
    da, db = _digest_tree(a), _digest_tree(b)
    assert len(da) > 12 + 3  # images plus CSV and two lists
    assert da == db


def test_other_seed_differs(tmp_path):
    synthetic.generate(tmp_path, patients=12, image_size=64, seed=8, progress=False)
    other = synthetic.table_csv(synthetic.make_table(12, seed=7, image_size=64))
    assert (tmp_path / "Data_Entry_2017.csv").read_text() != other


def test_header_is_the_real_v2020_header(twice, fixtures):
    a, _ = twice
    with gzip.open(fixtures / "Data_Entry_2017_v2020.csv.gz", "rt") as f:
        real = f.readline().rstrip("\n")
    lines = (a / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == real
    assert all(len(ln.split(",")) == 11 for ln in lines)  # as the real file: 11 fields


def test_rows_names_labels_views(twice):
    a, _ = twice
    frame, issues = read_metadata(a / "Data_Entry_2017.csv")
    assert issues.skipped == [] and issues.notes == []
    assert len(frame) == len(list((a / "images").glob("*.png")))
    assert frame["image"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert (frame["image"].str[:8].astype(int) == frame["patient"]).all()
    assert frame.groupby("patient").size().max() > 1  # follow-ups
    assert set(frame["view"]) == {"AP", "PA"}
    labels = {lab for s in frame["labels"] for lab in s.split("|")}
    assert labels <= set(ALL_LABELS)
    n_inf, n_nf = int(frame["Infiltration"].sum()), int(frame["no_finding"].sum())
    assert n_inf >= 0.2 * len(frame) and n_nf >= 0.2 * len(frame)


def test_lists_split_by_patient(twice):
    a, _ = twice
    tv = (a / "train_val_list.txt").read_text().split()
    te = (a / "test_list.txt").read_text().split()
    assert tv and te
    assert {n[:8] for n in tv}.isdisjoint({n[:8] for n in te})
    assert sorted(tv + te) == sorted(p.name for p in (a / "images").glob("*.png"))


def test_png_is_8bit_gray_of_asked_size(twice):
    a, _ = twice
    p = sorted((a / "images").glob("*.png"))[0]
    with Image.open(p) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (64, 64)
        arr = np.asarray(im)
    assert arr.std() > 10  # a picture, not a flat field


def test_infiltration_pattern_is_visible_at_64px():
    """One number (the spread of intensities inside the lung fields, after the pipeline's own
    load_xray to 64 px) must already separate Infiltration from No Finding; a CNN does better.
    Guards against generating an unlearnable data set."""
    rows = synthetic.make_table(50, seed=1, image_size=128)
    feats, ys = [], []
    for r in rows:
        lab = r["Finding Labels"].split("|")
        if lab != ["No Finding"] and "Infiltration" not in lab:
            continue
        big = synthetic.render(128, r["Finding Labels"], r["View Position"],
                               synthetic.image_rng(1, r["Patient ID"], r["Follow-up #"]))
        a = load_xray(synthetic.png_bytes(big), 64)[0].astype(np.float32)
        lungs = np.concatenate([a[18:46, 12:26].ravel(), a[18:40, 40:52].ravel()])
        feats.append(np.percentile(lungs, 75) - np.percentile(lungs, 25))
        ys.append("Infiltration" in lab)
    feats, ys = np.array(feats), np.array(ys)
    assert ys.sum() > 40 and (~ys).sum() > 40
    order = np.argsort(feats)
    ranks = np.empty(len(feats))
    ranks[order] = np.arange(1, len(feats) + 1)
    auc = (ranks[ys].sum() - ys.sum() * (ys.sum() + 1) / 2) / (ys.sum() * (~ys).sum())
    assert auc > 0.85, auc
    # and the classes differ only by that: a picture without findings has no such texture
    assert np.median(feats[ys]) > 1.5 * np.median(feats[~ys])


def test_chexpert_layout_is_deterministic_with_uncertain_blank_and_lateral(tmp_path):
    import pandas as pd

    s = synthetic.generate(tmp_path / "a", patients=12, image_size=32, seed=4, progress=False, fmt="chexpert")
    synthetic.generate(tmp_path / "b", patients=12, image_size=32, seed=4, progress=False, fmt="chexpert")
    csv = tmp_path / "a" / "CheXpert-v1.0-small" / "train.csv"
    assert csv.read_bytes() == (tmp_path / "b" / "CheXpert-v1.0-small" / "train.csv").read_bytes()
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert list(df.columns[:5]) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] and len(df.columns) == 19
    assert len(df) == s["images"] and (df["Frontal/Lateral"] == "Lateral").sum() == s["images"] - s["frontal"] > 0
    frontal = df[df["Frontal/Lateral"] == "Frontal"]
    assert frontal["Path"].str.endswith("/view1_frontal.jpg").all() and frontal["Path"].is_unique
    assert frontal["Path"].str.extract(r"(patient\d{5})")[0].nunique() == 12
    values = set(df.iloc[:, 5:].to_numpy().ravel())
    assert values == {"1.0", "0.0", "-1.0", ""}
    assert (frontal["Lung Opacity"] == "-1.0").sum() == s["uncertain Lung Opacity"] > 0
    assert all((tmp_path / "a" / p).is_file() for p in df["Path"])
