"""Reports that cannot be injected (issue 36, item 5): values from the CSV and file names escaped in report.md,
sweep.md and the console; CSV cells that a spreadsheet would run neutralised; views and sexes outside a small
vocabulary recorded as "other" with the original in the manifest's notes. No TensorFlow."""
import csv
import io
import re

import numpy as np
import pandas as pd
import pytest

from data_prep import metadata as md_
from data_prep.config import load_config
from data_prep.textsafe import csv_cell, md, md_code
from distributed import evaluate as E
from distributed import metrics as M
from distributed.report import write_report
from distributed.results import EvalResult

EVIL_VIEW = "PA|<script>alert(1)</script>"
EVIL_LABEL = "**bold** ![x](http://evil.example/x.png) <img src=x onerror=alert(1)>"
FORMULA = '=HYPERLINK("http://evil.example","click")'


def _cells(line: str) -> int:
    """Table cells of a Markdown row: the unescaped pipes."""
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_escapes():
    assert md("**b** <i>") == r"\*\*b\*\* &lt;i&gt;"
    assert md("![x](y)") == r"!\[x\](y)" and md("# h") == r"\# h"
    assert md("-x") == r"\-x" and md("1. x") == r"1\. x"
    assert md_code("a`b|c") == r"``a`b\|c``"
    assert md("a\x1b[31mb") == r"a\\x1b\[31mb"


@pytest.mark.parametrize("cell,out", [(FORMULA, "'" + FORMULA), ("+1+2", "'+1+2"), ("-2+3", "'-2+3"),
                                      ("@SUM(A1)", "'@SUM(A1)"),
                                      ("-0.5", "-0.5"), ("-1e-07", "-1e-07"), ("+3", "+3"), (-1, -1), (-0.25, -0.25),
                                      ("PA", "PA"), ("\tx", "'\tx")])
def test_csv_cells(cell, out):
    assert csv_cell(cell) == out


def _binary_metrics(views, sexes):
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 20)
    p = np.clip(y * 0.4 + rng.random(40) * 0.6, 0, 1)
    m = M.binary_metrics(y, p, class_names=("No Finding", "Infiltration"), groups=np.arange(40) // 2,
                         subgroups={"view": views, "sex": sexes}, n_boot=20, seed=1,
                         operating={"source": "validation", "rule": "youden", "threshold": 0.5})
    return y, p, m


def test_report_and_csv_escape_crafted_values(tmp_path):
    views = np.array([EVIL_VIEW, FORMULA] * 20, dtype=object)
    sexes = np.array(["M", "\x1b[31mF"] * 20, dtype=object)
    y, p, plain = _binary_metrics(views, sexes)
    cfg = load_config(None, [f"run.dir={tmp_path}", "run.name=<b>run</b>", "model.backbone=tiny"])
    manifest = {"task": "binary", "classes": ["No Finding", "Infiltration"], "image_size": 32,
                "splits": {"test": {"count": 40, "patients": 20, "label_counts": {"No Finding": 20, "Infiltration": 20},
                                    "shards": []}},
                "skipped": [{"image": "a.png", "reason": f"unknown finding label {EVIL_LABEL!r}"}], "converted": []}
    metrics = {"task": "binary", "classes": ["No Finding", "Infiltration"],
               "model": "model`|.keras", "checkpoint": "best",
               "n": 40, "ranks": 1, "seconds": 1.0, "tta_rounds": 0, "image_size": 32, "bootstrap": 20, "plain": plain,
               "tta": None, "operating_point": plain["operating_point"], "warnings": [f"odd {EVIL_LABEL}"],
               "run_dir": str(tmp_path), "gradcam": {}, "prevalence": {"test": 0.5}}
    console = E.console_text(EvalResult.from_json(metrics))
    assert "\x1b" not in console
    write_report(tmp_path, cfg=cfg, manifest=manifest, metrics=EvalResult.from_json(metrics), plots={}, gradcam={},
                 config_yaml="a: 1\n```\n<script>x</script>", console=console + "\n```\n# injected")
    text = (tmp_path / "report.md").read_text()
    # nothing of the crafted values is active Markdown or HTML outside code blocks
    outside = re.sub(r"(?ms)^(`{3,})[^\n]*\n.*?^\1\s*$", "", text)
    for bad in ("<script", "<img", "<b>", "**bold**", "![x]("):
        assert bad not in outside, bad
    assert not re.search(r"(?<!\\)\]\(http", outside)  # no link or image: every ] of the data escaped
    assert "&lt;script&gt;" in outside and r"\*\*bold\*\*" in outside
    # the subgroup table keeps its columns: a '|' in a view does not split a cell
    table = [ln for ln in text.splitlines() if ln.startswith("| view = ")]
    assert len(table) == 2 and len({_cells(ln) for ln in table}) == 1 and _cells(table[0]) == 5
    # the fenced console and config blocks cannot be closed by their content
    assert "# injected" not in outside and "<script>x" not in outside and "# injected" in text

    meta = {"image_index": np.array([f"{i:08d}_000.png" for i in range(40)], dtype=object),
            "patient_id": np.arange(40) // 2, "view": views, "sex": np.array(["@M", "-F"] * 20, dtype=object),
            "age": np.full(40, -1), "label": y}
    probs = np.stack([1 - p, p], axis=1).astype(np.float32)
    text = E.predictions_csv(meta, ["No Finding", "Infiltration"], False, probs, None,
                             findings=[FORMULA] * 40, calibrated=M.as_written(p - 0.5))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[1]["view"] == "'" + FORMULA and rows[0]["findings"] == "'" + FORMULA
    assert rows[0]["sex"] == "'@M" and rows[0]["age"] == "-1"  # a number stays a number
    assert any(r["calibrated_probability"].startswith("-") for r in rows)  # negative numbers are not touched
    assert not [c for r in rows for c in r.values() if c[:1] in "=+@" or (c[:1] == "-" and not _number(c))]


def _number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def test_view_and_sex_outside_the_vocabulary_become_other_with_the_original_noted():
    df = pd.DataFrame({"image": ["a.png", "b.png", "c.png", "d.png"], "labels": ["No Finding"] * 4,
                       "patient": ["1", "2", "3", "4"], "age": ["40"] * 4, "sex": ["M", "female", FORMULA, ""],
                       "view": ["pa", EVIL_VIEW, "AP", "LL"], "followup": ["0"] * 4, "line": [2, 3, 4, 5]})
    frame, issues = md_.parse_frame(df)
    got = dict(zip(frame["image"], zip(frame["sex"], frame["view"])))
    assert got == {"a.png": ("M", "PA"), "b.png": ("F", "other"), "c.png": ("other", "AP"), "d.png": ("", "LL")}
    originals = {(n["image"], n["original"]) for n in issues.notes if "original" in n}
    assert originals == {("b.png", EVIL_VIEW), ("c.png", FORMULA)}
    assert all("recorded as 'other'" in n["reason"] for n in issues.notes if "original" in n)


def test_crafted_metadata_csv_through_prep_to_report_and_csv(tmp_path):
    """The issue's done-when from a CSV: Markdown, HTML and =HYPERLINK( in labels, views, sexes and an image
    name go through prep; the report escapes them and predictions.csv neutralises them."""
    import shutil

    import h5py

    from data_prep import synthetic
    from data_prep.prepare import run
    from distributed.report import data_section

    data = tmp_path / "data"
    synthetic.generate(data, patients=16, image_size=32, seed=2, progress=False)
    src = sorted((data / "images").glob("*.png"))[0]
    evil_name = '=HYPERLINK(1)|**x**.png'
    shutil.copy(src, data / "images" / evil_name)
    shutil.copy(src, data / "images" / "99990011_000.png")
    with open(data / "Data_Entry_2017.csv", "a", newline="") as f:
        w = csv.writer(f)
        w.writerow([evil_name, "Infiltration", 0, 99990010, 40, "<script>x</script>", FORMULA + "|**b**",
                    32, 32, 0.1, 0.1])
        w.writerow(["99990011_000.png", "Infiltration|" + EVIL_LABEL, 0, 99990011, 40, "M", "PA", 32, 32, 0.1, 0.1])
    cfg = load_config(None, [f"data.csv={data / 'Data_Entry_2017.csv'}", f"data.images={data}", "data.image_size=32",
                             f"prep.out={tmp_path / 'prepared'}", "prep.shard_size=64", "prep.test_fraction=0.5"])
    manifest = run(cfg)
    originals = {n.get("original") for n in manifest["notes"]}
    assert {FORMULA + "|**b**", "<script>x</script>"} <= originals
    # the shards hold the vocabulary's values only
    meta = {k: [] for k in ("image_index", "patient_id", "view", "sex", "age")}
    labels = []
    for split in ("train", "val", "test"):
        for sh in manifest["splits"][split]["shards"]:
            with h5py.File(tmp_path / "prepared" / sh["file"], "r") as h:
                for k in meta:
                    meta[k] += [x.decode() if isinstance(x, bytes) else x for x in h[k][:]]
                labels += h["label"][:].tolist()
    assert set(meta["view"]) <= {"PA", "AP", "LL", "other"} and set(meta["sex"]) <= {"M", "F", "", "other"}
    assert evil_name in meta["image_index"]
    meta = {k: np.array(v, dtype=object) for k, v in meta.items()}
    meta["label"] = np.array(labels)
    n = len(labels)
    text = E.predictions_csv(meta, ["No Finding", "Infiltration"], False, np.full((n, 2), 0.5, np.float32), None,
                             findings=["Infiltration"] * n)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert "'" + evil_name in [r["image"] for r in rows] and evil_name not in [r["image"] for r in rows]
    section = data_section(manifest)
    assert "unknown finding label" in section and "<img" not in section and "&lt;img" in section
    assert "![x](" not in section
