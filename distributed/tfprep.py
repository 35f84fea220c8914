"""The project's image preprocessing (:func:`data_prep.imaging.load_xray` after the decode) as TensorFlow ops.

An exported bundle (:mod:`distributed.export`) carries it in its SavedModel, so a server that decodes a
file to a grayscale array gets the network input prep and ``cxr-predict`` would make from that file:

1. resize to ``S x S`` as Pillow 10.4 does for ``img.resize((S, S), Image.BILINEAR, reducing_gap=1.3)``:
   an integer box pre-reduction by ``int(W / S / 1.3)`` (and ``int(H / S / 1.3)``) when that is above 1
   (``Image.reduce``: partial blocks at the right and bottom edges averaged over their own pixels), then
   the separable triangle filter (support 1 widened by the reduction factor, coefficients normalised per
   output pixel), horizontal pass then vertical;
2. per-image min-max to 0..255, rounded half to even (a constant image becomes all zeros).

``uint8`` input follows Pillow's 8-bit arithmetic bit for bit: box averages as
``((sum + n // 2) * floor(2**32 / (256 n))) >> 24`` (the multiplier computed in float32, as
``Reduce.c`` does), filter coefficients in 22-bit fixed point, each pass rounded to uint8, then the
min-max lookup table of ``imaging._lut``. ``uint16`` input follows the float path (``_load`` turns a
16-bit image into Pillow's mode ``F``): box averages and filter sums in float64 stored as float32
after each step, then ``imaging._minmax_float``. Both match ``load_xray`` exactly on the images of
``tests/unit/test_export.py`` (0 of their pixels differ); in the float path a sum taken in another
order could move a value by one float32 ulp and so, at a rounding boundary, one pixel by one grey level.

What this does not do, because it happens in the decoder: colour to gray (ITU-R 601 luma, Pillow's
``convert("L")``), and for JPEG the DCT-domain downscale ``load_xray`` asks libjpeg for
(``img.draft("L", (S, S))``: scale 1/8, 1/4 or 1/2, the largest ``d`` with ``d <= min(W // S, H // S)``;
``tf.io.decode_jpeg(..., ratio=d)`` is the same request).
"""
from __future__ import annotations

import tensorflow as tf

__all__ = ["REDUCING_GAP", "preprocess", "resize_like_pillow", "jpeg_draft_ratio", "to_float32"]

REDUCING_GAP = 1.3  # data_prep.imaging.REDUCING_GAP (a test keeps them equal)
_PRECISION_BITS = 22  # Resample.c: 32 - 8 - 2
_F64 = tf.float64


def to_float32(x):
    """``x`` (>= 0) rounded to float32, as a store into a float32 image rounds it, then back in float64 for
    the next step. The ``maximum`` keeps converters from folding the two casts into none (tf2onnx removes
    a float cast that feeds another cast, which would skip the rounding)."""
    return tf.cast(tf.maximum(tf.cast(x, tf.float32), 0.0), _F64)


def jpeg_draft_ratio(width: int, height: int, size: int) -> int:
    """The DCT scale denominator Pillow's ``draft("L", (size, size))`` asks libjpeg for (JpegImagePlugin)."""
    scale = min(width // size, height // size)
    return next((d for d in (8, 4, 2) if scale >= d), 1)


def _reduce_factor(n, size: int):
    """``int(n / size / reducing_gap) or 1`` (Image.resize), float64 as Python computes it."""
    f = tf.cast(tf.math.floor(tf.cast(n, _F64) / size / REDUCING_GAP), tf.int32)
    return tf.maximum(f, 1)


def _box_sums(x, fy, fx):
    """Sums over (fy, fx) blocks of a (N, H, W) float64 batch, the last row/column of blocks partial,
    and the number of pixels in each block: ((N, ceil(H/fy), ceil(W/fx)), (ceil(H/fy), ceil(W/fx)))."""
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    oh, ow = (h + fy - 1) // fy, (w + fx - 1) // fx
    pad = [[0, 0], [0, oh * fy - h], [0, ow * fx - w]]
    xp = tf.pad(x, pad)
    ones = tf.pad(tf.ones([1, h, w], _F64), pad)

    def blocks(a):
        a = tf.reshape(a, [tf.shape(a)[0], oh, fy, ow, fx])
        return tf.reduce_sum(a, axis=[2, 4])

    return blocks(xp), blocks(ones)[0]


def _reduce_u8(x, fy, fx):
    """``Image.reduce((fx, fy))`` of uint8 values held in float64 (Reduce.c, 8-bit)."""
    s, n = _box_sums(x, fy, fx)
    # division_UINT32(n, 8): (UINT32)(float(2**32) / float(256 n)), in float32
    mult = tf.math.floor(tf.cast(tf.constant(4294967296.0, tf.float32) / tf.cast(256.0 * n, tf.float32), _F64))
    amend = tf.math.floor(n / 2.0)
    # (ss * multiplier) >> 24 on UINT32: the product stays below 2**32, exact in float64
    return tf.math.floor((s + amend) * mult / 16777216.0)


def _reduce_f(x, fy, fx):
    """``Image.reduce((fx, fy))`` of a mode ``F`` image (Reduce.c, 32bpc): sum * (1 / n) in double, stored float32."""
    s, n = _box_sums(x, fy, fx)
    return to_float32(s * (1.0 / n))


def _coefficients(in_size, in1, out_size: int, out_first: bool):
    """Resample.c ``precompute_coeffs`` for the bilinear filter over the box [0, in1) of an axis of
    ``in_size`` pixels: a dense float64 matrix of each output pixel's normalised weights (zeros outside
    its window), (out_size, in_size) when ``out_first`` else (in_size, out_size). Built in the orientation
    each pass multiplies with, so that no transpose meets a matrix product (ONNX Runtime fuses the two
    into a kernel that has no float64 version)."""
    in1 = tf.cast(in1, _F64)  # float32: the box reaches C as float
    scale = in1 / out_size
    filterscale = tf.maximum(scale, 1.0)
    support = 1.0 * filterscale
    center = (tf.range(out_size, dtype=_F64) + 0.5) * scale  # in0 = 0
    xmin = tf.maximum(tf.math.floor(center - support + 0.5), 0.0)  # (int) truncates; negative values clamp to 0
    xmax = tf.minimum(tf.math.floor(center + support + 0.5), tf.cast(in_size, _F64))
    xs = tf.cast(tf.range(in_size), _F64)
    ax = 1 if out_first else 0  # the input axis
    if out_first:
        xs, c, lo, hi = xs[None, :], center[:, None], xmin[:, None], xmax[:, None]
    else:
        xs, c, lo, hi = xs[:, None], center[None, :], xmin[None, :], xmax[None, :]
    t = tf.abs((xs - c + 0.5) * (1.0 / filterscale))
    w = tf.where((xs >= lo) & (xs < hi) & (t < 1.0), 1.0 - t, 0.0)
    ww = tf.reduce_max(tf.math.cumsum(w, axis=ax), axis=ax, keepdims=True)  # summed in input order, as in C
    return tf.where(ww != 0.0, w / tf.where(ww != 0.0, ww, 1.0), w)


def _passes(x, size: int, in1_w, in1_h, coefficients, between):
    """Horizontal pass ``x @ kx`` (N, H, S), ``between`` (the rounding Pillow does after it), then the
    vertical pass ``ky @ t``: (N, S, S)."""
    kx = coefficients(_coefficients(tf.shape(x)[2], in1_w, size, out_first=False))  # (W, S)
    ky = coefficients(_coefficients(tf.shape(x)[1], in1_h, size, out_first=True))  # (S, H)
    t = between(tf.matmul(x, kx[None]))
    return tf.matmul(ky[None], t)


def _resample_u8(x, size: int, in1_w, in1_h):
    """ImagingResample, 8-bit: 22-bit fixed-point coefficients, horizontal pass, uint8, vertical, uint8."""
    def fixed(k):  # normalize_coeffs_8bpc (coefficients are >= 0 for this filter)
        return tf.math.floor(0.5 + k * float(1 << _PRECISION_BITS))

    def clip8(s):  # clip8(ss0) with ss0 starting at 1 << (PRECISION_BITS - 1)
        v = tf.math.floor((s + float(1 << (_PRECISION_BITS - 1))) / float(1 << _PRECISION_BITS))
        return tf.clip_by_value(v, 0.0, 255.0)

    # integer products below 2**30, sums below 2**31: exact in float64
    return clip8(_passes(x, size, in1_w, in1_h, fixed, clip8))


def _resample_f(x, size: int, in1_w, in1_h):
    """ImagingResample, mode ``F``: double sums, float32 after each pass."""
    return tf.cast(_passes(x, size, in1_w, in1_h, lambda k: k, to_float32), tf.float32)


def resize_like_pillow(images, size: int):
    """(N, H, W) uint8 or uint16 -> (N, size, size): uint8 input as Pillow resizes mode ``L`` (uint8
    out), uint16 input as Pillow resizes mode ``F`` (float32 out); reducing_gap 1.3, bilinear."""
    eight = images.dtype == tf.uint8
    x = tf.cast(images, _F64)  # exact for uint8 and uint16
    h, w = tf.shape(x)[1], tf.shape(x)[2]
    fx, fy = _reduce_factor(w, size), _reduce_factor(h, size)
    reduced = (fx > 1) | (fy > 1)
    if eight:
        x = tf.cond(reduced, lambda: _reduce_u8(x, fy, fx), lambda: x)
    else:
        x = tf.cond(reduced, lambda: _reduce_f(x, fy, fx), lambda: x)
    # the box after the reduction, (0, 0, W / fx, H / fy), reaches C as float32: the float32 quotient of
    # two integers is the double one rounded to float32 (and needs no cast of a cast)
    in1_w = tf.cast(w, tf.float32) / tf.cast(fx, tf.float32)
    in1_h = tf.cast(h, tf.float32) / tf.cast(fy, tf.float32)
    if eight:
        return tf.cast(_resample_u8(x, size, in1_w, in1_h), tf.uint8)
    return _resample_f(x, size, in1_w, in1_h)


def _minmax(a):
    """Per-image min-max to uint8 of (N, S, S) float32 values: ``imaging._lut`` / ``_minmax_float``."""
    lo = tf.reduce_min(a, axis=[1, 2], keepdims=True)
    hi = tf.reduce_max(a, axis=[1, 2], keepdims=True)
    span = tf.cast(hi, _F64) - tf.cast(lo, _F64)
    k = tf.cast(255.0 / tf.where(span > 0, span, 1.0), tf.float32)  # 255.0 / (hi - lo) in double, then float32
    out = tf.clip_by_value(tf.math.round((a - lo) * k), 0.0, 255.0)  # round half to even, as np.round/np.rint
    return tf.cast(tf.where(span > 0, out, tf.zeros_like(out)), tf.uint8)


def preprocess(images, size: int):
    """(N, H, W) or (H, W) uint8/uint16 grayscale -> (N, size, size) uint8, as ``load_xray`` (module doc)."""
    images = tf.convert_to_tensor(images)
    if images.dtype not in (tf.uint8, tf.uint16):
        raise TypeError(f"grayscale images are uint8 or uint16, not {images.dtype.name}")
    if images.shape.rank == 2:
        images = images[None]
    resized = resize_like_pillow(images, size)
    return _minmax(tf.cast(resized, tf.float32))
