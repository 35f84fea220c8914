"""NIH ChestX-ray14 (``data.format: nih``, the default): ``Data_Entry_2017.csv`` (2017 or v2020 schema).

Images are named by file name (found below ``data.images``, flat or Kaggle's ``images_NNN/images/``) or by a
path relative to it; patient ids are integers (kept as their decimal string); labels are positive or negative,
never uncertain or blank; the negative rule is "No Finding"."""
from __future__ import annotations

import numpy as np

from data_prep import metadata as md
from data_prep.datasets.common import LABELLED, STATE, Table


def findings(d) -> tuple[str, ...]:
    return md.FINDINGS


def read(d, limit: int = 0) -> Table:
    frame, issues = md.read_metadata(d.csv, d.max_age, limit)
    rows = len(frame) + len(issues.skipped)
    frame["name"] = frame["image"]
    frame["patient"] = frame["patient"].astype(str)
    extra = {}
    for f in md.FINDINGS:
        extra[STATE + f] = frame[f].to_numpy(np.int8)
        extra[LABELLED + f] = np.ones(len(frame), bool)
    frame = frame.assign(**extra)
    return Table(frame, md.FINDINGS, issues, rows, fmt="nih", by_name=True, policy={})
