"""`prepare` straight from and to object storage (a real S3 API on 127.0.0.1)."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest

from raysrec.data.pipeline import PrepareConfig, prepare
from raysrec.data.sources import SourceConfig
from raysrec.data.storage import PreparedData
from raysrec.errors import InputError

pytestmark = pytest.mark.slow

HEADER = b"user_id,item_id,timestamp\n"


def _csv(n_users: int = 40, per_user: int = 6) -> bytes:
    lines = [f"{u},{(u * 7 + k * 3) % 23 + 1},{1_000_000 + 60 * k + u}\n" for u in range(n_users)
             for k in range(per_user)]
    return HEADER + "".join(lines).encode()


def _put(uri: str, data: bytes) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as handle:
        handle.write(data)


def test_prepare_reads_and_writes_s3_like_local_files(ray_local, s3, tmp_path):
    data = _csv()
    (tmp_path / "log.csv").write_bytes(data)
    _put(s3("logs/log.csv"), data)
    local = prepare(PrepareConfig(source=SourceConfig(path=str(tmp_path / "log.csv")), output=str(tmp_path / "p"),
                                  split_bytes=1024))
    remote = prepare(PrepareConfig(source=SourceConfig(path=s3("logs/log.csv")), output=s3("prepared"),
                                   split_bytes=1024))     # several byte ranges, read through the S3 API
    for key in ("rows_read", "rows_kept", "num_users", "num_items", "rows_dropped"):
        assert remote[key] == local[key], key
    assert remote["inputs"][0]["sha256"] == local["inputs"][0]["sha256"]
    assert remote["inputs"][0]["path"] == "s3://bucket/logs/log.csv"          # no credentials, no options
    loaded = PreparedData.load(s3("prepared"))
    same = PreparedData.load(tmp_path / "p")
    assert loaded.num_items == same.num_items
    assert loaded.read().items.tolist() == same.read().items.tolist()
    assert "test:test" not in json.dumps(remote)


def test_a_bad_line_in_an_s3_file_is_named_with_its_line(ray_local, s3):
    _put(s3("logs/bad.csv"), HEADER + b"1,2,100\n1,3,101\n1,x,oops\n")
    with pytest.raises(InputError, match=r"s3://bucket/logs/bad.csv, line 4"):
        prepare(PrepareConfig(source=SourceConfig(path=s3("logs/bad.csv"), id_type="int"), output=s3("bad-out")))
    fs, path = pafs.FileSystem.from_uri(s3("bad-out"))
    assert fs.get_file_info(f"{path}/manifest.json").type == pafs.FileType.NotFound   # nothing looks complete
