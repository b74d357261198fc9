"""Locations (local paths or pyarrow filesystem URIs), output folders and file digests."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
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


def join(location: str, *parts: str) -> str:
    """``location``/part/... for a local path or a URI, keeping a URI's ``?options`` at the end."""
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (never the whole file at once)."""
    with open(path, "rb") as handle:
        return sha256_stream(handle)


def sha256_stream(handle) -> str:
    """Hex sha256 of what is left to read in a binary file, in 8 MiB chunks."""
    digest = hashlib.sha256()
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


def publish(local: str | Path, target: str, last: tuple[str, ...] = ("manifest.json", "metrics.json")) -> str:
    """Copy a finished local folder to ``target`` (local path or pyarrow URI), replacing what was there.

    Object stores have no rename: the files named in ``last`` (what marks a folder complete) are written after
    everything else, so a reader that waits for them never sees a half-written folder.
    """
    fs, path = filesystem(target)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
    fs.create_dir(path, recursive=True)
    local = Path(local)
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: (p.relative_to(local).as_posix()
                                                                                 in last, str(p)))
    for file in files:
        relative = file.relative_to(local).as_posix()
        if "/" in relative:
            fs.create_dir(f"{path}/{relative.rsplit('/', 1)[0]}", recursive=True)
        pafs.copy_files(str(file), f"{path}/{relative}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    return target


@dataclasses.dataclass(frozen=True)
class Location:
    """A file or folder on any pyarrow filesystem, with the few pathlib operations reading an input needs.

    ``str()`` is what messages show: a local path as the user typed it, or the URI without credentials and
    options. Pickles with its filesystem, so Ray tasks on any node open the same file.
    """

    fs: pafs.FileSystem
    path: str          # the filesystem's own path
    shown: str

    @classmethod
    def of(cls, location: str | Path) -> Location:
        fs, path = filesystem(location)
        text = str(location)
        if "://" in text:
            scheme = text.split("://", 1)[0]
            text = f"{scheme}://{path}"   # no user:secret@, no ?options
        return cls(fs, path.rstrip("/") or "/", text.rstrip("/") or text)

    def __str__(self) -> str:
        return self.shown

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path}/{name}", f"{self.shown}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> Location:
        shown = (self.shown.rsplit("/", 1)[0] or "/") if "/" in self.shown else "."
        return Location(self.fs, self.path.rsplit("/", 1)[0] or "/", shown)

    def with_suffix(self, suffix: str) -> Location:
        return self.parent / (Path(self.name).stem + suffix)

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def glob(self, pattern: str) -> list[Location]:
        """The direct children whose name matches ``pattern``, sorted by name."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = sorted(i.base_name for i in infos if fnmatch.fnmatch(i.base_name, pattern))
        return [self / n for n in names]

    def size(self) -> int:
        return int(self.fs.get_file_info(self.path).size or 0)

    def open(self) -> io.BufferedReader:
        """A seekable, buffered binary file (``readline``, ``seek``, ``tell``), local or remote."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return open(self.path, "rb")  # noqa: SIM115 (the caller closes it)
        return io.BufferedReader(_RawNative(self.fs.open_input_file(self.path)), buffer_size=1 << 20)

    def sha256(self) -> str:
        with self.open() as handle:
            return sha256_stream(handle)


class _RawNative(io.RawIOBase):
    """A pyarrow ``NativeFile`` as a Python raw stream, so ``io.BufferedReader`` adds ``readline``."""

    def __init__(self, native) -> None:
        self._native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._native.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._native.seek(offset, whence)

    def tell(self) -> int:
        return self._native.tell()

    def close(self) -> None:
        self._native.close()
        super().close()
