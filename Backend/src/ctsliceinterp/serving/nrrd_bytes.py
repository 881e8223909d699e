"""NRRD bytes <-> Volume, the wire format between the client and the server.

Numpy and the standard library only, so the client works in Slicer's Python without SimpleITK.
Only geometry crosses the wire: the header carries the LPS space, the space directions
(direction columns times spacing), the space origin, and the slice thickness (the NRRD
``thicknesses`` field, which the acquisition model needs). Nothing from ``Volume.metadata``
else is ever written, so DICOM tags and patient identifiers stay where they are.

``volume_from_nrrd_bytes`` parses untrusted input (the server's upload parser): every field is
validated, the voxel count is checked before anything is allocated, and gzip data is inflated
with a bound, so a malformed or hostile header gets an ``InputError`` naming the problem.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import numpy as np

from ..core.errors import CTSliceInterpError, InputError
from ..core.volume import Geometry, Volume

MAGIC = re.compile(rb"^NRRD000[1-5]$")
MAX_HEADER_BYTES = 64 * 1024
INFLATE_CHUNK = 4 * 1024 * 1024
# gzip data declaring less than this is never refused for its ratio (a small all-zero test
# volume may compress 100-fold; a bomb has to be large to matter).
GZIP_RATIO_FLOOR = 16 * 1024 * 1024
# NRRD type names (all spellings in the NRRD spec) -> numpy dtype name.
_TYPES = {
    "int8": "i1", "signed char": "i1", "int8_t": "i1",
    "uint8": "u1", "uchar": "u1", "unsigned char": "u1", "uint8_t": "u1",
    "int16": "i2", "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2", "int16_t": "i2",
    "uint16": "u2", "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2", "uint16_t": "u2",
    "int32": "i4", "int": "i4", "signed int": "i4", "int32_t": "i4",
    "uint32": "u4", "uint": "u4", "unsigned int": "u4", "uint32_t": "u4",
    "float": "f4", "double": "f8",
}
_WRITE_TYPES = {"i1": "int8", "u1": "uint8", "i2": "int16", "u2": "uint16", "i4": "int32", "u4": "uint32", "f4": "float", "f8": "double"}
# Spaces we accept, and the sign flip that takes them to LPS.
_SPACES = {
    "left-posterior-superior": (1, 1, 1), "lps": (1, 1, 1), "3d-left-handed": None,
    # scanner-xyz and 3D-right-handed are read as LPS, as ITK (and so our file reader) does.
    "right-anterior-superior": (-1, -1, 1), "ras": (-1, -1, 1), "scanner-xyz": (1, 1, 1), "3d-right-handed": (1, 1, 1),
    "left-anterior-superior": (1, -1, 1), "las": (1, -1, 1),
}
_VECTOR = re.compile(r"\(\s*([^()]*?)\s*\)")


# --- writing ---------------------------------------------------------------------------------
def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def nrrd_header(volume: Volume, encoding: str = "gzip") -> bytes:
    """The header (ending in the blank line) for ``volume``'s array stored little-endian."""
    dtype = np.dtype(volume.array.dtype)
    if dtype.kind not in "iuf" or dtype.str[1:] not in _WRITE_TYPES:
        raise InputError(f"voxel type {dtype} cannot be sent as NRRD; use an integer or float32/64 volume")
    g = volume.geometry
    columns = g.affine[:3, :3]  # column k = axis k direction * spacing
    lines = [
        "NRRD0004",
        "# CTSliceInterp volume: geometry only, LPS",
        f"type: {_WRITE_TYPES[dtype.str[1:]]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {g.shape[2]} {g.shape[1]} {g.shape[0]}",
        "space directions: " + " ".join(_vector(columns[:, k]) for k in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {encoding}",
        "space origin: " + _vector(g.origin),
    ]
    thickness = volume.metadata.get("slice_thickness")
    try:
        thickness = float(thickness) if thickness is not None else None
    except (TypeError, ValueError):
        thickness = None
    if thickness is not None and thickness > 0 and math.isfinite(thickness):
        lines.append(f"thicknesses: nan nan {thickness!r}")
    if volume.metadata.get("method"):
        lines.append(f"ctsliceinterp_method:={_safe_value(volume.metadata['method'])}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def _safe_value(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", str(value))[:64]


def little_endian_array(volume: Volume) -> np.ndarray:
    """The array as contiguous little-endian data (no copy when it already is)."""
    dtype = np.dtype(volume.array.dtype).newbyteorder("<")
    return np.ascontiguousarray(volume.array, dtype=dtype)


def volume_to_nrrd_parts(volume: Volume, gzip: bool = True, level: int = 1) -> tuple[bytes, memoryview | bytes]:
    """(header, payload): one attached NRRD file in two pieces, to be sent one after the other.

    Raw: the payload is a view of the array's own memory (no copy of the voxels when the array
    is already contiguous little-endian). ``level`` 1 compresses CT about as well as 6 at a
    fraction of the time."""
    data = little_endian_array(volume)
    header = nrrd_header(volume, "gzip" if gzip else "raw")
    if gzip:
        compressor = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container
        return header, compressor.compress(memoryview(data).cast("B")) + compressor.flush()
    return header, memoryview(data).cast("B")


def volume_to_nrrd_bytes(volume: Volume, gzip: bool = True, level: int = 1) -> bytes:
    """The volume as one attached NRRD file (gzip or raw encoding)."""
    header, payload = volume_to_nrrd_parts(volume, gzip, level)
    return header + payload


# --- reading ---------------------------------------------------------------------------------
def _split_header(data: bytes | bytearray | memoryview) -> tuple[list[str], int]:
    head = bytes(data[:MAX_HEADER_BYTES]) if isinstance(data, memoryview) else data
    end = head.find(b"\n\n", 0, MAX_HEADER_BYTES)
    crlf_end = head.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES)
    if crlf_end >= 0 and (end < 0 or crlf_end < end):
        end, sep = crlf_end, 4
    else:
        sep = 2
    if end < 0:
        if len(data) < MAX_HEADER_BYTES:
            raise InputError("the NRRD header is incomplete: no blank line ends it (truncated upload?)")
        raise InputError(f"the NRRD header is longer than {MAX_HEADER_BYTES // 1024} KiB")
    try:
        text = bytes(head[:end]).decode("ascii")
    except UnicodeDecodeError:
        raise InputError("the NRRD header contains non-ASCII bytes") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if not MAGIC.match(lines[0].strip().encode()):
        raise InputError("not a NRRD file: the data does not start with NRRD0001..NRRD0005")
    return lines[1:], end + sep


def _parse_fields(lines: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    fields: dict[str, str] = {}
    key_values: dict[str, str] = {}
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        if ":=" in line:
            key, value = line.split(":=", 1)
            key_values[key.strip()] = value.strip()
            continue
        if ": " not in line:
            raise InputError(f"malformed NRRD header line {line[:60]!r}")
        key, value = line.split(": ", 1)
        key = key.strip().lower()
        if key in fields:
            raise InputError(f"the NRRD field {key!r} appears twice")
        fields[key] = value.strip()
    return fields, key_values


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(f"NRRD {what} must be numbers, got {text[:60]!r}") from None
    return values


def _parse_vectors(text: str, what: str) -> list[list[float]]:
    vectors = []
    for token in text.split():
        if token.lower() == "none":
            raise InputError(f"NRRD {what} contains 'none': a scalar 3-D volume has three spatial axes")
    for match in _VECTOR.finditer(text):
        vectors.append(_floats(match.group(1), what))
    if not vectors or any(len(v) != 3 for v in vectors):
        raise InputError(f"NRRD {what} must be 3-vectors like (x,y,z), got {text[:80]!r}")
    return vectors


def _require_finite(values, what: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"NRRD {what} must be finite numbers")


class VolumeTooLarge(InputError):
    """The header declares more bytes of voxel data than the caller allows, or more than a gzip
    body can hold (checked before anything is inflated or allocated)."""


def volume_from_nrrd_bytes(data: bytes, max_voxels: int | None = None, max_bytes: int | None = None,
                           max_gzip_ratio: float | None = None) -> Volume:
    """Parse an attached NRRD (raw or gzip) into a Volume with its LPS geometry.

    Raises ``InputError`` naming the problem for anything malformed: dimension other than 3,
    unsupported type or encoding, non-positive spacing, more than ``max_voxels`` voxels,
    truncated or extra data; and ``VolumeTooLarge`` (also an ``InputError``) for more than
    ``max_bytes`` bytes of voxel data, or gzip data that would inflate more than
    ``max_gzip_ratio`` times (a decompression bomb).
    gzip data is inflated into one buffer of the declared size, never more."""
    try:
        return _volume_from_nrrd_bytes(data, max_voxels, max_bytes, max_gzip_ratio)
    except CTSliceInterpError:
        raise
    except (ValueError, OverflowError, TypeError, MemoryError) as exc:  # last line of defence: never a 500
        raise InputError(f"the NRRD data cannot be read: {exc}") from None


def _volume_from_nrrd_bytes(data, max_voxels: int | None, max_bytes: int | None, max_gzip_ratio: float | None) -> Volume:
    if isinstance(data, np.ndarray):  # a receive buffer (uint8): the volume shares its memory
        data = memoryview(data.reshape(-1)).cast("B")
    if isinstance(data, memoryview):
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    elif not isinstance(data, (bytes, bytearray)):
        data = bytes(data)  # a bytearray or writable view is kept: the array shares (and may write) its memory
    lines, offset = _split_header(data)
    fields, key_values = _parse_fields(lines)

    if fields.get("dimension") != "3":
        raise InputError(f"the NRRD dimension must be 3 (a scalar 3-D volume), got {fields.get('dimension', 'none')!r}")
    type_name = " ".join(fields.get("type", "").lower().split())
    if type_name not in _TYPES:
        raise InputError(f"unsupported NRRD voxel type {fields.get('type', 'none')!r}; use an integer type, float or double")
    try:
        sizes = [int(s) for s in fields.get("sizes", "").split()]
    except ValueError:
        raise InputError(f"NRRD sizes must be integers, got {fields.get('sizes', '')[:60]!r}") from None
    if len(sizes) != 3 or any(s < 1 for s in sizes):
        raise InputError(f"NRRD sizes must be 3 positive integers, got {fields.get('sizes', 'none')!r}")
    n_voxels = sizes[0] * sizes[1] * sizes[2]
    if max_voxels is not None and n_voxels > max_voxels:
        raise InputError(f"the volume has {n_voxels} voxels, more than the limit of {max_voxels}")
    if "data file" in fields or "datafile" in fields:
        raise InputError("detached NRRD (data file) is not supported: send an attached .nrrd")
    if fields.get("byte skip", "0") not in ("0",) or fields.get("line skip", "0") not in ("0",):
        raise InputError("NRRD byte skip / line skip are not supported")

    dtype = np.dtype(_TYPES[type_name])
    endian = fields.get("endian", "little").lower()
    if dtype.itemsize > 1:
        if endian not in ("little", "big"):
            raise InputError(f"NRRD endian must be little or big, got {endian!r}")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    encoding = fields.get("encoding", "").lower()
    if encoding not in ("raw", "gzip", "gz"):
        raise InputError(f"unsupported NRRD encoding {fields.get('encoding', 'none')!r}; use raw or gzip")

    spacing, direction, origin = _parse_geometry(fields)
    expected = n_voxels * dtype.itemsize
    if max_bytes is not None and expected > max_bytes:
        raise VolumeTooLarge(f"the volume declares {expected / 2**20:.0f} MiB of {type_name} voxels, more than the limit of {max_bytes / 2**20:.0f} MiB")
    payload = memoryview(data)[offset:]
    if encoding != "raw" and max_gzip_ratio is not None and expected > GZIP_RATIO_FLOOR and expected > max_gzip_ratio * max(1, len(payload)):
        raise VolumeTooLarge(
            f"the gzip data ({len(payload)} bytes) declares {expected / 2**20:.0f} MiB: it would inflate more than "
            f"{max_gzip_ratio:g} times, which no CT does (a decompression bomb?)"
        )
    if encoding == "raw":
        if len(payload) < expected:
            raise InputError(f"the NRRD data is truncated: {len(payload)} bytes of {expected} expected")
        if len(payload) > expected:
            raise InputError(f"the NRRD data has {len(payload) - expected} bytes more than its header describes")
        raw = payload
    else:
        raw = _gunzip(payload, expected)
    array = np.frombuffer(raw, dtype=dtype, count=n_voxels).reshape(sizes[2], sizes[1], sizes[0])
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    metadata: dict[str, Any] = {}
    thickness = _thickness(fields)
    if thickness is not None:
        metadata["slice_thickness"] = thickness
    if "ctsliceinterp_method" in key_values:
        metadata["method"] = _safe_value(key_values["ctsliceinterp_method"])
    try:
        geometry = Geometry((sizes[2], sizes[1], sizes[0]), spacing, origin, direction)
    except CTSliceInterpError as exc:
        raise InputError(f"invalid NRRD geometry: {exc}") from None
    _check_finite(array)
    return Volume(array, geometry, metadata)


def _check_finite(array: np.ndarray, block: int = 1 << 18) -> None:
    """``InputError`` when a float volume holds NaN or infinity (as ``Volume.check_finite``).

    Block by block into one small reused mask: about twice as fast on a large volume as one
    ``np.isfinite`` over the whole array, which allocates a mask as big as the volume."""
    if array.dtype.kind != "f":
        return
    flat = array.reshape(-1)
    mask = np.empty(min(block, flat.size), dtype=bool)
    for start in range(0, flat.size, block):
        part = flat[start:start + block]
        finite = mask[:part.size]
        np.isfinite(part, out=finite)
        if not finite.all():
            bad = int(flat.size - np.count_nonzero(np.isfinite(flat)))
            raise InputError(f"the volume contains {bad} NaN or infinite voxels")


def _parse_geometry(fields: dict[str, str]):
    space = fields.get("space", "").lower().strip()
    if space:
        if space not in _SPACES or _SPACES[space] is None:
            raise InputError(f"unsupported NRRD space {fields['space']!r}; use left-posterior-superior (LPS) or RAS")
        flip = np.asarray(_SPACES[space], dtype=float)
    else:
        flip = np.ones(3)
    if fields.get("space dimension", "3").strip() != "3":
        raise InputError("NRRD space dimension must be 3")
    units = fields.get("space units")
    if units and any(u.strip('"').lower() not in ("mm", "") for u in units.split()):
        raise InputError(f"NRRD space units must be mm, got {units!r}")
    if "space directions" in fields:
        columns = np.asarray(_parse_vectors(fields["space directions"], "space directions"), dtype=float)
        if columns.shape != (3, 3):
            raise InputError("NRRD space directions must list exactly 3 vectors")
        _require_finite(columns.ravel(), "space directions")
        spacing = np.linalg.norm(columns, axis=1)
        if np.any(spacing <= 0):
            raise InputError("NRRD space directions include a zero vector: voxel spacing must be > 0")
        direction = (columns / spacing[:, None]).T * flip[:, None]  # columns = axes
    elif "spacings" in fields:
        spacing = np.asarray(_floats(fields["spacings"], "spacings"), dtype=float)
        if spacing.shape != (3,):
            raise InputError("NRRD spacings must be 3 numbers")
        _require_finite(spacing, "spacings")
        if np.any(spacing <= 0):
            raise InputError(f"NRRD spacings must be > 0, got {fields['spacings']!r}")
        direction = np.diag(flip)
    else:
        raise InputError("the NRRD header has neither space directions nor spacings: the voxel size is unknown")
    if "space origin" in fields:
        vectors = _parse_vectors(fields["space origin"], "space origin")
        if len(vectors) != 1:
            raise InputError("NRRD space origin must be one (x,y,z) vector")
        origin = np.asarray(vectors[0]) * flip
        _require_finite(origin, "space origin")
    else:
        origin = np.zeros(3)
    return tuple(spacing.tolist()), tuple(direction.ravel().tolist()), tuple(origin.tolist())


def _thickness(fields: dict[str, str]) -> float | None:
    if "thicknesses" not in fields:
        return None
    parts = fields["thicknesses"].split()
    if len(parts) != 3:
        return None
    try:
        value = float(parts[2])
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def _gunzip(payload: memoryview, expected: int) -> memoryview:
    """Inflate exactly ``expected`` bytes into one buffer (a bound against gzip bombs: nothing
    beyond the declared size is ever produced, and no second copy is made); the stream must end there."""
    inflater = zlib.decompressobj(47)  # 32 + 15: gzip or zlib header, detected
    out = memoryview(np.empty(expected, dtype=np.uint8))
    filled, tail = 0, payload
    try:
        while filled < expected:
            piece = inflater.decompress(tail, min(INFLATE_CHUNK, expected - filled))
            if not piece:
                break
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            tail = inflater.unconsumed_tail
        extra = inflater.decompress(tail, 1) if tail else b""
    except zlib.error as exc:
        raise InputError(f"the NRRD gzip data is corrupted: {exc}") from None
    if filled < expected:
        raise InputError(f"the NRRD gzip data is truncated: {filled} bytes of {expected} expected")
    if extra:
        raise InputError("the NRRD gzip data holds more voxels than its header describes")
    return out
