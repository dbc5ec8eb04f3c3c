"""Real processes: Supervisor runs Gunicorn + Flask and the poller; a killed poller comes back.
The Dockerfile's steps are mirrored outside Docker (no Docker engine on these machines)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import requests

import db_manager
from standins.support import free_port, wait_for
from tests.conftest import venv_bin

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(predicate, timeout: float, what: str):
    return wait_for(predicate, timeout, interval=0.2, what=what,
                    ignoring=(requests.RequestException,))


def _start_supervisor(tmp_path: Path, app_dir: Path, env_extra: dict) -> tuple:
    conf = (app_dir / "supervisord.conf").read_text()
    sock, pid = tmp_path / "s.sock", tmp_path / "s.pid"
    conf = conf.replace("/tmp/ponte-supervisor.sock", str(sock)).replace(
        "/tmp/ponte-supervisord.pid", str(pid))
    conf_path = app_dir / f"supervisord-test-{os.getpid()}.conf"
    conf_path.write_text(conf)
    port = free_port()
    env = {**os.environ, "PATH": f"{venv_bin()}:{os.environ['PATH']}", "PORT": str(port),
           "HOST": "127.0.0.1", "DATABASE_PATH": str(tmp_path / "data" / "ponte.db"),
           "LOG_DIR": str(tmp_path / "data" / "logs"), "PONTE_ENV_FILE": str(tmp_path / "no.env"),
           **env_extra}
    proc = subprocess.Popen([str(venv_bin() / "supervisord"), "-c", str(conf_path)], env=env,
                            cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, port, env, conf_path


def _stop(proc, conf_path):
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        conf_path.unlink(missing_ok=True)


def test_supervisor_runs_web_and_poller_and_restarts_a_killed_poller(tmp_path):
    proc, port, env, conf_path = _start_supervisor(tmp_path, ROOT, {})
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(lambda: requests.get(base + "/health", timeout=2).status_code == 200, 20,
                  "/health 200")
        assert requests.get(base + "/").json()["name"] == "ponte"
        requests.post(base + "/webhooks/kommo/path-secret-123456?secret=query-secret-654321")
        conn = db_manager.connect(env["DATABASE_PATH"])
        first_pid = db_manager.last_beat(conn, "poller")["pid"]
        os.kill(first_pid, signal.SIGKILL)

        def restarted():
            beat = db_manager.last_beat(conn, "poller")
            return beat["pid"] != first_pid and time.time() - beat["beat_at"] < 10

        _wait_for(restarted, 30, "a new poller heartbeat")
        assert requests.get(base + "/health", timeout=2).status_code == 200
        # gunicorn's access log reached stdout (JSON app logs too)
    finally:
        _stop(proc, conf_path)
    output = proc.stdout.read().decode(errors="replace")
    assert '"event": "poller_started"' in output and '"GET /health HTTP/1.1" 200' in output
    assert "/webhooks/kommo/***" in output  # the access log line is there, scrubbed
    assert "path-secret-123456" not in output and "query-secret-654321" not in output


def _dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    env = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", text, re.M):
        for key, value in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[key] = value
    cmd = json.loads("[" + re.search(r'^CMD \[(.*)\]$', text, re.M).group(1) + "]")
    return text, env, cmd


def test_dockerfile_keeps_state_on_the_data_volume_and_runs_as_non_root():
    text, env, cmd = _dockerfile()
    assert env["DATABASE_PATH"].startswith("/data/") and env["LOG_DIR"].startswith("/data/")
    assert env["PYTHONUNBUFFERED"] == "1"
    assert re.search(r'^VOLUME \["/data"\]', text, re.M)
    assert "/app" not in re.search(r"^VOLUME .*$", text, re.M).group(0)
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/health" in text
    assert cmd == ["sh", "-c", "python config.py --check && exec supervisord -c "
                   "/app/supervisord.conf"]


def test_dockerfile_steps_outside_docker(tmp_path):
    """WORKDIR /app + COPY . . + the Dockerfile's ENV (with /data mapped to a temp dir) + CMD."""
    _, env, cmd = _dockerfile()
    app_dir = tmp_path / "app"
    shutil.copytree(ROOT, app_dir, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "logs", "__pycache__", ".pytest_cache", ".env"))
    data = tmp_path / "volume"
    docker_env = {k: v.replace("/data", str(data)) for k, v in env.items()
                  if k not in ("PORT", "HOST")}
    proc, port, _, conf_path = _start_supervisor(tmp_path, app_dir, docker_env)
    try:
        _wait_for(lambda: requests.get(f"http://127.0.0.1:{port}/health",
                                       timeout=2).status_code == 200, 20, "/health 200")
    finally:
        _stop(proc, conf_path)
    assert (data / "ponte.db").exists() and list((data / "logs").glob("app-*.log"))
    assert not (app_dir / "data").exists()  # nothing written next to the code


def test_web_with_a_broken_configuration_says_everything_in_one_line(tmp_path):
    env = {**os.environ, "PORT": str(free_port()), "ML_CLIENT_ID": "123", "DEBUG": "talvez",
           "PONTE_ENV_FILE": str(tmp_path / "none.env"), "LOG_DIR": str(tmp_path)}
    result = subprocess.run([str(venv_bin() / "python"), "-m", "gunicorn", "-c",
                             "gunicorn_conf.py", "webhook_server:create_app()"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    [line] = [l for l in result.stderr.splitlines() if l.startswith("ponte:")]
    assert "DEBUG inválido" in line and "ML_CLIENT_SECRET" in line


def test_a_program_that_gives_up_stops_supervisor(tmp_path):
    """A bad configuration that slipped past the check (e.g. set after it): Supervisor must not
    stay up serving nothing."""
    proc, _, _, conf_path = _start_supervisor(tmp_path, ROOT, {"PORT": "not-a-port"})
    try:
        proc.wait(60)
    finally:
        _stop(proc, conf_path)
    output = proc.stdout.read().decode(errors="replace")
    assert "desistiu de iniciar" in output
