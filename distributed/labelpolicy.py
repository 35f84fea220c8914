"""What the prep recorded about the labels (``manifest["labels"]``), for metrics.json and one line of report.md.

The data format, the uncertain-label policy (``data.uncertain``) and its counts: uncertain labels read,
images left out of a binary task because their positive label was masked, labels masked per split
(multilabel), and whether patient ids are pseudonymised. Pure: no TensorFlow."""
from __future__ import annotations

from typing import Mapping

import numpy as np

POLICY_TEXT = {"ignore": "masked out of the loss and the metrics (U-Ignore)",
               "positive": "counted as positive (U-Ones)", "negative": "counted as negative (U-Zeros)"}


def bootstrap_groups(patients) -> np.ndarray:
    """Patient ids as the bootstrap's groups: numbers when every id is one (NIH's: the same resamples as when
    the shards held integers), else the strings."""
    ids = np.asarray([str(p) for p in patients], dtype=object)
    if len(ids) and all(p.isdigit() for p in ids):
        return ids.astype(np.int64)
    return ids


def summary(manifest: Mapping, evaluated_mask=None) -> dict | None:
    """``manifest["labels"]`` with each split's masked counts (and the test labels masked at evaluation)."""
    labels = manifest.get("labels")
    if not isinstance(labels, Mapping):
        return None
    out = dict(labels)
    out["masked_per_split"] = {name: dict(s.get("masked") or {}) for name, s in (manifest.get("splits") or {}).items()}
    if evaluated_mask is not None:
        out["masked_test_labels"] = int((evaluated_mask == 0).sum())
    return out


def report_line(lab) -> str:
    """One Markdown paragraph from metrics.json's ``labels`` (a ``distributed.results.Labels``): the format,
    the uncertain-label policy and the masked counts ('' without)."""
    if lab is None:
        return ""
    parts = [f"Labels: `data.format: {lab.format or 'nih'}`"]
    pol = lab.uncertain
    if pol and lab.format != "nih":
        unc = sum(int(v) for v in (lab.uncertain_labels or {}).values())
        parts.append(f"uncertain labels (`data.uncertain: {pol}`): {unc} read, {POLICY_TEXT.get(pol, pol)}")
        if lab.masked_images is not None and pol == "ignore":  # U-Ones/U-Zeros keep every image
            parts.append(f"{int(lab.masked_images)} images left out of the binary task because their positive "
                         "label was uncertain and masked")
        masked = sum(int(v) for s in (lab.masked_per_split or {}).values() for v in s.values())
        if masked or lab.masked_test_labels is not None:
            parts.append(f"{masked} labels masked in the shards ({int(lab.masked_test_labels or 0)} of them "
                         "in the evaluated test split)")
    if lab.pseudonymized:
        parts.append(f"patient ids ({lab.patient_from or 'column'}) pseudonymised by a keyed hash")
    return "; ".join(parts) + "."
