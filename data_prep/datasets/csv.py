"""Any CSV (``data.format: csv``): ``data.columns`` names the image, patient and label columns.

``data.columns.image``: the image's path relative to ``data.images``; ``labels``: one column (a binary task:
1 positive, 0 negative) or several (their names are the findings); each value 1, 0, -1 (uncertain, see
``data.uncertain``) or blank (unlabelled). Optional ``patient`` (else, for DICOM images, the header's
PatientID, read when the files are found; else each image is its own patient), ``view``, ``sex``, ``age``.
Negative rule: every label 0 (``negative_rule: no_finding``) or the positive label 0 (``all_others``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep import metadata as md
from data_prep.datasets.chexpert import read_columns
from data_prep.datasets.common import STATE, Table, apply_policy, finish, parse_states


def findings(d) -> tuple[str, ...]:
    if not d.columns.labels:
        raise md.MetadataError("data.columns.labels: no label column given (data.format: csv needs at least one)")
    return tuple(d.columns.labels)


def read(d, limit: int = 0) -> Table:
    c = d.columns
    if not c.image:
        raise md.MetadataError("data.columns.image: no image column given (data.format: csv needs it)")
    labels = findings(d)
    optional = {"view": c.view, "sex": c.sex, "age": c.age, "patient": c.patient}
    raw = read_columns(d.csv, [c.image, *labels, *(v for v in optional.values() if v)], limit)
    issues = md.Issues()
    frame = pd.DataFrame({"image": raw[c.image], "line": raw["line"]})
    for key, col in optional.items():
        frame[key] = raw[col] if col else ""
    frame["patient"] = frame["patient"].astype(str).str.strip()
    bad = np.zeros(len(frame), bool)
    for f in labels:
        frame[STATE + f], b = parse_states(raw[f])
        bad |= b
    issues.skip_rows(frame, bad, "a label that is not 1, 0, -1 or blank")
    frame = frame.loc[~bad]
    if c.patient:
        empty = frame["patient"] == ""
        issues.skip_rows(frame, empty, f"empty patient ({c.patient})")
        frame = frame.loc[~empty]
    frame = finish(frame, issues, d.max_age)
    if not c.patient:  # each image its own patient until prep finds a DICOM header's PatientID (patients.resolve)
        frame["patient"] = frame["image"]
    if c.view:
        other = ~frame["view"].isin(d.views)
        issues.skip_rows(frame, other, f"view not in data.views ({', '.join(d.views)})")
        frame = frame.loc[~other].reset_index(drop=True)
    policy = apply_policy(frame, labels, d.uncertain)
    frame["no_finding"] = (frame[[STATE + f for f in labels]].to_numpy() == 0).all(axis=1) & \
        ~frame[list(labels)].to_numpy(bool).any(axis=1)
    return Table(frame, labels, issues, len(raw), fmt="csv", policy=policy)
