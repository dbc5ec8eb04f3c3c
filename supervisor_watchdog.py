"""Supervisor event listener: when a program gives up (FATAL, e.g. a broken configuration),
stop supervisord too, so the container exits and the platform shows the failure instead of a
container that looks up but serves nothing. Supervisor itself always exits 0, so the listener
first leaves a mark (`$PONTE_RUN_DIR/fatal`, the event's payload) for ponte_start.py, which
turns it into exit code 1. A program that keeps dying after it started (Supervisor restarts
it forever and never calls it FATAL: e.g. a port taken after the launcher's check) counts as
giving up too, once it died CRASH_LIMIT times within CRASH_WINDOW_SECONDS.

Owns: the mark; speaks Supervisor's event-listener protocol on stdin/stdout.
Must not: touch ponte's database or settings.
"""
import os
import signal
import sys
import time
from collections import defaultdict, deque
from pathlib import Path

FATAL_MARK = "fatal"  # read by ponte_start.py
CRASH_LIMIT = 5
CRASH_WINDOW_SECONDS = 60.0


class CrashLoop:
    """Counts each program's unexpected exits; `died()` says when one is in a crash loop."""

    def __init__(self, limit: int = CRASH_LIMIT, window_seconds: float = CRASH_WINDOW_SECONDS):
        self.limit, self.window_seconds = limit, window_seconds
        self._exits: dict[str, deque] = defaultdict(deque)

    def died(self, program: str, now: float) -> bool:
        exits = self._exits[program]
        exits.append(now)
        while exits and now - exits[0] > self.window_seconds:
            exits.popleft()
        return len(exits) >= self.limit


def fields(payload: str) -> dict:
    """The `key:value` tokens of a Supervisor header or payload (and of the fatal mark)."""
    return dict(token.split(":", 1) for token in payload.split() if ":" in token)


def leave_mark(payload: str) -> None:
    """Tell ponte_start.py which program gave up (nothing to do when run without it)."""
    folder = os.environ.get("PONTE_RUN_DIR")
    if folder:
        try:
            Path(folder, FATAL_MARK).write_text(payload)
        except OSError as exc:
            sys.stderr.write(f"ponte: não consegui registrar a falha em {folder}: {exc}\n")


def _give_up(payload: str, why: str) -> None:
    sys.stderr.write(f"ponte: {why} ({payload}); encerrando o Supervisor\n")
    sys.stderr.flush()
    leave_mark(payload)
    os.kill(os.getppid(), signal.SIGTERM)


def read_event(stdin) -> tuple[str | None, dict, str] | None:
    """The next event from Supervisor, each header read once: (event name, the payload's
    fields, the payload), or None when Supervisor closed our stdin."""
    line = stdin.readline()
    if not line:
        return None
    header = fields(line)
    payload = stdin.read(int(header.get("len", 0))).strip()
    return header.get("eventname"), fields(payload), payload


def main(clock=time.monotonic) -> None:
    """Answer Supervisor's events until it closes our stdin."""
    crashes = CrashLoop()
    while True:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        read = read_event(sys.stdin)
        if read is None:
            return
        event, fields, payload = read
        if event == "PROCESS_STATE_FATAL":
            _give_up(payload, "um processo desistiu de iniciar")
        elif event == "PROCESS_STATE_EXITED" and fields.get("expected") == "0":
            program = fields.get("processname", "?")
            if crashes.died(program, clock()):
                _give_up(payload, f"o programa '{program}' caiu {CRASH_LIMIT} vezes em "
                                  f"{CRASH_WINDOW_SECONDS:g} s")
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
