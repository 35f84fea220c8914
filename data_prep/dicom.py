"""DICOM radiographs to the project's gray image: what hospitals export, decoded the way a viewer shows it.

:func:`read_dicom` returns a float32 2-D array of display values and an ``info`` dict; ``load_xray``
(:mod:`data_prep.imaging`) then resizes it and scales it by its own min..max like any wide image. The
steps, each recorded in ``info`` so the prep stage can put it in the manifest:

1. header first (the pixel data is read only when decoded): a file without pixel data, a non-image object (structured
   report, presentation state), several frames, a colour or unknown photometric interpretation, or more
   than ``max_pixels`` pixels is refused (``DicomError``, an ``ImageError`` to ``load_xray``'s callers) before any
   pixel is decoded;
2. pixels by pydicom, with pylibjpeg's plugins for JPEG, JPEG-LS and JPEG 2000 (pydicom decodes
   uncompressed and RLE itself); a transfer syntax nothing here decodes is one ``DicomError`` naming it;
3. the Modality LUT (Rescale Slope and Intercept, or a Modality LUT Sequence) to the modality's values;
4. the VOI LUT: a VOI LUT Sequence, else the first Window Center/Width (DICOM PS3.3 C.11.2.1.2's
   linear function); without either, the stored range is used as it is;
5. MONOCHROME1 (white = low values) inverted, so that bone is bright as in MONOCHROME2 and the NIH PNGs.

Patient identifiers in the header are never read into ``info`` (only the pixel spacing, photometric
interpretation, bit depth, transfer syntax, rescale and window).
"""
from __future__ import annotations

import io
import os

import numpy as np


class DicomError(Exception):
    """A DICOM file that is not read; ``reason`` is short (``data_prep.imaging`` raises it as ImageError)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

PREAMBLE = 128  # DICOM Part 10 files: 128 bytes of preamble, then "DICM"
MAGIC = b"DICM"
IMAGE_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
DEFER_SIZE = "256 KB"  # pydicom reads larger values (the pixel data) only when they are used


def is_dicom(head: bytes) -> bool:
    """True for the first bytes of a DICOM Part 10 file."""
    return len(head) >= PREAMBLE + 4 and head[PREAMBLE:PREAMBLE + 4] == MAGIC


def looks_like_dicom(src) -> bool:
    """Whether the file, bytes or binary file object ``src`` is DICOM (its position is kept)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return is_dicom(bytes(src[:PREAMBLE + 4]))
    if hasattr(src, "read"):
        pos = src.tell()
        head = src.read(PREAMBLE + 4)
        src.seek(pos)
        return is_dicom(head)
    try:
        with open(os.fspath(src), "rb") as f:
            return is_dicom(f.read(PREAMBLE + 4))
    except OSError:
        return False


def _source(src):
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    return src if hasattr(src, "read") else os.fspath(src)


def _num(value, default):
    """A DICOM numeric value (DS/IS, possibly multi-valued): the first one as a float."""
    if value is None or value == "":
        return default
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return default


def read_dicom(src, max_pixels: int = 0) -> tuple[np.ndarray, dict]:
    """Display values (float32, 2-D) and what was done (module docstring); ``DicomError`` otherwise
    (``max_pixels`` 0: no limit; ``load_xray`` passes prep.max_pixels)."""
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pinned in requirements.txt; a broken install is said, not a traceback
        raise DicomError("DICOM needs pydicom (pip install -r requirements.txt)") from None
    try:
        # one parse; values over DEFER_SIZE (the pixel data) are read only when decoded, after the checks
        ds = pydicom.dcmread(_source(src), defer_size=DEFER_SIZE)
    except (InvalidDicomError, EOFError, ValueError, TypeError, OSError, KeyError, AttributeError) as e:
        raise DicomError(f"unreadable DICOM header ({type(e).__name__})") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomError(f"DICOM without an image ({_modality(ds)}: no pixel data)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in IMAGE_PHOTOMETRIC:
        raise DicomError(f"DICOM photometric interpretation {photometric or 'missing'!r}: only MONOCHROME1/2 "
                         f"radiographs are read")
    frames = int(_num(ds.get("NumberOfFrames"), 1))
    rows, cols = int(_num(ds.get("Rows"), 0)), int(_num(ds.get("Columns"), 0))
    if rows < 1 or cols < 1:
        raise DicomError("DICOM without rows and columns")
    if frames != 1:
        raise DicomError(f"DICOM with {frames} frames: one radiograph per file is read")
    if max_pixels and rows * cols > max_pixels:
        raise DicomError(f"{cols}x{rows} = {rows * cols} pixels, over the limit of {max_pixels} (prep.max_pixels)")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    syntax_name = getattr(syntax, "name", str(syntax or "unknown"))
    try:
        raw = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, TypeError, AttributeError, OSError, KeyError) as e:
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DicomError(f"DICOM pixels not decoded ({syntax_name}: {why})") from None
    if raw.ndim != 2:
        raise DicomError(f"DICOM pixel array of shape {raw.shape}: one gray frame is read")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
    slope, intercept = _num(ds.get("RescaleSlope"), 1.0), _num(ds.get("RescaleIntercept"), 0.0)
    window = None
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        window = "VOI LUT sequence"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _num(ds.WindowCenter, None), _num(ds.WindowWidth, None)
        if center is not None and width is not None and width >= 1:
            values = window_linear(values, center, width)
            window = {"center": center, "width": width}
    inverted = photometric == "MONOCHROME1"
    if inverted:
        values = values.max() + values.min() - values
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    info = {
        "format": "DICOM",
        "mode": photometric,
        "size": (cols, rows),
        "transfer_syntax": syntax_name,
        "bits_stored": int(_num(ds.get("BitsStored"), raw.dtype.itemsize * 8)),
        "rescale": {"slope": slope, "intercept": intercept},
        "window": window,
        "inverted": inverted,
        "pixel_spacing_mm": [float(x) for x in spacing][:2] if spacing is not None else None,
    }
    return values.astype(np.float32), info


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) onto 0..1: below ``c - 0.5 - (w - 1) / 2`` is 0,
    above ``c - 0.5 + (w - 1) / 2`` is 1, linear between."""
    lo = center - 0.5 - (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1) + 0.5) if width > 1 else (values > lo).astype(np.float64)
    return np.clip(out, 0.0, 1.0)


def conversions(info: dict) -> list[dict]:
    """What decoding this DICOM did, as ``imaging.conversions`` lists it for the manifest."""
    out = [{"kind": "format", "from": f"DICOM {info['transfer_syntax']}", "action": "decoded"}]
    r = info["rescale"]
    if (r["slope"], r["intercept"]) != (1.0, 0.0):
        out.append({"kind": "modality LUT", "from": f"slope {r['slope']:g}, intercept {r['intercept']:g}",
                    "action": "applied"})
    w = info["window"]
    out.append({"kind": "VOI", "from": w if isinstance(w, str) else (
        f"window center {w['center']:g} width {w['width']:g}" if w else "none"),
        "action": "applied" if w else "stored range used"})
    if info["inverted"]:
        out.append({"kind": "photometric", "from": "MONOCHROME1", "action": "inverted"})
    out.append({"kind": "bit depth", "from": f"{info['bits_stored']}-bit", "action": "8-bit from the window"})
    return out


def _modality(ds) -> str:
    return str(ds.get("Modality", "") or ds.get("SOPClassUID", "") or "unknown object")


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 12,
                slope: float = 1.0, intercept: float = 0.0, window: tuple[float, float] | None = None,
                compress: str = "", patient_id: str = "", spacing: float = 0.143, uid_seed: str = "") -> None:
    """A DX radiograph file (the synthetic generator's and the tests'): ``pixels`` are the stored values
    (uint16), ``compress`` '' or 'rle' (pydicom's own RLE Lossless encoder); ``uid_seed`` makes the
    UIDs, and so the file, the same on every run."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed]) if uid_seed else generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * PREAMBLE)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = patient_id or "ANON"
    ds.PatientName = f"Test^{patient_id or 'Anon'}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelSpacing = [spacing, spacing]
    if (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if window:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    if compress == "rle":
        ds.compress(RLELossless, encoding_plugin="pydicom")
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
