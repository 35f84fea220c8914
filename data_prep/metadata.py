"""NIH ChestX-ray14 metadata: reading, validation, the task's labels, patient split, sampling.

Everything is vectorised pandas/numpy (the real 112,120-row CSV reads and parses in well under
a second) and deterministic for ``prep.seed``. Problems with single rows never raise: the row is
dropped and listed in ``Issues.skipped`` (with its reason and CSV line), or kept and listed in
``Issues.notes`` (an implausible age becomes unknown). Only a CSV that cannot be used at all
(missing file, missing columns) raises ``MetadataError``.

Split rules:
* patients, never images, are assigned to splits: no patient is ever in two splits;
* seeded split: patients are permuted with ``prep.seed``; ``round(test_fraction * P)`` go to test,
  ``round(val_fraction * P)`` to val, the rest to train (``P``: patients with an image of the task);
* official split (``data.official_split``: both list files beside the CSV or in ``data.images``,
  else an error naming the missing one): ``test_list.txt`` is the test split; validation patients are carved from the
  ``train_val_list.txt`` patients (``round(val_fraction * P_train_val)``). Rows in neither list are
  skipped; a patient in both lists keeps only the test images (train_val rows skipped);
* balancing (``prep.train_per_class``, binary task) happens only in train: a class with at
  least that many images is sampled without replacement, a smaller class keeps every image once
  and is topped up by resampling with replacement. Val/test hold each image at most once, capped
  by ``val_per_class``/``test_per_class`` (binary task).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep.cli import UserError
from data_prep.fsutil import walk_tree

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
ALL_LABELS = FINDINGS + (NO_FINDING,)
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
OPTIONAL_COLUMNS = ("Follow-up #",)
_RENAME = {"Image Index": "image", "Finding Labels": "labels", "Follow-up #": "followup", "Patient ID": "patient",
           "Patient Age": "age", "Patient Gender": "sex", "View Position": "view"}
SPLITS = ("train", "val", "test")
VIEWS = ("PA", "AP", "LL")  # View Position values kept; any other becomes OTHER (the original in the manifest's notes)
SEXES = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}  # Patient Gender; empty stays empty (unknown)
OTHER = "other"
LIST_FILES = ("train_val_list.txt", "test_list.txt")


class MetadataError(UserError, ValueError):
    """The CSV (or the lists) cannot be used at all."""


@dataclass
class Issues:
    skipped: list = field(default_factory=list)   # rows/images left out: {"image", "reason", ...}
    notes: list = field(default_factory=list)     # kept, but changed: {"image", "reason", ...}

    def skip_rows(self, frame: pd.DataFrame, mask, reason):
        """Record every row of ``frame[mask]``; ``reason`` is a string or a Series of strings."""
        sub = frame.loc[mask]
        reasons = reason.loc[sub.index] if isinstance(reason, pd.Series) else [reason] * len(sub)
        names = sub["name"] if "name" in sub else sub["image"]  # the CSV's own name: what the user finds there
        for img, line, r in zip(names.tolist(), sub["line"].tolist(), reasons):
            self.skipped.append({"image": str(img), "reason": str(r), "line": int(line)})

    def extend(self, other: "Issues"):
        self.skipped.extend(other.skipped)
        self.notes.extend(other.notes)


# --------------------------------------------------------------------------- reading

def read_metadata(csv_path, max_age: int = 120, limit: int = 0) -> tuple[pd.DataFrame, Issues]:
    """Read the NIH CSV (2017 or v2020 schema, .csv or .csv.gz).

    Returns ``(frame, issues)``; ``frame`` is sorted by image name with columns ``image``,
    ``labels`` (normalised ``|`` string), ``patient`` (int64), ``followup`` (int64, -1 unknown),
    ``age`` (int16, -1 unknown), ``sex``, ``view``, ``line`` (line in the CSV file), ``no_finding``
    (bool) and one bool column per finding in ``FINDINGS``.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise MetadataError(f"metadata CSV not found: {csv_path} (data.csv)")
    try:
        header = pd.read_csv(csv_path, nrows=0)
    except Exception as e:  # noqa: BLE001 - any parser failure means an unusable file
        raise MetadataError(f"{csv_path}: cannot read as CSV: {e}") from None
    cols = {str(c).strip(): c for c in header.columns}
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise MetadataError(f"{csv_path}: missing required column(s) {', '.join(repr(m) for m in missing)}; "
                            f"found {', '.join(repr(c) for c in cols)}")
    use = [cols[c] for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in cols]
    df = pd.read_csv(csv_path, usecols=use, dtype=str, keep_default_na=False, na_filter=False,
                     nrows=limit or None, skipinitialspace=True)
    df.columns = [str(c).strip() for c in df.columns]
    df = df.rename(columns=_RENAME)
    if "followup" not in df:
        df["followup"] = ""
    df = df.reset_index(drop=True)
    df["line"] = np.arange(2, len(df) + 2)  # header is line 1
    return parse_frame(df, max_age)


def _by_unique(series: pd.Series, fn) -> pd.Series:
    """Apply a Python function to each distinct value only (labels, ages, views: a few hundred)."""
    codes, uniq = pd.factorize(series, sort=False)
    mapped = np.empty(len(uniq), dtype=object)
    mapped[:] = [fn(u) for u in uniq]
    return pd.Series(mapped[codes], index=series.index)


def _parse_labels(raw: str):
    """(canonical string, 14 bools, reason or '') for one distinct ``Finding Labels`` value."""
    parts = [p.strip() for p in str(raw).split("|")]
    if parts == [""]:
        return None, None, "empty Finding Labels"
    unknown = sorted({p for p in parts if p not in ALL_LABELS})
    if unknown:
        return None, None, "unknown finding label(s) " + ", ".join(map(repr, unknown))
    if NO_FINDING in parts:
        if len(set(parts)) > 1:
            return None, None, "'No Finding' together with findings"
        return NO_FINDING, np.zeros(len(FINDINGS), bool), ""
    t = np.array([f in parts for f in FINDINGS])
    return "|".join(f for f, v in zip(FINDINGS, t) if v), t, ""


def _sex(raw: str) -> str:
    v = raw.strip().upper()
    return SEXES.get(v, OTHER) if v else ""


def _view(raw: str) -> str:
    v = raw.strip().upper()
    return v if v in VIEWS else (OTHER if v else "")


def _vocab(col: str) -> str:
    return ", ".join(VIEWS) if col == "view" else "M, F (or Male, Female)"


def _parse_age(raw: str) -> int | None:
    r = str(raw).strip()
    if r[-1:] in ("Y", "y"):
        r = r[:-1].strip()
    return int(r) if r.isdigit() else None


def parse_frame(df: pd.DataFrame, max_age: int = 120) -> tuple[pd.DataFrame, Issues]:
    """Validate and type the renamed string columns (see ``read_metadata``)."""
    issues = Issues()
    img = df["image"].astype(str)
    if img.str.len().ne(img.str.strip().str.len()).any():
        img = img.str.strip()
    df = df.assign(image=img)
    # 1. names: a file name or a relative path below data.images (an image is known by that path); no '..',
    # no absolute path, no backslash, not empty
    bad_name = (img == "") | img.str.contains(r"\\|(?:^|/)\.\.(?:/|$)|^/|//", regex=True)
    issues.skip_rows(df, bad_name & (img == ""), "empty Image Index")
    issues.skip_rows(df, bad_name & (img != ""), "unsafe Image Index (absolute path, backslash or '..')")
    df = df.loc[~bad_name]
    # 2. duplicates: keep the first row of a name
    dup = df["image"].duplicated(keep="first")
    issues.skip_rows(df, dup, "duplicate row in CSV (the first row of this image is kept)")
    df = df.loc[~dup]
    # 3. patient id
    pid = pd.to_numeric(df["patient"].astype(str).str.strip(), errors="coerce")
    bad_pid = pid.isna() | (pid < 0) | (pid != np.floor(pid))
    issues.skip_rows(df, bad_pid, "Patient ID is not a non-negative integer")
    df = df.loc[~bad_pid].copy()
    df["patient"] = pid.loc[df.index].astype(np.int64)
    # 4. labels, parsed once per distinct value
    codes, uniq = pd.factorize(df["labels"].astype(str), sort=False)
    parsed = [_parse_labels(u) for u in uniq]
    reason_u = np.array([r for _, _, r in parsed], dtype=object)
    reason = pd.Series(reason_u[codes] if len(codes) else [], index=df.index, dtype=object)
    bad = (reason != "").to_numpy()
    issues.skip_rows(df, bad, reason)
    df = df.loc[~bad].copy()
    codes = codes[~bad]
    t_u = np.stack([t if t is not None else np.zeros(len(FINDINGS), bool) for _, t, _ in parsed]) \
        if parsed else np.zeros((0, len(FINDINGS)), bool)
    t = t_u[codes] if len(codes) else np.zeros((0, len(FINDINGS)), bool)
    names_u = np.array([c for c, _, _ in parsed], dtype=object)
    df["labels"] = names_u[codes] if len(codes) else np.array([], dtype=object)
    for j, name in enumerate(FINDINGS):
        df[name] = t[:, j]
    df["no_finding"] = ~t.any(axis=1)
    # 5. age: '58', '058Y' -> 58; implausible or missing -> -1, noted
    age_raw = df["age"].astype(str)
    age = pd.to_numeric(_by_unique(age_raw, _parse_age), errors="coerce")
    implausible = age.notna() & ((age > max_age) | (age < 0))
    unparsed = age.isna()
    for m, why in ((implausible, "implausible age {} recorded as unknown (data.max_age={})"),
                   (unparsed, "unreadable age {!r} recorded as unknown")):
        sub = df.loc[m]
        for i, a, line in zip(sub["image"].tolist(), age_raw.loc[m].str.strip().tolist(), sub["line"].tolist()):
            issues.notes.append({"image": i, "reason": why.format(a, max_age), "line": int(line)})
    df["age"] = age.where(~(implausible | unparsed), -1).fillna(-1).astype(np.int16)
    # 6. sex, view (a small vocabulary: anything else is OTHER, its original noted), follow-up
    for col, name, fn in (("sex", "Patient Gender", _sex), ("view", "View Position", _view)):
        raw = df[col].astype(str)
        df[col] = _by_unique(raw, fn)
        odd = (df[col] == OTHER).to_numpy()
        for i, v, line in zip(df["image"][odd].tolist(), raw[odd].tolist(), df["line"][odd].tolist()):
            issues.notes.append({"image": i, "reason": f"{name} outside {_vocab(col)}: recorded as {OTHER!r}",
                                 "original": v[:200], "line": int(line)})
    df["followup"] = pd.to_numeric(_by_unique(df["followup"].astype(str), lambda v: v.strip()),
                                   errors="coerce").fillna(-1).astype(np.int64)
    df = df.sort_values("image", kind="stable").reset_index(drop=True)
    cols = ["image", "labels", "patient", "followup", "age", "sex", "view", "line", "no_finding", *FINDINGS]
    return df[cols], issues


# --------------------------------------------------------------------------- files

def find_images(root, names=None, exclude=(), refused: list | None = None) -> dict[str, str]:
    """Map file name -> path for every file below ``root`` (flat ``images/`` or Kaggle's
    ``images_NNN/images/``): NIH's CSV names its images by file name only. Only names in ``names`` are kept
    when given. Directories are walked in sorted order, so when a name occurs twice the first path in that
    order wins. Symlink loops and symlinks leaving ``root`` are not followed and are listed in ``refused``
    (``fsutil.walk_tree``)."""
    root = Path(root)
    if not root.is_dir():
        raise MetadataError(f"image folder not found: {root} (data.images)")
    want = set(names) if names is not None else None
    found: dict[str, str] = {}
    for dirpath, filenames in walk_tree(root, exclude, refused):  # loops and links leaving root refused
        for fn in filenames:
            if (want is None or fn in want) and fn not in found:
                found[fn] = os.path.join(dirpath, fn)
    return found


def find_official_lists(csv_path, images_root) -> tuple[Path, Path] | None:
    """``(train_val_list.txt, test_list.txt)`` beside the CSV, else in ``images_root``; None if absent."""
    for folder in (Path(csv_path).parent, Path(images_root)):
        tv, te = (folder / n for n in LIST_FILES)
        if tv.is_file() and te.is_file():
            return tv, te
    return None


def official_lists(csv_path, images_root) -> tuple[Path, Path]:
    """:func:`find_official_lists` for ``data.official_split: true``: a missing list is an error naming it."""
    lists = find_official_lists(csv_path, images_root)
    if lists is not None:
        return lists
    folders = (Path(csv_path).parent, Path(images_root))
    missing = [n for n in LIST_FILES if not any((f / n).is_file() for f in folders)] or list(LIST_FILES)
    raise MetadataError(f"data.official_split: {' and '.join(missing)} not found beside {csv_path} or in "
                        f"{images_root} (both lists must be in one of them; data.official_split: false for the "
                        "seeded patient split)")


def read_list(path) -> set[str]:
    return {ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()}


# --------------------------------------------------------------------------- task

def task_classes(task: str, positive: str = "Infiltration", negative_rule: str = "no_finding") -> list[str]:
    if task == "multilabel":
        return list(FINDINGS)
    if positive not in FINDINGS:
        raise MetadataError(f"data.positive_label: {positive!r} is not one of the 14 findings: {', '.join(FINDINGS)}")
    return [NO_FINDING if negative_rule == "no_finding" else f"Not {positive}", positive]


def select_task(df: pd.DataFrame, task: str, positive: str = "Infiltration",
                negative_rule: str = "no_finding") -> pd.DataFrame:
    """Rows of the task with ``label`` (int64: 0/1 binary, -1 multilabel) and ``targets``
    (list-like uint8 rows: one-hot for binary, the 14 findings for multilabel)."""
    task_classes(task, positive, negative_rule)  # validates positive
    if task == "multilabel":
        out = df.copy()
        out["label"] = np.int64(-1)
        return out
    pos = df[positive].to_numpy()
    neg = df["no_finding"].to_numpy() if negative_rule == "no_finding" else ~pos
    out = df.loc[pos | neg].copy()
    out["label"] = out[positive].astype(np.int64)
    return out


def targets_matrix(df: pd.DataFrame, task: str) -> np.ndarray:
    if task == "multilabel":
        return df[list(FINDINGS)].to_numpy(dtype=np.uint8)
    lab = df["label"].to_numpy()
    return np.stack([lab == 0, lab == 1], axis=1).astype(np.uint8)


def label_counts(df: pd.DataFrame, task: str, classes) -> dict[str, int]:
    if task == "multilabel":
        out = {f: int(df[f].sum()) for f in FINDINGS}
        out[NO_FINDING] = int(df["no_finding"].sum())
        return out
    lab = df["label"].to_numpy()
    return {classes[0]: int((lab == 0).sum()), classes[1]: int((lab == 1).sum())}


# --------------------------------------------------------------------------- split

def _n_of(frac: float, n: int) -> int:
    return int(np.floor(frac * n + 0.5))


def split_patients(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int,
                   official: tuple[set, set] | None = None) -> tuple[pd.Series, Issues]:
    """Split name per row (``train``/``val``/``test``; rows to drop get ``""`` and an issue)."""
    issues = Issues()
    split = pd.Series("", index=df.index, dtype=object)
    rng = np.random.default_rng([seed, 0])
    if official is None:
        patients = patient_order(df["patient"])
        perm = patients[rng.permutation(len(patients))]
        n_test = min(_n_of(test_fraction, len(perm)), len(perm))
        n_val = min(_n_of(val_fraction, len(perm)), len(perm) - n_test)
        test_p, val_p = perm[:n_test], perm[n_test:n_test + n_val]
        p = df["patient"].astype(str) if len(patients) else df["patient"]
        split[:] = "train"
        split[p.isin(val_p)] = "val"
        split[p.isin(test_p)] = "test"
        return split, issues
    train_val, test = official
    name = df["name"] if "name" in df else df["image"]  # the lists name NIH's images by file name
    in_test = name.isin(test)
    in_tv = name.isin(train_val) & ~in_test
    neither = ~(in_test | in_tv)
    issues.skip_rows(df, neither, "not in train_val_list.txt or test_list.txt (data.official_split)")
    test_patients = df.loc[in_test, "patient"].unique()
    leak = in_tv & df["patient"].isin(test_patients)
    issues.skip_rows(df, leak, "patient also in test_list.txt: train_val image dropped to keep splits disjoint")
    in_tv = in_tv & ~leak
    split[in_test] = "test"
    tv_patients = patient_order(df.loc[in_tv, "patient"])
    perm = tv_patients[rng.permutation(len(tv_patients))]
    val_p = perm[:min(_n_of(val_fraction, len(perm)), len(perm))]
    split[in_tv] = "train"
    split[in_tv & df["patient"].astype(str).isin(val_p)] = "val"
    return split, issues


def patient_order(patients: pd.Series) -> np.ndarray:
    """The distinct patient ids in the split's order: by number when every id is a decimal number (NIH's, as
    when they were integers), else as strings."""
    uniq = pd.unique(patients.astype(str).to_numpy()) if len(patients) else np.array([], dtype=object)
    if len(uniq) and all(u.isdigit() for u in uniq):
        return uniq[np.argsort([int(u) for u in uniq], kind="stable")]
    return np.sort(uniq.astype(object))


def sample_split(df: pd.DataFrame, split: str, task: str, per_class: int, seed: int) -> pd.DataFrame:
    """Rows of one split in their final order (train: balanced when asked, then shuffled;
    val/test: each image at most once, capped per class, sorted by the CSV's name of the image)."""
    df = df.sort_values("name" if "name" in df else "image", kind="stable")
    stream = {"train": 1, "val": 2, "test": 3}[split]
    rng = np.random.default_rng([seed, stream])
    if task != "binary" or per_class <= 0:
        if split == "train":
            return df.iloc[rng.permutation(len(df))]
        return df
    parts = []
    for c in (0, 1):
        idx = np.flatnonzero(df["label"].to_numpy() == c)
        n = len(idx)
        if n == 0:
            continue
        if split == "train":
            if n >= per_class:
                pick = rng.choice(idx, size=per_class, replace=False)
            else:
                pick = np.concatenate([idx, rng.choice(idx, size=per_class - n, replace=True)])
        else:
            pick = np.sort(rng.choice(idx, size=per_class, replace=False)) if n > per_class else idx
        parts.append(pick)
    pick = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if split == "train":
        pick = pick[rng.permutation(len(pick))]
    else:
        pick = np.sort(pick)
    return df.iloc[pick]
