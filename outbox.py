"""The job outbox: every outbound effect of ponte is a row of `jobs`, run by the poller.

Owns: enqueue (or stage, for a webhook that must answer fast) / claim with a lease / complete
with follow-ups in the same transaction / fail with backoff / dead letters / retry / release /
prune; ordering per conversation; `Job` and `FollowUp`. The tables are migrations in db_manager.
Must not: call a peer (job_runner runs the handlers) or open connections (db_manager).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from db_manager import delete_in_batches, dumps, transaction


BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 900.0


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


def enqueue_job(conn: sqlite3.Connection, kind: str, dedupe_key: str, payload: dict,
                available_at: float | None = None, ordering_key: str | None = None,
                max_attempts: int | None = None, now: float | None = None) -> int | None:
    """Add a job unless one with `dedupe_key` exists (then nothing changes). Returns the new job
    id, or None for a duplicate. A staged job (`stage_job`) with the same key, not moved yet,
    is dropped when it is moved: the key is taken."""
    now = now or time.time()
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
    transaction): a row of `staged_jobs`, a table with no index but its row id, instead of a row
    of `jobs` and its four indexes — ~1.7 WAL pages instead of ~6 (measured in
    docs/benchmarks.md). `claim_next_job` moves staged jobs into `jobs`, in the order they were
    staged, before it picks one; until then the job counts in `queue_stats` (as `staged`, and
    in `pending`).

    Returns False (and changes nothing) when a job with `dedupe_key` is in `jobs`. A key staged
    twice before the poller moves it is not caught here (checking would need the index this
    table does without, one random page more per webhook): the move keeps the first copy and
    drops the others."""
    if conn.execute("SELECT 1 FROM jobs WHERE dedupe_key = ?", (dedupe_key,)).fetchone():
        return False
    conn.execute(
        "INSERT INTO staged_jobs (kind, dedupe_key, ordering_key, payload, max_attempts,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?)",
        (kind, dedupe_key, ordering_key, dumps(payload), max_attempts, now or time.time()))
    return True


# Staged jobs moved per claim. The move holds the write lock that webhook acks wait for, so a
# backlog left by a poller that was down moves a bounded batch at a time (~10 ms each).
STAGED_MOVE_BATCH = 500


def _move_staged_jobs(conn: sqlite3.Connection, now: float) -> None:
    # Inside the claim's write transaction, so nothing can be staged meanwhile. A staged row's
    # id is larger than every id still waiting (SQLite reuses ids only once the table is
    # empty) and each batch takes the lowest ones, so moving in batches keeps the staging order.
    last_id = conn.execute("SELECT MAX(id) FROM (SELECT id FROM staged_jobs ORDER BY id LIMIT ?)",
                           (STAGED_MOVE_BATCH,)).fetchone()[0]
    if last_id is None:
        return
    # ON CONFLICT drops a key already in jobs, and every copy but the first of a key staged
    # more than once (rows go in id order). "WHERE id <= ?" also satisfies SQLite's rule that
    # INSERT ... SELECT with an ON CONFLICT clause needs a WHERE.
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
    """Claim the next runnable job (`claim_jobs` with a limit of one), or None."""
    jobs = claim_jobs(conn, now, lease_seconds, 1, worker=worker, urgent_kinds=urgent_kinds)
    return jobs[0] if jobs else None


def claim_jobs(conn: sqlite3.Connection, now: float, lease_seconds: float, limit: int,
               worker: str | None = None, urgent_kinds: tuple[str, ...] = (),
               lanes: dict[str, str] | None = None, lane_room: dict[str, int] | None = None,
               lane_busy: dict[str, int] | None = None, urgent_only: bool = False,
               running_ids: tuple[int, ...] = (), urgent_together: int = 1) -> list[Job]:
    """Claim up to `limit` runnable jobs in one transaction, in this order: running with an
    expired lease (its worker died), then pending and due — of one of `urgent_kinds` first.

    - A job with an `ordering_key` waits while an earlier job with the same key is pending or
      running, so one conversation's jobs run one at a time, in order, however many workers.
    - `lanes` maps a kind to its lane (the peer it talks to) and `lane_room` says how many more
      jobs each lane may start; a lane with no room is skipped, so a slow peer holds only its
      own lane. Among lanes with room, the least busy (`lane_busy`: jobs running now) goes
      first, so a backlog of one peer never makes a newly due job of another peer wait for it;
      within a lane, the job due first goes first. Kinds not in `lanes` count as one lane.
    - Urgent jobs (inbound deliveries: a seller's pause) are claimed alone, and while one
      runs (`urgent_only`) only urgent jobs are claimed: nothing claimed after a pause runs
      beside it. A caller that runs urgent jobs one after another, in claim order, may take
      with the first up to `urgent_together - 1` more: the urgent jobs right behind it in its
      ordering key, while they are due (applying 600 recorded webhooks: 19 claims, not 600).
    - `running_ids` are jobs the caller is running: never claimed again, even if their lease
      looks expired (the caller renews it).

    Call `bury_worn_out_jobs()` first so a job that keeps killing its worker is not re-run.
    Staged jobs (`stage_job`) become jobs first."""
    lanes, room, busy = lanes or {}, dict(lane_room or {}), dict(lane_busy or {})
    claimed: list[Job] = []

    def claim(row: sqlite3.Row) -> None:
        token = f"{worker or os.getpid()}:{_LEASE_PREFIX}{next(_LEASE_SERIALS)}"
        conn.execute(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, locked_until = ?,"
            " locked_by = ?, updated_at = ? WHERE id = ?",
            (now + lease_seconds, token, now, row["id"]))
        claimed.append(_job(row, token, row["attempts"] + 1))

    with transaction(conn):
        _move_staged_jobs(conn, now)
        pending = _pending_kinds(conn)
        while len(claimed) < limit:
            row = _pick(conn, now, urgent_kinds, urgent_only, lanes, room, busy,
                        running_ids + tuple(job.id for job in claimed), pending)
            if row is None:
                break
            claim(row)
            lane = lanes.get(row["kind"])
            if lane is not None:  # the kinds of no lane have no room to run out of
                room[lane] = room.get(lane, 1) - 1
            busy[lane] = busy.get(lane, 0) + 1
            if row["kind"] in urgent_kinds:
                if urgent_together > 1 and len(claimed) == 1 and row["ordering_key"]:
                    for follower in _next_in_order(conn, row, urgent_together - 1):
                        if follower["kind"] not in urgent_kinds or follower["status"] != \
                                "pending" or follower["available_at"] > now:
                            break
                        claim(follower)
                break  # claimed alone (the urgent jobs behind it usually wait for it, too)
    return claimed


def _next_in_order(conn: sqlite3.Connection, row: sqlite3.Row, count: int) -> list:
    """The next `count` open jobs of `row`'s ordering key, in order."""
    return conn.execute(
        "SELECT * FROM jobs WHERE ordering_key = ? AND id > ? AND status IN ('pending',"
        " 'running') ORDER BY id LIMIT ?", (row["ordering_key"], row["id"], count)).fetchall()


# A lease token only has to differ from every other claim's: a random prefix per process (a pid
# can come back after a restart) and a counter. (uuid4 per claim cost 3 % of the poller's CPU.)
_LEASE_PREFIX = secrets.token_hex(4)
_LEASE_SERIALS = itertools.count(1)


def _in(column: str, values) -> tuple[str, list]:
    return f"{column} IN ({','.join('?' * len(values))})", list(values)


# The kinds that have pending jobs, one index seek per kind (a skip scan of the partial index
# jobs_ready_by_kind): the claim then looks only where there is work, and each kind's next job
# is a seek in that index too. Walking the pending jobs in due order instead cost a step per
# pending job of other kinds (0.45 ms a claim behind a backlog of 800).
_PENDING_KINDS = """
    WITH RECURSIVE k(kind) AS (
        SELECT (SELECT MIN(kind) FROM jobs INDEXED BY jobs_ready_by_kind
                WHERE status = 'pending')
        UNION ALL
        SELECT (SELECT MIN(kind) FROM jobs INDEXED BY jobs_ready_by_kind
                WHERE status = 'pending' AND kind > k.kind)
        FROM k WHERE k.kind IS NOT NULL)
    SELECT kind FROM k WHERE kind IS NOT NULL"""


_NEXT_OF_KIND = (f"SELECT * FROM jobs AS j WHERE j.status = 'pending' AND j.kind = ?"
                 f" AND j.available_at <= ? AND {_NOT_BLOCKED} ORDER BY j.available_at, j.id"
                 f" LIMIT 1")


def _pending_kinds(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute(_PENDING_KINDS)]


def _pick(conn: sqlite3.Connection, now: float, urgent_kinds: tuple[str, ...],
          urgent_only: bool, lanes: dict[str, str], room: dict, busy: dict,
          running_ids: tuple[int, ...], pending_kinds: list[str]) -> sqlite3.Row | None:
    """The next runnable job's row, or None (see `claim_jobs` for the order)."""
    # `running_ids` are filtered here, not in SQL: a statement whose text changes with the
    # number of running jobs would be prepared anew on every claim.
    # A job whose worker died (its lease expired) goes first.
    where, args = "", []
    closed = tuple(kind for kind, lane in lanes.items() if room.get(lane, 1) <= 0)
    if closed:
        clause, values = _in("j.kind", closed)
        where, args = f" AND NOT {clause}", values
    if urgent_only:
        clause, values = _in("j.kind", urgent_kinds or ("",))
        where, args = f"{where} AND {clause}", args + values
    for expired in conn.execute(
            f"SELECT * FROM jobs AS j WHERE j.status = 'running' AND j.locked_until <= ?"
            f"{where} AND {_NOT_BLOCKED} ORDER BY j.locked_until", [now] + args):
        if expired["id"] not in running_ids:
            return expired

    def next_of(kinds) -> sqlite3.Row | None:
        """The due, unblocked job of `kinds` that is due first (one index seek per kind)."""
        best = None
        for kind in kinds:
            row = conn.execute(_NEXT_OF_KIND, (kind, now)).fetchone()
            if row is None or row["id"] in running_ids:  # (its worker is handing it back)
                continue
            if best is None or (row["available_at"], row["id"]) < (best["available_at"],
                                                                   best["id"]):
                best = row
        return best

    open_kinds = [kind for kind in pending_kinds
                  if kind not in lanes or room.get(lanes[kind], 1) > 0]
    for kind in urgent_kinds:
        if kind in open_kinds:
            row = next_of([kind])
            if row is not None:
                return row
    if urgent_only:
        return None
    # One candidate per open lane (kinds of no lane count as one); the least busy lane wins,
    # then the job due first.
    by_lane: dict[str | None, list[str]] = {}
    for kind in open_kinds:
        by_lane.setdefault(lanes.get(kind), []).append(kind)
    best = None
    for lane_busy, kinds in sorted(((busy.get(lane, 0), kinds)
                                    for lane, kinds in by_lane.items()), key=lambda g: g[0]):
        if best is not None and lane_busy > best[0]:
            break  # a less busy lane already has a due job
        row = next_of(kinds)
        if row is not None and (best is None or (row["available_at"], row["id"]) <
                                (best[1]["available_at"], best[1]["id"])):
            best = (lane_busy, row)
    return best[1] if best else None


def _job(row: sqlite3.Row, token: str, attempt: int) -> Job:
    return Job(id=row["id"], kind=row["kind"], dedupe_key=row["dedupe_key"],
               ordering_key=row["ordering_key"], payload=json.loads(row["payload"]),
               attempt=attempt, max_attempts=row["max_attempts"], created_at=row["created_at"],
               lease_token=token)


def bury_worn_out_jobs(conn: sqlite3.Connection, now: float, max_attempts: int,
                       max_age_seconds: float, on_dead=None,
                       running_ids: tuple[int, ...] = ()) -> list[Job]:
    """Dead-letter the jobs whose lease expired (their worker died) and that used up their
    attempts or age, instead of running them again — except `running_ids`, which the caller
    is still running. `on_dead(job, error)` may return follow-up jobs, written in the same
    transaction. Returns the buried jobs."""
    buried = []
    with transaction(conn):
        rows = conn.execute(
            "SELECT * FROM jobs WHERE status = 'running' AND locked_until <= ? AND"
            " (attempts >= COALESCE(max_attempts, ?) OR created_at <= ?)",
            (now, max_attempts, now - max_age_seconds)).fetchall()
        for row in rows:
            if row["id"] in running_ids:
                continue
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


def renew_leases(conn: sqlite3.Connection, jobs: list[tuple[int, str]],
                 locked_until: float) -> int:
    """Extend the leases of jobs still running: `(job id, lease token)` pairs. A job that runs
    longer than JOB_LEASE_SECONDS (a slow peer, a long download) keeps its lease, so no worker
    takes it over while it runs. Returns how many leases were extended."""
    if not jobs:
        return 0
    with transaction(conn):
        return sum(conn.execute(
            "UPDATE jobs SET locked_until = ? WHERE id = ? AND locked_by = ?"
            " AND status = 'running'", (locked_until, job_id, token)).rowcount
            for job_id, token in jobs)


def complete_job(conn: sqlite3.Connection, job: Job, result: dict | None = None,
                 follow_ups: list[FollowUp] | tuple = (), now: float | None = None,
                 writes=None) -> bool:
    """Mark `job` done and enqueue its follow-ups atomically, with the handler's own `writes`
    (a callable given the connection) in the same transaction. False when this worker lost
    its lease to another one: then only `writes` are made (they record what the handler did
    outside, a message sent say, which the job's new owner must know)."""
    now = now or time.time()
    with transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET status = 'done', finished_at = ?, updated_at = ?, locked_until = NULL,"
            " result = ?, last_error = NULL WHERE id = ? AND locked_by = ? AND status = 'running'",
            (now, now, dumps(result) if result is not None else None, job.id, job.lease_token))
        if writes is not None:
            writes(conn)
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
             rng: random.Random | None = None, on_dead=None,
             retry_after_cap_seconds: float = BACKOFF_CAP_SECONDS) -> str:
    """Record a failed run. Returns the new status: 'pending' (retry later), 'dead' (not
    retryable, out of attempts or too old) or 'lost' (this worker no longer holds the lease).
    When the job dies, `on_dead(job, error)` may return follow-up jobs (a note telling a human),
    written in the same transaction so the news of a failure cannot be lost.

    A peer's `retry_after_seconds` is honoured up to `retry_after_cap_seconds`: a peer asking
    for years (`Retry-After: 100000000`) would otherwise park the job, and its conversation
    behind it, out of reach of the attempt and age limits. A retry that would start past the
    age limit is not scheduled: the job dies now, where an operator sees it."""
    limit = job.max_attempts or max_attempts
    delay = max(backoff_seconds(job.attempt, rng),
                min(retry_after_seconds or 0, retry_after_cap_seconds))
    dead = (not retryable or job.attempt >= limit
            or now + delay - job.created_at >= max_age_seconds)
    with transaction(conn):
        if dead:
            cur = conn.execute(
                "UPDATE jobs SET status = 'dead', finished_at = ?, updated_at = ?,"
                " locked_until = NULL, last_error = ? WHERE id = ? AND locked_by = ?"
                " AND status = 'running'", (now, now, error[:2000], job.id, job.lease_token))
            if cur.rowcount == 1 and on_dead:
                _enqueue_follow_ups(conn, on_dead(job, error), now)
        else:
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


def discard_dead_job(conn: sqlite3.Connection, job_id: int, reason: str,
                     now: float | None = None) -> bool:
    """An operator gives up on a dead job: it becomes `done` with `result = {"discarded":
    true, "reason": ..., "discarded_at": ...}` (its last error kept), so it leaves the dead
    letters and is pruned like any finished job. False if not dead (or not an id SQLite can
    hold)."""
    if not 0 <= job_id < 2**63:
        return False
    now = now or time.time()
    result = {"discarded": True, "reason": reason[:500], "discarded_at": now}
    with transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET status = 'done', finished_at = ?, updated_at = ?, result = ?"
            " WHERE id = ? AND status = 'dead'", (now, now, dumps(result), job_id))
    return cur.rowcount == 1


def release_job(conn: sqlite3.Connection, job: Job, available_at: float, now: float,
                reason: str | None = None) -> bool:
    """Give a claimed job back without counting the attempt (e.g. it must wait longer). A
    `reason` is kept as its `last_error`, so the wait shows as held back (`queue_stats`,
    `list_jobs`) until the job runs."""
    with transaction(conn):
        cur = conn.execute(
            "UPDATE jobs SET status = 'pending', attempts = attempts - 1, available_at = ?,"
            " locked_until = NULL, updated_at = ?, last_error = COALESCE(?, last_error)"
            " WHERE id = ? AND locked_by = ? AND status = 'running'",
            (available_at, now, reason[:2000] if reason else None, job.id, job.lease_token))
    return cur.rowcount == 1


def reschedule_pending_job(conn: sqlite3.Connection, dedupe_key: str, available_at: float,
                           now: float) -> bool:
    """Move a still-pending job (e.g. a debounce window being extended); False if it already
    started or finished."""
    cur = conn.execute("UPDATE jobs SET available_at = ?, updated_at = ?"
                       " WHERE dedupe_key = ? AND status = 'pending'",
                       (available_at, now, dedupe_key))
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
              limit: int = 100, now: float | None = None) -> list[dict]:
    """Jobs, newest first, optionally filtered by status and kind. A pending job that failed
    before also says how long it has been held back (`held_back_seconds`, since it was created)
    and when it runs next (`next_attempt_in_seconds`)."""
    sql, args = "SELECT * FROM jobs WHERE 1=1", []
    if status:
        sql, args = sql + " AND status = ?", args + [status]
    if kind:
        sql, args = sql + " AND kind = ?", args + [kind]
    rows = conn.execute(sql + " ORDER BY id DESC LIMIT ?", args + [limit]).fetchall()
    now = now or time.time()
    jobs = [_job_dict(r) for r in rows]
    for job in jobs:
        if job["status"] == "pending" and (job["attempts"] > 0 or job["last_error"]):
            job["held_back_seconds"] = round(now - job["created_at"], 1)
            job["next_attempt_in_seconds"] = round(max(0.0, job["available_at"] - now), 1)
    return jobs


def _job_dict(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["payload"] = json.loads(d["payload"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    return d


def dead_jobs_by_kind(conn: sqlite3.Connection, except_kind: str | None = None) -> dict[str, int]:
    """How many jobs are dead, per kind (leaving out `except_kind`), in kind order."""
    return {kind: n for kind, n in conn.execute(
        "SELECT kind, COUNT(*) FROM jobs WHERE status = 'dead' AND kind IS NOT ?"
        " GROUP BY kind ORDER BY kind", (except_kind,))}


def count_staged_jobs(conn: sqlite3.Connection) -> int:
    """How many jobs wait in `staged_jobs` for the poller to move them into `jobs` (copies of
    one key included, see `stage_job`)."""
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
    # Jobs that failed and wait for another attempt (a peer down, a Retry-After).
    held = conn.execute("SELECT COUNT(*), MIN(created_at) FROM jobs WHERE status = 'pending'"
                        " AND (attempts > 0 OR last_error IS NOT NULL)").fetchone()
    counts["held_back"] = held[0]
    counts["oldest_held_back_seconds"] = round(now - held[1], 1) if held[1] else 0.0
    return counts


def next_job_due_at(conn: sqlite3.Connection, after: float | None = None) -> float | None:
    """When the next job can be claimed: the earliest pending job not blocked by an earlier job
    of its conversation, a staged job, or the earliest lease to expire — of those later than
    `after`, when given (the jobs due already are known to wait for a free worker)."""
    floor = after if after is not None else float("-inf")
    row = conn.execute(
        f"SELECT MIN(t) FROM (SELECT MIN(j.available_at) AS t FROM jobs AS j"
        f" WHERE j.status = 'pending' AND j.available_at > ? AND {_NOT_BLOCKED}"
        f" UNION ALL SELECT (SELECT created_at FROM staged_jobs WHERE created_at > ?"
        f" ORDER BY id LIMIT 1)"
        f" UNION ALL SELECT MIN(locked_until) FROM jobs WHERE status = 'running'"
        f" AND locked_until > ?)", (floor, floor, floor)).fetchone()
    return row[0]


def prune_jobs(conn: sqlite3.Connection, older_than: float) -> int:
    """Delete done jobs finished before `older_than` (dead jobs stay for an operator), a batch
    per transaction. Returns how many."""
    return delete_in_batches(conn, "jobs", "status = 'done' AND finished_at < ?", (older_than,))
