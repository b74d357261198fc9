"""Output folders and file digests shared by the stages (prepared data, checkpoints)."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path


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
