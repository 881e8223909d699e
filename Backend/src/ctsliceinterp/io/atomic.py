"""Atomic, verified writes: write to a temporary file next to the target, check it, then rename over it.

A crash, a cancel or a full disk never leaves a half-written output: the old output stays intact until
the new one is complete and synced, and the input is never overwritten. File-system errors (a full disk,
a read-only mount, a file-size limit...) become one-line ``OutputError`` messages that name the problem,
also when the library that wrote the file hid them (see ``WriteFailed``)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from ..core.errors import CTSliceInterpError, OutputError

# What the user is told for the errors a write can meet.
WRITE_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the folder is on a read-only file system",
    errno.EFBIG: "the file is larger than the file system or this process's file-size limit (ulimit -f) allows",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EIO: "input/output error on the device",
}
PROBE_BYTES = 64 * 1024


class WriteFailed(OutputError):
    """A writer found its output incomplete, or its library reported a failure without the operating
    system's reason (ITK prints "wrote only ... bytes" and carries on). The atomic writers turn it into
    the reason (``write_error``); the message is the detail used when no reason is found."""


def write_error(target: str | os.PathLike, exc: OSError | None = None, partial: Path | None = None,
                detail: str = "", attempted: bool = True) -> OutputError:
    """One line for a failed write of ``target``: the reason of ``exc``; else an operating-system reason
    quoted in ``detail`` (a library's message), or the one a probe write into the ``partial`` output
    meets now (a full disk, a file-size limit); else ``detail`` itself. After an ``attempted`` write,
    an existing ``target`` is said to be unchanged."""
    target = Path(target)
    if exc is None:
        exc = _reason_quoted(detail) or (_probe(partial) if partial is not None else None)
    if exc is not None:
        code = errno.errorcode.get(exc.errno or 0)
        problem = WRITE_PROBLEMS.get(exc.errno) or exc.strerror or str(exc)
        problem += f" ({code})" if code else ""
    else:
        problem = next((line.strip() for line in detail.splitlines() if line.strip()), "the write failed")
    kept = f"; the existing {target.name} is unchanged" if attempted and target.exists() else ""
    return OutputError(f"cannot write {target}: {problem}{kept}")


def _reason_quoted(text: str) -> OSError | None:
    """Libraries with their own error types quote the system's message ("No space left on device")."""
    for code in WRITE_PROBLEMS:
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def _probe(partial: Path) -> OSError | None:
    """Append a little to the partial output (its largest file, for a folder) and sync it: on a full disk
    or at a file-size limit this fails with the reason the library did not pass on."""
    files = [p for p in partial.rglob("*") if p.is_file()] if partial.is_dir() else [partial]
    target = max(files, key=lambda p: p.stat().st_size) if files else partial / ".probe"
    try:
        with open(target, "ab") as f:
            f.write(bytes(PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        return exc
    return None


@contextlib.contextmanager
def _one_line_errors(target: Path, partial: Path | None = None) -> Iterator[None]:
    try:
        yield
    except WriteFailed as exc:
        raise write_error(target, partial=partial, detail=str(exc)) from None
    except OSError as exc:
        if exc.errno is None:  # re-raised by a library without its errno (pydicom adds a traceback instead)
            raise write_error(target, partial=partial, detail=str(exc)) from None
        raise write_error(target, exc) from None
    except CTSliceInterpError:
        raise  # already says what is wrong
    except Exception as exc:  # a library's own error type (safetensors' SafetensorError...): was it the disk?
        reason = _reason_quoted(str(exc)) or (_probe(partial) if partial is not None else None)
        if reason is None:
            raise
        raise write_error(target, reason) from None


def _sync(path: Path) -> None:
    """Flush a file (every file of a folder) to the device: a delayed write error (network file
    systems, delayed allocation) surfaces here, before the rename, not after."""
    for item in (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        fd = os.open(item, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a rename durable; not every platform or file system can sync a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output_path(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse an output that is (or would overwrite) one of the inputs, or whose folder is missing."""
    out = Path(output).expanduser()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser()
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, src)
        if same:
            raise OutputError(f"the output path {out} is the input: choose another output so the input is kept")
        if out.resolve() in src.resolve().parents:
            # Replacing a folder (a DICOM series output) would delete the input inside it.
            raise OutputError(f"the output folder {out} holds the input {src}: choose another output so the input is kept")
        if src.is_dir() and src.resolve() in out.resolve().parents:
            # An input folder is read as a whole (recursively): an output inside it becomes part of it.
            raise OutputError(f"the output {out} is inside the input folder {src}: choose an output outside it")
    if not out.parent.exists():
        raise OutputError(f"the output folder {out.parent} does not exist")
    check_writable_folder(out.parent, out)
    return out


def check_writable_folder(folder: Path, target: Path | None = None) -> None:
    """Refuse a folder on a read-only file system, or one we may not write to, before the work starts
    (a diffusion run takes minutes; its write would fail only at the end)."""
    if hasattr(os, "statvfs") and os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise write_error(target or folder, OSError(errno.EROFS, os.strerror(errno.EROFS)), attempted=False)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise write_error(target or folder, OSError(errno.EACCES, os.strerror(errno.EACCES)), attempted=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual permissions
    (what ``open()`` would give under the current umask), so colleagues and PACS tools can read them."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def _temporary_folder(target: Path, suffix: str = ".partial") -> Path:
    with _one_line_errors(target):
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent))


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success sync it and rename it to ``target``.

    ``suffix`` keeps the extension so that writers choosing the format by name still work. The writer
    checks what it wrote (raising ``WriteFailed``) when its library may not report a short write."""
    target = Path(target)
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    with _one_line_errors(target):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{suffix}", dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _one_line_errors(target, tmp_path):
            yield tmp_path
            _sync(tmp_path)
            _give_default_permissions(tmp_path)
            os.replace(tmp_path, target)
            _sync_folder(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_header_and_data(target: str | os.PathLike) -> Iterator[Path]:
    """For formats with a separate data file (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``): yield
    ``target``'s name inside a temporary folder next to it; on success move the data files into
    place first and the header last, so the header never points at a missing or partial file."""
    target = Path(target)
    tmp = _temporary_folder(target)
    try:
        with _one_line_errors(target, tmp):
            yield tmp / target.name
            header = tmp / target.name
            _sync(tmp)
            _give_default_permissions(tmp)
            for item in sorted(tmp.iterdir()):
                if item != header:
                    os.replace(item, target.parent / item.name)
            os.replace(header, target)
            _sync_folder(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success (every file synced) it replaces ``target``."""
    target = Path(target)
    tmp = _temporary_folder(target)
    try:
        with _one_line_errors(target, tmp):
            yield tmp
            _sync(tmp)
            _give_default_permissions(tmp)
            if target.exists():
                backup = _temporary_folder(target, ".old")
                os.replace(target, backup / "old")
                try:
                    os.replace(tmp, target)
                except OSError:
                    os.replace(backup / "old", target)  # put the old folder back
                    raise
                finally:
                    shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(tmp, target)
            _sync_folder(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
