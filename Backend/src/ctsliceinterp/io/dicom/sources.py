"""Where the files are: a folder, a ZIP, or the files a DICOMDIR lists, all seen as named members that
can be opened. A ZIP is read in place (memory-mapped), never extracted; a member is inflated in one
bounded call that stops past its declared size."""

from __future__ import annotations

import contextlib
import mmap
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

from ...core.errors import InputError
from .messages import logger, short

# More files than this is not one series export: refuse instead of scanning for minutes.
MAX_MEMBERS = 100_000
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR (and of Philips' DIRFILE)


@dataclass(frozen=True)
class Member:
    name: str  # relative POSIX path inside the folder or ZIP (what the user sees in errors)
    opener: Callable[[], Any]  # returns a binary file object
    display: str  # full name for messages
    size: int  # bytes: the file's size, or the uncompressed size the ZIP declares
    reader: Callable[[], bytes] | None = None  # the whole member at once, when faster than opener().read()


def member_bytes(member: Member) -> bytes:
    """The whole member (never more than its declared size)."""
    if member.reader is not None:
        return member.reader()
    with member.opener() as f:
        return f.read(member.size + 1)


def _too_many(kind: str, where: Path) -> InputError:
    return InputError(f"the {kind} {where} holds more than {MAX_MEMBERS} files: pass the folder or ZIP of one series or case")


def folder_members(folder: Path, recursive: bool = True) -> list[Member]:
    paths = folder.rglob("*") if recursive else folder.iterdir()
    members = []
    for p in paths:
        rel = p.relative_to(folder).as_posix()
        # Hidden files and folders (.DS_Store, a crashed write's .partial folder) are not the series.
        if any(part.startswith(".") for part in PurePosixPath(rel).parts) or not p.is_file():
            continue
        members.append(_file_member(p, rel))
        if len(members) > MAX_MEMBERS:
            raise _too_many("folder", folder)
    return sorted(members, key=lambda m: m.name)


def _file_member(path: Path, name: str) -> Member:
    return Member(name, lambda: open(path, "rb"), str(path), path.stat().st_size)


def _unsafe(name: str) -> bool:
    """A member that would land outside the archive's folder if extracted (``../x``, ``/etc/x``, ``C:x``)."""
    return name.startswith(("/", "\\")) or bool(re.match(r"[A-Za-z]:", name)) or ".." in re.split(r"[/\\]", name)


def zip_members(archive: zipfile.ZipFile, zip_path: Path, raw: mmap.mmap | None = None) -> list[Member]:
    """``raw``: the ZIP file memory-mapped; whole members are then inflated in one call from it
    (``_inflate_member``) instead of through zipfile's streams."""
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _too_many("ZIP", zip_path)
    members, unsafe = [], []
    for info in infos:
        name = info.filename
        if info.is_dir():
            continue
        if _unsafe(name):
            unsafe.append(name)
            continue
        if name.startswith("__MACOSX/") or any(part.startswith(".") for part in PurePosixPath(name).parts):
            continue
        # ZipExtFile streams are seekable; pydicom reads headers without inflating the pixels.
        opener = lambda info=info: archive.open(info)  # noqa: E731
        reader = None
        if raw is not None:
            reader = lambda info=info, opener=opener: _inflate_member(raw, info, opener)  # noqa: E731
        members.append(Member(name, opener, f"{zip_path}:{name}", info.file_size, reader))
    if unsafe:
        shown = ", ".join(unsafe[:5]) + (f" and {len(unsafe) - 5} more" if len(unsafe) > 5 else "")
        logger.warning("%s: skipped %d member(s) whose path leads outside the archive: %s", zip_path, len(unsafe), shown)
    return members


def _inflate():
    """The fastest raw-deflate decoder at hand, as (decompressobj, crc32): ISA-L (``isal``, 2-3x zlib)
    when installed, else zlib. Both release the GIL, so members inflate in parallel threads."""
    try:
        from isal import isal_zlib

        return isal_zlib.decompressobj, isal_zlib.crc32
    except ImportError:
        return zlib.decompressobj, zlib.crc32


def _inflate_member(raw: mmap.mmap, info: zipfile.ZipInfo, opener: Callable[[], Any]) -> bytes:
    """One ZIP member, inflated in one call from the memory-mapped archive, never past its declared
    size plus one byte, and checked against its CRC-32. Anything but a plain stored or deflated member
    (encrypted, bzip2, LZMA, an odd local header) goes through zipfile, which also stops at that size."""
    offset = info.header_offset
    header = raw[offset : offset + 30]
    plain = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and not info.flag_bits & 0x1
    if not plain or len(header) < 30 or header[:4] != b"PK\x03\x04":
        with opener() as f:
            return f.read(info.file_size + 1)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    start = offset + 30 + name_length + extra_length
    compressed = raw[start : start + info.compress_size]
    decompressobj, crc32 = _inflate()
    if info.compress_type == zipfile.ZIP_STORED:
        data = compressed
    else:
        try:
            data = decompressobj(-15).decompress(compressed, info.file_size + 1)
        except Exception as exc:  # noqa: BLE001 - zlib.error / isal error: a damaged member
            raise zipfile.BadZipFile(f"cannot inflate {info.filename}: {exc}") from None
    if len(data) > info.file_size:
        raise zipfile.BadZipFile(f"{info.filename} inflates past its declared size of {info.file_size} bytes: corrupted or hostile ZIP")
    if len(data) != info.file_size or crc32(data) & 0xFFFFFFFF != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 or size for {info.filename}: the ZIP is corrupted")
    return data


@contextlib.contextmanager
def members_of(p: Path) -> Iterator[tuple[list[Member], str]]:
    """The files of a folder or a ZIP as members; a ZIP stays open (and memory-mapped, so whole
    members inflate in one call) until the block ends."""
    if p.is_dir():
        yield folder_members(p), "folder"
        return
    try:
        archive = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{p} is not a valid ZIP file ({short(exc)})") from None
    with archive, open(p, "rb") as f:
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            yield zip_members(archive, p, raw), "ZIP"
        finally:
            raw.close()


# ---------------------------------------------------------------------------------------------
# DICOMDIR (and Philips DIRFILE): an index of the files of a file set
# ---------------------------------------------------------------------------------------------
def is_directory_file(path: Path) -> bool:
    """A Media Storage Directory object (DICOMDIR, Philips DIRFILE), whatever its name."""
    import pydicom

    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - not DICOM at all
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY


def _references(directory: Path) -> list[tuple[str, PurePosixPath]]:
    """(record type, referenced file) of each directory record that points at a file."""
    import pydicom

    try:
        ds = pydicom.dcmread(directory, force=True)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read the DICOM directory {directory}: {short(exc)}") from None
    found = []
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if not ref:
            continue
        parts = [str(ref)] if isinstance(ref, str) else [str(part) for part in ref]
        rel = PurePosixPath(*parts)
        if _unsafe(rel.as_posix()):
            raise InputError(f"the DICOM directory {directory} points outside its file set ({rel})")
        found.append((str(record.get("DirectoryRecordType", "")), rel))
    return found


def _file_set_root(index: Path, references: list[PurePosixPath]) -> Path:
    """File IDs are relative to the folder of the top DICOMDIR. A nested directory (Philips' DIRFILE in a
    series folder) given directly lists them from that top folder too: find it among the parents."""
    for candidate in [index.parent, *index.parent.parents][:8]:
        if any((candidate / rel).is_file() for rel in references[:20]):
            return candidate
    return index.parent


def directory_members(index: Path) -> list[Member]:
    """The files a DICOMDIR lists, following nested directory files (Philips: DICOMDIR -> study DIRFILE
    -> series DIRFILE -> images). A listed file that is missing is an error: a partial copy of a CD."""
    references = _references(index)
    root = _file_set_root(index, [rel for _, rel in references])
    pending, seen = [references], {index.resolve()}
    files: list[PurePosixPath] = []
    missing: list[str] = []
    while pending:
        for record_type, rel in pending.pop():
            path = root / rel
            if not path.is_file():
                missing.append(rel.as_posix())
            elif record_type != "IMAGE" and is_directory_file(path):
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    pending.append(_references(path))
            else:
                files.append(rel)
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        raise InputError(
            f"the DICOM directory {index} lists {len(missing)} file(s) that are missing ({shown}): "
            "copy the whole export, or read the folder of the series instead"
        )
    if len(files) > MAX_MEMBERS:
        raise _too_many("DICOM directory", index)
    return [_file_member(root / rel, rel.as_posix()) for rel in sorted(set(files))]
