"""Supervisor event listener: when a program gives up (FATAL, e.g. a broken configuration),
stop supervisord too, so the container exits and the platform shows the failure instead of a
container that looks up but serves nothing.

Owns: nothing of ponte's state; speaks Supervisor's event-listener protocol on stdin/stdout.
"""
import os
import signal
import sys


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
            os.kill(os.getppid(), signal.SIGTERM)
        sys.stdout.write("RESULT 2\nOK")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
