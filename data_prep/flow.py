"""The flow of images and patients from the CSV to the evaluated test split (STARD 2015, item 19).

Prep records it in ``manifest.json`` as ``flow``; the evaluation adds the evaluated test images
(``metrics.json`` ``flow``); ``report.md`` renders it. Layout::

    {"classes": ["No Finding", "Infiltration", "not in the task"],
     "steps": [{"step": "csv", "split": null, "images": 120, "patients": null, "classes": null, "what": ...},
               {"step": "usable", "split": null, "images": 118, "patients": 24,
                "classes": {"No Finding": {"images": 50, "patients": 20}, ...}, "what": ...},
               ...,
               {"step": "capped", "split": "train", "images": 40, "rows": 64, ...}, ...]}

Steps, in order (``STEPS``): ``csv`` (data rows read), ``usable`` (a valid name, patient id and
labels; the first row of a duplicated name), ``task`` (kept by the task rule, ``data.*``), ``files``
(an image file found, not empty), then per split: ``split`` (assigned to the split), ``capped``
(after balancing and the per-class caps, ``prep.*_per_class``), ``written`` (decoded into the
shards: prep's skips gone), ``evaluated`` (test only, added by the evaluation). ``images`` counts
distinct images; ``rows`` is there too where a balanced split holds resampled copies. A patient
counts in every class of which they have an image, so the classes' patients may add up to more
than ``patients``. Binary task classes are ``data.classes``; multilabel ones ``No Finding`` and
``with a finding``; at the ``usable`` step, ``not in the task`` holds the rows the task rule drops.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # annotations only: data_prep.manifest reads flows without loading numpy
    import numpy as np

OTHER = "not in the task"
ANY_FINDING = "with a finding"
NO_FINDING = "No Finding"
SPLITS = ("train", "val", "test")
STEPS = {
    "csv": "data rows read from the CSV",
    "usable": "rows with a usable image name, patient id and labels",
    "task": "kept by the task rule",
    "files": "image file found and not empty",
    "split": "assigned to the split (by patient)",
    "capped": "after balancing and per-class caps",
    "written": "decoded and written by prep",
    "evaluated": "evaluated",
}
# What an image dropped between a step and the one before it was dropped for (report, CLAIM).
EXCLUDED = {
    "usable": "unusable CSV rows",
    "task": "by the task rule",
    "files": "image file missing or empty",
    "split": "in neither official list, or dropped to keep splits disjoint",
    "capped": "by balancing and per-class caps",
    "written": "unreadable images skipped by prep",
    "evaluated": "written but not evaluated",
}


def class_names(task: str, classes: Sequence[str]) -> list[str]:
    """The flow's classes: the task's (multilabel: No Finding, with a finding), then ``OTHER``."""
    return ([NO_FINDING, ANY_FINDING] if task == "multilabel" else list(classes)) + [OTHER]


def row_classes(df, task: str, classes: Sequence[str], positive: str, negative_rule: str) -> np.ndarray:
    """Each row's flow class, from the parsed metadata columns (``metadata.parse_frame``)."""
    import numpy as np  # here: data_prep.manifest reads flows without loading numpy

    nf = df["no_finding"].to_numpy(bool)
    if task == "multilabel":
        return np.where(nf, NO_FINDING, ANY_FINDING).astype(object)
    pos = df[positive].to_numpy(bool)
    neg = nf if negative_rule == "no_finding" else ~pos
    return np.where(pos, classes[1], np.where(neg, classes[0], OTHER)).astype(object)


def label_classes(label, targets, task: str, classes: Sequence[str]) -> np.ndarray:
    """Each row's flow class from a split's label column (binary) or targets (multilabel)."""
    import numpy as np

    if task == "multilabel":
        t = np.asarray(targets).reshape(len(targets), -1)
        return np.where(t.sum(axis=1) == 0, NO_FINDING, ANY_FINDING).astype(object)
    return np.asarray(classes, dtype=object)[np.asarray(label, dtype=np.int64)]


def count(step: str, images, patients, cls, names: Sequence[str], split: str | None = None) -> dict:
    """One step's counts of rows (image name, patient id, flow class): distinct images and patients,
    per class."""
    import numpy as np
    import pandas as pd

    f = pd.DataFrame({"image": np.asarray(images, dtype=object), "patient": np.asarray(patients).astype(str),
                      "cls": np.asarray(cls, dtype=object)})
    distinct = f.drop_duplicates("image")
    names = [c for c in names if c != OTHER or step == "usable"]  # the task rule leaves none of OTHER
    out = {"step": step, "split": split, "what": STEPS[step], "images": int(len(distinct)),
           "patients": int(distinct["patient"].nunique()),
           "classes": {c: {"images": int((distinct["cls"] == c).sum()),
                           "patients": int(distinct.loc[distinct["cls"] == c, "patient"].nunique())} for c in names}}
    if len(f) != len(distinct):
        out["rows"] = int(len(f))
    return out


def csv_step(rows: int, limit: int = 0) -> dict:
    what = STEPS["csv"] + (f" (prep.limit {limit})" if limit else "")
    return {"step": "csv", "split": None, "what": what, "images": int(rows), "patients": None, "classes": None}


def steps_of(flow: Mapping | None, step: str) -> list[dict]:
    return [s for s in (flow or {}).get("steps") or [] if s.get("step") == step]


def total(flow: Mapping | None, step: str) -> int | None:
    """Images at ``step``, summed over splits for the per-split steps; None when not recorded."""
    s = steps_of(flow, step)
    return sum(int(x["images"]) for x in s) if s else None


def exclusions(flow: Mapping | None) -> list[tuple[str, str, int]]:
    """(step, why, images) dropped at each step of the whole data set before the shards, from the CSV rows
    to the written images (the evaluated step excluded: see :func:`not_evaluated`)."""
    order = ["csv", "usable", "task", "files", "split", "capped", "written"]
    out = []
    for before, step in zip(order, order[1:]):
        a, b = total(flow, before), total(flow, step)
        if a is not None and b is not None:
            out.append((step, EXCLUDED[step], a - b))
    return out


def not_evaluated(flow: Mapping | None) -> int | None:
    """Written test images the evaluation did not evaluate (0 when it evaluated every one)."""
    w, e = ([s for s in steps_of(flow, k) if s.get("split") == "test"] for k in ("written", "evaluated"))
    return int(w[0]["images"]) - int(e[0]["images"]) if w and e else None


def valid(flow) -> bool:
    """A flow block of the layout above (as far as the report reads it)."""
    if not isinstance(flow, Mapping) or not isinstance(flow.get("steps"), list) or \
            not isinstance(flow.get("classes"), list):
        return False
    return all(isinstance(s, Mapping) and s.get("step") in STEPS and isinstance(s.get("images"), int)
               for s in flow["steps"])


def with_evaluated(flow: Mapping | None, images, patients, cls) -> dict | None:
    """A copy of prep's ``flow`` with the ``evaluated`` step of the test split (the images the evaluation
    predicted); None when the manifest recorded no flow (a prep older than it)."""
    if not valid(flow):
        return None
    steps = [s for s in flow["steps"] if s["step"] != "evaluated"]
    return {**flow, "steps": steps + [count("evaluated", images, patients, cls, flow["classes"], "test")]}
