"""The poller's pool of job workers: threads that run claimed outbox jobs side by side, so one
customer's slow AI answer never makes every other conversation (or Mercado Livre) wait.

Owns: `WorkerPool` — how many jobs run at once (POLLER_CONCURRENCY) and per lane
(POLLER_LANE_LIMITS), the workers' database connections (`ConnectionPool`: one per job while
it uses the database, none while it waits on a slow peer) and each worker thread's peer
clients, what is in flight (for the heartbeat and /health), and the claim → submit → wait
cycle.
Must not: know what a job does (the bridges' handlers), schedule periodic tasks (poller), or
let two jobs use one database connection at the same time.

Why threads: the work is waiting on peers (an n8n call takes seconds), and both sqlite3 and
requests release the GIL while they wait. Order per conversation is the outbox's (one running
job per ordering key), not the pool's: the pool only says how many may start.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import config
import db_manager
import outbox
from job_runner import (DATABASE_LANE, JobContext, JobOutcome, claim_jobs, lane_of, run_job,
                        urgent_kinds)
from outbox import Job

log = logging.getLogger("ponte.pool")

# Each lane (peer) may fill this share of the pool by default, so a slow or failing peer always
# leaves the rest to the other peers.
DEFAULT_LANE_SHARE = 0.75
# Kommo takes at most 7 requests a second (peer_http's shared limit): more workers than that
# would only wait in the limiter, holding workers the other peers could use.
DEFAULT_LANE_LIMITS = {"kommo": 8}
# How many urgent database-only jobs (recorded webhooks to apply, in arrival order) one claim
# may take.
URGENT_BATCH = 32
# A job reads and writes a few rows with a few statements: a small page cache and statement
# cache per worker connection keep 32 of them from adding SQLite's default 2 MiB (pages) and
# 128 prepared statements each to the poller's memory.
WORKER_CACHE_KIB = 256
WORKER_CACHED_STATEMENTS = 24
# glibc gives each thread that allocates its own malloc arena (up to 8 per core), each keeping
# its own free memory: 32 workers left ~2 MB more resident than two arenas shared by all.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h


class ConnectionPool:
    """The workers' database connections: taken by a job when it first touches the database,
    given back when it ends or waits on a slow peer (`LeasedConnection.release`). 24 jobs
    waiting on an AI answer then hold no connection, instead of one each (a connection keeps
    its parsed schema, ~170 KB with ponte's tables)."""

    def __init__(self, path: str):
        self.path = path
        self._idle: list[sqlite3.Connection] = []
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def take(self) -> sqlite3.Connection:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        conn = db_manager.connect(self.path, cache_kib=WORKER_CACHE_KIB,
                                  cached_statements=WORKER_CACHED_STATEMENTS)
        with self._lock:
            self._all.append(conn)
        return conn

    def give(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._idle.append(conn)

    @property
    def opened(self) -> int:
        """How many connections the pool has opened (its high-water mark)."""
        with self._lock:
            return len(self._all)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
            self._idle.clear()


class LeasedConnection:
    """A worker's `ctx.conn`: a connection from the pool, taken on first use, used like a
    `sqlite3.Connection`; `release()` gives it back unless a transaction is open on it."""

    def __init__(self, pool: ConnectionPool):
        self._pool = pool
        self._conn: sqlite3.Connection | None = None

    def __getattr__(self, name: str):  # execute, in_transaction, ... of the leased connection
        if self._conn is None:
            self._conn = self._pool.take()
        return getattr(self._conn, name)

    def release(self, job_ended: bool = False) -> None:
        """Give the connection back (a later use takes one again, maybe another). Mid-job a
        connection with a transaction open is kept; at the end of a job (`job_ended`) such a
        transaction (a COMMIT that failed) is rolled back first, so the next job cannot join
        it and never commit."""
        if self._conn is None:
            return
        if self._conn.in_transaction:
            if not job_ended:
                return
            log.critical("job_left_transaction_open")
            self._conn.execute("ROLLBACK")
        conn, self._conn = self._conn, None
        self._pool.give(conn)


@dataclass(frozen=True)
class InFlight:
    """A job a worker is running: what the heartbeat reports."""

    job_id: int
    kind: str
    lane: str
    started_at: float
    lease_token: str


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (call before the workers start); True if
    set. Elsewhere than glibc (musl) nothing changes: memory only, never behaviour."""
    try:
        import ctypes
        return ctypes.CDLL(None).mallopt(_M_ARENA_MAX, int(arenas)) == 1
    except (OSError, AttributeError):
        return False


def lane_limits(settings, lanes: set[str]) -> dict[str, int]:
    """How many jobs each lane may run at once: POLLER_LANE_LIMITS, else
    `DEFAULT_LANE_SHARE` of POLLER_CONCURRENCY (at least one)."""
    default = max(1, int(settings.poller_concurrency * DEFAULT_LANE_SHARE))
    limits = {lane: min(default, DEFAULT_LANE_LIMITS.get(lane, default)) for lane in lanes}
    given = config.parse_lane_limits(settings.poller_lane_limits)
    unknown = sorted(set(given) - lanes)
    if unknown:  # a typo would silently leave the default in place
        raise config.ConfigError([f"POLLER_LANE_LIMITS: faixa desconhecida {', '.join(unknown)}"
                                  f" (as faixas são: {', '.join(sorted(lanes))})"])
    limits.update(given)
    return limits


class WorkerPool:
    """Runs claimed jobs on up to `settings.poller_concurrency` threads. The thread that owns
    the pool (the poller's loop) calls `dispatch()` and `wait()`; workers call nothing back but
    the database."""

    def __init__(self, settings, conn: sqlite3.Connection, handlers: dict, on_dead: dict,
                 clock: Callable[[], float], worker: str):
        self.settings = settings
        self.handlers, self.on_dead = handlers, on_dead
        self.clock = clock
        self.worker = worker
        self.concurrency = max(1, settings.poller_concurrency)
        self.lanes = {kind: lane_of(kind, h) for kind, h in handlers.items()}
        self.limits = lane_limits(settings, set(self.lanes.values()))
        self._urgent = urgent_kinds(handlers)
        # Urgent jobs that only write to the database run right here, in turn: one claim may
        # take a run of them. One at a time if any urgent kind would run on a worker.
        self._urgent_together = (URGENT_BATCH if all(self.lanes.get(kind) == DATABASE_LANE
                                                     for kind in self._urgent) else 1)
        self._claim_ctx = JobContext(settings, conn, now=clock)
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency,
                                            thread_name_prefix="job-worker")
        self._local = threading.local()
        self.connections = ConnectionPool(settings.database_path)
        self._changed = threading.Condition()
        self._in_flight: dict[int, InFlight] = {}
        self.finished = 0  # jobs finished by the workers so far (`wait_finished`)
        self.fatal: BaseException | None = None

    # --- the owner's side ----------------------------------------------------------------------
    def dispatch(self, max_jobs: int | None = None) -> int:
        """Claim as many due jobs as there are free workers (and room in their lanes), and start
        them. A job that only writes to the database (the `database` lane: applying a recorded
        webhook) runs right here instead, on the owner's connection: it takes ~0.1 ms, and
        handing it to a thread would cost more than running it. Returns how many started."""
        with self._changed:
            free = self.concurrency - len(self._in_flight)
            running = list(self._in_flight.values())
        if max_jobs is not None:
            free = min(free, max_jobs)
        if free <= 0 or self.fatal is not None:
            return 0
        room, busy = dict(self.limits), {}
        for item in running:
            room[item.lane] = room.get(item.lane, 0) - 1
            busy[item.lane] = busy.get(item.lane, 0) + 1
        jobs = claim_jobs(self._claim_ctx, self.handlers, self.on_dead, worker=self.worker,
                          limit=free, lane_room=room, lane_busy=busy,
                          urgent_only=any(item.kind in self._urgent for item in running),
                          running_ids=tuple(item.job_id for item in running),
                          lanes=self.lanes, urgent=self._urgent,
                          urgent_together=self._urgent_together)
        held_up = False
        for job in jobs:
            if self.lanes.get(job.kind) != DATABASE_LANE:
                self._start(job)
            elif held_up:
                # An earlier delivery of the run will be tried again: the ones behind it wait
                # for it, as they would have had they not been claimed with it.
                outbox.release_job(self._claim_ctx.conn, job, self.clock(), self.clock())
            elif run_job(self._claim_ctx, job, self.handlers, self.on_dead) not in \
                    JobOutcome.FINISHED and job.kind in self._urgent:
                held_up = True
        return len(jobs)

    def wait(self, timeout: float | None = None) -> None:
        """Block until a running job finishes (or `timeout` passes)."""
        with self._changed:
            if self._in_flight:
                self._changed.wait(timeout)

    def wait_finished(self, seen: int, timeout: float) -> bool:
        """Block until a worker finishes a job after `finished` was `seen` (or `timeout`
        passes); True if one did."""
        with self._changed:
            return self._changed.wait_for(lambda: self.finished != seen, timeout)

    def in_flight(self) -> list[InFlight]:
        """The jobs running now, oldest first."""
        with self._changed:
            return sorted(self._in_flight.values(), key=lambda i: i.started_at)

    @property
    def busy(self) -> bool:
        """Whether any job is running."""
        with self._changed:
            return bool(self._in_flight)

    def renew_leases(self, conn: sqlite3.Connection) -> None:
        """Extend the lease of every running job (called with the heartbeat, from its own
        thread and connection): a job may run longer than JOB_LEASE_SECONDS without another
        worker — or this pool — taking it over."""
        running = self.in_flight()
        outbox.renew_leases(conn, [(item.job_id, item.lease_token) for item in running],
                            self.clock() + self.settings.job_lease_seconds)

    def raise_if_fatal(self) -> None:
        """Re-raise, in the owner's thread, a database failure a worker met (the poller must
        exit and be restarted, as when it ran jobs itself)."""
        if self.fatal is not None:
            raise self.fatal

    def shutdown(self) -> None:
        """Wait for the running jobs (warm stop), then close the workers' connections."""
        self._executor.shutdown(wait=True)
        self.connections.close()

    # --- the workers' side ---------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        lane = self.lanes.get(job.kind) or lane_of(job.kind, None)
        with self._changed:
            self._in_flight[job.id] = InFlight(job.id, job.kind, lane, self.clock(),
                                               job.lease_token)
        self._executor.submit(self._run, job)

    def _run(self, job: Job) -> None:
        ctx = self._context()
        try:
            run_job(ctx, job, self.handlers, self.on_dead)
        except (sqlite3.Error, db_manager.DatabaseError) as exc:
            log.critical("job_worker_database_failure", extra={"job_id": job.id,
                                                               "error": str(exc)})
            self.fatal = exc
        except BaseException:  # run_job records every job failure; this is a bug in ponte
            log.exception("job_worker_crashed", extra={"job_id": job.id})
        finally:
            try:
                ctx.conn.release(job_ended=True)
            except sqlite3.Error as exc:  # the database itself fails: the poller must stop
                self.fatal = self.fatal or exc
            with self._changed:
                self._in_flight.pop(job.id, None)
                self.finished += 1
                self._changed.notify_all()

    def _context(self) -> JobContext:
        """This worker thread's context: its own peer clients (the rate limits they share live
        outside the process, in peer_http) and a connection leased from the pool per job."""
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = JobContext(self.settings, LeasedConnection(self.connections),
                                               now=self.clock)
        return ctx
