"""The one image preprocessing function, shared by the prep stage and ``distributed.predict``.

``load_xray(path, size)`` decodes a chest X-ray file and returns a ``uint8`` ``(size, size)`` array
and an ``info`` dict. Steps:

1. decode with Pillow's PNG or JPEG decoder (8/16-bit), or a DICOM radiograph by its content
   (:mod:`data_prep.dicom`: modality and VOI LUTs, MONOCHROME1 inverted), no other format; zero-byte, truncated,
   non-image, other-format input and images over ``max_pixels`` (default 50 M, ``prep.max_pixels``;
   checked from the header, before decoding) raise ``ImageError(reason)`` with a short reason;
2. colour (RGB, RGBA, LA, P, CMYK, 1-bit) becomes 8-bit gray (ITU-R 601 luma; alpha dropped) and the
   conversion is recorded in ``info['converted_from']``; 16/32-bit and float images stay in float
   and are scaled later by their own min..max (never clipped to 8 bits first). A PNG with 16 bits
   per colour channel (RGB, RGBA), which Pillow decodes to 8 bits by dropping each value's low byte,
   is decoded a second time for the low bytes: its luma is computed from the full 16-bit values;
3. resize to ``size x size`` with anti-aliasing: Pillow's separable filter (its support widens with
   the reduction factor, so it low-passes) after an integer box pre-reduction (``reducing_gap``),
   all in uint8 for 8-bit input; aspect ratio is not kept (NIH images are square);
4. per-image min-max to the full 0..255 range (the article's normalisation); a constant image
   becomes all zeros.

Everything that made the input differ from the expected 8-bit square grayscale PNG is listed in
``info['conversions']``, one ``{"kind", "from", "action"}`` per difference (kinds: ``mode``,
``bit depth``, ``format``, ``aspect``), so the prep stage can put each on record in its manifest.

Decoding dominates its cost: the resize of an 8-bit image stays in uint8 and the min-max is a 256-entry
lookup table (``python -m benchmarks prep`` compares it with a bare decode; results in BENCHMARKS.md).
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from data_prep import dicom  # pydicom itself is imported only for DICOM input

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a half-grey image
# Only these decoders run on input from others (Pillow would also hand EPS to Ghostscript, ...).
FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 50_000_000  # prep.max_pixels' default: a larger image is refused from its header, never decoded

# Modes decoded as integers/floats wider than 8 bits: scaled by their real range.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
# reducing_gap: Pillow first box-reduces by the integer factor int(scale / gap) (a proper low-pass),
# then the bilinear filter does the rest. 1.3 makes 1024 -> 384 a 2x box reduce + 512 -> 384 bilinear:
# cheaper than filtering the full image, and within a grey level of it on average.
REDUCING_GAP = 1.3
RESAMPLE = Image.BILINEAR


class ImageError(Exception):
    """An unreadable image; ``reason`` is short and meant for the manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _open(src):
    """Open lazily (PNG or JPEG only) from a path, bytes or a binary file object; raise ImageError
    for bad input."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("zero-byte file")
        fp = io.BytesIO(bytes(src))
    elif hasattr(src, "read"):
        fp = src
    else:
        p = os.fspath(src)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise ImageError("file not found") from None
        except OSError as e:
            raise ImageError(f"cannot stat file: {e.strerror or e}") from None
        if not os.path.isfile(p):
            raise ImageError("not a regular file")
        if st.st_size == 0:
            raise ImageError("zero-byte file")
        fp = p
    try:
        img = Image.open(fp, formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError("not an image (or not PNG or JPEG: other formats are not decoded)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot open image: {e}") from None
    return img


def _minmax_pil(img: Image.Image) -> np.ndarray:
    """Per-image min-max of an 8-bit PIL image through a lookup table, in Pillow's C code."""
    a = np.asarray(img)
    lo, hi = int(a.min()), int(a.max())
    if hi == lo:
        return np.zeros_like(a)
    if lo == 0 and hi == 255:
        return np.array(a)  # writable copy
    return np.array(img.point(_lut(lo, hi)))


def _lut(lo: int, hi: int) -> list[int]:
    lut = np.round((np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo)))
    return np.clip(lut, 0, 255).astype(np.uint8).tolist()


def _minmax_u8(a: np.ndarray) -> np.ndarray:
    """Per-image min-max of a uint8 array to 0..255 through a lookup table."""
    lo, hi = int(a.min()), int(a.max())
    if lo == 0 and hi == 255:
        return a
    if hi == lo:
        return np.zeros_like(a)
    lut = np.clip(np.round((np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return lut[a]


def _minmax_float(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    out = (a - lo) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_xray(src, size: int, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Decode, convert to gray, resize (anti-aliased) and min-max one image.

    ``src`` is a path, ``bytes`` or a binary file object. Returns ``(uint8 (size, size), info)``
    with ``info = {"mode", "format", "width", "height", "bits", "converted_from", "conversions"}``
    (``converted_from`` is ``None`` unless a colour image was turned into gray; ``conversions``
    lists every difference from an 8-bit square grayscale PNG and what was done, see the module).
    Raises ``ImageError`` with a short reason for anything unreadable, for a format other than PNG
    and JPEG, and for more than ``max_pixels`` pixels (read from the header; nothing decoded).
    """
    arr, info, _ = _load_checked(src, size, keep_original=False, max_pixels=max_pixels)
    return arr, info


def load_xray_and_original(src, size: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`load_xray` plus the same gray image, min-maxed, at its original size (``cxr-predict
    --gradcam`` draws its overlay on it): ``(uint8 (size, size), uint8 (height, width), info)``.
    One decode, except for a JPEG: :func:`load_xray` decodes it downscaled in the DCT domain, so its
    network input comes from a second, identical decode and predictions do not depend on --gradcam."""
    arr, info, original = _load_checked(src, size, keep_original=True)
    if info.get("format") == "JPEG":
        arr, info, _ = _load_checked(src, size, keep_original=False)
    return arr, original, info


def _load_checked(src, size, keep_original: bool, max_pixels: int = MAX_PIXELS):
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    try:
        if dicom.looks_like_dicom(src):
            return _load_dicom(src, size, keep_original, max_pixels)
        arr, info, original = _load(src, size, keep_original, max_pixels)
    except (ImageError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem, never the caller's
        raise ImageError(f"cannot decode: {type(e).__name__}: {e}") from None
    info["conversions"] = conversions(info)
    return arr, info, original


def _load_dicom(src, size: int, keep_original: bool, max_pixels: int):
    """A DICOM radiograph (:mod:`data_prep.dicom`: modality and VOI LUTs, MONOCHROME1 inverted), then
    resized and min-maxed as any wide gray image."""
    try:
        values, d = dicom.read_dicom(src, max_pixels)
    except dicom.DicomError as e:
        raise ImageError(e.reason) from None
    h, w = values.shape
    info = {"mode": d["mode"], "format": "DICOM", "width": w, "height": h, "bits": d["bits_stored"],
            "converted_from": None, "dicom": d}
    img = Image.fromarray(values, mode="F")
    original = _minmax_float(values) if keep_original else None
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    info["conversions"] = dicom.conversions(d) + ([{"kind": "aspect", "from": f"{w}x{h}",
                                                    "action": f"resized, aspect {w / h:.2f} -> 1.00"}]
                                                  if w != h else [])
    return _minmax_float(np.asarray(img, dtype=np.float32)), info, original


CONVERSION_KINDS = ("mode", "bit depth", "format", "aspect")


def conversions(info: dict) -> list[dict]:
    """What differed from an 8-bit square grayscale PNG, and what ``load_xray`` did about it:
    ``[{"kind", "from", "action"}, ...]`` (empty for the expected input)."""
    out = []
    bits = info.get("bits", 8)
    if info.get("converted_from"):
        out.append({"kind": "mode", "from": info["converted_from"],
                    "action": ("converted to 8-bit gray" if bits == 8
                               else f"converted to gray from its {bits}-bit values")})
    if bits != 8:
        source = f"{info['mode']} {bits}-bit per channel" if info.get("converted_from") else info["mode"]
        out.append({"kind": "bit depth", "from": source, "action": f"{bits}-bit values scaled to 8 bit "
                                                                  "by their own min..max"})
    if info.get("format") != "PNG":
        out.append({"kind": "format", "from": f"{info.get('format') or 'unknown'} content",
                    "action": "decoded by content"})
    w, h = info["width"], info["height"]
    if w != h:
        out.append({"kind": "aspect", "from": f"{w}x{h}", "action": f"resized, aspect {w / h:.2f} -> 1.00"})
    return out


def _rewind(src):
    """``src`` ready to be opened again (a file object back at its start)."""
    if hasattr(src, "read") and hasattr(src, "seek"):
        src.seek(0)
    return src


def _color16_luma(src, rawmode: str, hi: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (float32) of a 16-bit-per-channel colour PNG from its full values: ``hi`` holds
    the high bytes (Pillow's decode), a second decode with the little-endian unpacker gives the low ones."""
    low = _open(_rewind(src))
    try:
        t = low.tile[0]
        args = t[3]
        swapped = rawmode[:-1] + "L"  # "RGB;16B" -> "RGB;16L": each sample's second byte
        low.tile = [(t[0], t[1], t[2], (swapped, *args[1:]) if isinstance(args, tuple) else swapped)]
        low.load()
        lo = np.asarray(low)
    finally:
        low.close()
    if lo.shape != hi.shape:
        raise ImageError("16-bit colour image: the two decodes differ")
    v = hi[..., :3].astype(np.float32) * 256.0 + lo[..., :3]
    return v[..., 0] * np.float32(0.299) + v[..., 1] * np.float32(0.587) + v[..., 2] * np.float32(0.114)


def _load(src, size: int, keep_original: bool = False,
          max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict, np.ndarray | None]:
    img = _open(src)
    try:
        mode, fmt = img.mode, img.format
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageError(f"empty image ({w}x{h})")
        if max_pixels and w * h > max_pixels:  # from the header: nothing decoded yet
            raise ImageError(f"image too large: {w}x{h} = {w * h} pixels, more than prep.max_pixels={max_pixels}; "
                             f"not decoded")
        info = {"mode": mode, "format": fmt, "width": w, "height": h, "bits": 8, "converted_from": None}
        if fmt == "JPEG" and mode in ("L", "RGB", "CMYK", "YCbCr") and not keep_original:
            img.draft("L", (size, size))  # DCT-domain downscale: never below the asked size
        args = img.tile[0][3] if fmt == "PNG" and len(img.tile) == 1 else None
        rawmode = args[0] if isinstance(args, tuple) and args else args
        color16 = mode in ("RGB", "RGBA") and rawmode in ("RGB;16B", "RGBA;16B")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            msg = str(e).lower()
            if "truncat" in msg or "eof" in msg or isinstance(e, EOFError):
                raise ImageError("truncated image data") from None
            raise ImageError(f"corrupt image data: {e}") from None
        except Image.DecompressionBombError as e:
            raise ImageError(f"image too large: {e}") from None
        mode = img.mode
        if color16:  # Pillow kept only each value's high byte: the full values, then as a wide gray image
            info["bits"], info["converted_from"] = 16, mode
            img = Image.fromarray(_color16_luma(src, rawmode, np.asarray(img)), mode="F")
            mode = "F"
        if mode in _WIDE_MODES:
            if not color16:
                info["bits"] = 16 if mode.startswith("I;16") else 32
            if mode != "F":
                img = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F")
            original = _minmax_float(np.asarray(img, dtype=np.float32)) if keep_original else None
            if img.size != (size, size):
                img = img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
            return _minmax_float(np.asarray(img, dtype=np.float32)), info, original
        if mode != "L":
            info["converted_from"] = mode
            if mode in ("LA", "La"):
                img = img.getchannel(0)
            elif mode == "P":
                img = img.convert("RGBA").convert("L")
            else:
                img = img.convert("L")
        original = _minmax_pil(img) if keep_original else None
        if img.size != (size, size):
            img = img.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
        return _minmax_pil(img), info, original
    finally:
        img.close()
