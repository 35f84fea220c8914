import time

import numpy as np
import pandas as pd
import pytest

from data_prep import metadata as md
from data_prep import synthetic


@pytest.fixture(scope="module")
def real(fixtures):
    t0 = time.perf_counter()
    frame, issues = md.read_metadata(fixtures / "Data_Entry_2017_v2020.csv.gz")
    return frame, issues, time.perf_counter() - t0


def test_real_csv_parses_completely(real):
    frame, issues, secs = real
    assert len(frame) == 112_120
    assert issues.skipped == [] and issues.notes == []
    assert frame["patient"].nunique() == 30_805
    assert set(frame["view"]) == {"AP", "PA"}
    assert secs < 10  # vectorised: about a second even on a busy 2-core box


def test_article_binary_counts(real):
    frame = real[0]
    t = md.select_task(frame, "binary", "Infiltration", "no_finding")
    assert int((t["label"] == 1).sum()) == 19_894
    assert int((t["label"] == 0).sum()) == 60_361
    pure = frame["Infiltration"] & (frame[list(md.FINDINGS)].sum(axis=1) == 1)
    assert int(pure.sum()) == 9_547
    allo = md.select_task(frame, "binary", "Infiltration", "all_others")
    assert len(allo) == 112_120 and int((allo["label"] == 1).sum()) == 19_894
    assert md.task_classes("binary") == ["No Finding", "Infiltration"]
    # the five thousand patients with both kinds of image
    both = t.groupby("patient")["label"].nunique() == 2
    assert int(both.sum()) == 5_513


def test_real_patient_split_is_disjoint(real):
    frame = real[0]
    t = md.select_task(frame, "binary")
    split, issues = md.split_patients(t, 0.1, 0.2, seed=42)
    assert issues.skipped == []
    owners = split.groupby(t["patient"]).nunique()
    assert int((owners > 1).sum()) == 0
    pats = {s: set(t.loc[split == s, "patient"]) for s in md.SPLITS}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"]) and not (pats["val"] & pats["test"])
    n = t["patient"].nunique()
    assert abs(len(pats["test"]) - 0.2 * n) <= 1 and abs(len(pats["val"]) - 0.1 * n) <= 1
    again, _ = md.split_patients(t, 0.1, 0.2, seed=42)
    assert again.equals(split)
    other, _ = md.split_patients(t, 0.1, 0.2, seed=43)
    assert not other.equals(split)


def test_multilabel_targets(real):
    frame = real[0]
    t = md.select_task(frame, "multilabel")
    y = md.targets_matrix(t, "multilabel")
    assert y.shape == (112_120, 14) and y.dtype == np.uint8
    assert int(y[:, md.FINDINGS.index("Infiltration")].sum()) == 19_894
    assert int((y.sum(axis=1) == 0).sum()) == 60_361
    assert (t["label"] == -1).all()
    row = frame.index[frame["image"] == "00000001_001.png"][0]
    assert frame.loc[row, "labels"] == "Cardiomegaly|Emphysema"


def test_missing_columns_named(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("Image Index,Finding Labels,Patient Age\nx.png,No Finding,3\n")
    with pytest.raises(md.MetadataError) as e:
        md.read_metadata(p)
    msg = str(e.value)
    for col in ("Patient ID", "Patient Gender", "View Position"):
        assert col in msg
    assert "'Finding Labels'" not in msg.split("found")[0]


def test_2017_schema_and_bad_rows(tmp_path):
    # 2017 header with the trailing comma (an unnamed 12th column), ages >120 and '058Y'
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000002_000.png,No Finding,0,2,150,F,AP,2500,2048,0.171,0.171,\n"
        "00000003_000.png,Infiltration|Effusion,0,3,058Y,F,PA,2500,2048,0.171,0.171,\n"
        "../00000004_000.png,No Finding,0,4,30,F,PA,2500,2048,0.171,0.171,\n"
        "sub/00000005_000.png,No Finding,0,5,30,F,PA,2500,2048,0.171,0.171,\n"
        "00000001_000.png,No Finding,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000006_000.png,Pneumonitis,0,6,40,M,PA,2500,2048,0.171,0.171,\n"
        "00000007_000.png,No Finding,0,abc,40,M,PA,2500,2048,0.171,0.171,\n"
    )
    frame, issues = md.read_metadata(p, max_age=120)
    # a relative path below data.images is an image's id too (format 4); '..' never
    assert frame["image"].tolist() == ["00000001_000.png", "00000002_000.png", "00000003_000.png",
                                       "sub/00000005_000.png"]
    assert frame["age"].tolist() == [58, -1, 58, 30]
    assert frame["labels"].tolist() == ["Cardiomegaly", "No Finding", "Effusion|Infiltration", "No Finding"]
    reasons = {(s["image"], s["reason"].split(" ")[0]) for s in issues.skipped}
    assert ("../00000004_000.png", "unsafe") in reasons
    assert not any(img.startswith("sub/") for img, _ in reasons)
    assert ("00000001_000.png", "duplicate") in reasons
    assert ("00000006_000.png", "unknown") in reasons
    assert ("00000007_000.png", "Patient") in reasons
    assert len(issues.skipped) == 4
    dup = [s for s in issues.skipped if s["image"] == "00000001_000.png"][0]
    assert dup["line"] == 7
    assert issues.notes == [{"image": "00000002_000.png", "line": 3,
                             "reason": "implausible age 150 recorded as unknown (data.max_age=120)"}]


def test_find_images_kaggle_layout(tmp_path):
    for i, folder in enumerate(["images_001/images", "images_002/images"]):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / f"0000000{i}_000.png").write_bytes(b"x")
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "00000009_000.png").write_bytes(b"x")
    found = md.find_images(tmp_path, ["00000000_000.png", "00000001_000.png", "00000009_000.png", "zz.png"],
                           exclude=[tmp_path / "prepared"])
    assert sorted(found) == ["00000000_000.png", "00000001_000.png"]
    assert found["00000001_000.png"].endswith("images_002/images/00000001_000.png")


def _synthetic_frame(tmp_path, patients=40):
    (tmp_path / "Data_Entry_2017.csv").write_text(synthetic.table_csv(synthetic.make_table(patients, seed=3)))
    frame, _ = md.read_metadata(tmp_path / "Data_Entry_2017.csv")
    return frame


def test_official_lists_honoured(tmp_path):
    frame = _synthetic_frame(tmp_path)
    t = md.select_task(frame, "binary")
    test_patients = set(range(1, 9))
    names = frame["image"].tolist()
    test_list = {n for n in names if int(n[:8]) in test_patients}
    train_val = set(names) - test_list
    train_val.discard(names[-1])                  # in neither list: skipped
    leak = sorted(n for n in names if int(n[:8]) == 1)
    train_val.add(leak[0])                        # patient 1 in both lists
    test_list.discard(leak[0])
    (tmp_path / "train_val_list.txt").write_text("\n".join(sorted(train_val)) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(sorted(test_list)) + "\n")
    lists = md.find_official_lists(tmp_path / "Data_Entry_2017.csv", tmp_path / "nowhere")
    assert lists is not None
    official = (md.read_list(lists[0]), md.read_list(lists[1]))
    split, issues = md.split_patients(t, 0.25, 0.5, seed=1, official=official)
    assert set(t.loc[split == "test", "image"]) == test_list & set(t["image"])
    assert set(t.loc[split.isin(["train", "val"]), "image"]) <= train_val
    pats = {s: set(t.loc[split == s, "patient"]) for s in md.SPLITS}
    assert pats["val"] and pats["train"]
    assert not (pats["test"] & (pats["train"] | pats["val"])) and not (pats["train"] & pats["val"])
    reasons = {s["image"]: s["reason"] for s in issues.skipped}
    if leak[0] in set(t["image"]):
        assert "patient also in test_list.txt" in reasons[leak[0]]
    if names[-1] in set(t["image"]):
        assert "not in train_val_list.txt" in reasons[names[-1]]


def test_balancing_only_in_train(tmp_path):
    frame = _synthetic_frame(tmp_path, 60)
    t = md.select_task(frame, "binary")
    split, _ = md.split_patients(t, 0.2, 0.2, seed=5)
    n_pos = int(((split == "train") & (t["label"] == 1)).sum())
    train = md.sample_split(t.loc[split == "train"], "train", "binary", n_pos + 25, seed=5)
    assert (train["label"] == 1).sum() == n_pos + 25 and (train["label"] == 0).sum() == n_pos + 25
    assert train["image"].duplicated().any()  # resampled with replacement
    assert set(train.loc[train["label"] == 1, "image"]) == set(t.loc[(split == "train") & (t["label"] == 1), "image"])
    small = md.sample_split(t.loc[split == "train"], "train", "binary", 5, seed=5)
    assert len(small) == 10 and not small["image"].duplicated().any()
    for name in ("val", "test"):
        part = t.loc[split == name]
        capped = md.sample_split(part, name, "binary", 3, seed=5)
        assert not capped["image"].duplicated().any()
        assert capped.groupby("label").size().max() <= 3
        whole = md.sample_split(part, name, "binary", 0, seed=5)
        assert len(whole) == len(part) and not whole["image"].duplicated().any()
    again = md.sample_split(t.loc[split == "train"], "train", "binary", n_pos + 25, seed=5)
    assert again["image"].tolist() == train["image"].tolist()


def test_parse_frame_empty_ok():
    df = pd.DataFrame({c: pd.Series([], dtype=str) for c in
                       ("image", "labels", "patient", "age", "sex", "view", "followup")})
    df["line"] = np.array([], dtype=np.int64)
    frame, issues = md.parse_frame(df)
    assert len(frame) == 0 and issues.skipped == []
