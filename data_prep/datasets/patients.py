"""Patient ids: from a DICOM header when no column gives them, and pseudonymised by a keyed hash.

``data.pseudonymize`` (auto: on when the patient comes from a DICOM header): every patient id becomes
``HMAC-SHA256(key, id)`` (its first 16 hex digits), with a random key made once in ``prep.out/PATIENT_KEY``
(mode 0600) and reused, so that a rerun gives the same ids. No map of id -> hash is written: the key and the
original ids recompute it. The header's PatientID is read without the pixel data and never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from data_prep import dicom
from data_prep import metadata as md

PATIENT_KEY = ".patient-key"


def header_patient(path) -> str:
    """The PatientID of a DICOM file ('' when it has none or the file is not DICOM)."""
    if not dicom.looks_like_dicom(path):
        return ""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    except Exception:  # noqa: BLE001 - an unreadable header: no patient id from it
        return ""
    return str(getattr(ds, "PatientID", "") or "").strip()


def key(out) -> bytes:
    """The run's keyed-hash key: ``out/PATIENT_KEY`` (0600), made when absent."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PATIENT_KEY
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    os.chmod(path, 0o600)
    text = path.read_text().strip()
    if len(text) != 64:
        raise md.MetadataError(f"{path}: not a patient key (64 hex digits); remove it to make a new one")
    return bytes.fromhex(text)


def pseudonym(k: bytes, patient: str) -> str:
    return "p" + hmac.new(k, str(patient).encode(), hashlib.sha256).hexdigest()[:16]


def resolve(df, d, out, log):
    """``df["patient"]`` filled (csv without a patient column: the DICOM header's PatientID, else the image
    id) and pseudonymised when asked; returns ``(df, {"patient_from", "pseudonymized"})`` for the manifest."""
    source = {"nih": "column Patient ID", "chexpert": "Path's patientNNNNN folder"}.get(
        d.format, f"column {d.columns.patient}")
    if d.format == "csv" and not d.columns.patient:
        ids = [header_patient(p) for p in df["path"]]
        from_header = sum(bool(i) for i in ids)
        df = df.assign(patient=[i or img for i, img in zip(ids, df["image"])])
        source = "DICOM PatientID" if from_header else "image (each image its own patient)"
        if from_header and from_header < len(ids):
            source += f" ({len(ids) - from_header} images without one: their image id)"
        log.info("patients from %s", source)
    on = d.pseudonymize == "on" or (d.pseudonymize == "auto" and source.startswith("DICOM"))
    if on:
        k = key(out)
        df = df.assign(patient=[pseudonym(k, p) for p in df["patient"].astype(str)])
        log.info("patient ids pseudonymised (keyed hash, key %s)", Path(out) / PATIENT_KEY)
    return df, {"patient_from": source, "pseudonymized": on}
