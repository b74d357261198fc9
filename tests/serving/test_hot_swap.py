"""`raysrec deploy --model NEW` on a running cluster swaps the served model under load: no request fails,
every answer names the model version that computed it, and the new version takes over."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.models_for_tests import tiny_model

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deploy_swaps_the_model_under_load_without_a_failed_request(tmp_path, ray_tmp):
    v1, v2 = tiny_model(tmp_path / "v1", 1), tiny_model(tmp_path / "v2", 2)
    gcs, http = _free_port(), _free_port()
    # as tests/pipeline/test_cluster_job.py: the cluster and its clients share the token in ~/.ray/auth_token
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAYSREC_PROGRESS": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    ray = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
                    f"--temp-dir={ray_tmp}", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)
    env["RAY_ADDRESS"] = (Path(ray_tmp) / "ray_current_cluster").read_text().strip()   # as the head advertises it

    def deploy(model: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "raysrec.cli", "deploy", "--model", str(model), "--port",
                               str(http), "--batch-wait-timeout-s", "0.005"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    url = f"http://127.0.0.1:{http}"
    answers: list = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        while not stop.is_set():
            try:
                r = session.post(f"{url}/recommend", json={"history": ["it1", "it2"], "k": 5}, timeout=30)
                answers.append((time.monotonic(), r.status_code, r.json().get("model")))
            except Exception as exc:  # noqa: BLE001  (a failed request is what this test looks for)
                answers.append((time.monotonic(), "error", repr(exc)))

    try:
        first = deploy(v1)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "creating app" in first.stdout
        version1 = requests.get(f"{url}/model", timeout=10).json()["version"]
        assert version1.startswith("v1@")
        clients = [threading.Thread(target=client) for _ in range(4)]
        for c in clients:
            c.start()
        time.sleep(2)
        swap_started = time.monotonic()
        second = deploy(v2)
        swap_ended = time.monotonic()
        assert second.returncode == 0, second.stdout + second.stderr
        assert "updating app" in second.stdout
        time.sleep(2)
        stop.set()
        for c in clients:
            c.join(60)
        version2 = requests.get(f"{url}/model", timeout=10).json()["version"]
    finally:
        stop.set()
        # not `ray stop`: it stops every Ray on the host, this test session's own included; the ray_tmp
        # fixture kills this cluster's processes (their command lines name its temp dir)
        subprocess.run(["pkill", "-9", "-f", ray_tmp], check=False)

    during = [a for a in answers if swap_started <= a[0] <= swap_ended]
    print(f"hot swap: {len(answers)} requests, {len(during)} while `raysrec deploy` ran ({swap_ended - swap_started:.1f} s), "
          f"{sum(a[1] != 200 for a in answers)} failed; {sum(a[2] == version1 for a in during)} answered by the old "
          f"and {sum(a[2] == version2 for a in during)} by the new version during the swap")
    assert version2.startswith("v2@") and version2 != version1
    failed = [a for a in answers if a[1] != 200]
    assert failed == [], failed[:5]
    assert len(during) > 20, "too little load while the swap ran: the test would prove nothing"
    versions = [a[2] for a in answers]
    assert set(versions) == {version1, version2}
    assert all(v == version2 for t, _, v in answers if t > swap_ended)   # once deploy returns, only the new one
    assert versions[0] == version1
