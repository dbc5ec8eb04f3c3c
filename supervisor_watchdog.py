"""Supervisor event listener: when a program gives up (FATAL, e.g. a broken configuration),
stop supervisord too, so the container exits and the platform shows the failure instead of a
container that looks up but serves nothing. Supervisor itself always exits 0, so the listener
first leaves a mark (`$PONTE_RUN_DIR/fatal`, the event's payload) for ponte_start.py, which
turns it into exit code 1.

Owns: the mark; speaks Supervisor's event-listener protocol on stdin/stdout.
Must not: touch ponte's database or settings.
"""
import os
import signal
import sys
from pathlib import Path

FATAL_MARK = "fatal"  # ponte_start.FATAL_MARK


def leave_mark(payload: str) -> None:
    """Tell ponte_start.py which program gave up (nothing to do when run without it)."""
    folder = os.environ.get("PONTE_RUN_DIR")
    if folder:
        try:
            Path(folder, FATAL_MARK).write_text(payload)
        except OSError as exc:
            sys.stderr.write(f"ponte: não consegui registrar a falha em {folder}: {exc}\n")


def main() -> None:
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        header = dict(token.split(":", 1) for token in sys.stdin.readline().split())
        payload = sys.stdin.read(int(header.get("len", 0)))
        if header.get("eventname") == "PROCESS_STATE_FATAL":
            sys.stderr.write(f"ponte: um processo desistiu de iniciar ({payload.strip()}); "
                             "encerrando o Supervisor\n")
            sys.stderr.flush()
            leave_mark(payload.strip())
            os.kill(os.getppid(), signal.SIGTERM)
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
