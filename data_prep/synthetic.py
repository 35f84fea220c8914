"""A generated stand-in for NIH ChestX-ray14: same CSV schema, same file names, same lists.

``python -m data_prep.synthetic --out DIR [--patients N] [--image-size PX] [--seed S]`` writes (with
``--config C`` instead of ``--out``: into C's ``data.images``, whose ``data.csv`` must be the CSV below)

* ``DIR/Data_Entry_2017.csv`` with the real v2020 header (11 fields per row, as the real file),
* ``DIR/images/PPPPPPPP_FFF.png``: 8-bit grayscale, square, one per row,
* ``DIR/train_val_list.txt`` and ``DIR/test_list.txt``, split by patient (as NIH's lists),
* ``DIR/SYNTHETIC.txt``, which marks the set as generated (model cards say so).

``--format dicom`` writes the same pictures as DX DICOM files (``PPPPPPPP_FFF.dcm``, named so in the
CSV) the way hospitals export them: 12 bits stored, a window, MONOCHROME1 for every second follow-up
(inverted values), every third RLE-compressed, so prep and predict meet each case; the header's PatientID is
an MRN-like code found in no file name, and ``DIR/labels.csv`` (``image,Infiltration,view,sex,age``) is the
table of ``data.format: csv`` (no patient column: the patient is the header's PatientID).

``--format chexpert`` writes CheXpert's layout instead: ``DIR/CheXpert-v1.0-small/train.csv`` (``Path, Sex,
Age, Frontal/Lateral, AP/PA`` and the 14 observations as 1.0 / 0.0 / -1.0 / blank) and the JPEGs at
``CheXpert-v1.0-small/train/patientNNNNN/studyK/view1_frontal.jpg`` (the same file name in every folder),
with a lateral ``view2_lateral.jpg`` beside every third study; Infiltration's opacities are "Lung Opacity".

Pictures are procedural and only chest-LIKE in layout (body, two darker lung fields, heart,
spine, ribs, noise); they are not medical data. Images labelled Infiltration carry patchy bright
opacities inside the lung fields, large enough to survive a resize to 64 px, so a small network
learns the binary task quickly. Everything derives from the seed: the same seed gives
byte-identical CSV, lists and PNGs. Nothing here reads ``shared/`` or the network.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.cli import command
from data_prep.config import ConfigError, add_config_args, load_config
from data_prep.fsutil import atomic_write_bytes, atomic_write_text

CSV_NAME = "Data_Entry_2017.csv"  # NIH's metadata file name, in the folder written

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
NO_FINDING = "No Finding"
HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
          "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
_OTHERS = tuple(f for f in FINDINGS if f != "Infiltration")
# Roughly the real relative frequencies of the other findings (Hernia is rare).
_OTHER_P = np.array([11.6, 2.5, 11.9, 5.2, 5.6, 1.3, 4.7, 4.2, 2.1, 2.2, 1.5, 3.0, 0.2])
_OTHER_P = _OTHER_P / _OTHER_P.sum()


# --------------------------------------------------------------------------- metadata

def make_table(patients: int = 200, seed: int = 0, image_size: int = 1024,
               p_infiltration: float = 0.36, p_no_finding: float = 0.42) -> list[dict]:
    """Rows of the CSV (dicts), deterministic for a seed. About 3.5 images per patient."""
    rng = np.random.default_rng([seed, 0x5EED])
    rows = []
    for pid in range(1, patients + 1):
        n_follow = int(rng.integers(1, 7))
        sex = "M" if rng.random() < 0.56 else "F"
        age = int(rng.integers(12, 88))
        ap_bias = rng.random()  # some patients mostly AP (bedside), others mostly PA
        for f in range(n_follow):
            u = rng.random()
            if u < p_infiltration:
                labels = ["Infiltration"]
                if rng.random() < 0.45:
                    k = int(rng.integers(1, 3))
                    labels += list(rng.choice(_OTHERS, size=k, replace=False, p=_OTHER_P))
            elif u < p_infiltration + p_no_finding:
                labels = [NO_FINDING]
            else:
                k = 1 if rng.random() < 0.7 else 2
                labels = list(rng.choice(_OTHERS, size=k, replace=False, p=_OTHER_P))
            if labels != [NO_FINDING]:
                labels = sorted(labels, key=FINDINGS.index)
            view = "AP" if rng.random() < 0.25 + 0.5 * ap_bias else "PA"
            spacing = (0.143, 0.168, 0.139)[int(rng.integers(0, 3))]
            rows.append({
                "Image Index": f"{pid:08d}_{f:03d}.png",
                "Finding Labels": "|".join(labels),
                "Follow-up #": f,
                "Patient ID": pid,
                "Patient Age": min(age + f // 2, 95),
                "Patient Gender": sex,
                "View Position": view,
                "width": image_size, "height": image_size,
                "sx": spacing, "sy": spacing,
            })
    return rows


def table_csv(rows: list[dict]) -> str:
    lines = [HEADER]
    for r in rows:
        lines.append(f"{r['Image Index']},{r['Finding Labels']},{r['Follow-up #']},{r['Patient ID']},"
                     f"{r['Patient Age']},{r['Patient Gender']},{r['View Position']},"
                     f"{r['width']},{r['height']},{r['sx']},{r['sy']}")
    return "\n".join(lines) + "\n"


def split_lists(rows: list[dict], seed: int = 0, test_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(train_val names, test names), split by patient like NIH's lists."""
    pids = sorted({r["Patient ID"] for r in rows})
    rng = np.random.default_rng([seed, 0x1157])
    order = rng.permutation(len(pids))
    n_test = int(round(test_fraction * len(pids)))
    test_p = {pids[i] for i in order[:n_test]}
    train_val = [r["Image Index"] for r in rows if r["Patient ID"] not in test_p]
    test = [r["Image Index"] for r in rows if r["Patient ID"] in test_p]
    return train_val, test


# --------------------------------------------------------------------------- pictures

_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int):
    if size not in _GRIDS:
        c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0  # [-1, 1]
        _GRIDS[size] = (c[None, :], c[:, None])  # x (1, S), y (S, 1): broadcasting keeps it cheap
    return _GRIDS[size]


def _soft_ellipse(x, y, cx, cy, ax, ay, edge):
    """1 inside the ellipse, 0 outside, a smooth rim of relative width ``edge``."""
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a small random grid upsampled bilinearly (PIL)."""
    small = rng.random((cells, cells), dtype=np.float32) * 2.0 - 1.0
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BILINEAR))


# The smooth anatomy is drawn at most at this size and upsampled; pixel noise is added at full size.
_ANATOMY_MAX = 256


def render(size: int, labels: str, view: str, rng: np.random.Generator) -> np.ndarray:
    """One chest-like uint8 (size, size) picture for the given ``Finding Labels`` string."""
    base = min(size, _ANATOMY_MAX)
    img = _anatomy(base, set(labels.split("|")), view, rng)
    if base != size:
        img = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.BILINEAR))
    img = img + 10.0 * _smooth_noise(rng, size, 8)
    img += rng.standard_normal((size, size), dtype=np.float32) * np.float32(4.0)
    gain = np.float32(rng.uniform(0.85, 1.15))
    offset = np.float32(rng.uniform(-15, 15))
    img *= gain
    img += offset
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _anatomy(size: int, found: set, view: str, rng: np.random.Generator) -> np.ndarray:
    """float32 (size, size): body, lungs, ribs, spine, heart, findings, view marker."""
    x, y = _grid(size)
    # pose and body
    cx = np.float32(rng.normal(0.0, 0.03))
    cy = np.float32(rng.normal(0.02, 0.03))
    scale = np.float32(rng.uniform(0.92, 1.04))
    body = _soft_ellipse(x, y, cx, cy + 0.05, 0.86 * scale, 1.05 * scale, 0.08)
    img = 25.0 + 140.0 * body
    # lungs: two darker fields
    lung_ay = 0.50 * scale * (0.85 if "Effusion" in found else 1.0)
    lung_ax = 0.27 * scale * (1.12 if "Emphysema" in found else 1.0)
    lung_cy = cy - 0.05 - (0.04 if "Effusion" in found else 0.0)
    lungs = []
    for side in (-1.0, 1.0):
        lcx = cx + side * 0.36 * scale + np.float32(rng.normal(0, 0.01))
        lungs.append(_soft_ellipse(x, y, lcx, lung_cy, lung_ax, lung_ay, 0.12))
    lung = np.maximum(lungs[0], lungs[1])
    img = img - 85.0 * lung
    # ribs: curved bands, only visible across the lungs
    freq = np.float32(rng.uniform(6.5, 8.0))
    phase = np.float32(rng.uniform(0, 2 * np.pi))
    ribs = np.sin((y + 0.35 * (x - cx) ** 2) * freq * np.pi + phase)
    img = img + 14.0 * lung * (ribs > 0.55)
    # spine and heart
    spine = np.clip(1.0 - np.abs(x - cx) / (0.055 * scale), 0.0, 1.0) * body
    img = img + 55.0 * spine
    heart_r = 0.22 * scale * (1.35 if "Cardiomegaly" in found else 1.0) * (1.1 if view == "AP" else 1.0)
    heart = _soft_ellipse(x, y, cx + 0.09, cy + 0.28, heart_r * 1.1, heart_r, 0.2)
    img = img + 60.0 * heart
    # findings inside the lung fields
    if "Infiltration" in found:
        texture = 0.6 + 0.4 * _smooth_noise(rng, size, 24)
        blobs = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(4, 8))):
            side = -1.0 if rng.random() < 0.5 else 1.0
            bx = cx + side * 0.36 * scale + np.float32(rng.uniform(-0.6, 0.6) * lung_ax)
            by = lung_cy + np.float32(rng.uniform(-0.6, 0.7) * lung_ay)
            s = np.float32(rng.uniform(0.05, 0.10))
            blobs += np.exp(-(((x - bx) ** 2 + (y - by) ** 2) / (2 * s * s)))
        img = img + 75.0 * np.minimum(blobs, 1.3) * texture * lung
    if "Mass" in found or "Nodule" in found:
        side = -1.0 if rng.random() < 0.5 else 1.0
        bx = cx + side * 0.36 * scale
        by = lung_cy + np.float32(rng.uniform(-0.3, 0.3))
        r = 0.07 if "Mass" in found else 0.03
        img = img + 70.0 * _soft_ellipse(x, y, bx, by, r, r, 0.3) * lung
    if "Effusion" in found:
        img = img + 60.0 * lung * np.clip((y - (lung_cy + 0.2)) / 0.15, 0.0, 1.0)
    # view marker (like the lead letters on real films)
    mx = -0.85 if view == "PA" else 0.75
    marker = ((x > mx) & (x < mx + 0.08) & (y > -0.92) & (y < -0.84)).astype(np.float32)
    return (img + 90.0 * marker).astype(np.float32)


def image_rng(seed: int, patient: int, followup: int) -> np.random.Generator:
    """Each image has its own stream: order and parallelism never change a picture."""
    return np.random.default_rng([seed, patient, followup, 0x1A6E])


def png_bytes(arr: np.ndarray) -> bytes:
    """8-bit gray PNG; zlib's RLE strategy: as small as level 6 and faster to write."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=6, compress_type=zlib.Z_RLE)
    return buf.getvalue()


# --------------------------------------------------------------------------- driver

FORMATS = ("nih", "chexpert", "dicom")
CHEXPERT_DIR = "CheXpert-v1.0-small"
CHEXPERT_OBS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices")
# NIH findings drawn by make_table -> the CheXpert observation that stands for them (Infiltration: Lung Opacity)
_TO_CHEXPERT = {"Infiltration": "Lung Opacity", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
                "Atelectasis": "Atelectasis", "Pneumonia": "Pneumonia", "Pneumothorax": "Pneumothorax",
                "Consolidation": "Consolidation", "Edema": "Edema", "Mass": "Lung Lesion", "Nodule": "Lung Lesion"}
DICOM_LABELS = "labels.csv"  # --format dicom: the csv format's table (no patient column: the header's PatientID)


def patient_mrn(seed: int, pid: int) -> str:
    """The DICOM PatientID of a generated patient: an MRN-like code that no file name or CSV contains."""
    import hashlib

    return "MRN" + hashlib.sha256(f"cxr-synth-{seed}-{pid}".encode()).hexdigest()[:10].upper()


def chexpert_rows(rows: list[dict], seed: int) -> list[dict]:
    """The NIH-style rows as CheXpert rows: ``patientNNNNN/studyK/view1_frontal.jpg`` (the same file name in
    every folder), a lateral ``view2_lateral.jpg`` beside every third study, observations as 1.0 / 0.0 / -1.0
    (uncertain: about a sixth of the positive ones) / blank (not mentioned)."""
    rng = np.random.default_rng([seed, 0xC4E7])
    out = []
    for r in rows:
        found = {_TO_CHEXPERT[f] for f in r["Finding Labels"].split("|") if f in _TO_CHEXPERT}
        obs = {}
        for o in CHEXPERT_OBS[1:]:
            if o in found:
                obs[o] = "-1.0" if rng.random() < 0.17 else "1.0"
            else:
                obs[o] = "0.0" if rng.random() < 0.4 else ""
        obs["No Finding"] = "1.0" if r["Finding Labels"] == NO_FINDING else ""
        folder = f"{CHEXPERT_DIR}/train/patient{int(r['Patient ID']):05d}/study{int(r['Follow-up #']) + 1}"
        sex = "Male" if r["Patient Gender"] == "M" else "Female"
        base = {"Sex": sex, "Age": r["Patient Age"], "obs": obs, "nih": r}
        out.append({**base, "Path": f"{folder}/view1_frontal.jpg", "Frontal/Lateral": "Frontal",
                    "AP/PA": r["View Position"]})
        if int(r["Follow-up #"]) % 3 == 0:
            out.append({**base, "Path": f"{folder}/view2_lateral.jpg", "Frontal/Lateral": "Lateral", "AP/PA": ""})
    return out


def chexpert_csv(rows: list[dict]) -> str:
    lines = [",".join(("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CHEXPERT_OBS)]
    for r in rows:
        lines.append(",".join([r["Path"], r["Sex"], str(r["Age"]), r["Frontal/Lateral"], r["AP/PA"]]
                              + [r["obs"][o] for o in CHEXPERT_OBS]))
    return "\n".join(lines) + "\n"


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def generate_chexpert(out: Path, rows: list[dict], image_size: int, seed: int, progress: bool,
                      overwrite_images: bool) -> dict:
    cx = chexpert_rows(rows, seed)
    for r in tqdm(cx, desc="synthetic images", unit="img", disable=not progress, file=sys.stderr):
        path = out / r["Path"]
        if not overwrite_images and path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        n = r["nih"]
        arr = render(image_size, n["Finding Labels"], n["View Position"], image_rng(seed, n["Patient ID"],
                                                                                    n["Follow-up #"]))
        if r["Frontal/Lateral"] == "Lateral":
            arr = np.ascontiguousarray(arr[:, ::-1])
        atomic_write_bytes(path, jpeg_bytes(arr))
    atomic_write_text(out / CHEXPERT_DIR / "train.csv", chexpert_csv(cx))
    atomic_write_text(out / "SYNTHETIC.txt", f"Generated by data_prep.synthetic (seed {seed}): procedural pictures, "
                                             "not medical data.\n")
    frontal = [r for r in cx if r["Frontal/Lateral"] == "Frontal"]
    return {"out": str(out), "images": len(cx), "patients": len({r["nih"]["Patient ID"] for r in cx}),
            "image_size": image_size, "seed": seed, "frontal": len(frontal),
            "Lung Opacity": sum(r["obs"]["Lung Opacity"] == "1.0" for r in frontal),
            "uncertain Lung Opacity": sum(r["obs"]["Lung Opacity"] == "-1.0" for r in frontal),
            "No Finding": sum(r["obs"]["No Finding"] == "1.0" for r in frontal)}


def dicom_labels_csv(rows: list[dict]) -> str:
    """--format dicom: the csv format's table, image paths relative to the output folder, no patient column."""
    lines = ["image,Infiltration,view,sex,age"]
    for r in rows:
        pos = "1" if "Infiltration" in r["Finding Labels"].split("|") else "0"
        lines.append(f"images/{r['Image Index']},{pos},{r['View Position']},{r['Patient Gender']},{r['Patient Age']}")
    return "\n".join(lines) + "\n"


def dicom_file(path: Path, arr: np.ndarray, row: dict, seed: int) -> None:
    """``arr`` (8-bit) as a 12-bit DX DICOM: values x16 in a 0..4095 window, MONOCHROME1 (stored inverted)
    for odd follow-ups, RLE for every third; what decoding must undo to give ``arr`` back."""
    from data_prep import dicom

    f = int(row["Follow-up #"])
    stored = arr.astype(np.uint16) * 16 + 8
    photometric = "MONOCHROME1" if f % 2 else "MONOCHROME2"
    if f % 2:
        stored = 4095 - stored
    tmp = path.with_name(path.name + ".tmp")
    dicom.write_dicom(tmp, stored, photometric=photometric, window=(2048.0, 4096.0),
                      compress="rle" if f % 3 == 2 else "", patient_id=patient_mrn(seed, int(row["Patient ID"])),
                      spacing=float(row["sx"]), uid_seed=f"cxr-synth-{seed}-{row['Image Index']}")
    os.replace(tmp, path)  # whole or absent, as the PNGs


def generate(out, patients: int = 200, image_size: int = 1024, seed: int = 0, progress: bool = True,
             overwrite_images: bool = True, fmt: str = "nih") -> dict:
    """Write the whole data set to ``out``; returns a small summary dict."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    rows = make_table(patients, seed, image_size)
    if fmt == "chexpert":
        return generate_chexpert(out, rows, image_size, seed, progress, overwrite_images)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "dicom":
        for r in rows:
            r["Image Index"] = r["Image Index"][:-4] + ".dcm"
    train_val, test = split_lists(rows, seed)
    it = tqdm(rows, desc="synthetic images", unit="img", disable=not progress, file=sys.stderr)
    for r in it:
        path = img_dir / r["Image Index"]
        if not overwrite_images and path.exists():
            continue
        arr = render(image_size, r["Finding Labels"], r["View Position"],
                     image_rng(seed, r["Patient ID"], r["Follow-up #"]))
        if fmt == "dicom":
            dicom_file(path, arr, r, seed)
        else:
            atomic_write_bytes(path, png_bytes(arr))
    atomic_write_text(out / CSV_NAME, table_csv(rows))
    if fmt == "dicom":
        atomic_write_text(out / DICOM_LABELS, dicom_labels_csv(rows))
    atomic_write_text(out / "train_val_list.txt", "\n".join(train_val) + "\n")
    atomic_write_text(out / "test_list.txt", "\n".join(test) + "\n")
    # read by distributed.export: a model card of a model trained on these says so
    atomic_write_text(out / "SYNTHETIC.txt", f"Generated by data_prep.synthetic (seed {seed}): procedural pictures, "
                                             "not medical data.\n")
    n_inf = sum("Infiltration" in r["Finding Labels"].split("|") for r in rows)
    n_nf = sum(r["Finding Labels"] == NO_FINDING for r in rows)
    return {"out": str(out), "images": len(rows), "patients": patients, "image_size": image_size,
            "seed": seed, "Infiltration": n_inf, "No Finding": n_nf,
            "train_val": len(train_val), "test": len(test)}


def _out_folder(args, parser) -> str:
    """``--out``, or the folder a config's ``data.images`` names, whose ``data.csv`` must then be the CSV
    written there: one config generates and prepares the same data."""
    if args.config is None:
        if args.overrides:
            parser.error("--set needs --config")
        if args.out is None:
            parser.error("--out (or --config, whose data.images is the folder) is required")
        return args.out
    cfg = load_config(args.config, args.overrides)
    out = args.out or cfg.data.images
    expected = Path(out) / {"chexpert": f"{CHEXPERT_DIR}/train.csv", "dicom": DICOM_LABELS}.get(
        args.format if cfg.data.format != "nih" else "nih", CSV_NAME)
    if os.path.abspath(cfg.data.csv) != os.path.abspath(expected):
        raise ConfigError(f"data.csv: {cfg.data.csv} is not the CSV this writes ({expected}); set data.csv to it "
                          f"or --out to the folder of data.csv")
    return out


@command("cxr-synth")  # a folder that cannot be written: one line, exit 1
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-synth", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="folder to write (CSV, lists, images/); default: data.images of "
                                                "--config")
    ap.add_argument("--patients", type=int, default=200, help="number of patients (about 3.5 images each)")
    ap.add_argument("--image-size", type=int, default=1024, help="side of the square PNGs, pixels")
    ap.add_argument("--seed", type=int, default=0, help="seed; the same seed gives byte-identical output")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--format", choices=FORMATS, default="nih",
                    help="nih: 8-bit PNGs (default); chexpert: CheXpert's layout (JPEGs in patient/study "
                         "folders, train.csv with uncertain and blank labels, lateral views); dicom: the same "
                         "pictures as 12-bit DX DICOM files, with labels.csv for data.format csv")
    add_config_args(ap, required=False)
    args = ap.parse_args(argv)
    args.out = _out_folder(args, ap)
    if args.patients < 1:
        ap.error("--patients must be at least 1")
    if not 16 <= args.image_size <= 4096:
        ap.error("--image-size must be in [16, 4096]")
    s = generate(args.out, args.patients, args.image_size, args.seed, progress=not args.no_progress,
                 fmt=args.format)
    if args.format == "chexpert":
        print(f"wrote {s['images']} images of {s['patients']} patients ({s['image_size']} px) to {s['out']}: "
              f"{s['frontal']} frontal, Lung Opacity {s['Lung Opacity']} (uncertain {s['uncertain Lung Opacity']}), "
              f"No Finding {s['No Finding']}")
        return 0
    print(f"wrote {s['images']} images of {s['patients']} patients ({s['image_size']} px) to {s['out']}: "
          f"Infiltration {s['Infiltration']}, No Finding {s['No Finding']}; "
          f"train_val {s['train_val']}, test {s['test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
