"""The poller process: runs the job outbox and every periodic task; never serves HTTP.

Owns: `main()` (settings → logging → migrate → clients → schedule → loop), the `Poller` loop with
its fast wake-up on new jobs, the heartbeat, pruning, and warm shutdown on SIGTERM.
Must not: know what a job does (bridges' handlers) or talk to a peer itself.
"""
from __future__ import annotations

import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from typing import Callable

import schedule

import bridges
import config
import db_manager
import outbox
import ponte_logging
from job_runner import JobContext, run_next_job

log = logging.getLogger("ponte.poller")

HEARTBEAT_SECONDS = 5
PRUNE_SECONDS = 3600
# How often the idle loop looks for work written by the web process. PRAGMA data_version is
# read from shared memory, so checking often costs almost nothing and keeps wake-up latency low.
IDLE_CHECK_SECONDS = 0.02


class Poller:
    """The poller's loop. Tests drive it with `run_once()` / `drain()`; `run_forever()` is the
    daemon."""

    def __init__(self, settings, conn: sqlite3.Connection, clock: Callable[[], float] = time.time,
                 handlers: dict | None = None, on_dead: dict | None = None):
        self.settings = settings
        self.conn = conn
        self.clock = clock
        self.ctx = JobContext(settings, conn, now=clock)
        default_handlers, default_on_dead = bridges.handlers()
        self.handlers = handlers if handlers is not None else default_handlers
        self.on_dead = on_dead if on_dead is not None else default_on_dead
        self._stopped = threading.Event()  # also wakes the heartbeat thread at once on stop
        self.worker = worker_name()
        self.busy_since: float | None = None
        self.scheduler = schedule.Scheduler()
        self.scheduler.every(PRUNE_SECONDS).seconds.do(self.prune)
        for interval, task in bridges.schedules(settings):
            self.scheduler.every(max(1, int(interval))).seconds.do(self._guarded, task)

    def _guarded(self, task) -> None:
        try:
            task(self.ctx)
        except sqlite3.OperationalError:
            raise
        except Exception:
            log.exception("scheduled_task_failed", extra={"task": getattr(task, "__name__", "?")})

    def recover_orphans(self) -> int:
        """Jobs left running by a poller that died (SIGKILL, OOM) run again now, not after
        their lease."""
        released = outbox.release_orphaned_jobs(self.conn, "poller-", _worker_alive,
                                                 self.clock())
        if released:
            log.warning("orphaned_jobs_released", extra={"count": released})
        return released

    def heartbeat(self, conn: sqlite3.Connection | None = None) -> None:
        """Tell /health this process is alive, and since when it is busy with one job (so a
        stuck job shows up even while the heartbeat is fresh)."""
        db_manager.beat(conn or self.conn, "poller", self.clock(),
                        {"busy_since": self.busy_since, "worker": self.worker})

    def prune(self, older_than: float | None = None) -> None:
        """Delete what is past retention (JOB_RETENTION_DAYS, or before `older_than`): done jobs,
        inbound events, and each bridge's own rows (`bridges.pruners`), a batch of rows per
        transaction (`db_manager.delete_in_batches`)."""
        if older_than is None:
            older_than = self.clock() - self.settings.job_retention_days * 86400
        removed = outbox.prune_jobs(self.conn, older_than)
        db_manager.prune_events(self.conn, older_than)
        for prune in bridges.pruners():
            prune(self.conn, older_than)
        if removed:
            log.info("jobs_pruned", extra={"count": removed})

    def drain(self, max_jobs: int | None = None, between_jobs=None) -> int:
        """Run due jobs until none is due (or `max_jobs` ran). Returns how many ran."""
        ran = 0
        while not self.stopping and (max_jobs is None or ran < max_jobs):
            self.busy_since = self.clock()
            try:
                job = run_next_job(self.ctx, self.handlers, self.on_dead, worker=self.worker)
            finally:
                self.busy_since = None
            if job is None:
                break
            ran += 1
            if between_jobs:
                between_jobs()
        return ran

    def run_once(self) -> int:
        """One turn of the loop: due scheduled tasks, then due jobs — with the scheduled tasks
        also run between jobs, so a backlog does not hold back auto-resume or token refresh."""
        self.scheduler.run_pending()
        return self.drain(between_jobs=self.scheduler.run_pending)

    def run_forever(self) -> None:
        """Loop until SIGTERM: run what is due, then wait for new work written by another
        process, for the next due job, or for the next scheduled task."""
        self.recover_orphans()
        self.heartbeat()
        db_manager.start_periodic(self.settings.database_path, HEARTBEAT_SECONDS,
                                  self.heartbeat, "heartbeat", "heartbeat_failed", self._stopped)
        self.scheduler.run_all()
        while not self.stopping:
            # Read before running: a commit by the web process during run_once() must wake us.
            last_version = db_manager.data_version(self.conn)
            self.run_once()
            next_due = outbox.next_job_due_at(self.conn)
            wake_at = time.monotonic() + min(1.0, max(0.0, self.scheduler.idle_seconds or 1.0))
            if next_due is not None:
                wake_at = min(wake_at, time.monotonic() + max(0.0, next_due - self.clock()))
            while time.monotonic() < wake_at and not self._stopped.wait(IDLE_CHECK_SECONDS):
                if db_manager.data_version(self.conn) != last_version:
                    break
        log.info("poller_stopped")

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for (`request_stop`)."""
        return self._stopped.is_set()

    def request_stop(self, *_args) -> None:
        """Warm shutdown: the job in progress finishes, nothing new starts."""
        if not self.stopping:
            log.info("poller_stopping")
        self._stopped.set()


_STARTED_AT = int(time.time())


def worker_name() -> str:
    """`poller-<pid>-<start time>`: the start time tells a restarted container's poller (which
    often gets the same pid) from the one that died."""
    return f"poller-{os.getpid()}-{_STARTED_AT}"


def _worker_alive(name: str) -> bool:
    pid_text, _, started = name.partition("-")
    if not pid_text.isdigit():
        return True  # not ours to judge
    pid = int(pid_text)
    if pid == os.getpid():
        return started == str(_STARTED_AT)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> int:
    """Entry point of `python poller.py`. Exit codes: 0 stopped, 2 bad config, 3 database."""
    try:
        settings = config.load_settings()
    except config.ConfigError as exc:
        sys.stderr.write(str(exc) + "\n")
        return 2
    ponte_logging.setup_logging(settings, "poller")
    try:
        conn = db_manager.connect(settings.database_path)
        db_manager.migrate(conn)
        poller = Poller(settings, conn)
        signal.signal(signal.SIGTERM, poller.request_stop)
        signal.signal(signal.SIGINT, poller.request_stop)
        log.info("poller_started", extra={"bridges": list(settings.enabled_bridges),
                                          "version": config.VERSION})
        poller.run_forever()
    except (sqlite3.Error, db_manager.DatabaseError) as exc:
        log.critical("poller_database_failure", extra={"error": str(exc)})
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
