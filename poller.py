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

import alerts
import bridges
import config
import db_manager
import outbox
import ponte_logging
import ponte_metrics
from job_runner import JobContext
import worker_pool
from worker_pool import WorkerPool

log = logging.getLogger("ponte.poller")

HEARTBEAT_SECONDS = 5
PRUNE_SECONDS = 3600
# How often the idle loop looks for work written by the web process. PRAGMA data_version is
# read from shared memory, so checking often costs almost nothing and keeps wake-up latency low.
IDLE_CHECK_SECONDS = 0.02


class Poller:
    """The poller's loop. Tests drive it with `run_once()` / `drain()`; `run_forever()` is the
    daemon. Jobs run on a `WorkerPool`; the loop claims them, and in the daemon the scheduled
    tasks run on a thread of their own, so neither a slow Mercado Livre poll nor a slow job
    holds the other back."""

    def __init__(self, settings, conn: sqlite3.Connection, clock: Callable[[], float] = time.time,
                 handlers: dict | None = None, on_dead: dict | None = None):
        self.settings = settings
        self.conn = conn
        self.clock = clock
        self.ctx = JobContext(settings, conn, now=clock)
        self.task_ctx = self.ctx  # the scheduled tasks' context (their own thread's in run_forever)
        default_handlers, default_on_dead = bridges.handlers()
        default_handlers = {**default_handlers, **alerts.HANDLERS}  # alert.deliver
        self.handlers = handlers if handlers is not None else default_handlers
        self.on_dead = on_dead if on_dead is not None else default_on_dead
        self._stopped = threading.Event()  # also wakes the heartbeat thread at once on stop
        self.worker = worker_name()
        self.pool = WorkerPool(settings, conn, self.handlers, self.on_dead, clock, self.worker)
        self.scheduler = schedule.Scheduler()
        self.scheduler.every(PRUNE_SECONDS).seconds.do(self._guarded, self._prune_task)
        self.scheduler.every(max(5, settings.alert_check_seconds)).seconds.do(
            self._guarded, alerts.check)
        for interval, task in bridges.schedules(settings):
            self.scheduler.every(max(1, int(interval))).seconds.do(self._guarded, task)

    def _guarded(self, task) -> None:
        try:
            task(self.task_ctx)
        except sqlite3.OperationalError:
            raise
        except Exception:
            log.exception("scheduled_task_failed", extra={"task": getattr(task, "__name__", "?")})

    def _prune_task(self, ctx: JobContext) -> None:
        self.prune(conn=ctx.conn)

    def recover_orphans(self) -> int:
        """Jobs left running by a poller that died (SIGKILL, OOM) run again now, not after
        their lease."""
        released = outbox.release_orphaned_jobs(self.conn, "poller-", _worker_alive,
                                                 self.clock())
        if released:
            log.warning("orphaned_jobs_released", extra={"count": released})
        return released

    def heartbeat(self, conn: sqlite3.Connection | None = None) -> None:
        """Tell /health this process is alive, how many jobs it runs, and since when the oldest
        of them runs (`busy_since`: a stuck job shows up even while the heartbeat is fresh)."""
        running = self.pool.in_flight()
        oldest = running[0] if running else None
        self.pool.renew_leases(conn or self.conn)
        db_manager.beat(conn or self.conn, "poller", self.clock(), {
            "worker": self.worker, "concurrency": self.pool.concurrency,
            "in_flight": len(running), "busy_since": oldest.started_at if oldest else None,
            "db_connections": self.pool.connections.opened,
            "oldest_job": {"job_id": oldest.job_id, "kind": oldest.kind} if oldest else None})

    def prune(self, older_than: float | None = None,
              conn: sqlite3.Connection | None = None) -> None:
        """Delete what is past retention (JOB_RETENTION_DAYS, or before `older_than`): done jobs,
        inbound events, and each bridge's own rows (`bridges.pruners`), a batch of rows per
        transaction (`db_manager.delete_in_batches`)."""
        conn = conn or self.conn
        if older_than is None:
            older_than = self.clock() - self.settings.job_retention_days * 86400
        removed = outbox.prune_jobs(conn, older_than)
        db_manager.prune_events(conn, older_than)
        for prune in bridges.pruners():
            prune(conn, older_than)
        if removed:
            log.info("jobs_pruned", extra={"count": removed})

    def drain(self, max_jobs: int | None = None, between_jobs=None) -> int:
        """Run due jobs, up to POLLER_CONCURRENCY at once, until none is due and none is
        running (or `max_jobs` were started). Returns how many were started."""
        started = 0
        while True:
            self.pool.raise_if_fatal()
            claimed = 0
            if not self.stopping and (max_jobs is None or started < max_jobs):
                claimed = self.pool.dispatch(None if max_jobs is None else max_jobs - started)
                started += claimed
            if not claimed and not self.pool.busy:
                break
            self.pool.wait(IDLE_CHECK_SECONDS)  # returns as soon as a job finishes
            if between_jobs:
                between_jobs()
        self.pool.raise_if_fatal()
        return started

    def run_once(self) -> int:
        """One turn of the loop: due scheduled tasks, then due jobs — with the scheduled tasks
        also run between jobs, so a backlog does not hold back auto-resume or token refresh."""
        self.scheduler.run_pending()
        return self.drain(between_jobs=self.scheduler.run_pending)

    def run_forever(self) -> None:
        """Loop until SIGTERM: start what is due on free workers, then wait for a job to
        finish, for new work written by another process, or for the next due job. On stop, the
        running jobs finish (warm shutdown) and nothing new starts."""
        self.recover_orphans()
        self.heartbeat()
        # The heartbeat (and the leases it renews) goes on while the running jobs finish after
        # a stop: /health must not call a poller that stops warmly dead.
        beating = threading.Event()
        db_manager.start_periodic(self.settings.database_path, HEARTBEAT_SECONDS,
                                  self.heartbeat, "heartbeat", "heartbeat_failed", beating)
        tasks = threading.Thread(target=self._run_scheduler, name="scheduled-tasks", daemon=True)
        tasks.start()
        try:
            while not self.stopping:
                self.pool.raise_if_fatal()
                # Read before claiming: a commit by the web process or by a worker (a job done,
                # its follow-ups) during dispatch() must wake us.
                last_version = db_manager.data_version(self.conn)
                finished = self.pool.finished
                if self.pool.dispatch():
                    continue  # there may be more due than free workers took
                # A job already due that did not start waits for a worker or a lane to free
                # up, or for a commit: something that wakes us below. Trying again at every
                # tick would take the write lock the webhook acks need, 50 times a second.
                now = self.clock()
                next_due = outbox.next_job_due_at(self.conn, after=now)
                wait = 1.0
                if next_due is not None:
                    wait = min(wait, max(IDLE_CHECK_SECONDS, next_due - now))
                wake_at = time.monotonic() + wait
                # A worker that finishes wakes us at once (its vacancy, its follow-ups); a commit
                # by another process is seen within IDLE_CHECK_SECONDS.
                while time.monotonic() < wake_at and not self.stopping:
                    if self.pool.wait_finished(finished, IDLE_CHECK_SECONDS) or \
                            db_manager.data_version(self.conn) != last_version:
                        break
        finally:
            self._stopped.set()
            if self.pool.busy:
                log.info("poller_waiting_for_jobs", extra={"in_flight": len(self.pool.in_flight())})
            self.pool.shutdown()
            beating.set()
            tasks.join(timeout=5)
        self.pool.raise_if_fatal()
        log.info("poller_stopped")

    def _run_scheduler(self) -> None:
        """The scheduled tasks' thread (run_forever): its own connection, one task at a time."""
        conn = None
        try:
            conn = db_manager.connect(self.settings.database_path)
            self.task_ctx = JobContext(self.settings, conn, now=self.clock)
            self.scheduler.run_all()
            while not self._stopped.wait(min(1.0, max(0.05, self.scheduler.idle_seconds or 1.0))):
                self.scheduler.run_pending()
        except (sqlite3.Error, db_manager.DatabaseError) as exc:
            log.critical("scheduled_tasks_database_failure", extra={"error": str(exc)})
            self.pool.fatal = exc
        finally:
            if conn is not None:
                conn.close()

    @property
    def stopping(self) -> bool:
        """Whether a stop was asked for (`request_stop`)."""
        return self._stopped.is_set()

    def request_stop(self, *_args) -> None:
        """Warm shutdown: the jobs in progress finish, nothing new starts."""
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
    return db_manager.process_alive(pid)


def main() -> int:
    """Entry point of `python poller.py`. Exit codes: 0 stopped, 2 bad config, 3 database."""
    try:
        settings = config.load_settings()
    except config.ConfigError as exc:
        sys.stderr.write(str(exc) + "\n")
        return 2
    ponte_logging.setup_logging(settings, "poller")
    ponte_metrics.setup(settings)
    worker_pool.limit_malloc_arenas()
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
