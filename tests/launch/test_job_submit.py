"""Cluster path: a real Ray head on 127.0.0.1, the smoke job (async loop) submitted with `ray job submit`, as a user would."""
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    gcs, dash, agent_http, agent_grpc, metrics, runtime_env = (free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it (107-byte limit)
    # Ray 2.60 heads require token authentication; head and clients share a fresh token.
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([f"{BIN}/ray", "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             # Every other test's ray.init starts a dashboard agent on Ray's default ports (HTTP 52365);
                             # an agent that cannot bind its HTTP port stays alive without it, and every submission
                             # then fails with "No available agent to submit job". Ports of its own avoid the clash.
                             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                             f"--temp-dir={temp_dir}"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:  # the Jobs API answers once the dashboard is up
        probe = subprocess.run([f"{BIN}/ray", "job", "list", "--address", address], capture_output=True, env=env)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(head.pid, signal.SIGTERM)
        pytest.fail("ray head did not come up within 120 s")
    yield address, env, temp_dir
    os.killpg(head.pid, signal.SIGTERM)  # the head and every process it started share the session
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:  # a graceful Ray shutdown takes ~30 s; nothing of the test is left to keep
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    shutil.rmtree(temp_dir, ignore_errors=True)


def agent_log_tail(temp_dir: str, chars: int = 1500) -> str:
    """The end of the head's dashboard agent log: where a port clash or a failed agent start is written."""
    logs = glob.glob(os.path.join(temp_dir, "session_latest", "logs", "dashboard_agent*.log"))
    return "".join(f"\n--- {path}:\n" + open(path, errors="replace").read()[-chars:] for path in logs)


def test_smoke_job_through_ray_job_submit(ray_head, tmp_path):
    address, env, temp_dir = ray_head
    runs = tmp_path / "runs"
    cmd = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env", "configs/runtime_env.yaml", "--",
           sys.executable, "-m", "launch.train", "--config", "configs/smoke.yaml",
           f"run_dir={runs}", "run_name=job", "train.async_rollouts=true"]
    deadline = time.time() + 180
    while True:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        # The Jobs API can answer before the head's job agent has registered (seen on a loaded box);
        # Ray then refuses the submission before creating any job and asks to try again.
        if p.returncode == 0 or "No available agent to submit job" not in p.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:] + agent_log_tail(temp_dir)
    assert "succeeded" in (p.stdout + p.stderr).lower()
    summary = json.loads((runs / "job" / "summary.json").read_text())
    assert summary["steps"] == summary["policy_version"] > 0
    assert summary["rollouts_from_prefix"] > 0
