"""What every dataset adapter shares: the canonical table, label states, the uncertain-label policy."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from data_prep import metadata as md

LABELLED = "labelled:"
STATE = "state:"
BLANK = -2
POLICIES = ("ignore", "positive", "negative")


@dataclass
class Table:
    frame: pd.DataFrame
    findings: tuple[str, ...]
    issues: md.Issues
    rows: int                       # data rows read from the CSV
    fmt: str = "nih"
    by_name: bool = False           # images found by file name below data.images (NIH), else by relative path
    policy: dict = field(default_factory=dict)   # the uncertain-label policy and its counts (manifest)


def apply_policy(frame: pd.DataFrame, findings, policy: str) -> dict:
    """Set each finding's positive and labelled columns from its state under ``data.uncertain``; the counts."""
    if policy not in POLICIES:
        raise md.MetadataError(f"data.uncertain: {policy!r} is not one of {', '.join(POLICIES)}")
    uncertain = {}
    for f in findings:
        s = frame[STATE + f].to_numpy()
        unc = s == -1
        uncertain[f] = int(unc.sum())
        frame[f] = (s == 1) | (unc & (policy == "positive"))
        frame[LABELLED + f] = (s == 1) | (s == 0) | (unc & (policy != "ignore"))
    return {"uncertain": policy, "uncertain_labels": uncertain,
            "blank_labels": {f: int((frame[STATE + f] == BLANK).sum()) for f in findings}}


def parse_states(col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """A label column as read (``1``, ``1.0``, ``0``, ``-1``, blank) -> (int8 states, bad-value mask)."""
    raw = col.astype(str).str.strip()
    num = pd.to_numeric(raw, errors="coerce")
    state = np.full(len(raw), BLANK, np.int8)
    ok = num.isin([1, 0, -1]).to_numpy()
    state[ok] = num[ok].astype(np.int8)
    bad = ~ok & (raw != "").to_numpy()
    return state, bad


def finish(frame: pd.DataFrame, issues: md.Issues, max_age: int) -> pd.DataFrame:
    """Shared checks of every non-NIH adapter: safe relative paths, duplicates, ages, sex, view."""
    img = frame["image"].astype(str).str.strip().str.replace("\\", "/", regex=False)
    frame = frame.assign(image=img, name=img)
    parts = img.str.split("/")
    unsafe = (img == "") | img.str.startswith("/") | parts.map(lambda p: ".." in p or "" in p[:-1])
    issues.skip_rows(frame, unsafe & (img == ""), "empty image path")
    issues.skip_rows(frame, unsafe & (img != ""), "unsafe image path (absolute or '..')")
    frame = frame.loc[~unsafe]
    dup = frame["image"].duplicated(keep="first")
    issues.skip_rows(frame, dup, "duplicate row in CSV (the first row of this image is kept)")
    frame = frame.loc[~dup].copy()
    age = pd.to_numeric(frame["age"].astype(str).str.strip().str.rstrip("Yy"), errors="coerce")
    odd = age.notna() & ((age < 0) | (age > max_age))
    for i, a, line in zip(frame["image"][odd], age[odd], frame["line"][odd]):
        issues.notes.append({"image": i, "reason": f"implausible age {a:g} recorded as unknown "
                                                   f"(data.max_age={max_age})", "line": int(line)})
    frame["age"] = age.where(age.notna() & ~odd, -1).astype(np.int16)
    sex = frame["sex"].astype(str).str.strip().str.upper()
    frame["sex"] = sex.map(lambda v: md.SEXES.get(v, md.OTHER) if v else "")
    view = frame["view"].astype(str).str.strip().str.upper()
    frame["view"] = view
    return frame.sort_values("name", kind="stable").reset_index(drop=True)
