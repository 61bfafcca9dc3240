"""A real `ray job submit` of the whole pipeline to a Ray head this test starts itself, with token
authentication on (as in production) and every artefact in the S3 server; then the deployed
service answers over HTTP. Only the processes this test started are stopped, by PID."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from pyarrow.fs import FileSelector

from recsys import storage
from recsys.storage import LocalS3Server, free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.ray


def _ray(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def ray_head(s3_server: LocalS3Server) -> Iterator[dict[str, str]]:
    """`ray start --head --block` in its own temp dir and ports; stopped by its PID and its children's."""
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # The job's `python` must be this interpreter (CI runs pytest without activating the venv).
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        **s3_server.env(),  # the cluster's own object-store credentials, as an instance profile would give
        # Serve's HAProxy ingress, as every node of cluster/ sets it; its stats and metrics
        # listeners on ports of their own, beside the session cluster's.
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    })
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", "--num-cpus=4",
    ]
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in the finally below
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert head.poll() is None, f"ray start exited: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}"
            try:
                if httpx.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the Ray head did not come up in 120 s")
        yield {"address": address, "token": token, "env": {**env, "RAY_ADDRESS": address}, "temp_dir": temp_dir}
    finally:
        try:
            family = [head, *psutil.Process(head.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        head.send_signal(signal.SIGTERM)  # --block shuts the node's processes down on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        gone, alive = psutil.wait_procs([p for p in family if not isinstance(p, subprocess.Popen)], timeout=30)
        for p in alive:  # only descendants of the head we started
            p.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_token_auth_is_enforced(ray_head: dict[str, str]) -> None:
    anonymous = httpx.get(f"{ray_head['address']}/api/jobs/", timeout=10)
    assert anonymous.status_code in (401, 403)
    authed = httpx.get(f"{ray_head['address']}/api/jobs/", headers={"Authorization": f"Bearer {ray_head['token']}"}, timeout=10)
    assert authed.status_code == 200


def test_submitted_pipeline_lands_in_s3_and_serves(ray_head: dict[str, str], s3_server: LocalS3Server) -> None:
    root = f"s3://test/submitted-{secrets.token_hex(3)}"
    serve_port = free_port()
    runtime_env = {"excludes": [".venv", "runs", ".git", "**/__pycache__"]}
    for _ in range(12):
        submit = _ray(
            "job", "submit", "--address", ray_head["address"], "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "-m", "jobs.pipeline", "--config", "jobs/configs/pipeline_tiny.yaml",
            "--stages", "prepare,train,evaluate,index,deploy",
            f"storage.root={root}", f"storage.s3_endpoint={s3_server.endpoint}", f"serve.port={serve_port}",
            env=ray_head["env"], timeout=900,
        )
        out = submit.stdout + submit.stderr
        # The head's job agent registers a little after the dashboard answers (seconds on a
        # loaded machine); until then the job API refuses or drops submissions, creating nothing.
        if not any(m in out for m in ("No available agent to submit job", "Connection aborted", "RemoteDisconnected")):
            break
        time.sleep(5)
    assert submit.returncode == 0 and "succeeded" in out, out[-6000:]

    fs, base = storage.filesystem(root, s3_server.storage_config(root))
    listing = [f.path for f in fs.get_file_info(FileSelector(base, recursive=True))]
    assert any("/tiny/checkpoint_" in p for p in listing), "Ray Train checkpoints in the bucket"
    assert f"{base}/tiny/export/recsys_model.json" in listing, "the exported model"
    assert f"{base}/tiny/eval/report.json" in listing and f"{base}/tiny/eval/report.png" in listing, "the report"
    assert f"{base}/tiny/index/index.json" in listing, "the index"
    assert f"{base}/pipeline.json" in listing
    with fs.open_input_stream(f"{base}/tiny/eval/report.json") as f:
        report = json.loads(f.read())
    assert "fine_tuned" in report["metrics"] and "bm25" in report["metrics"]
    with fs.open_input_stream(f"{base}/pipeline.json") as f:
        summary = json.loads(f.read())
    assert list(summary["stages"]) == ["prepare", "train", "evaluate", "index", "deploy"]
    assert summary["stages"]["deploy"]["result"]["args"]["index_uri"] == f"{root}/tiny/index"

    # The deploy stage left the app running on the cluster after the job ended.
    with httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        hits = c.post("/search", json={"query": "running shoe", "k": 3}).json()["items"]
        assert len(hits) == 3 and all("item_id" in h for h in hits)
