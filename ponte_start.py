"""Start ponte under Supervisor, and fail loudly and clearly when it cannot run.

Owns: the checks made before Supervisor starts (the configuration, a ponte already running from
this folder, a data folder that takes writes, a free port), the per-checkout run folder that
holds Supervisor's socket and pid file (`PONTE_RUN_DIR`), forwarding stop signals to Supervisor,
and the exit code of a start: 0 after a normal stop, 1 when a program gave up (FATAL, or a
crash loop; the watchdog leaves a mark in the run folder), 2 for an invalid configuration, 3 when the machine is
not ready (busy port, data folder not writable, already running).
Used by `./ponte run` and as the container's CMD. Messages for people are in Portuguese.
Must not: do any of ponte's work, open the database, or start the programs itself.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import config
import supervisor_watchdog

ROOT = Path(__file__).resolve().parent
EXIT_OK, EXIT_GAVE_UP, EXIT_CONFIG, EXIT_NOT_READY = 0, 1, 2, 3
FATAL_MARK = supervisor_watchdog.FATAL_MARK  # "processname:web groupname:web ..."
PID_FILE = "supervisord.pid"
SERVICE_UID = 10001  # the container's user (Dockerfile)


def say(text: str) -> None:
    print("ponte: " + text, file=sys.stderr, flush=True)


def run_dir(checkout: Path = ROOT, environ=os.environ) -> Path:
    """Where Supervisor keeps its socket and pid file: one folder per checkout and user, so
    two copies of ponte on one machine never share them (`PONTE_RUN_DIR` overrides)."""
    if environ.get("PONTE_RUN_DIR"):
        return Path(environ["PONTE_RUN_DIR"])
    digest = hashlib.sha256(str(checkout.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ponte-{os.getuid()}-{digest}"


def running_pid(folder: Path) -> int | None:
    """The pid of the Supervisor started from this run folder, if it is still running (a pid
    file left by a killed Supervisor, or a pid reused by another program, does not count)."""
    try:
        pid = int((folder / PID_FILE).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid  # no /proc here: trust the live pid
    return pid if b"supervisord" in cmdline or b"supervisor.supervisord" in cmdline else None


def data_folder_problem(settings) -> str | None:
    """A Portuguese message when the database's folder or the log folder cannot be written
    (naming the path and the fix), else None. Tries a real write: permissions alone do not
    tell (root ignores them, a read-only mount ignores them the other way)."""
    database = Path(settings.database_path).expanduser().absolute()
    for folder in (database.parent, Path(settings.log_dir).expanduser().absolute()):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".ponte-write-test-"):
                pass
            if folder == database.parent and database.exists():
                with open(database, "r+b"):
                    pass
        except OSError as exc:
            return (f"não consigo gravar em {folder} ({exc.strerror or exc}); a ponte guarda o "
                    f"banco e os logs lá. Rode como um usuário que possa escrever nessa pasta "
                    f"(agora: uid {os.getuid()}). No EasyPanel, em Mounts, monte {folder} como "
                    f"Volume (não Bind mount); num Bind mount, dê a pasta do servidor ao usuário "
                    f"do contêiner: chown -R {SERVICE_UID}:{SERVICE_UID} <pasta no servidor>. "
                    "Fora do Docker, confira DATABASE_PATH e LOG_DIR.")
    return None


def port_problem(host: str, port: int) -> str | None:
    """A Portuguese message naming the port when the web server could not listen there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Gunicorn does
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"a porta {port} já está em uso (outro programa, ou outra ponte); pare-o "
                        f"ou escolha outra porta: PORT={port + 10} ./ponte run")
            if exc.errno == errno.EACCES:
                return (f"sem permissão para escutar na porta {port}; use uma porta acima de "
                        "1023 (ex.: PORT=8000)")
            return f"não consigo escutar em {host}:{port} ({exc.strerror or exc}); confira HOST"
    return None


def preflight(settings, folder: Path) -> tuple[int, str] | None:
    """(exit code, message) when ponte must not start, else None."""
    pid = running_pid(folder)
    if pid:
        return EXIT_NOT_READY, (f"a ponte já está rodando a partir desta pasta (Supervisor, pid "
                                f"{pid}); pare-a antes (Ctrl+C no terminal dela, ou kill {pid}).")
    problem = data_folder_problem(settings) or port_problem(settings.host, settings.port)
    return (EXIT_NOT_READY, problem) if problem else None


def _supervisord() -> list[str]:
    beside = Path(sys.executable).parent / "supervisord"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "supervisor.supervisord"]


def supervise(conf: Path, folder: Path) -> int:
    """Run Supervisor until it stops, passing on stop signals; the exit code of the start."""
    mark = folder / FATAL_MARK
    mark.unlink(missing_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PONTE_RUN_DIR": str(folder),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(_supervisord() + ["-c", str(conf)], env=env)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    code = _wait_reaping(proc)
    if mark.exists():
        fields = supervisor_watchdog.fields(mark.read_text())
        program = fields.get("processname", "um programa")
        what = "não para de cair" if fields.get("from_state") == "RUNNING" else \
            "desistiu de iniciar"
        say(f"o programa '{program}' {what} (veja as linhas acima); a ponte parou com erro "
            f"(código {EXIT_GAVE_UP}).")
        return EXIT_GAVE_UP
    if code < 0:  # killed by a signal: the shell's convention, never a clean 0
        return 128 - code
    return code


def _wait_reaping(proc: subprocess.Popen) -> int:
    """Wait for Supervisor. In a container this process is PID 1, and orphans (a Gunicorn worker
    whose master died) become its children: reap them too, or they stay as zombies."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:  # Supervisor was reaped by proc.poll() in forward()
            return proc.wait()
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./ponte run",
                                     description="Sobe a ponte (web + poller) sob o Supervisor.")
    parser.add_argument("--conf", type=Path, default=ROOT / "supervisord.conf",
                        help="arquivo do Supervisor (padrão: supervisord.conf)")
    args = parser.parse_args(argv)
    settings = config.check()
    if settings is None:
        return EXIT_CONFIG
    folder = run_dir()
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        say(f"não consigo criar a pasta do Supervisor {folder} ({exc.strerror or exc}); "
            "defina PONTE_RUN_DIR com uma pasta gravável.")
        return EXIT_NOT_READY
    refusal = preflight(settings, folder)
    if refusal:
        say(refusal[1])
        return refusal[0]
    return supervise(args.conf, folder)


if __name__ == "__main__":
    sys.exit(main())
