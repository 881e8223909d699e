"""Pixels: what kind they are, whether their declared size is sane (checked before anything is
inflated or read whole), decoding to HU, copies of one instance, and de-tilting a sheared stack.

Uncompressed little-endian 16-bit pixels are read straight from the file's bytes with numpy (as pydicom
would, unused high bits included); other transfer syntaxes are decoded by pydicom, with pylibjpeg for
compressed ones (JPEG Lossless, JPEG-LS, JPEG 2000...)."""

from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...core.errors import InputError
from ...core.volume import Geometry
from .geometry import Tilt, detilt_extent
from .messages import short
from .scan import PIXEL_DATA_TAG, SCAN_THREADS, Slice
from .sources import member_bytes

NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # pixels need no decoder
HEADER_AND_TRAILER_SLACK = 1 << 20  # bytes a file may hold beyond its header and pixels (trailing padding)
MAX_SERIES_PIXEL_BYTES = 16 << 30  # stored pixels of one series: past this, refuse instead of swapping


def check_pixel_kind(s: Slice) -> None:
    ds = s.header
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise InputError(
            f"{s.member.display} is a colour image ({photometric}, {samples} samples per pixel): "
            "a greyscale CT in HU is needed"
        )
    if s.frames > 1 and s.frame is None:
        raise InputError(
            f"{s.member.display} is a multi-frame image ({s.frames} frames) without per-frame functional groups "
            "(not an Enhanced CT): export the series as Enhanced CT or as single-frame (classic) CT images"
        )


def transfer_syntax(header) -> str:
    """The file's transfer syntax; for a file without meta information (no preamble), the encoding
    pydicom found when it parsed it (those files are uncompressed)."""
    syntax = str((getattr(header, "file_meta", None) or {}).get("TransferSyntaxUID", ""))
    if syntax:
        return syntax
    implicit, little_endian = getattr(header, "original_encoding", (None, None))
    if not little_endian:
        return ""
    return "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"


def _syntax(s: Slice) -> str:
    return transfer_syntax(s.header)


def expected_pixel_bytes(s: Slice) -> int:
    """Stored pixel bytes of the whole object (all frames): Rows x Columns x frames x BitsAllocated."""
    bits = int(s.header.get("BitsAllocated", 16) or 16)
    return s.rows * s.columns * s.frames * ((bits + 7) // 8)


def check_declared_sizes(slices: list[Slice]) -> None:
    """Before any pixel is read: each file (or the size its ZIP entry declares) and its PixelData
    element must fit Rows x Columns x frames x bits, and the series a total limit."""
    objects = {s.member.display: s for s in slices}.values()  # one check per file, not per frame
    total = 0
    for s in objects:
        expected = expected_pixel_bytes(s)
        total += expected
        encapsulated = _syntax(s) not in NATIVE_LITTLE_ENDIAN and _syntax(s) != "1.2.840.10008.1.2.2"
        allowed = (s.pixel_offset or 0) + expected * (2 if encapsulated else 1) + HEADER_AND_TRAILER_SLACK
        declared = s.pixel_length if (s.pixel_length is not None and not encapsulated) else None
        if s.member.size > allowed or (declared is not None and declared > expected + 1):
            claim = f"a PixelData of {declared} bytes" if declared and declared > expected + 1 else f"{s.member.size} bytes"
            raise InputError(
                f"{s.member.display} declares {claim} for {s.frames} frame(s) of {s.columns} x {s.rows} pixels "
                f"({expected} bytes of pixels): refused before reading it (corrupted or hostile file?)"
            )
    if total > MAX_SERIES_PIXEL_BYTES:
        raise InputError(f"the series holds {total / 2**30:.1f} GiB of pixels, more than the {MAX_SERIES_PIXEL_BYTES >> 30} GiB "
                         "this reader accepts: pass a smaller series")


def _native_pixels(s: Slice, data: bytes) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian 16-bit object as (frames, rows, columns), read from
    the file's bytes with numpy (a view, no copy), or None when this file needs pydicom's decoders.
    Unused high bits are corrected as pydicom does (masked when unsigned, sign-extended when signed)."""
    ds, offset = s.header, s.pixel_offset
    syntax = _syntax(s)
    if offset is None or syntax not in NATIVE_LITTLE_ENDIAN or int(ds.get("BitsAllocated", 0) or 0) != 16:
        return None
    if data[offset : offset + 4] != PIXEL_DATA_TAG:
        return None
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    if syntax == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        (length,), start = struct.unpack("<I", data[offset + 4 : offset + 8]), offset + 8
    elif data[offset + 4 : offset + 6] in (b"OW", b"OB"):  # explicit VR: tag, VR, 2 reserved, length
        (length,), start = struct.unpack("<I", data[offset + 8 : offset + 12]), offset + 12
    else:
        return None
    count = s.rows * s.columns * s.frames
    if length != 2 * count or start + length > len(data) or not 1 <= bits_stored <= 16:
        return None  # undefined length (encapsulated) or a size pydicom should judge
    pixels = np.frombuffer(data, "<i2" if signed else "<u2", count, start).reshape(s.frames, s.rows, s.columns)
    if bits_stored < 16:
        shift = 16 - bits_stored
        if signed and (pixels.min() < -(1 << (bits_stored - 1)) or pixels.max() >= 1 << (bits_stored - 1)):
            pixels = (pixels << shift) >> shift
        elif not signed and pixels.max() >= 1 << bits_stored:
            pixels = pixels & np.uint16((1 << bits_stored) - 1)
    return pixels


def object_pixels(s: Slice) -> np.ndarray:
    """Stored pixels of the whole object ``s`` belongs to, as (frames, rows, columns)."""
    import pydicom

    try:
        data = s.data if s.data is not None else member_bytes(s.member)  # one read: ZIP inflation runs outside the GIL
        pixels = _native_pixels(s, data)
        if pixels is None:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            if "TransferSyntaxUID" not in ds.file_meta and _syntax(s):
                ds.file_meta.TransferSyntaxUID = _syntax(s)  # a file without meta information
            pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a corrupted file for the user
        raise InputError(f"cannot decode the pixels of {s.member.display}: {short(exc)} (corrupted or unsupported compression?)") from None
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape != (s.frames, s.rows, s.columns):
        raise InputError(f"{s.member.display}: pixel data of shape {pixels.shape[-2:]} does not match Rows x Columns {s.rows}x{s.columns}")
    return pixels


def _hu_range(pixels: np.ndarray, s: Slice) -> tuple[float, float]:
    lo, hi = float(pixels.min()), float(pixels.max())
    if s.slope < 0:
        lo, hi = hi, lo
    return lo * s.slope + s.intercept, hi * s.slope + s.intercept


def _hu_dtype(slices: list[Slice], ranges: list[tuple[float, float]]):
    """int16 when the HU are integers that fit, int32 when wider, float32 when a slope or intercept is
    fractional (keep the fractions)."""
    integral = all(s.slope == round(s.slope) and s.intercept == round(s.intercept) for s in slices)
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if integral and -32768 <= low and high <= 32767:
        return np.int16
    if integral and -(2**31) <= low and high < 2**31:
        return np.int32
    return np.float32


def stack_hu(slices: list[Slice]) -> np.ndarray:
    """The planes' HU as one (planes, rows, columns) array, each file decoded once (all its frames)."""
    by_object: dict[str, np.ndarray] = {}
    first_of = {s.member.display: s for s in reversed(slices)}
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        for key, pixels in zip(first_of, pool.map(object_pixels, first_of.values())):
            by_object[key] = pixels
    planes = [by_object[s.member.display][s.frame or 0] for s in slices]
    dtype = _hu_dtype(slices, [_hu_range(p, s) for p, s in zip(planes, slices)])
    out = np.empty((len(planes),) + planes[0].shape, dtype=dtype)

    def convert(k: int) -> None:
        pixels, s = planes[k], slices[k]
        if dtype == np.float32:
            out[k] = pixels.astype(np.float64) * s.slope + s.intercept
        elif s.slope == 1 and pixels.dtype.itemsize <= 2:
            # The common CT case, in one pass: 16-bit storage + intercept, computed in int32
            # (exact) and stored in the output type, which the range above says holds it.
            np.add(pixels, np.int32(s.intercept), out=out[k], casting="unsafe")
        else:
            out[k] = pixels.astype(np.int64) * int(s.slope) + int(s.intercept)

    with ThreadPoolExecutor(SCAN_THREADS) as pool:  # numpy releases the GIL
        list(pool.map(convert, range(len(planes))))
    for s in slices:
        s.data = None  # the file bytes kept by the scan are no longer needed
    return out


def drop_identical_copies(slices: list[Slice]) -> list[Slice]:
    """The same SOP instance found twice (a copied file) is kept once; two files with one
    SOPInstanceUID but different pixels are an error: one of them is not what it claims to be."""
    unique: dict[tuple[str, int], Slice] = {}
    for s in slices:
        kept = unique.setdefault(s.instance_key, s)
        if kept is not s and not _same_plane(kept, s):
            first, second = sorted((kept.display, s.display))
            raise InputError(
                f"two files with the same SOPInstanceUID {s.sop_uid} hold different pixels: {first} and "
                f"{second} (an edited copy?): remove one"
            )
    return list(unique.values())


def _same_plane(a: Slice, b: Slice) -> bool:
    if member_bytes(a.member) == member_bytes(b.member):
        return True
    hu_a = object_pixels(a)[a.frame or 0] * a.slope + a.intercept
    hu_b = object_pixels(b)[b.frame or 0] * b.slope + b.intercept
    return hu_a.shape == hu_b.shape and np.array_equal(hu_a, hu_b)


# ---------------------------------------------------------------------------------------------
# De-tilting
# ---------------------------------------------------------------------------------------------
def _resample_axis(image: np.ndarray, offset: float, length: int, axis: int, padding: float) -> np.ndarray:
    """``image`` sampled at t + offset (t = 0..length-1) along ``axis``: linear between pixel centres,
    the edge pixel within half a pixel outside it (a pixel covers its square), ``padding`` beyond."""
    n = image.shape[axis]
    t = np.arange(length) + offset
    inside = (t >= -0.5) & (t <= n - 0.5)
    clamped = np.clip(t, 0, n - 1)
    low = np.floor(clamped).astype(int)
    high = np.minimum(low + 1, n - 1)
    shape = [1, 1]
    shape[axis] = length
    weight = (clamped - low).reshape(shape)
    values = np.take(image, low, axis) * (1 - weight) + np.take(image, high, axis) * weight
    return np.where(inside.reshape(shape), values, padding)


def detilt_stack(array: np.ndarray, tilt: Tilt, target: Geometry, padding: float) -> np.ndarray:
    """Resample a sheared stack onto ``target`` (from ``geometry.detilted``): each plane moves within its
    own plane by its drift, bilinear in plane and never across planes, as dcm2niix's ``_Tilt_1``."""
    first_column, _ = detilt_extent(tilt.shift_columns)
    first_row, _ = detilt_extent(tilt.shift_rows)
    _, rows, columns = target.shape
    out = np.empty(target.shape, np.float32)
    for k in range(array.shape[0]):
        plane = array[k].astype(np.float64)
        plane = _resample_axis(plane, first_row - tilt.shift_rows[k], rows, 0, padding)
        out[k] = _resample_axis(plane, first_column - tilt.shift_columns[k], columns, 1, padding)
    return out
