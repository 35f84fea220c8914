"""Dataset adapters: ``data.format`` (nih, chexpert, csv) reads its CSV into ONE canonical table.

Every adapter's ``read(data_cfg, limit) -> Table``; the rest of prep reads only the table:

* ``image``: the image id, unique: its path relative to ``data.images`` (normalised by :func:`locate`), except
  NIH's file names (NIH names every image by a unique file name, found below ``data.images``: that name stays
  its id, as in NIH's own lists); ``name``: the CSV's own value (the sort order and the official lists use it);
* ``patient`` (str), ``age`` (int16, -1 unknown), ``sex``, ``view``, ``line`` (the source row's line in the CSV);
* per finding ``f`` of the format: ``f`` (bool: positive after the uncertain-label policy), ``LABELLED + f``
  (bool: the label is known: not blank, not uncertain under ``data.uncertain: ignore``) and ``STATE + f``
  (int8 as read: 1 positive, 0 negative, -1 uncertain, -2 blank);
* ``no_finding`` (bool): the format's negative rule (NIH: "No Finding"; CheXpert: "No Finding" = 1 or every
  observation negative or blank; csv: every label 0).

:func:`select_task` picks the task's rows (binary: positive vs the negative rule; an image whose positive
label is masked leaves the task and is counted), :func:`targets` gives the shards' targets and mask.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from data_prep import metadata as md
from data_prep.datasets import chexpert, csv, nih
from data_prep.datasets.common import LABELLED, STATE, Table

FORMATS = {"nih": nih, "chexpert": chexpert, "csv": csv}


def adapter(fmt: str):
    return FORMATS[fmt]


def findings_of(d) -> tuple[str, ...]:
    """The findings the format ``d.format`` labels (csv: ``data.columns.labels``)."""
    return tuple(adapter(d.format).findings(d))


def read(d, limit: int = 0) -> Table:
    return adapter(d.format).read(d, limit)


def task_classes(d) -> list[str]:
    """The task's class names; ``data.positive_label`` checked against the format's findings."""
    found = findings_of(d)
    if d.task == "multilabel":
        return list(found)
    pos = d.positive_label
    if d.format == "csv" and len(found) == 1 and pos == "Infiltration" and pos not in found:
        pos = found[0]  # the default positive label of a one-label csv is its label
    if pos not in found:
        raise md.MetadataError(f"data.positive_label: {pos!r} is not a finding of data.format {d.format} "
                               f"({', '.join(found)})")
    return [md.NO_FINDING if d.negative_rule == "no_finding" else f"Not {pos}", pos]


def select_task(table: Table, d) -> tuple[pd.DataFrame, dict]:
    """Rows of the task with ``label`` (0/1 binary, -1 multilabel); ``{"masked_images": n}``: images left out
    of a binary task because their positive label is masked (uncertain under ``ignore``)."""
    classes = task_classes(d)
    df = table.frame
    if d.task == "multilabel":
        out = df.copy()
        out["label"] = np.int64(-1)
        return out, {}
    pos_label = classes[1]
    pos = df[pos_label].to_numpy(bool)
    known = df[LABELLED + pos_label].to_numpy(bool)
    neg = (df["no_finding"].to_numpy(bool) if d.negative_rule == "no_finding" else known) & ~pos
    masked = ~known & ~pos & ~neg
    out = df.loc[pos | neg].copy()
    out["label"] = out[pos_label].astype(np.int64)
    return out, {"masked_images": int((masked & (df[STATE + pos_label] == -1).to_numpy()).sum())}


def targets(df: pd.DataFrame, task: str, classes) -> tuple[np.ndarray, np.ndarray]:
    """(targets, mask) uint8 (N, K): multilabel the findings and which are labelled; binary one-hot, all 1."""
    if task == "multilabel":
        t = df[list(classes)].to_numpy(dtype=np.uint8).reshape(len(df), len(classes))
        m = df[[LABELLED + c for c in classes]].to_numpy(dtype=np.uint8).reshape(len(df), len(classes))
        return t, m
    lab = df["label"].to_numpy()
    t = np.stack([lab == 0, lab == 1], axis=1).astype(np.uint8).reshape(len(df), 2)
    return t, np.ones_like(t)


def findings_text(df: pd.DataFrame, findings) -> list[str]:
    """Each row's positive findings joined by ``|`` (empty: none), for the shards (co-findings in reports)."""
    cols = df[list(findings)].to_numpy(bool) if len(df) else np.zeros((0, len(findings)), bool)
    return ["|".join(f for f, v in zip(findings, row) if v) for row in cols]


def label_counts(df: pd.DataFrame, task: str, classes) -> dict[str, int]:
    if task == "multilabel":
        out = {f: int((df[f] & df[LABELLED + f]).sum()) for f in classes}
        out[md.NO_FINDING] = int(df["no_finding"].sum())
        return out
    lab = df["label"].to_numpy()
    return {classes[0]: int((lab == 0).sum()), classes[1]: int((lab == 1).sum())}


def masked_counts(df: pd.DataFrame, task: str, classes) -> dict[str, int]:
    """Per class: labels masked out of the loss and the metrics (multilabel; binary has none in the shards)."""
    if task != "multilabel":
        return {}
    return {f: int((~df[LABELLED + f]).sum()) for f in classes}


def _safe_join(root: Path, rel: str) -> Path | None:
    p = root / rel
    try:
        if p.is_file() and p.resolve().is_relative_to(root.resolve()):
            return p
    except OSError:
        pass
    return None


def locate(df: pd.DataFrame, table: Table, root, exclude=(), refused: list | None = None) -> pd.Series:
    """Each row's file (a path string, NaN when absent); sets ``df["image"]`` to the path relative to
    ``root`` (but NIH's plain file names). NIH names without a folder are found by file name below ``root``
    (``metadata.find_images``); every other image by its relative path, which must stay inside ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise md.MetadataError(f"image folder not found: {root} (data.images)")
    names = df["image"].astype(str)
    flat = names[~names.str.contains("/", regex=False)] if table.by_name else names.iloc[:0]
    found = md.find_images(root, flat.tolist(), exclude=exclude, refused=refused) if len(flat) else {}
    paths = []
    for n in names:
        if n in found:
            paths.append(found[n])
        elif "/" in n or not table.by_name:
            p = _safe_join(root, n)
            paths.append(str(p) if p is not None else np.nan)
        else:
            paths.append(np.nan)
    paths = pd.Series(paths, index=df.index, dtype=object)
    ok = paths.notna() & (names.str.contains("/", regex=False) | (not table.by_name))
    rel = paths[ok].map(lambda p: Path(os.path.relpath(p, root)).as_posix())
    df.loc[ok, "image"] = rel
    return paths
