"""Real processes: Supervisor runs Gunicorn + Flask and the poller; a killed poller comes back.
The Dockerfile's steps are mirrored outside Docker (no Docker engine on these machines)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

import config
import db_manager
from standins.support import free_port, wait_for
from tests.conftest import venv_bin

ROOT = Path(__file__).resolve().parent.parent


def _wait_for(predicate, timeout: float, what: str):
    return wait_for(predicate, timeout, interval=0.2, what=what,
                    ignoring=(requests.RequestException,))


def _env(tmp_path: Path, **extra) -> dict:
    """The environment of a ponte started by a test: its own port, data, logs and run folder."""
    return {**os.environ, "PATH": f"{venv_bin()}:{os.environ['PATH']}", "PORT": str(free_port()),
            "HOST": "127.0.0.1", "DATABASE_PATH": str(tmp_path / "data" / "ponte.db"),
            "LOG_DIR": str(tmp_path / "data" / "logs"), "PONTE_ENV_FILE": str(tmp_path / "no.env"),
            "PONTE_RUN_DIR": str(tmp_path / "run"), **extra}


def _start_supervisor(tmp_path: Path, app_dir: Path, env_extra: dict) -> tuple:
    conf_path = app_dir / f"supervisord-test-{os.getpid()}.conf"
    conf_path.write_text((app_dir / "supervisord.conf").read_text())
    env = _env(tmp_path, **env_extra)
    (tmp_path / "run").mkdir(exist_ok=True)
    proc = subprocess.Popen([str(venv_bin() / "supervisord"), "-c", str(conf_path)], env=env,
                            cwd=app_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, env["PORT"], env, conf_path


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
    # the launcher checks before Supervisor starts and turns a program giving up into exit 1
    assert cmd == ["python", "ponte_start.py"] and re.search(r"^WORKDIR /app$", text, re.M)
    assert env["PONTE_NO_VENV"] == "1"  # ./ponte status|backup in the container's console


def test_dockerfile_steps_outside_docker(tmp_path):
    """WORKDIR /app + COPY . . + the Dockerfile's ENV (with /data mapped to a temp dir) + CMD;
    docker stop's SIGTERM to the CMD stops everything with exit code 0."""
    _, env, cmd = _dockerfile()
    app_dir = tmp_path / "app"
    shutil.copytree(ROOT, app_dir, ignore=shutil.ignore_patterns(
        ".git", ".venv", "data", "logs", "__pycache__", ".pytest_cache", ".env"))
    data = tmp_path / "volume"
    docker_env = {k: v.replace("/data", str(data)) for k, v in env.items()
                  if k not in ("PORT", "HOST")}
    run_env = _env(tmp_path, **docker_env)
    del run_env["DATABASE_PATH"], run_env["LOG_DIR"]
    run_env.update({k: v for k, v in docker_env.items() if k in ("DATABASE_PATH", "LOG_DIR")})
    proc = subprocess.Popen([str(venv_bin() / cmd[0]), *cmd[1:]], cwd=app_dir, env=run_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: requests.get(f"http://127.0.0.1:{run_env['PORT']}/health",
                                       timeout=2).status_code == 200, 20, "/health 200")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        _kill(proc)
    assert (data / "ponte.db").exists() and list((data / "logs").glob("app-*.log"))
    assert not (app_dir / "data").exists()  # nothing written next to the code
    assert not (tmp_path / "run" / "supervisord.pid").exists()  # Supervisor stopped cleanly


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
    stay up serving nothing, and the watchdog tells the launcher which program gave up."""
    proc, _, _, conf_path = _start_supervisor(tmp_path, ROOT, {"PORT": "not-a-port"})
    try:
        proc.wait(60)
    finally:
        _stop(proc, conf_path)
    output = proc.stdout.read().decode(errors="replace")
    assert "desistiu de iniciar" in output
    assert "processname:" in (tmp_path / "run" / "fatal").read_text()


def _kill(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _launch(tmp_path: Path, *args: str, via_ponte: bool = False, **env) -> subprocess.Popen:
    """`python ponte_start.py` (or `./ponte run`); the environment is in `proc.env`."""
    command = ["./ponte", "run"] if via_ponte else [str(venv_bin() / "python"), "ponte_start.py"]
    full_env = _env(tmp_path, **env)
    proc = subprocess.Popen([*command, *args], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.env = full_env
    return proc


def _start_with_poller_command(tmp_path, name: str, command: str, timeout: float):
    """Start ponte with Supervisor running `command` as the poller; (exit code, output)."""
    conf = ROOT / f"supervisord-test-{name}-{os.getpid()}.conf"
    text = (ROOT / "supervisord.conf").read_text()
    assert "command=python poller.py\n" in text
    conf.write_text(text.replace("command=python poller.py\n", f"command={command}\n"))
    try:
        proc = _launch(tmp_path, "--conf", str(conf))
        try:
            code = proc.wait(timeout)
        finally:
            _kill(proc)
    finally:
        conf.unlink(missing_ok=True)
    return code, proc.stdout.read()


def test_a_start_where_a_program_gives_up_exits_1_naming_it(tmp_path):
    # GIVEN a poller that dies at once, every time (past every check made before the start)
    # WHEN ponte starts
    code, output = _start_with_poller_command(tmp_path, "fatal",
                                              "python -c 'raise SystemExit(7)'", 90)
    # THEN Supervisor gives up on it, stops the web too, and the start fails with code 1
    assert code == 1, output
    assert "o programa 'poller' desistiu de iniciar" in output


def test_a_program_that_keeps_dying_after_it_started_stops_the_start_with_exit_1(tmp_path):
    # GIVEN a poller that runs past Supervisor's startsecs, then dies: never FATAL, restarted
    # forever (what a web whose port was taken after the launcher's check does)
    code, output = _start_with_poller_command(
        tmp_path, "loop", "python -c 'import time; time.sleep(2.5); raise SystemExit(1)'", 120)
    assert code == 1, output
    assert "o programa 'poller' caiu 5 vezes em 60 s" in output
    assert "o programa 'poller' não para de cair" in output


def test_the_crash_loop_counts_each_program_within_its_window():
    import supervisor_watchdog
    loop = supervisor_watchdog.CrashLoop(limit=3, window_seconds=60)
    assert not loop.died("web", 0) and not loop.died("web", 10)
    assert not loop.died("poller", 20)  # another program's deaths are its own
    assert not loop.died("web", 61)  # the death at 0 is out of the window
    assert loop.died("web", 62)


def _supervisor_event(name: str, payload: str) -> str:
    header = (f"ver:3.0 server:supervisor serial:1 pool:ponte_watchdog poolserial:1 "
              f"eventname:{name} len:{len(payload)}\n")
    return header + payload


def test_the_watchdog_reads_each_event_once_and_gives_up_on_a_crash_loop(tmp_path,
                                                                          monkeypatch):
    import io

    import supervisor_watchdog
    # GIVEN Supervisor's events: a tick, a clean exit, then the poller dying 5 times at once
    died = "processname:poller groupname:poller from_state:RUNNING expected:0 pid:{}"
    events = [_supervisor_event("TICK_5", "when:1"),
              _supervisor_event("PROCESS_STATE_EXITED",
                                "processname:web groupname:web from_state:RUNNING "
                                "expected:1 pid:9")]
    events += [_supervisor_event("PROCESS_STATE_EXITED", died.format(100 + i)) for i in range(5)]
    out, kills = io.StringIO(), []
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(events)))
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr(supervisor_watchdog.os, "kill", lambda pid, sig: kills.append(sig))
    monkeypatch.setenv("PONTE_RUN_DIR", str(tmp_path))
    # WHEN the watchdog answers them, until Supervisor closes its stdin
    supervisor_watchdog.main(clock=lambda: 1000.0)
    # THEN every event was acknowledged, and the fifth death stopped Supervisor, marked
    assert out.getvalue() == "READY\nRESULT 2\nOK" * len(events) + "READY\n"
    assert kills == [signal.SIGTERM]
    assert (tmp_path / "fatal").read_text() == died.format(104)


def test_a_supervisor_killed_by_a_signal_is_never_a_clean_stop(tmp_path):
    # GIVEN programs that just wait (marked, to find them after their Supervisor is gone)
    marker = f"ponte-test-{os.getpid()}-{time.time_ns()}"
    text = (ROOT / "supervisord.conf").read_text()
    text = re.sub(r"^command=python (?:-m gunicorn .*|poller\.py)$",
                  f"command=python -c 'import time; time.sleep(600)' {marker}", text, flags=re.M)
    conf = ROOT / f"supervisord-test-killed-{os.getpid()}.conf"
    conf.write_text(text)
    proc = _launch(tmp_path, "--conf", str(conf))
    try:
        pid_file = tmp_path / "run" / "supervisord.pid"
        _wait_for(lambda: pid_file.exists() and len(_marked(marker)) == 2, 30, "both programs")
        # WHEN Supervisor is killed (the OOM killer, a kill -9)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        # THEN the start ends with 128 + 9, as a shell reports it
        assert proc.wait(30) == 128 + signal.SIGKILL
    finally:
        _kill(proc)
        conf.unlink(missing_ok=True)
        for pid in _marked(marker):
            os.kill(pid, signal.SIGKILL)


def _marked(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_busy_port_stops_the_start_with_exit_3_naming_the_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _launch(tmp_path, via_ponte=True, PORT=str(port))
        code = proc.wait(60)
    output = proc.stdout.read()
    assert code == 3, output
    assert f"a porta {port} já está em uso" in output and "Address already in use" not in output
    assert not (tmp_path / "run" / "supervisord.pid").exists()  # nothing was started


def test_an_invalid_configuration_stops_the_start_with_exit_2(tmp_path):
    proc = _launch(tmp_path, PORT="70000")
    assert proc.wait(60) == 2
    assert "PORT inválido (use de 1 a 65535)" in proc.stdout.read()


def test_a_data_folder_that_takes_no_writes_is_named_with_the_fix(tmp_path):
    # A file where the folder should be stops any user, root included.
    (tmp_path / "volume").write_text("not a folder")
    proc = _launch(tmp_path, DATABASE_PATH=str(tmp_path / "volume" / "ponte.db"))
    assert proc.wait(60) == 3
    output = proc.stdout.read()
    assert f"não consigo gravar em {tmp_path / 'volume'}" in output
    assert "Volume (não Bind mount)" in output and "chown -R 10001:10001" in output
    assert "sqlite" not in output.lower()


def test_a_folder_that_refuses_writes_is_named_with_the_fix(tmp_path):
    # What a root-owned volume is to the container's user; root itself is refused in /sys.
    volume = Path("/sys") if os.getuid() == 0 else tmp_path / "volume"
    if volume != Path("/sys"):
        volume.mkdir(mode=0o500)
    try:
        proc = _launch(tmp_path, DATABASE_PATH=str(volume / "ponte.db"))
        assert proc.wait(60) == 3
        output = proc.stdout.read()
        assert f"não consigo gravar em {volume} (Permission denied)" in output
        assert f"(agora: uid {os.getuid()})" in output
    finally:
        if volume != Path("/sys"):
            volume.chmod(0o700)


def test_a_second_start_from_the_same_checkout_says_it_is_already_running(tmp_path):
    first = _launch(tmp_path)
    try:
        base = f"http://127.0.0.1:{first.env['PORT']}"
        _wait_for(lambda: requests.get(base + "/health", timeout=2).status_code == 200, 30,
                  "the first ponte")
        pid = int((tmp_path / "run" / "supervisord.pid").read_text())
        second = _launch(tmp_path)  # same run folder, another port
        assert second.wait(60) == 3
        assert f"a ponte já está rodando a partir desta pasta (Supervisor, pid {pid})" in \
            second.stdout.read()
        assert requests.get(base + "/health", timeout=2).status_code == 200
        first.send_signal(signal.SIGINT)  # Ctrl+C
        assert first.wait(60) == 0
    finally:
        _kill(first)


def test_each_checkout_has_its_own_supervisor_folder(tmp_path):
    import ponte_start
    one, other = ponte_start.run_dir(tmp_path / "a", {}), ponte_start.run_dir(tmp_path / "b", {})
    assert one != other and one == ponte_start.run_dir(tmp_path / "a", {})
    assert ponte_start.run_dir(tmp_path / "a", {"PONTE_RUN_DIR": "/x/y"}) == Path("/x/y")
    conf = (ROOT / "supervisord.conf").read_text()
    assert "/tmp/" not in conf and conf.count("%(ENV_PONTE_RUN_DIR)s/") == 3


def _compose() -> dict:
    import yaml  # PyYAML comes with the test dependencies (responses)
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _stopwaitsecs() -> dict[str, int]:
    conf = (ROOT / "supervisord.conf").read_text()
    found = {}
    for name, body in re.findall(r"^\[program:(\w+)\]\n(.*?)(?=^\[|\Z)", conf, re.M | re.S):
        found[name] = int(re.search(r"^stopwaitsecs=(\d+)", body, re.M).group(1))
    return found


def _seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", str(text)))


def test_compose_keeps_data_on_a_volume_waits_for_the_poller_and_checks_health():
    ponte = _compose()["services"]["ponte"]
    assert any(v.split(":")[1] == "/data" for v in ponte["volumes"])
    # Supervisor stops web, then poller: the platform must wait for both before SIGKILL
    waits = _stopwaitsecs()
    assert set(waits) == {"web", "poller"}
    assert _seconds(ponte["stop_grace_period"]) >= max(80, sum(waits.values()))
    assert "/health" in " ".join(ponte["healthcheck"]["test"])
    env = dict(item.partition("=")[::2] for item in ponte["environment"])
    assert env["DATABASE_PATH"].startswith("/data/") and env["LOG_DIR"].startswith("/data/")
    assert ponte["ports"][0].endswith(":" + env["PORT"])
    assert "n8n" in _compose()["services"]["n8n"]["profiles"]  # optional, off by default


def test_compose_lists_each_bridge_variables_and_marks_the_required_ones():
    env_names = [item.partition("=")[0] for item in _compose()["services"]["ponte"]["environment"]]
    declared = {s.name for s in config.SETTINGS}
    assert set(env_names) <= declared, set(env_names) - declared
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    marked = set(re.findall(r"^\s+- (\w+)\s+# \(obrigatória", text, re.M))
    required = {k for keys in config.BRIDGE_REQUIRED.values() for k in keys}
    # the bridges' keys, what load_settings also demands of a bridge, and the console's token
    assert marked == required | {"ADMIN_TOKEN", "PUBLIC_BASE_URL", "KOMMO_ACCESS_TOKEN",
                                 "CHATWOOT_WEBHOOK_SECRET"}
    assert set(env_names) >= {"KOMMO_CLIENT_ID", "KOMMO_CLIENT_SECRET", "CHATWOOT_WEBHOOK_TOKEN"}
