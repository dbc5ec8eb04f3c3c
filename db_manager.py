"""The state database: connections, schema and the spine's SQL (bridge A's tables are queried
by whatsapp_store; their schema is here so migrations stay in one ordered list).

Owns: connections (WAL, busy timeout, foreign keys, the checkpointer thread), numbered
migrations (`PRAGMA user_version`), `transaction()` (BEGIN IMMEDIATE), the inbound event log,
the job outbox (enqueue or stage / claim with a lease / complete / fail with backoff / dead
letters / retry / prune), ordering per conversation, heartbeats, cross-process locks, key-value
mappings, tokens and bot states.
Must not: call a peer, import flask or a peer module. Times are UTC epoch seconds (REAL, because
debounce windows and wake-up latency are sub-second).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import logging
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

_log = logging.getLogger("ponte.db")

BUSY_TIMEOUT_MS = 10_000
# SQLite checkpoints the WAL inside each commit made while the WAL is over the threshold: it
# copies pages into the database file, with two fsyncs — ~10 ms at SQLite's default of 1,000
# pages, and ~40 ms at 10,000. Every web commit is a webhook's ack, so the web checkpoints in a
# background thread instead (`start_checkpointer`, run by each Gunicorn worker), and its commits
# only at 10,000 pages; the poller keeps the default and commits after every job and on every
# heartbeat. Under a sustained burst a checkpoint that runs beside the writers never finds the
# WAL fully copied, so the WAL is not restarted and keeps growing; past 10,000 pages the acks
# checkpoint again too, but then only copy the little the thread has not.
WAL_AUTOCHECKPOINT_PAGES = 1000
WEB_WAL_AUTOCHECKPOINT_PAGES = 10_000
CHECKPOINT_EVERY_SECONDS = 1.0
# After a checkpoint, SQLite reuses the WAL file but keeps its size; a burst must not leave a
# big file behind.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 900.0


def _catch_up_first_release(conn: sqlite3.Connection) -> None:
    # Migration 2 was changed after the first release had applied it, so a database from then
    # is at version >= 2 without those changes; a newer one has them. Bring the first up to
    # date and leave the second as it is. kommo_conversations_lead is an index nothing queries.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(bot_states)")}
    if "paused_by" in columns:
        conn.execute("ALTER TABLE bot_states RENAME COLUMN paused_by TO changed_by")
    conn.execute("CREATE TABLE IF NOT EXISTS kommo_leads (kommo_lead_id TEXT PRIMARY KEY,"
                 " kommo_contact_id TEXT NOT NULL, updated_at REAL NOT NULL)")
    conn.execute("INSERT OR IGNORE INTO kommo_leads (kommo_lead_id, kommo_contact_id, updated_at)"
                 " SELECT kommo_lead_id, kommo_contact_id, updated_at FROM kommo_conversations"
                 " WHERE kommo_lead_id != ''")
    conn.execute("CREATE INDEX IF NOT EXISTS kommo_messages_received"
                 " ON kommo_messages(received_at)")
    conn.execute("DROP INDEX IF EXISTS kommo_conversations_lead")


MIGRATIONS: list = [
    # 1: the spine — events, jobs, heartbeats, locks, mappings, tokens
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        status TEXT NOT NULL,
        received_at REAL NOT NULL,
        request_id TEXT,
        summary TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_received ON events(received_at);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,
        ordering_key TEXT,
        payload TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER,
        available_at REAL NOT NULL,
        locked_until REAL,
        locked_by TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        last_error TEXT,
        result TEXT
    );
    CREATE INDEX jobs_ready ON jobs(status, available_at);
    CREATE INDEX jobs_open_by_order ON jobs(ordering_key, id)
        WHERE ordering_key IS NOT NULL AND status IN ('pending', 'running');
    CREATE TABLE heartbeats (
        process TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        beat_at REAL NOT NULL,
        info TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE locks (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        locked_until REAL NOT NULL
    );
    CREATE TABLE mappings (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE TABLE tokens (
        provider TEXT PRIMARY KEY,
        access_token TEXT NOT NULL DEFAULT '',
        refresh_token TEXT NOT NULL DEFAULT '',
        expires_at REAL,
        status TEXT NOT NULL DEFAULT 'ok',
        detail TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL
    );
    """,
    # 2: bridge A (WhatsApp via Kommo ⇄ n8n) — conversations, customer messages, bot states
    """
    CREATE TABLE kommo_conversations (
        kommo_contact_id TEXT PRIMARY KEY,
        kommo_lead_id TEXT NOT NULL DEFAULT '',
        kommo_talk_id TEXT NOT NULL DEFAULT '',
        kommo_chat_id TEXT NOT NULL DEFAULT '',
        contact_name TEXT NOT NULL DEFAULT '',
        origin TEXT NOT NULL DEFAULT '',
        open_batch_key TEXT,
        batch_started_at REAL,
        last_message_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX kommo_conversations_lead ON kommo_conversations(kommo_lead_id);
    CREATE TABLE kommo_leads (
        kommo_lead_id TEXT PRIMARY KEY,
        kommo_contact_id TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX kommo_conversations_talk ON kommo_conversations(kommo_talk_id);
    CREATE TABLE kommo_messages (
        kommo_message_id TEXT PRIMARY KEY,
        kommo_contact_id TEXT NOT NULL,
        text TEXT NOT NULL,
        message_type TEXT NOT NULL DEFAULT 'text',
        attachments TEXT NOT NULL DEFAULT '[]',
        sent_at REAL NOT NULL,
        received_at REAL NOT NULL,
        status TEXT NOT NULL,
        batch_key TEXT
    );
    CREATE INDEX kommo_messages_batch ON kommo_messages(batch_key);
    CREATE INDEX kommo_messages_received ON kommo_messages(received_at);
    CREATE TABLE bot_states (
        kommo_contact_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('active', 'paused')),
        changed_by TEXT NOT NULL DEFAULT '',
        paused_by_kind TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        since_at REAL,
        until_at REAL,
        pause_count INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE INDEX bot_states_until ON bot_states(until_at) WHERE status = 'paused';
    """,
    # 3: urgent kinds are claimed first (see claim_next_job)
    """
    CREATE INDEX jobs_ready_by_kind ON jobs(kind, available_at) WHERE status = 'pending';
    """,
    # 4: jobs staged by a webhook's ack (see stage_job)
    """
    CREATE TABLE staged_jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,
        ordering_key TEXT,
        payload TEXT NOT NULL,
        max_attempts INTEGER,
        created_at REAL NOT NULL
    );
    """,
    # 5: catch up databases made by the first release, whose migration 2 had no kommo_leads,
    # no kommo_messages_received and bot_states.paused_by (see _catch_up_first_release)
    _catch_up_first_release,
]


class DatabaseError(Exception):
    """The state database cannot be opened or used."""


@dataclass(frozen=True)
class Job:
    """One claimed outbox job. `attempt` counts this run (1 for the first)."""

    id: int
    kind: str
    dedupe_key: str
    ordering_key: str | None
    payload: dict[str, Any]
    attempt: int
    max_attempts: int | None
    created_at: float
    lease_token: str


@dataclass(frozen=True)
class FollowUp:
    """A job to enqueue in the same transaction that completes its parent."""

    kind: str
    dedupe_key: str
    payload: dict[str, Any]
    available_at: float | None = None
    ordering_key: str | None = None


def connect(path: str, wal_autocheckpoint_pages: int = WAL_AUTOCHECKPOINT_PAGES
            ) -> sqlite3.Connection:
    """Open the database (creating its folder), in WAL mode with a busy timeout and foreign keys.
    The web passes `WEB_WAL_AUTOCHECKPOINT_PAGES` (see there).

    The connection is in autocommit mode: writes go through `transaction()`.
    """
    try:
        if path != ":memory:" and not path.startswith("file:"):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False, uri=path.startswith("file:"))
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _set_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_autocheckpoint_pages)}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn
    except (sqlite3.Error, OSError) as exc:
        raise DatabaseError(f"cannot open database {path}: {exc}") from exc


def start_periodic(path: str, every_seconds: float, work, name: str, failure_event: str,
                   stop: threading.Event | None = None) -> threading.Thread:
    """Run `work(conn)` every `every_seconds` in a daemon thread named `name`, with its own
    connection to the database at `path` (a connection must not be shared by two threads'
    work), until `stop` is set. A failure (the volume not mounted yet, a disk error) is logged
    once as `failure_event` and retried on every turn. Returns the started thread."""
    stop = stop or threading.Event()

    def run() -> None:
        conn, failing = None, False
        while not stop.wait(every_seconds):
            try:
                conn = conn or connect(path)
                work(conn)
                failing = False
            except (sqlite3.Error, DatabaseError) as exc:
                if not failing:
                    _log.warning(failure_event, extra={"error": str(exc)})
                failing = True
        if conn is not None:
            conn.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def start_checkpointer(path: str, every_seconds: float = CHECKPOINT_EVERY_SECONDS,
                       stop: threading.Event | None = None) -> threading.Thread:
    """Checkpoint the WAL of the database at `path` every `every_seconds` in a thread
    (`start_periodic`; PASSIVE: it never blocks a writer, and Python's sqlite3 releases the GIL
    while SQLite copies and syncs); the commits' own threshold still holds if it fails."""
    return start_periodic(path, every_seconds,
                          lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone(),
                          "wal-checkpointer", "wal_checkpoint_failed", stop)


def _set_wal(conn: sqlite3.Connection) -> None:
    # Switching a fresh file to WAL needs an exclusive lock and SQLite does not call the busy
    # handler for it: when web and poller start together, one of them must wait and try again.
    _execute_when_unlocked(conn, "PRAGMA journal_mode = WAL", pause=0.02, max_pause=0.02)


def _execute_when_unlocked(conn: sqlite3.Connection, sql: str, pause: float,
                           max_pause: float) -> None:
    """Run `sql`, trying again while the database is locked (sleeping `pause`, doubling up to
    `max_pause`), for at most BUSY_TIMEOUT_MS."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, max_pause)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction taken with BEGIN IMMEDIATE (the write lock up front, so two writers
    never deadlock on an upgrade); commits on success, rolls back on any exception."""
    if conn.in_transaction:  # nested use joins the outer transaction
        yield conn
        return
    _begin_immediate(conn)
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def _begin_immediate(conn: sqlite3.Connection) -> None:
    # SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries. Two web workers each
    # holding the write lock for a fraction of a millisecond would leave the CPU idle in those
    # sleeps, so the wait for the write lock polls faster (50 µs doubling to 2 ms), within the
    # same overall timeout.
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        _execute_when_unlocked(conn, "BEGIN IMMEDIATE", pause=0.00005, max_pause=0.002)
    finally:
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except BaseException:
            if conn.in_transaction:  # never leave a transaction that nobody will commit
                conn.execute("ROLLBACK")
            raise


def schema_version(conn: sqlite3.Connection) -> int:
    """The number of migrations applied."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; safe when web and poller call it at the same moment (each step
    runs under the write lock and re-reads the version inside it). Returns the final version."""
    while True:
        with transaction(conn):
            version = schema_version(conn)
            if version >= len(MIGRATIONS):
                return version
            step = MIGRATIONS[version]
            if callable(step):  # a step SQL alone cannot express
                step(conn)
            else:
                for statement in _split_sql(step):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")



def _split_sql(script: str) -> list[str]:
    # executescript() would COMMIT our transaction; run statement by statement instead.
    return [s.strip() for s in script.split(";") if s.strip()]


def dumps(value: Any) -> str:
    """Compact, stable JSON for the database."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


# --- inbound events -----------------------------------------------------------------------------

def record_event(conn: sqlite3.Connection, source: str, dedupe_key: str, event_type: str,
                 status: str, summary: dict | None = None, request_id: str | None = None,
                 now: float | None = None) -> bool:
    """Record one inbound event; False when the same `dedupe_key` was recorded before."""
    cur = conn.execute(
        "INSERT INTO events (source, dedupe_key, event_type, status, received_at, request_id,"
        " summary) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(dedupe_key) DO NOTHING",
        (source, dedupe_key, event_type, status, now or time.time(), request_id,
         dumps(summary or {})))
    return cur.rowcount == 1


def count_events(conn: sqlite3.Connection, source: str | None = None,
                 status: str | None = None) -> int:
    """How many inbound events were recorded (optionally of one source and status)."""
    sql, args = "SELECT COUNT(*) FROM events WHERE 1=1", []
    if source:
        sql, args = sql + " AND source = ?", args + [source]
    if status:
        sql, args = sql + " AND status = ?", args + [status]
    return conn.execute(sql, args).fetchone()[0]


# --- job outbox ---------------------------------------------------------------------------------

def enqueue_job(conn: sqlite3.Connection, kind: str, dedupe_key: str, payload: dict,
                available_at: float | None = None, ordering_key: str | None = None,
                max_attempts: int | None = None, now: float | None = None) -> int | None:
    """Add a job unless one with `dedupe_key` exists, staged or not (then nothing changes).
    Returns the new job id, or None for a duplicate."""
    now = now or time.time()
    if conn.execute("SELECT 1 FROM staged_jobs WHERE dedupe_key = ?", (dedupe_key,)).fetchone():
        return None
    cur = conn.execute(
        "INSERT INTO jobs (kind, dedupe_key, ordering_key, payload, status, max_attempts,"
        " available_at, created_at, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?)"
        " ON CONFLICT(dedupe_key) DO NOTHING",
        (kind, dedupe_key, ordering_key, dumps(payload), max_attempts,
         available_at if available_at is not None else now, now, now))
    return cur.lastrowid if cur.rowcount == 1 else None


def stage_job(conn: sqlite3.Connection, kind: str, dedupe_key: str, payload: dict,
              ordering_key: str | None = None, max_attempts: int | None = None,
              now: float | None = None) -> bool:
    """Add a job the cheap way, for a webhook that must answer fast (inside the caller's
    transaction): a row of `staged_jobs`, whose only index is the unique key, instead of a row
    of `jobs` and its four indexes — ~3 WAL pages instead of ~6, and ~40 % less time.
    `claim_next_job` moves staged jobs into `jobs`, in the order they were staged, before it
    picks one; until then the job counts in `queue_stats` (as `staged`, and in `pending`).
    Returns False (and changes nothing) when a job with `dedupe_key` is staged or in `jobs`."""
    if conn.execute("SELECT 1 FROM jobs WHERE dedupe_key = ?", (dedupe_key,)).fetchone():
        return False
    cur = conn.execute(
        "INSERT INTO staged_jobs (kind, dedupe_key, ordering_key, payload, max_attempts,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(dedupe_key) DO NOTHING",
        (kind, dedupe_key, ordering_key, dumps(payload), max_attempts, now or time.time()))
    return cur.rowcount == 1


# Staged jobs moved per claim. The move holds the write lock that webhook acks wait for, so a
# backlog left by a poller that was down moves a bounded batch at a time (~10 ms each).
STAGED_MOVE_BATCH = 500


def _move_staged_jobs(conn: sqlite3.Connection, now: float) -> None:
    # Inside the claim's write transaction, so nothing can be staged meanwhile. Staged ids only
    # grow and each batch takes the lowest ones, so moving in batches keeps the staging order.
    last_id = conn.execute("SELECT MAX(id) FROM (SELECT id FROM staged_jobs ORDER BY id LIMIT ?)",
                           (STAGED_MOVE_BATCH,)).fetchone()[0]
    if last_id is None:
        return
    # "WHERE id <= ?" also satisfies SQLite's rule that INSERT ... SELECT with an ON CONFLICT
    # clause needs a WHERE.
    conn.execute(
        "INSERT INTO jobs (kind, dedupe_key, ordering_key, payload, status, max_attempts,"
        " available_at, created_at, updated_at) SELECT kind, dedupe_key, ordering_key, payload,"
        " 'pending', max_attempts, created_at, created_at, ? FROM staged_jobs WHERE id <= ?"
        " ORDER BY id ON CONFLICT(dedupe_key) DO NOTHING", (now, last_id))
    conn.execute("DELETE FROM staged_jobs WHERE id <= ?", (last_id,))


_NOT_BLOCKED = """(j.ordering_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM jobs AS e WHERE e.ordering_key = j.ordering_key AND e.id < j.id
          AND e.status IN ('pending', 'running')))"""


def claim_next_job(conn: sqlite3.Connection, now: float, lease_seconds: float,
                   worker: str | None = None, urgent_kinds: tuple[str, ...] = ()) -> Job | None:
    """Claim the next runnable job: running with an expired lease (its worker died), else
    pending and due — of one of `urgent_kinds` first, if any is due. A job with an
    `ordering_key` waits while an earlier job with the same key is still pending or running,
    so one conversation's jobs run in order. Call `bury_worn_out_jobs()` first so a job that
    keeps killing its worker is not re-run. Staged jobs (`stage_job`) become jobs first."""
    with transaction(conn):
        _move_staged_jobs(conn, now)
        # Separate queries instead of one OR, so each can walk its index in order.
        row = conn.execute(
            f"SELECT * FROM jobs AS j WHERE j.status = 'running' AND j.locked_until <= ?"
            f" AND {_NOT_BLOCKED} ORDER BY j.locked_until LIMIT 1", (now,)).fetchone()
        for kind in urgent_kinds:
            if row is not None:
                break
            row = conn.execute(
                f"SELECT * FROM jobs AS j WHERE j.status = 'pending' AND j.kind = ?"
                f" AND j.available_at <= ? AND {_NOT_BLOCKED} ORDER BY j.available_at, j.id"
                f" LIMIT 1", (kind, now)).fetchone()
        if row is None:
            row = conn.execute(
                f"SELECT * FROM jobs AS j WHERE j.status = 'pending' AND j.available_at <= ?"
                f" AND {_NOT_BLOCKED} ORDER BY j.available_at, j.id LIMIT 1", (now,)).fetchone()
        if row is None:
            return None
        token = f"{worker or os.getpid()}:{uuid.uuid4().hex[:12]}"
        conn.execute(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, locked_until = ?,"
            " locked_by = ?, updated_at = ? WHERE id = ?",
            (now + lease_seconds, token, now, row["id"]))
    return _job(row, token, row["attempts"] + 1)


def _job(row: sqlite3.Row, token: str, attempt: int) -> Job:
    return Job(id=row["id"], kind=row["kind"], dedupe_key=row["dedupe_key"],
               ordering_key=row["ordering_key"], payload=json.loads(row["payload"]),
               attempt=attempt, max_attempts=row["max_attempts"], created_at=row["created_at"],
               lease_token=token)


def bury_worn_out_jobs(conn: sqlite3.Connection, now: float, max_attempts: int,
                       max_age_seconds: float, on_dead=None) -> list[Job]:
    """Dead-letter the jobs whose lease expired (their worker died) and that used up their
    attempts or age, instead of running them again. `on_dead(job, error)` may return follow-up
    jobs, written in the same transaction. Returns the buried jobs."""
    buried = []
    with transaction(conn):
        rows = conn.execute(
            "SELECT * FROM jobs WHERE status = 'running' AND locked_until <= ? AND"
            " (attempts >= COALESCE(max_attempts, ?) OR created_at <= ?)",
            (now, max_attempts, now - max_age_seconds)).fetchall()
        for row in rows:
            error = (f"worker died {row['attempts']} time(s) while running this job"
                     " (lease expired)")
            conn.execute(
                "UPDATE jobs SET status = 'dead', finished_at = ?, updated_at = ?,"
                " locked_until = NULL, last_error = ? WHERE id = ?", (now, now, error, row["id"]))
            job = _job(row, row["locked_by"] or "", row["attempts"])
            _enqueue_follow_ups(conn, on_dead(job, error) if on_dead else [], now)
            buried.append(job)
    return buried


def _enqueue_follow_ups(conn: sqlite3.Connection, follow_ups, now: float) -> None:
    for f in follow_ups or []:
        enqueue_job(conn, f.kind, f.dedupe_key, f.payload, available_at=f.available_at,
                    ordering_key=f.ordering_key, now=now)


def release_orphaned_jobs(conn: sqlite3.Connection, worker_prefix: str,
                          is_alive, now: float) -> int:
    """Make claimable at once the running jobs of workers named `<worker_prefix><name>` that
    `is_alive(name)` says are gone, instead of waiting for their lease to end. Used by a poller
    starting after a crash; a worker that cannot be judged keeps its lease."""
    released = 0
    with transaction(conn):
        rows = conn.execute("SELECT id, locked_by FROM jobs WHERE status = 'running'"
                            " AND locked_by LIKE ?", (worker_prefix + "%",)).fetchall()
        for row in rows:
            name = row["locked_by"][len(worker_prefix):].split(":", 1)[0]
            if not is_alive(name):
                conn.execute("UPDATE jobs SET locked_until = ? WHERE id = ?", (now, row["id"]))
                released += 1
    return released


def complete_job(conn: sqlite3.Connection, job: Job, result: dict | None = None,
                 follow_ups: list[FollowUp] | tuple = (), now: float | None = None) -> bool:
    """Mark `job` done and enqueue its follow-ups atomically. False (and nothing written) when
    this worker lost its lease to another one."""
    now = now or time.time()
    with transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET status = 'done', finished_at = ?, updated_at = ?, locked_until = NULL,"
            " result = ?, last_error = NULL WHERE id = ? AND locked_by = ? AND status = 'running'",
            (now, now, dumps(result) if result is not None else None, job.id, job.lease_token))
        if cur.rowcount != 1:
            return False
        _enqueue_follow_ups(conn, follow_ups, now)
    return True


def backoff_seconds(attempt: int, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): exponential from 2 s, capped at 15 min,
    with jitter in [50 %, 100 %] so a peer coming back is not hit by every job at once."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * (2 ** max(0, attempt - 1)))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def fail_job(conn: sqlite3.Connection, job: Job, error: str, retryable: bool, now: float,
             max_attempts: int, max_age_seconds: float, retry_after_seconds: float | None = None,
             rng: random.Random | None = None, on_dead=None) -> str:
    """Record a failed run. Returns the new status: 'pending' (retry later), 'dead' (not
    retryable, out of attempts or too old) or 'lost' (this worker no longer holds the lease).
    When the job dies, `on_dead(job, error)` may return follow-up jobs (a note telling a human),
    written in the same transaction so the news of a failure cannot be lost."""
    limit = job.max_attempts or max_attempts
    dead = (not retryable or job.attempt >= limit or now - job.created_at >= max_age_seconds)
    with transaction(conn):
        if dead:
            cur = conn.execute(
                "UPDATE jobs SET status = 'dead', finished_at = ?, updated_at = ?,"
                " locked_until = NULL, last_error = ? WHERE id = ? AND locked_by = ?"
                " AND status = 'running'", (now, now, error[:2000], job.id, job.lease_token))
            if cur.rowcount == 1 and on_dead:
                _enqueue_follow_ups(conn, on_dead(job, error), now)
        else:
            delay = max(backoff_seconds(job.attempt, rng), retry_after_seconds or 0)
            cur = conn.execute(
                "UPDATE jobs SET status = 'pending', available_at = ?, updated_at = ?,"
                " locked_until = NULL, last_error = ? WHERE id = ? AND locked_by = ?"
                " AND status = 'running'", (now + delay, now, error[:2000], job.id,
                                            job.lease_token))
    if cur.rowcount != 1:
        return "lost"
    return "dead" if dead else "pending"


def retry_dead_job(conn: sqlite3.Connection, job_id: int, now: float | None = None) -> bool:
    """Put a dead job back in the queue with a fresh attempt budget. False if not dead (or not
    an id SQLite can hold)."""
    if not 0 <= job_id < 2**63:
        return False
    now = now or time.time()
    with transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET status = 'pending', attempts = 0, available_at = ?, created_at = ?,"
            " updated_at = ?, finished_at = NULL WHERE id = ? AND status = 'dead'",
            (now, now, now, job_id))
    return cur.rowcount == 1


def release_job(conn: sqlite3.Connection, job: Job, available_at: float, now: float) -> bool:
    """Give a claimed job back without counting the attempt (e.g. it must wait longer)."""
    with transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET status = 'pending', attempts = attempts - 1, available_at = ?,"
            " locked_until = NULL, updated_at = ? WHERE id = ? AND locked_by = ?"
            " AND status = 'running'", (available_at, now, job.id, job.lease_token))
    return cur.rowcount == 1


def reschedule_pending_job(conn: sqlite3.Connection, dedupe_key: str, available_at: float,
                           now: float, payload: dict | None = None) -> bool:
    """Move a still-pending job (e.g. a debounce window being extended); False if it already
    started or finished."""
    sql = "UPDATE jobs SET available_at = ?, updated_at = ?"
    args: list[Any] = [available_at, now]
    if payload is not None:
        sql += ", payload = ?"
        args.append(dumps(payload))
    cur = conn.execute(sql + " WHERE dedupe_key = ? AND status = 'pending'", args + [dedupe_key])
    return cur.rowcount == 1


def get_job(conn: sqlite3.Connection, job_id: int | None = None,
            dedupe_key: str | None = None) -> dict | None:
    """One job as a dict (payload decoded), by id or dedupe key."""
    if job_id is not None:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    else:
        row = conn.execute("SELECT * FROM jobs WHERE dedupe_key = ?", (dedupe_key,)).fetchone()
    return _job_dict(row) if row else None


def list_jobs(conn: sqlite3.Connection, status: str | None = None, kind: str | None = None,
              limit: int = 100) -> list[dict]:
    """Jobs, newest first, optionally filtered by status and kind."""
    sql, args = "SELECT * FROM jobs WHERE 1=1", []
    if status:
        sql, args = sql + " AND status = ?", args + [status]
    if kind:
        sql, args = sql + " AND kind = ?", args + [kind]
    rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", args + [limit]).fetchall()
    return [_job_dict(r) for r in rows]


def _job_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["payload"] = json.loads(d["payload"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return d


def count_staged_jobs(conn: sqlite3.Connection) -> int:
    """How many jobs wait in `staged_jobs` for the poller to move them into `jobs`."""
    return conn.execute("SELECT COUNT(*) FROM staged_jobs").fetchone()[0]


def queue_stats(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
    """Counts per status, how many are due now, and the age of the oldest due job. Staged
    jobs (`stage_job`) are counted in `pending` and `due`, and alone in `staged`."""
    now = now or time.time()
    counts = {s: 0 for s in ("pending", "running", "done", "dead")}
    for row in conn.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status"):
        counts[row["status"]] = row["n"]
    due = conn.execute("SELECT COUNT(*), MIN(available_at) FROM jobs WHERE status = 'pending'"
                       " AND available_at <= ?", (now,)).fetchone()
    # The oldest staged job is the first one: ids follow staging order (no scan of the bodies).
    staged = conn.execute("SELECT (SELECT COUNT(*) FROM staged_jobs),"
                          " (SELECT created_at FROM staged_jobs ORDER BY id LIMIT 1)").fetchone()
    counts["staged"] = staged[0]
    counts["pending"] += staged[0]
    counts["due"] = due[0] + staged[0]
    oldest = min((t for t in (due[1], staged[1]) if t is not None), default=None)
    counts["oldest_due_seconds"] = round(now - oldest, 3) if oldest else 0.0
    return counts


def next_job_due_at(conn: sqlite3.Connection) -> float | None:
    """When the next job can be claimed: the earliest pending job not blocked by an earlier job
    of its conversation, a staged job, or the earliest lease to expire."""
    row = conn.execute(
        f"SELECT MIN(t) FROM (SELECT MIN(j.available_at) AS t FROM jobs AS j"
        f" WHERE j.status = 'pending' AND {_NOT_BLOCKED}"
        f" UNION ALL SELECT (SELECT created_at FROM staged_jobs ORDER BY id LIMIT 1)"
        f" UNION ALL SELECT MIN(locked_until) FROM jobs WHERE status = 'running')").fetchone()
    return row[0]


# Rows deleted per write transaction by a clean-up: the write lock it holds is the one webhook
# acks wait for, and the first clean-up after a long outage may have days of rows to delete.
PRUNE_BATCH_ROWS = 2000


def delete_in_batches(conn: sqlite3.Connection, table: str, where: str,
                      params: tuple = ()) -> int:
    """Delete the rows of `table` that match `where`, PRUNE_BATCH_ROWS per write transaction.
    Returns how many rows went."""
    removed = 0
    while True:
        with transaction(conn):
            count = conn.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"
                                 f" WHERE {where} LIMIT ?)", (*params, PRUNE_BATCH_ROWS)).rowcount
        removed += count
        if count < PRUNE_BATCH_ROWS:
            return removed


def prune_jobs(conn: sqlite3.Connection, older_than: float) -> int:
    """Delete done jobs finished before `older_than` (dead jobs stay for an operator) and
    inbound events received before it. Returns how many jobs. Each bridge prunes its own rows
    (its jobs module's `PRUNE`, see bridges)."""
    removed = delete_in_batches(conn, "jobs", "status = 'done' AND finished_at < ?",
                                (older_than,))
    delete_in_batches(conn, "events", "received_at < ?", (older_than,))
    return removed


def prune_mappings(conn: sqlite3.Connection, namespaces: tuple[str, ...],
                   older_than: float) -> None:
    """Delete the mappings of `namespaces` last written before `older_than`: for mappings that
    only matter for a while (answers to match, OAuth states, throttles), not for those that
    live as long as what they point to (conversation ids, watermarks)."""
    delete_in_batches(conn, "mappings", f"updated_at < ? AND namespace IN"
                      f" ({','.join('?' * len(namespaces))})", (older_than, *namespaces))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection commits: a cheap way to notice new jobs."""
    return conn.execute("PRAGMA data_version").fetchone()[0]


# --- heartbeats and locks -----------------------------------------------------------------------

def beat(conn: sqlite3.Connection, process: str, now: float | None = None,
         info: dict | None = None) -> None:
    """Record that `process` is alive."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO heartbeats (process, pid, beat_at, info) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(process) DO UPDATE SET pid = excluded.pid, beat_at = excluded.beat_at,"
            " info = excluded.info", (process, os.getpid(), now or time.time(), dumps(info or {})))


def last_beat(conn: sqlite3.Connection, process: str) -> dict | None:
    """The last heartbeat of `process` (`pid`, `beat_at`, `info`), if any."""
    row = conn.execute("SELECT * FROM heartbeats WHERE process = ?", (process,)).fetchone()
    if not row:
        return None
    d = dict(row)
    d["info"] = json.loads(d["info"])
    return d


def acquire_lock(conn: sqlite3.Connection, name: str, owner: str, ttl_seconds: float,
                 now: float | None = None) -> bool:
    """Take the named cross-process lock if it is free or expired. Held for at most
    `ttl_seconds`, so a crashed holder cannot block the others forever."""
    now = now or time.time()
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO locks (name, owner, locked_until) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET owner = excluded.owner,"
            " locked_until = excluded.locked_until WHERE locks.locked_until <= ?"
            " OR locks.owner = excluded.owner", (name, owner, now + ttl_seconds, now))
    return cur.rowcount == 1


def release_lock(conn: sqlite3.Connection, name: str, owner: str) -> None:
    """Free the lock if `owner` still holds it."""
    with transaction(conn):
        conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))


# --- mappings (external id ↔ our ids, watermarks) -----------------------------------------------

def mapping_get(conn: sqlite3.Connection, namespace: str, key: str) -> Any:
    """The JSON value stored under (namespace, key), or None."""
    row = conn.execute("SELECT value FROM mappings WHERE namespace = ? AND key = ?",
                       (namespace, str(key))).fetchone()
    return json.loads(row[0]) if row else None


def mapping_put(conn: sqlite3.Connection, namespace: str, key: str, value: Any,
                now: float | None = None) -> None:
    """Store (replace) a JSON value under (namespace, key)."""
    conn.execute(
        "INSERT INTO mappings (namespace, key, value, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at", (namespace, str(key), dumps(value), now or time.time()))


def mapping_keys_open(conn: sqlite3.Connection, namespace: str, has_field: str,
                      lacks_field: str, unless_in: str) -> list[str]:
    """Keys of `namespace`, oldest first, whose JSON value has `has_field`, lacks `lacks_field`
    and whose key has no entry in namespace `unless_in` (e.g. imported questions not answered
    and not closed)."""
    rows = conn.execute(
        "SELECT q.key FROM mappings q WHERE q.namespace = ?"
        " AND json_extract(q.value, '$.' || ?) IS NOT NULL"
        " AND json_extract(q.value, '$.' || ?) IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM mappings a WHERE a.namespace = ? AND a.key = q.key)"
        " ORDER BY q.updated_at", (namespace, has_field, lacks_field, unless_in)).fetchall()
    return [row[0] for row in rows]


# --- tokens -------------------------------------------------------------------------------------

def token_get(conn: sqlite3.Connection, provider: str) -> dict | None:
    """The stored token pair of `provider` (`access_token`, `refresh_token`, `expires_at`,
    `status`, `detail`), or None."""
    row = conn.execute("SELECT * FROM tokens WHERE provider = ?", (provider,)).fetchone()
    return dict(row) if row else None


def token_put(conn: sqlite3.Connection, provider: str, access_token: str, refresh_token: str,
              expires_at: float | None, status: str = "ok", detail: str = "",
              now: float | None = None) -> None:
    """Store the token pair atomically (single-use refresh tokens must be saved before use)."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO tokens (provider, access_token, refresh_token, expires_at, status, detail,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(provider) DO UPDATE SET"
            " access_token = excluded.access_token, refresh_token = excluded.refresh_token,"
            " expires_at = excluded.expires_at, status = excluded.status,"
            " detail = excluded.detail, updated_at = excluded.updated_at",
            (provider, access_token, refresh_token, expires_at, status, detail, now or time.time()))


def token_set_status(conn: sqlite3.Connection, provider: str, status: str, detail: str = "",
                     now: float | None = None) -> None:
    """Mark a provider's tokens (e.g. 'disconnected' after invalid_grant)."""
    with transaction(conn):
        conn.execute("UPDATE tokens SET status = ?, detail = ?, updated_at = ? WHERE provider = ?",
                     (status, detail, now or time.time(), provider))
