"""Dataset adapters (data_prep.datasets): CheXpert's uncertain-label policies with counts, the csv format's
columns and its one-line errors, positive labels per format, patient ids from DICOM headers and their keyed hash."""
import os
import stat

import numpy as np
import pytest

from data_prep import datasets as ds
from data_prep import prepare, synthetic
from data_prep.config import load_config
from data_prep.datasets import patients
from data_prep.datasets.chexpert import OBSERVATIONS
from data_prep.metadata import MetadataError

P = "CheXpert-v1.0-small/train"
# Lung Opacity (4th observation) per row: 1, -1, 0, blank, -1 (lateral), 1; row 3 says No Finding = 1
ROWS = [
    (f"{P}/patient00001/study1/view1_frontal.jpg", "Male", "60", "Frontal", "PA", {"Lung Opacity": "1.0"}),
    (f"{P}/patient00001/study2/view1_frontal.jpg", "Male", "61", "Frontal", "AP",
     {"Lung Opacity": "-1.0", "Edema": "-1.0"}),
    (f"{P}/patient00002/study1/view1_frontal.jpg", "Female", "40", "Frontal", "PA",
     {"Lung Opacity": "0.0", "No Finding": "1.0"}),
    (f"{P}/patient00003/study1/view1_frontal.jpg", "Female", "33", "Frontal", "AP", {"Edema": "0.0"}),
    (f"{P}/patient00003/study1/view2_lateral.jpg", "Female", "33", "Lateral", "", {"Lung Opacity": "-1.0"}),
    (f"{P}/patient00004/study1/view1_frontal.jpg", "Male", "150", "Frontal", "PA",
     {"Lung Opacity": "1.0", "Pleural Effusion": "-1.0"}),
]


def write_chexpert(folder, rows=ROWS):
    csv = folder / "CheXpert-v1.0-small" / "train.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + OBSERVATIONS)]
    for path, sex, age, fl, ap, obs in rows:
        lines.append(",".join([path, sex, age, fl, ap] + [obs.get(o, "") for o in OBSERVATIONS]))
    csv.write_text("\n".join(lines) + "\n")
    return csv


def cfg_for(csv, images, *sets):
    return load_config(None, ["data.format=chexpert", f"data.csv={csv}", f"data.images={images}",
                              "data.positive_label=Lung Opacity", *sets])


def table(tmp_path, *sets):
    csv = write_chexpert(tmp_path)
    return cfg_for(csv, tmp_path, *sets).data


@pytest.mark.parametrize("policy, pos, neg, masked", [("ignore", 2, 2, 1), ("positive", 3, 2, 0),
                                                      ("negative", 2, 3, 0)])
def test_chexpert_uncertain_policies_binary_counts(tmp_path, policy, pos, neg, masked):
    d = table(tmp_path, f"data.uncertain={policy}")
    t = ds.read(d)
    assert len(t.frame) == 5  # the lateral view is left out (data.views: PA, AP)
    assert [s["reason"] for s in t.issues.skipped] == ["view not in data.views (PA, AP)"]
    assert t.policy["uncertain"] == policy
    assert t.policy["uncertain_labels"]["Lung Opacity"] == 1 and t.policy["uncertain_labels"]["Edema"] == 1
    rows, info = ds.select_task(t, d)
    assert int((rows["label"] == 1).sum()) == pos and int((rows["label"] == 0).sum()) == neg
    assert info["masked_images"] == masked
    assert ds.task_classes(d) == ["No Finding", "Lung Opacity"]
    # patients from the path, as strings; ids are the relative paths (one basename, many folders)
    assert sorted(set(t.frame["patient"])) == ["patient00001", "patient00002", "patient00003", "patient00004"]
    assert t.frame["image"].is_unique and set(t.frame["image"].str.rsplit("/", n=1).str[1]) == {"view1_frontal.jpg"}
    assert t.frame.loc[t.frame["patient"] == "patient00004", "age"].tolist() == [-1]  # implausible: unknown


def test_chexpert_negative_rule_no_finding_or_all_negative(tmp_path):
    t = ds.read(table(tmp_path, "data.uncertain=ignore"))
    nf = dict(zip(t.frame["image"].str.slice(len(P) + 1), t.frame["no_finding"]))
    # No Finding = 1; or nothing positive and nothing uncertain (blank counts as not mentioned)
    assert nf == {"patient00001/study1/view1_frontal.jpg": False, "patient00001/study2/view1_frontal.jpg": False,
                  "patient00002/study1/view1_frontal.jpg": True, "patient00003/study1/view1_frontal.jpg": True,
                  "patient00004/study1/view1_frontal.jpg": False}


def test_chexpert_multilabel_mask(tmp_path):
    d = table(tmp_path, "data.task=multilabel", "data.uncertain=ignore")
    t = ds.read(d)
    rows, _ = ds.select_task(t, d)
    classes = ds.task_classes(d)
    assert len(classes) == 13 and "No Finding" not in classes
    tgt, mask = ds.targets(rows, "multilabel", classes)
    j = classes.index("Lung Opacity")
    assert tgt[:, j].tolist() == [1, 0, 0, 0, 1] and mask[:, j].tolist() == [1, 0, 1, 0, 1]
    assert ds.masked_counts(rows, "multilabel", classes)["Lung Opacity"] == 2  # one uncertain, one blank
    d2 = table(tmp_path, "data.task=multilabel", "data.uncertain=positive")
    tgt2, mask2 = ds.targets(ds.select_task(ds.read(d2), d2)[0], "multilabel", classes)
    assert tgt2[:, j].tolist() == [1, 1, 0, 0, 1] and mask2[:, j].tolist() == [1, 1, 1, 0, 1]


def test_views_keep_laterals_when_asked(tmp_path):
    assert len(ds.read(table(tmp_path, "data.views=[PA, AP, LL]")).frame) == 6


def test_positive_label_checked_per_format(tmp_path):
    with pytest.raises(MetadataError, match="'Infiltration' is not a finding of data.format chexpert"):
        ds.task_classes(table(tmp_path, "data.positive_label=Infiltration"))
    nih = load_config(None, ["data.positive_label=Lung Opacity"]).data
    with pytest.raises(MetadataError, match="not a finding of data.format nih"):
        ds.task_classes(nih)


def csv_cfg(tmp_path, text, *sets):
    p = tmp_path / "labels.csv"
    p.write_text(text)
    return load_config(None, ["data.format=csv", f"data.csv={p}", f"data.images={tmp_path}", *sets]).data


def test_csv_missing_column_is_one_line_naming_it(tmp_path):
    d = csv_cfg(tmp_path, "path,label,pid\na/1.png,1,7\n", "data.columns.image=path",
                "data.columns.labels=[label]", "data.columns.patient=patient_id")
    with pytest.raises(MetadataError) as e:
        ds.read(d)
    msg = str(e.value)
    assert "\n" not in msg and "missing column(s) 'patient_id'" in msg and "found 'path', 'label', 'pid'" in msg


def test_csv_binary_and_several_labels(tmp_path):
    text = "path,effusion,mass,view,pid\na/1.png,1,0,PA,x\nb/1.png,0,,AP,y\nc/1.png,-1,1,PA,x\nd/1.png,0,0,LL,z\n"
    d = csv_cfg(tmp_path, text, "data.columns.image=path", "data.columns.labels=[effusion]",
                "data.columns.patient=pid", "data.columns.view=view")
    t = ds.read(d)
    assert t.frame["image"].tolist() == ["a/1.png", "b/1.png", "c/1.png"]  # LL not in data.views
    assert ds.task_classes(d) == ["No Finding", "effusion"]  # the one label is the default positive
    rows, info = ds.select_task(t, d)
    assert rows["label"].tolist() == [1, 0] and info["masked_images"] == 1
    d2 = csv_cfg(tmp_path, text, "data.columns.image=path", "data.columns.labels=[effusion, mass]",
                 "data.task=multilabel")
    rows2, _ = ds.select_task(ds.read(d2), d2)
    _, mask = ds.targets(rows2, "multilabel", ["effusion", "mass"])
    assert mask.tolist() == [[1, 1], [1, 0], [0, 1], [1, 1]]


def test_patient_key_is_private_and_reused(tmp_path):
    k = patients.key(tmp_path)
    path = tmp_path / patients.PATIENT_KEY
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert patients.key(tmp_path) == k
    a, b = patients.pseudonym(k, "MRN1"), patients.pseudonym(patients.key(tmp_path / "other"), "MRN1")
    assert a == patients.pseudonym(k, "MRN1") and a != b and "MRN1" not in a


def test_dicom_patients_from_the_header_pseudonymised(tmp_path):
    synthetic.generate(tmp_path / "d", patients=4, image_size=32, seed=2, progress=False, fmt="dicom")
    d = tmp_path / "d"
    cfg = load_config(None, ["data.format=csv", f"data.csv={d}/labels.csv", f"data.images={d}",
                             "data.columns.image=image", "data.columns.labels=[Infiltration]",
                             "data.columns.view=view", "data.columns.sex=sex", "data.columns.age=age",
                             f"prep.out={tmp_path / 'out'}", "data.image_size=32"])
    plan = prepare.make_plan(cfg)
    mrns = {synthetic.patient_mrn(2, p) for p in range(1, 5)}
    got = {p for s in plan["splits"].values() for p in s["patient"]}
    assert got and not (got & mrns) and all(p.startswith("p") and len(p) == 17 for p in got)
    assert plan["labels"]["patient_from"] == "DICOM PatientID" and plan["labels"]["pseudonymized"] is True
    k = patients.key(tmp_path / "out")
    assert got <= {patients.pseudonym(k, m) for m in mrns}
    assert np.all([i.startswith("images/") for s in plan["splits"].values() for i in s["image"]])


def test_csv_missing_column_at_the_command_line(tmp_path, root):
    import subprocess
    import sys

    (tmp_path / "labels.csv").write_text("path,label\na.png,1\n")
    (tmp_path / "c.yaml").write_text(f"data: {{format: csv, csv: {tmp_path}/labels.csv, images: {tmp_path}, "
                                     "columns: {image: file, labels: [label]}}\n"
                                     f"prep: {{out: {tmp_path}/out}}\n")
    r = subprocess.run([sys.executable, "-m", "data_prep", "-c", str(tmp_path / "c.yaml")], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "missing column(s) 'file'; found 'path', 'label'" in lines[0], r.stderr
