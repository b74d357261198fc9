"""The whole pipeline as a `ray job submit` on a real two-node Ray cluster started on this machine.

Two `ray start` nodes (the head and one worker node, 1 CPU each, each with its own custom
resource) form the cluster; the job runs prepare -> train (2 Ray Train workers, 1 CPU each) ->
export -> deploy -> smoke query, publishing to a ``file://`` storage URI. Two workers of 1 CPU
on two 1-CPU nodes must land one per node; the test checks they did, from the node ids the
workers recorded. The cluster is torn down whatever happens: each node runs `ray start --block`
in its own process group, which is killed at the end, and any process left using the cluster's
temp dir is killed too.
"""

from __future__ import annotations

import json
import os
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
    def __init__(self) -> None:
        # A short temp dir: Ray's unix socket paths must stay under 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rs2n-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []
        self.logs = Path(self.temp_dir) / "node-logs"
        self.logs.mkdir()

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.nodes.append(subprocess.Popen([str(BIN / "ray"), "start", *args, *_node_args(name)], env=_env(),
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self) -> None:
        self._start("head_node", ["--head", f"--port={self.gcs_port}",
                                  "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                  f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}",
                                  f"--ray-client-server-port={free_port()}"])
        self._wait(lambda: len(self.node_ids()) == 1, "the head node")
        # The GCS address as the head node advertises it (its node IP, not necessarily 127.0.0.1).
        self.address = (Path(self.temp_dir) / "ray_current_cluster").read_text().strip()
        self._start("worker_node", [f"--address={self.address}"])
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
                    proc.wait(timeout=20)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Anything still running from this cluster (it shows the temp dir on its command line).
        subprocess.run(["pkill", "-9", "-f", self.temp_dir], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def two_nodes():
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_pipeline_job_runs_training_workers_on_both_nodes(two_nodes, tmp_path):
    port = free_port()
    config = {
        "output": str(tmp_path / "out"),
        "storage_path": f"file://{tmp_path / 'storage'}",
        "synth": {"num_users": 150, "num_items": 80, "num_events": 6000, "seed": 3},
        "train": {"epochs": 2, "patience": 2, "num_workers": 2, "cpus_per_worker": 1, "batch_size": 64,
                  "model": {"hidden_dim": 16, "num_layers": 1, "num_heads": 1, "max_length": 20}},
        "serve": {"port": port, "proxy_location": "HeadOnly", "num_cpus": 0.5, "app_name": "twonode"},
        "smoke_k": 3,
    }
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config))

    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", two_nodes.dashboard, "--working-dir", str(REPO),
         "--submission-id", "raysrec-two-node", "--",
         sys.executable, "jobs/pipeline.py", "--config", str(config_file)],
        env=_env(), capture_output=True, text=True, timeout=900)
    logs = submit.stdout[-6000:] + submit.stderr[-3000:]
    assert submit.returncode == 0, logs
    assert "succeeded" in submit.stdout, logs

    summary = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    workers = summary["train"]["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert {w["node_id"] for w in workers} == two_nodes.node_ids(), workers  # one worker on each node

    # Everything was published to the storage URI, and best/ is a servable checkpoint.
    storage = tmp_path / "storage"
    assert (storage / "prepared" / "manifest.json").is_file()
    assert (storage / "best" / "checkpoint" / "state.json").is_file()
    assert json.loads((storage / "pipeline.json").read_text())["seconds"]["total"] > 0
    assert any((storage / "ray_results").rglob("state.json")), "Ray Train checkpoints go to the storage path"

    # The endpoint outlives the job (Serve is detached) and answers.
    body = json.dumps({"history": summary["smoke"]["request"]["history"], "k": 4}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body, method="POST",
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert len(answer["items"]) == 4
    assert answer["model"].startswith("best@")
