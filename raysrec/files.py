"""Locations (local paths or pyarrow filesystem URIs), output folders and file digests."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from raysrec.errors import InputError


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or any pyarrow filesystem URI (s3://, gs://, file://)."""
    text = str(location)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, ValueError, OSError) as exc:
            raise InputError(f"cannot open this storage URI: {exc}", path=text) from None
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (never the whole file at once)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def publish_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``, replacing what was there.

    The old folder is first renamed aside, so ``out`` is never a half-deleted or half-written
    folder: it is the old one, absent for an instant, or the new one.
    """
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(trash)
        shutil.rmtree(trash)
    tmp.rename(out)


def publish(local: str | Path, target: str) -> str:
    """Copy a finished local folder to ``target`` (local path or pyarrow URI), replacing what was there."""
    fs, path = filesystem(target)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return target
