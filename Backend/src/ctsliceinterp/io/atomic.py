"""Atomic writes: write to a temporary file next to the target, then rename over it.

A crash or a cancel never leaves a half-written output, and the input is never overwritten."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import OutputError


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
    if not out.parent.exists():
        raise OutputError(f"the output folder {out.parent} does not exist")
    return out


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


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``target``.

    ``suffix`` keeps the extension so that writers choosing the format by name still work."""
    target = Path(target)
    suffix = suffix if suffix is not None else "".join(target.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".partial{suffix}", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _give_default_permissions(tmp_path)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_header_and_data(target: str | os.PathLike) -> Iterator[Path]:
    """For formats with a separate data file (``.mhd`` + ``.zraw``, ``.nhdr`` + ``.raw.gz``): yield
    ``target``'s name inside a temporary folder next to it; on success move the data files into
    place first and the header last, so the header never points at a missing or partial file."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp / target.name
        header = tmp / target.name
        _give_default_permissions(tmp)
        for item in sorted(tmp.iterdir()):
            if item != header:
                os.replace(item, target.parent / item.name)
        os.replace(header, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield tmp
        _give_default_permissions(tmp)
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, backup / "old")
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
