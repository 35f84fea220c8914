"""The flow of images and patients (issue 34: STARD's flow diagram) recomputed independently: pandas on the CSV,
the image files, the split lists and the shards' columns, never data_prep.metadata. A generated data set with bad
inputs (prep written), and the real NIH metadata with official-style lists (planned only)."""
import gzip
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from data_prep import synthetic
from data_prep.config import load_config
from data_prep.prepare import make_plan, run

POS, NEG, OTHER = "Infiltration", "No Finding", "not in the task"
KNOWN = set(synthetic.FINDINGS) | {NEG}


def _classes(labels: pd.Series) -> pd.Series:
    """The flow class of each Finding Labels cell (None: not a usable label)."""
    def one(cell):
        parts = [x.strip() for x in str(cell).split("|")]
        if parts == [""] or not set(parts) <= KNOWN or (NEG in parts and len(parts) > 1):
            return None
        return POS if POS in parts else (NEG if parts == [NEG] else OTHER)
    return labels.map(one)


def _rows(csv) -> pd.DataFrame:
    """Usable CSV rows: image, patient, class (the first row of a duplicated name; integer patient ids)."""
    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    f = pd.DataFrame({"image": raw["Image Index"].str.strip(), "cls": _classes(raw["Finding Labels"]),
                      "patient": pd.to_numeric(raw["Patient ID"], errors="coerce")})
    f = f[~f["image"].duplicated(keep="first")]
    f = f[f["cls"].notna() & f["patient"].notna() & ~f["image"].str.contains("/")]
    return f.assign(patient=f["patient"].astype(np.int64)), len(raw)


def _counts(f: pd.DataFrame, names) -> dict:
    d = f.drop_duplicates("image")
    out = {"images": len(d), "patients": d["patient"].nunique(),
           "classes": {c: {"images": int((d["cls"] == c).sum()), "patients": d.loc[d["cls"] == c, "patient"].nunique()}
                       for c in names}}
    if len(f) != len(d):
        out["rows"] = len(f)
    return out


def _got(manifest_flow) -> dict:
    return {(s["step"], s["split"]): {k: s[k] for k in ("images", "patients", "classes", "rows") if k in s}
            for s in manifest_flow["steps"]}


def _expected_until_files(csv, has_file) -> tuple[dict, pd.DataFrame]:
    usable, n_rows = _rows(csv)
    task = usable[usable["cls"] != OTHER]
    files = task[task["image"].map(has_file)]
    return {("csv", None): {"images": n_rows, "patients": None, "classes": None},
            ("usable", None): _counts(usable, [NEG, POS, OTHER]),
            ("task", None): _counts(task, [NEG, POS]), ("files", None): _counts(files, [NEG, POS])}, files


def _shards(out, split) -> pd.DataFrame:
    parts = []
    for f in sorted((out / split).glob("shard-*.h5")):
        with h5py.File(f, "r") as h:
            parts.append(pd.DataFrame({"image": [x.decode() for x in h["image_index"][...]],
                                       "patient": [int(x) for x in h["patient_id"][...]],  # str since format 4
                                       "label": h["label"][...]}))
    f = pd.concat(parts) if parts else pd.DataFrame({"image": [], "patient": [], "label": []})
    return f.assign(cls=np.where(f["label"] == 1, POS, NEG))


@pytest.fixture(scope="module")
def data(tmp_path_factory, fixtures):
    """24 generated patients, plus: a truncated PNG, a deleted one, a zero-byte one (each of a patient with other
    images), an unknown label, a duplicated row."""
    d = tmp_path_factory.mktemp("flow")
    synthetic.generate(d, patients=24, image_size=64, seed=11, progress=False)
    csv = d / "Data_Entry_2017.csv"
    lines = csv.read_text().splitlines()
    many = pd.read_csv(csv, dtype=str).groupby("Patient ID")["Image Index"].apply(list)
    many = [v for v in many if len(v) >= 3]
    img = d / "images"
    data = img / many[0][0]
    data.write_bytes(data.read_bytes()[:60])       # truncated: prep skips it
    (img / many[1][0]).unlink()                    # missing
    (img / many[2][0]).write_bytes(b"")            # zero bytes
    lines += ["99990001_000.png,Pneumonia|Made_Up,0,99990001,40,M,PA,64,64,0.1,0.1", lines[5]]
    csv.write_text("\n".join(lines) + "\n")
    return d


def _prep(tmp_path, data, name, **prep):
    cfg = {"data": {"csv": str(data / "Data_Entry_2017.csv"), "images": str(data), "image_size": 32},
           "prep": {"out": str(tmp_path / name), "shard_size": 16, "seed": 3, **prep}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return run(load_config(tmp_path / f"{name}.yaml")), tmp_path / name


def test_flow_of_a_prepared_data_set_recomputed_from_the_csv_and_the_shards(tmp_path, data):
    img = data / "images"
    expected, files = _expected_until_files(data / "Data_Entry_2017.csv",
                                            lambda n: (img / n).is_file() and (img / n).stat().st_size > 0)
    # uncapped: every planned image is in a shard or skipped by prep, so the shards give each patient's split
    full, out_full = _prep(tmp_path, data, "full")
    where = {int(p): s for s in ("train", "val", "test") for p in _shards(out_full, s)["patient"]}
    assert set(files["patient"]) <= set(where)  # every patient kept one readable image
    unreadable = {s["image"] for s in full["skipped"] if "split" in s}
    assert len(unreadable) == 1
    capped, out_capped = _prep(tmp_path, data, "capped", train_per_class=25, val_per_class=2, test_per_class=4)
    for man, out in ((full, out_full), (capped, out_capped)):
        exp = dict(expected)
        skipped = {s["image"] for s in man["skipped"] if "split" in s}
        for split in ("train", "val", "test"):
            in_split = files[files["patient"].map(where) == split]
            shards = _shards(out, split)
            exp[("split", split)] = _counts(in_split, [NEG, POS])
            kept = pd.concat([shards[["image", "patient", "cls"]], in_split[in_split["image"].isin(skipped)]])
            exp[("capped", split)] = _counts(kept.drop_duplicates("image"), [NEG, POS])
            exp[("written", split)] = _counts(shards, [NEG, POS])
            if split == "train" and man is capped:  # balancing resampled copies: rows beside distinct images
                exp[("capped", split)]["rows"] = man["splits"]["train"]["planned"]
        got = _got(man["flow"])
        assert got == exp
    assert _got(capped["flow"])[("capped", "train")]["rows"] == 50  # 25 per class, the smaller class topped up
    assert _got(capped["flow"])[("written", "test")]["images"] <= 8


def test_flow_of_the_real_nih_metadata_recomputed_with_pandas(tmp_path, fixtures):
    """The 112,120 real rows (11 CSV fields, v2020): patients 1-2000 have image files (1 byte: planning does not
    decode), the rest are missing; lists written here put every 5th patient in test, leave some rows in neither
    list and put one image of a test patient in train_val (dropped to keep splits disjoint)."""
    csv = tmp_path / "Data_Entry_2017_v2020.csv"
    with gzip.open(fixtures / "Data_Entry_2017_v2020.csv.gz", "rb") as src, open(csv, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw = pd.read_csv(csv, dtype=str)
    pid = raw["Patient ID"].astype(int)
    img = tmp_path / "images"
    img.mkdir()
    for name in raw.loc[pid <= 2000, "Image Index"]:
        (img / name).write_bytes(b"x")
    fu = raw["Image Index"].str[9:12].astype(int)
    test = (pid % 5 == 0) & ~((pid % 3 == 0) & (fu == 0))
    neither = (pid % 11 == 0) & (fu >= 1) & ~test
    (tmp_path / "test_list.txt").write_text("\n".join(raw.loc[test, "Image Index"]) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(raw.loc[~test & ~neither, "Image Index"]) + "\n")

    def plan(**prep):
        cfg = load_config(None, [f"data.csv={csv}", f"data.images={img}", "data.official_split=true",
                                 f"prep.out={tmp_path / 'out'}", *(f"prep.{k}={v}" for k, v in prep.items())])
        return make_plan(cfg)
    full, capped = plan(), plan(train_per_class=2000, val_per_class=20, test_per_class=40)
    on_disk = {f.name for f in img.iterdir() if f.is_file()}
    expected, files = _expected_until_files(csv, on_disk.__contains__)
    assert expected[("csv", None)]["images"] == 112120
    assert expected[("usable", None)]["classes"][POS]["images"] == 19894  # the README's counts
    assert expected[("usable", None)]["classes"][NEG]["images"] == 60361
    in_test = files["image"].isin(set(raw.loc[test, "Image Index"]))
    in_tv = files["image"].isin(set(raw.loc[~test & ~neither, "Image Index"])) & ~in_test
    in_tv &= ~files["patient"].isin(set(files.loc[in_test, "patient"]))
    val_patients = {int(x) for x in full["splits"]["val"]["patient"]}  # str since format 4
    split = {"test": files[in_test], "val": files[in_tv & files["patient"].isin(val_patients)],
             "train": files[in_tv & ~files["patient"].isin(val_patients)]}
    cls = {i: c for i, c in zip(files["image"], files["cls"])}
    for p in (full, capped):
        exp = dict(expected)
        for s in ("train", "val", "test"):
            exp[("split", s)] = _counts(split[s], [NEG, POS])
            sp = p["splits"][s]
            exp[("capped", s)] = _counts(pd.DataFrame({"image": sp["image"], "patient": sp["patient"].astype(int),
                                                       "cls": [cls[n] for n in sp["image"]]}), [NEG, POS])
        assert _got(p["flow"]) == exp
    got = _got(capped["flow"])
    assert got[("capped", "test")]["classes"][POS]["images"] == 40 and got[("capped", "train")]["rows"] == 4000
    assert sum(got[("split", s)]["images"] for s in ("train", "val", "test")) < got[("files", None)]["images"]
    from distributed.report import flow_exclusions  # the "about 32k of NIH's 112k" dropped by the rule

    assert "(31865 by the task rule; " in flow_exclusions({**capped["flow"], "steps": capped["flow"]["steps"] + [
        {**s, "step": "written"} for s in capped["flow"]["steps"] if s["step"] == "capped"]})


def test_report_renders_the_flow_and_counts_every_exclusion(tmp_path, data):
    """The flow table and the exclusions in report.md, from a prep with caps and a skip: the excluded images are the
    CSV rows less the shards' distinct images, split into their causes; a manifest without a flow says so."""
    from data_prep import flow as fl
    from distributed.report import FLOW_NOT_RECORDED, flow_exclusions, flow_section

    man, out = _prep(tmp_path, data, "capped", val_per_class=2, test_per_class=4)
    n_rows = len(pd.read_csv(data / "Data_Entry_2017.csv", dtype=str))
    shards = {s: _shards(out, s) for s in ("train", "val", "test")}
    kept = sum(f["image"].nunique() for f in shards.values())
    t = shards["test"]
    flow = fl.with_evaluated(man["flow"], t["image"], t["patient"], t["cls"])
    text = flow_exclusions(flow)
    assert text.startswith(f"{n_rows - kept} of {n_rows} CSV rows excluded before training and testing (")
    usable, _ = _rows(data / "Data_Entry_2017.csv")
    assert f"{n_rows - len(usable)} unusable CSV rows; " in text
    assert f"; {(usable['cls'] == OTHER).sum()} by the task rule; 2 image file missing or empty; " in text
    assert "unreadable images skipped by prep" in text and "by balancing and per-class caps" in text
    assert text.endswith(f"; {kept} images in the shards; every written test image evaluated.")
    table = flow_section(flow)
    row = next(ln for ln in table.splitlines() if ln.startswith("| evaluated | test |"))
    per = [f"{(t['cls'] == c).sum()} / {t.loc[t['cls'] == c, 'patient'].nunique()}" for c in (NEG, POS)]
    assert row == f"| evaluated | test | {len(t)} | {t['patient'].nunique()} | {per[0]} | {per[1]} | – | 0 |"
    fewer = fl.with_evaluated(man["flow"], t["image"][1:], t["patient"][1:], t["cls"][1:])
    assert flow_exclusions(fewer).endswith("; 1 written test image(s) not evaluated.")
    assert flow_section(None) == FLOW_NOT_RECORDED and flow_section({"steps": "x"}) == FLOW_NOT_RECORDED


def test_a_manifest_without_a_flow_loads_and_a_malformed_one_is_refused(tmp_path, data):
    import json

    from data_prep.manifest import ManifestError, load_manifest

    man, out = _prep(tmp_path, data, "old")
    doc = json.loads((out / "manifest.json").read_text())
    del doc["flow"]  # a prep older than the flow
    (out / "manifest.json").write_text(json.dumps(doc))
    assert "flow" not in load_manifest(out)
    doc["flow"] = {"classes": [], "steps": [{"step": "csv", "images": "many"}]}
    (out / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="flow of images and patients is malformed; rerun prep"):
        load_manifest(out)
