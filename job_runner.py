"""Running outbox jobs: the context handed to job handlers and the claim → run → complete/fail
cycle.

Owns: `JobContext`, `Clients` (peer clients built lazily from settings), `JobFailed`,
`run_next_job()`.
Must not: know what any job does (that is the bridges' handlers) or schedule anything (poller).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import db_manager
import outbox
import ponte_logging
import ponte_metrics
from outbox import FollowUp, Job
from peer_http import PeerError

log = logging.getLogger("ponte.jobs")


class JobFailed(Exception):
    """Raised by a handler for a failure that is not a peer's HTTP error."""

    def __init__(self, detail: str, retryable: bool = True,
                 retry_after_seconds: float | None = None):
        self.detail = detail
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds
        super().__init__(detail)


class JobOutcome:
    """How one run of a job ended (`run_job`'s answer, and the metrics' label)."""

    DONE = "done"
    RETRY = "retry"  # failed, back to pending for a later attempt
    DEAD = "dead"
    DEFERRED = "deferred"  # given back without spending the attempt
    LEASE_LOST = "lease_lost"  # another worker took it over
    ERROR = "error"  # ponte itself failed (a database error, raised)
    # The job left the way of the jobs behind it in its ordering key.
    FINISHED = (DONE, DEAD)


@dataclass
class JobDone:
    """What a handler may return instead of `result` or `(result, follow_ups)`: also `writes`,
    database writes that record what the handler did outside (a message sent). They commit in
    the transaction that marks the job done (one write transaction instead of two); when the
    lease was lost they are still made, for the job's new owner to read (an `atomic` handler's
    are undone with everything else it wrote)."""

    result: dict | None = None
    follow_ups: list[FollowUp] = field(default_factory=list)
    writes: Callable[[sqlite3.Connection], None] | None = None


class JobDeferred(Exception):
    """Raised by a handler that cannot run yet (e.g. Kommo still running the previous Salesbot
    on that lead): the job goes back to the queue until `available_at`, attempt not counted."""

    def __init__(self, available_at: float):
        self.available_at = available_at
        super().__init__(f"deferred until {available_at}")


class Clients:
    """The peer clients of one process, each built on first use from the settings."""

    def __init__(self, settings, conn: sqlite3.Connection, now: Callable[[], float]):
        self.settings = settings
        self.conn = conn
        self.now = now

    @functools.cached_property
    def kommo(self):
        import kommo_auth
        return kommo_auth.build_client(self.settings, self.conn, self.now)

    @functools.cached_property
    def n8n(self):
        import n8n_api
        s = self.settings
        return n8n_api.N8nClient(s.n8n_webhook_url, s.n8n_api_key,
                                 timeout_seconds=s.n8n_timeout_seconds,
                                 max_block_seconds=s.retry_after_max_seconds)

    @functools.cached_property
    def meli(self):
        import meli_auth
        return meli_auth.build_client(self.settings, self.conn, self.now)

    @functools.cached_property
    def chatwoot(self):
        import chatwoot_api
        return chatwoot_api.ChatwootClient.from_settings(self.settings)


@dataclass
class JobContext:
    """What a handler may use: settings, the database, peer clients and the clock."""

    settings: Any
    conn: sqlite3.Connection
    now: Callable[[], float] = time.time
    clients: Clients | None = None

    def __post_init__(self):
        if self.clients is None:
            self.clients = Clients(self.settings, self.conn, self.now)

    @contextlib.contextmanager
    def away_from_database(self):
        """Around a call that waits seconds on a peer (an AI answering): the job's database
        connection goes back to the pool meanwhile (when it is leased from one, and no
        transaction is open), so waiting jobs do not each hold one."""
        release = getattr(self.conn, "release", None)
        if release is not None:
            release()
        yield


# A handler may set `handler.atomic = True` when it only writes to the database (see
# `_run_atomic`), and `handler.urgent = True` when its due jobs must run before any other due
# job and never beside one (inbound deliveries: a seller's pause must land before a reply
# queued earlier is sent), and `handler.lane = "<peer>"` when the peer it talks to is not the
# one its kind names (see `lane_of`).
Handler = Callable[[JobContext, Job], Any]
DeadHandler = Callable[[JobContext, Job, str], list]


def _split_result(outcome: Any) -> JobDone:
    if isinstance(outcome, JobDone):
        return outcome
    if outcome is None:
        return JobDone()
    if isinstance(outcome, tuple):
        result, follow_ups = outcome
        return JobDone(result, list(follow_ups or []))
    if isinstance(outcome, list):
        return JobDone(None, outcome)
    return JobDone(outcome)


DATABASE_LANE = "database"


def lane_of(kind: str, handler: Handler | None) -> str:
    """The lane of a job kind: the peer its handler talks to (`handler.lane`); `database` for
    an `atomic` handler (it talks to no peer); else the kind's prefix (`"kommo.send_reply"` →
    `"kommo"`)."""
    if getattr(handler, "lane", None):
        return handler.lane
    if getattr(handler, "atomic", False):
        return DATABASE_LANE
    return kind.split(".", 1)[0]


def urgent_kinds(handlers: dict[str, Handler]) -> tuple[str, ...]:
    """The kinds whose handlers are marked `urgent = True`."""
    return tuple(kind for kind, h in handlers.items() if getattr(h, "urgent", False))


def claim_jobs(ctx: JobContext, handlers: dict[str, Handler], on_dead: dict | None = None,
               worker: str | None = None, limit: int = 1,
               lane_room: dict[str, int] | None = None, lane_busy: dict[str, int] | None = None,
               urgent_only: bool = False, running_ids: tuple[int, ...] = (),
               lanes: dict[str, str] | None = None,
               urgent: tuple[str, ...] | None = None, urgent_together: int = 1) -> list[Job]:
    """Dead-letter the worn-out jobs, then claim up to `limit` due jobs (see
    `outbox.claim_jobs` for the order, lanes, urgent jobs and `running_ids`), in one write
    transaction. `lanes` and `urgent` are derived from `handlers` unless the caller (the
    pool, which claims on every turn of its loop) passes the ones it computed once."""
    s = ctx.settings
    if lanes is None:
        lanes = {k: lane_of(k, h) for k, h in handlers.items()}
    if urgent is None:
        urgent = urgent_kinds(handlers)
    with db_manager.transaction(ctx.conn):  # one write lock for both
        buried = outbox.bury_worn_out_jobs(ctx.conn, ctx.now(), s.job_max_attempts,
                                           s.job_max_age_seconds,
                                           on_dead=_dead_hook(ctx, on_dead or {}),
                                           running_ids=running_ids)
        jobs = outbox.claim_jobs(ctx.conn, ctx.now(), s.job_lease_seconds, limit, worker=worker,
                                 urgent_kinds=urgent, lanes=lanes,
                                 lane_room=lane_room, lane_busy=lane_busy,
                                 urgent_only=urgent_only, running_ids=running_ids,
                                 urgent_together=urgent_together)
    for dead in buried:
        log.error("job_failed", extra={"job_id": dead.id, "kind": dead.kind,
                                       "new_status": "dead", "error": "lease expired too often"})
    return jobs


def run_next_job(ctx: JobContext, handlers: dict[str, Handler],
                 on_dead: dict[str, DeadHandler] | None = None,
                 worker: str | None = None) -> Job | None:
    """Claim one due job and run it to completion or failure. Returns the job, or None when
    nothing was due."""
    jobs = claim_jobs(ctx, handlers, on_dead, worker=worker)
    if not jobs:
        return None
    run_job(ctx, jobs[0], handlers, on_dead)
    return jobs[0]


def run_job(ctx: JobContext, job: Job, handlers: dict[str, Handler],
            on_dead: dict[str, DeadHandler] | None = None) -> str:
    """Run a claimed job to completion or failure; every failure is recorded on the job (a
    database that fails is raised: the poller must stop). Returns the outcome: one of
    `JobOutcome`'s values."""
    on_dead = on_dead or {}
    token = ponte_logging.job_context_var.set({"job_id": job.id, "kind": job.kind,
                                               "attempt": job.attempt})
    # A job recorded by a webhook carries its request id: the job's log lines join that request.
    request_token = ponte_logging.request_id_var.set(job.payload.get("request_id"))
    started = time.monotonic()
    outcome = JobOutcome.ERROR  # also ponte_job_runs_total's label
    try:
        handler = handlers.get(job.kind)
        if handler is None:
            raise JobFailed(f"no handler for kind {job.kind}", retryable=False)
        run = _run_atomic if getattr(handler, "atomic", False) else _run_then_complete
        follow_ups = run(ctx, job, handler)
        if follow_ups is not None:
            outcome = JobOutcome.DONE
            log.info("job_done", extra={"elapsed_ms": _ms(started),
                                        "follow_ups": len(follow_ups)})
        else:
            outcome = JobOutcome.LEASE_LOST
            log.warning("job_lease_lost", extra={"elapsed_ms": _ms(started)})
    except JobDeferred as deferred:
        if ctx.now() - job.created_at >= ctx.settings.job_max_age_seconds:
            # Waiting counts toward the age limit too (an account disconnected for days): the
            # job dies where an operator sees it, with its note to the human, instead of
            # going out days late.
            outcome = _fail(ctx, job, JobFailed(
                f"waited past JOB_MAX_AGE_SECONDS: {deferred}", retryable=False),
                on_dead, started)
        else:
            outbox.release_job(ctx.conn, job, deferred.available_at, ctx.now(),
                               reason=str(deferred))
            outcome = JobOutcome.DEFERRED
            log.info("job_deferred", extra={"until": deferred.available_at})
    except Exception as exc:  # every failure is recorded on the job, never raised to the loop
        outcome = _fail(ctx, job, exc, on_dead, started)
    finally:
        ponte_metrics.observe_job(job.kind, outcome, time.monotonic() - started)
        ponte_logging.request_id_var.reset(request_token)
        ponte_logging.job_context_var.reset(token)
    return outcome


def _run_then_complete(ctx: JobContext, job: Job, handler: Handler) -> list | None:
    """The usual handler: talks to a peer outside any transaction, then the job is completed
    with its follow-ups. Returns the follow-ups, or None when the lease was lost."""
    done = _split_result(handler(ctx, job))
    if outbox.complete_job(ctx.conn, job, done.result, done.follow_ups, now=ctx.now(),
                           writes=done.writes):
        return done.follow_ups
    return None


class _LeaseLost(Exception):
    pass


def _run_atomic(ctx: JobContext, job: Job, handler: Handler) -> list | None:
    """A handler marked `atomic = True` only writes to the database: it runs inside the
    transaction that completes its job, so its writes and the completion commit together or
    not at all (a crash halfway leaves the job to run again from scratch)."""
    try:
        with db_manager.transaction(ctx.conn):
            done = _split_result(handler(ctx, job))
            if not outbox.complete_job(ctx.conn, job, done.result, done.follow_ups,
                                       now=ctx.now(), writes=done.writes):
                raise _LeaseLost  # another worker took the job over: undo what we wrote
    except _LeaseLost:
        return None
    return done.follow_ups


def _dead_hook(ctx: JobContext, on_dead: dict[str, DeadHandler]):
    """Adapt the bridges' ON_DEAD handlers for outbox, which calls them inside the
    transaction that buries the job."""

    def hook(job: Job, error: str) -> list:
        handler = on_dead.get(job.kind)
        if handler is None:
            return []
        try:
            return handler(ctx, job, error) or []
        except Exception:  # the job still dies; the operator sees it in /admin/jobs
            log.exception("job_dead_handler_failed", extra={"job_id": job.id})
            return []

    return hook


def _fail(ctx: JobContext, job: Job, exc: Exception, on_dead: dict, started: float) -> str:
    """Record a failed run on the job; the outcome: JobOutcome.DEAD or JobOutcome.RETRY."""
    if isinstance(exc, (PeerError, JobFailed)):
        retryable, retry_after = exc.retryable, exc.retry_after_seconds
        detail = str(exc)
        extra = {"peer": getattr(exc, "peer", None), "status": getattr(exc, "status", None)}
    elif isinstance(exc, sqlite3.OperationalError):
        raise exc  # the database itself is unusable: let the poller exit and be restarted
    else:
        retryable, retry_after = True, None
        detail = f"{type(exc).__name__}: {exc}"
        extra = {"traceback": traceback.format_exc(limit=6)}
    s = ctx.settings
    status = outbox.fail_job(ctx.conn, job, detail, retryable, ctx.now(), s.job_max_attempts,
                             s.job_max_age_seconds, retry_after_seconds=retry_after,
                             on_dead=_dead_hook(ctx, on_dead),
                             retry_after_cap_seconds=s.retry_after_max_seconds)
    level = logging.ERROR if status == "dead" else logging.WARNING
    log.log(level, "job_failed", extra={**extra, "error": detail[:300], "new_status": status,
                                        "elapsed_ms": _ms(started)})
    return JobOutcome.DEAD if status == "dead" else JobOutcome.RETRY


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
