"""CheXpert (``data.format: chexpert``): ``train.csv``/``valid.csv`` of CheXpert-v1.0(-small).

Columns ``Path, Sex, Age, Frontal/Lateral, AP/PA`` and the 14 observations, each ``1.0`` positive, ``0.0``
negative, ``-1.0`` uncertain or blank (not mentioned). ``Path`` (``CheXpert-v1.0-small/train/patient00001/
study1/view1_frontal.jpg``) is relative to the folder that holds ``CheXpert-v1.0-small``: that folder is
``data.images``. The patient is the path's ``patientNNNNN`` folder. The view is ``AP/PA`` for frontal images
and ``LL`` for lateral ones; ``data.views`` (default PA, AP) keeps the frontal ones.

Uncertain labels follow ``data.uncertain`` (ignore: masked out of the loss and the metrics; positive; negative).
A blank observation is unlabelled: masked like an ignored one in the multilabel task, and no obstacle to being a
negative. Negative rule (``negative_rule: no_finding``): "No Finding" is 1, or every other observation is 0 or
blank (none positive, none uncertain after the policy). The findings of the tasks are the 13 observations
besides "No Finding" (which is their absence).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep import metadata as md
from data_prep.datasets.common import BLANK, LABELLED, STATE, Table, apply_policy, finish, parse_states

OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
FINDINGS = OBSERVATIONS[1:]
REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + OBSERVATIONS


def findings(d) -> tuple[str, ...]:
    return FINDINGS


def read_columns(csv_path, required, limit: int = 0) -> pd.DataFrame:
    """The CSV as strings; a missing column is one ``MetadataError`` line naming it and the columns found."""
    from pathlib import Path

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise md.MetadataError(f"metadata CSV not found: {csv_path} (data.csv)")
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_filter=False, nrows=limit or None,
                         skipinitialspace=True)
    except Exception as e:  # noqa: BLE001 - any parser failure means an unusable file
        raise md.MetadataError(f"{csv_path}: cannot read as CSV: {e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise md.MetadataError(f"{csv_path}: missing column(s) {', '.join(map(repr, missing))}; "
                               f"found {', '.join(map(repr, df.columns))}")
    df = df.reset_index(drop=True)
    df["line"] = np.arange(2, len(df) + 2)
    return df


def read(d, limit: int = 0) -> Table:
    raw = read_columns(d.csv, REQUIRED, limit)
    issues = md.Issues()
    frame = pd.DataFrame({"image": raw["Path"], "age": raw["Age"], "sex": raw["Sex"], "line": raw["line"]})
    lateral = raw["Frontal/Lateral"].str.strip().str.lower() == "lateral"
    frame["view"] = np.where(lateral, "LL", raw["AP/PA"].str.strip().str.upper())
    pid = raw["Path"].str.extract(r"(?:^|/)(patient\d+)(?:/|$)", expand=False)
    frame["patient"] = pid.fillna("")
    bad = np.zeros(len(frame), bool)
    for o in OBSERVATIONS:
        frame[STATE + o], b = parse_states(raw[o])
        bad |= b
    issues.skip_rows(frame, frame["patient"].eq("") & ~bad, "no patientNNNNN folder in Path")
    issues.skip_rows(frame, bad, "a label that is not 1, 0, -1 or blank")
    frame = frame.loc[frame["patient"].ne("") & ~bad]
    frame = finish(frame, issues, d.max_age)
    other = ~frame["view"].isin(d.views)
    issues.skip_rows(frame, other, f"view not in data.views ({', '.join(d.views)})")
    frame = frame.loc[~other].reset_index(drop=True)
    policy = apply_policy(frame, OBSERVATIONS, d.uncertain)
    st = frame[[STATE + f for f in FINDINGS]].to_numpy()
    after = frame[list(FINDINGS)].to_numpy(bool) | ~frame[[LABELLED + f for f in FINDINGS]].to_numpy(bool)
    none_left = ~(after & (st != BLANK)).any(axis=1)  # nothing positive, nothing uncertain-and-masked
    frame["no_finding"] = ((frame[STATE + "No Finding"] == 1).to_numpy() | none_left) & \
        ~frame[list(FINDINGS)].to_numpy(bool).any(axis=1)
    return Table(frame, FINDINGS, issues, len(raw), fmt="chexpert", policy=policy)
