"""The whole pipeline as a `ray job submit` on a real two-node Ray cluster whose nodes share no disk.

Two `ray start` nodes (the head and one worker node, 1 CPU each, each with its own custom
resource) form the cluster. The worker node runs in its own mount namespace
(`unshare --mount --propagation private`) with a private tmpfs over ``/tmp``: the test's folders,
Ray's temp dir and TMPDIR. A file one node writes there is invisible to the other, as on two
machines. The data, the runs and the model live in object storage: a real S3 API (moto's server)
on 127.0.0.1, which both nodes reach.

The job: prepare from an ``s3://`` CSV -> a tune (one trial: several trials are the local tests' subject;
here what matters is where a trial's state goes) training with 2 Ray Train workers -> a refit of the winner (a plain training run, 2 workers) -> export ``best/`` to
``s3://`` -> deploy from ``s3://`` -> smoke query. Two 1-CPU workers on two 1-CPU nodes must land
one per node; the test checks they did, from the node ids the workers recorded. The cluster is
torn down whatever happens: each node runs `ray start --block` in its own process group, which is
killed at the end, and any process left using the cluster's temp dir is killed too.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow   # several processes: a Ray cluster, killed workers

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_AUTH_MODE"] = "token"  # the cluster and its clients share the token in ~/.ray/auth_token
    env["RAYSREC_PROGRESS"] = "0"
    return env


def _node_args(name: str) -> list[str]:
    return ["--num-cpus=1", "--num-gpus=0", f"--resources={json.dumps({name: 1})}",
            f"--object-store-memory={256 << 20}", "--block", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


class Cluster:
    def __init__(self, private_dirs: tuple[str, ...] = ()) -> None:
        # A short temp dir: Ray's unix socket paths must stay under 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rs2n-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []
        self.logs = Path(self.temp_dir) / "node-logs"
        self.logs.mkdir()
        # what the second node does not share with the head: its Ray temp dir and these folders
        self.private_dirs = (self.temp_dir, *private_dirs)

    def _start(self, name: str, args: list[str], private_tmp: bool = False) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        command = [str(BIN / "ray"), "start", *args, *_node_args(name)]
        if private_tmp:   # a second machine: its own Ray temp dir, test folders and TMPDIR
            mounts = " && ".join(f"mount -t tmpfs -o size=2g raysrec-node2 {d}" for d in self.private_dirs)
            script = f"{mounts} && mkdir -p {self.temp_dir}/tmp && TMPDIR={self.temp_dir}/tmp exec {' '.join(shlex.quote(c) for c in command)}"
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        self.nodes.append(subprocess.Popen(command, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def start(self) -> None:
        self._start("head_node", ["--head", f"--port={self.gcs_port}",
                                  "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                                  f"--ray-client-server-port={free_port()}"])
        self._wait(lambda: len(self.node_ids()) == 1 and (Path(self.temp_dir) / "ray_current_cluster").is_file(),
                   "the head node")
        # The GCS address as the head node advertises it (its node IP, not necessarily 127.0.0.1).
        self.address = (Path(self.temp_dir) / "ray_current_cluster").read_text().strip()
        self._start("worker_node", [f"--address={self.address}", f"--temp-dir={self.temp_dir}"], private_tmp=True)
        self._wait(lambda: len(self.node_ids()) == 2, "the second node")

    def _wait(self, ready, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what}: `ray start` exited with {proc.returncode}:\n{self.node_logs()}")
            try:
                if ready():
                    return
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} did not come up in {timeout}s:\n{self.node_logs()}")

    def node_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))

    def node_ids(self) -> set[str]:
        listed = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", self.dashboard, "--format", "json",
                                 "--filter", "state=ALIVE"], env=_env(), capture_output=True, text=True, timeout=60)
        if listed.returncode != 0:
            raise ValueError(listed.stderr)
        return {n["node_id"] for n in json.loads(listed.stdout)}

    def stop(self) -> None:
        for proc in reversed(self.nodes):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=5)     # nothing to save: a node slow to stop is killed
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Anything still running from this cluster (it shows the temp dir on its command line).
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _can_unshare() -> str:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs raysrec-probe /mnt && umount /mnt"], capture_output=True, text=True)
    return "" if probe.returncode == 0 else (probe.stderr.strip() or f"exit {probe.returncode}")


@pytest.fixture
def two_nodes(tmp_path_factory):
    reason = _can_unshare()
    if reason:
        pytest.skip(f"cannot give the second node its own mount namespace here: {reason}")
    cluster = Cluster(private_dirs=(str(tmp_path_factory.getbasetemp()),))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_pipeline_from_s3_to_a_live_endpoint_on_nodes_that_share_no_disk(two_nodes, s3, tmp_path):
    import pyarrow.fs as pafs

    from raysrec.data.synth import SynthConfig, write

    write(SynthConfig(output=str(tmp_path / "raw"), num_users=150, num_items=80, num_events=6000, seed=3,
                      format="csv"))
    _upload(tmp_path / "raw", s3("logs"))
    storage = s3("run")
    port = free_port()
    small = {"hidden_dim": 16, "num_layers": 1, "num_heads": 1, "max_length": 20}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"lr": {"loguniform": [1e-3, 1e-2]}}))
    config = {
        "output": str(tmp_path / "out"),
        "storage_path": storage,
        "prepare": {"source": {"path": s3("logs"), "format": "csv"}, "num_shards": 4},
        "stage": "tune",
        "train": {"epochs": 1, "patience": 1, "num_workers": 2, "cpus_per_worker": 1, "batch_size": 64,
                  "model": small},
        "tune": {"space": str(tmp_path / "space.yaml"), "num_samples": 1, "epochs": 1, "grace_period": 1,
                 "scheduler": "fifo", "max_concurrent": 1, "refit_epochs": 1},
        "serve": {"port": port, "proxy_location": "HeadOnly", "num_cpus": 0.5, "app_name": "twonode"},
        "smoke_k": 3,
    }
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config))

    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", two_nodes.dashboard, "--working-dir", str(REPO),
         "--submission-id", "raysrec-two-node", "--",
         sys.executable, "jobs/pipeline.py", "--config", str(config_file)],
        env=_env(), capture_output=True, text=True, timeout=1200)
    logs = submit.stdout[-6000:] + submit.stderr[-3000:]
    assert submit.returncode == 0, logs + two_nodes.node_logs()
    assert "succeeded" in submit.stdout, logs
    assert "test:test" not in submit.stdout + submit.stderr          # credentials never printed

    summary = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert summary["tune"]["num_trials"] == 1
    workers = summary["tune"]["workers"]                             # the refit: a 2-worker training run
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert {w["node_id"] for w in workers} == two_nodes.node_ids(), workers  # one worker on each node

    # Everything reached object storage; the head's disk holds only the driver's own scratch output.
    fs, root = pafs.FileSystem.from_uri(storage)
    for key in ("prepared/manifest.json", "best/checkpoint/state.json", "best/metrics.json", "pipeline.json"):
        assert fs.get_file_info(f"{root}/{key}").type == pafs.FileType.File, key
    stored = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{root}/tune", recursive=True))]
    assert any(p.endswith("state.json") for p in stored), "Ray Train checkpoints go to the storage path"
    assert not list((tmp_path / "out").rglob("ray_results")), "no run state on the head's local disk"
    sessions = list(Path(two_nodes.temp_dir).glob("session_2*"))
    assert len(sessions) == 1, sessions                              # the other node's Ray lives on its own disk

    # The endpoint was deployed from s3:// (replicas downloaded best/), outlives the job and answers.
    body = json.dumps({"history": summary["smoke"]["request"]["history"], "k": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert len(answer["items"]) == 4 and answer["model"].startswith("best@")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/model", timeout=30) as response:
        source = json.loads(response.read())["source"]
    assert source.startswith("s3://***@bucket/run/best")
