"""The job outbox: nothing lost, nothing doubled, in order, with backoff and dead letters."""
from __future__ import annotations

import multiprocessing
import os
import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import db_manager
import outbox
import web_common
import whatsapp_store
from job_runner import JobContext, JobFailed, run_next_job
from kommo_api import KommoError  # any PeerError subclass
from outbox import FollowUp

LEASE = 30


def test_duplicate_enqueue_is_a_noop(db, clock):
    first = outbox.enqueue_job(db, "n8n.forward_message", "kommo-msg:abc", {"text": "oi"},
                                   now=clock())
    second = outbox.enqueue_job(db, "n8n.forward_message", "kommo-msg:abc",
                                    {"text": "changed"}, now=clock())
    assert first is not None and second is None
    jobs = outbox.list_jobs(db)
    assert len(jobs) == 1 and jobs[0]["payload"] == {"text": "oi"}


def test_claim_marks_running_and_nothing_else_is_claimable(db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE)
    assert job.attempt == 1
    assert outbox.claim_next_job(db, clock(), LEASE) is None
    assert outbox.get_job(db, job.id)["status"] == "running"


def test_job_of_a_dead_worker_is_run_again_and_completes_once(db, clock):
    outbox.enqueue_job(db, "k", "a", {"n": 1}, now=clock())
    first = outbox.claim_next_job(db, clock(), LEASE, worker="w1")
    # worker w1 "dies": it never completes. Before the lease ends nobody may take the job.
    clock.advance(LEASE - 1)
    assert outbox.claim_next_job(db, clock(), LEASE, worker="w2") is None
    clock.advance(2)
    second = outbox.claim_next_job(db, clock(), LEASE, worker="w2")
    assert second is not None and second.id == first.id and second.attempt == 2
    assert outbox.complete_job(db, second, {"ok": True}, now=clock()) is True
    # the old worker wakes up late: its completion must not count again
    assert outbox.complete_job(db, first, {"ok": "late"}, now=clock()) is False
    row = outbox.get_job(db, first.id)
    assert row["status"] == "done" and row["result"] == {"ok": True} and row["attempts"] == 2


def test_backoff_grows_exponentially_with_jitter_and_caps():
    rng = random.Random(7)
    for attempt in range(1, 15):
        ceiling = min(outbox.BACKOFF_CAP_SECONDS, 2.0 * 2 ** (attempt - 1))
        delays = [outbox.backoff_seconds(attempt, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d, 6) for d in delays}) > 1  # jitter spreads retries
    assert outbox.backoff_seconds(30, rng) <= 900


def test_failures_retry_with_backoff_then_dead_letter(db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    scheduled = []
    for attempt in range(1, 4):
        job = outbox.claim_next_job(db, clock(), LEASE)
        assert job is not None and job.attempt == attempt
        status = outbox.fail_job(db, job, "boom", True, clock(), max_attempts=3,
                                 max_age_seconds=86400, rng=random.Random(1))
        row = outbox.get_job(db, job.id)
        if attempt < 3:
            assert status == "pending"
            delay = row["available_at"] - clock()
            scheduled.append(delay)
            # not claimable before its time
            assert outbox.claim_next_job(db, clock(), LEASE) is None
            clock.advance(delay)
        else:
            assert status == "dead" and row["status"] == "dead" and row["last_error"] == "boom"
    assert scheduled[1] > scheduled[0]
    assert outbox.claim_next_job(db, clock.advance(10_000), LEASE) is None


def test_non_retryable_error_goes_straight_to_dead_and_can_be_retried(db, clock):
    job_id = outbox.enqueue_job(db, "k", "a", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE)
    assert outbox.fail_job(db, job, "422 closed", False, clock(), 10, 86400) == "dead"
    assert outbox.queue_stats(db, clock())["dead"] == 1
    assert outbox.retry_dead_job(db, job_id, clock()) is True
    again = outbox.claim_next_job(db, clock(), LEASE)
    assert again.id == job_id and again.attempt == 1
    assert outbox.retry_dead_job(db, job_id, clock()) is False  # running, not dead


def test_job_too_old_is_dead_even_with_attempts_left(db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    clock.advance(100)
    job = outbox.claim_next_job(db, clock(), LEASE)
    assert outbox.fail_job(db, job, "x", True, clock(), 10, max_age_seconds=50) == "dead"


def test_retry_after_from_the_peer_is_honoured(db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE)
    outbox.fail_job(db, job, "429", True, clock(), 10, 86400, retry_after_seconds=120)
    assert outbox.get_job(db, job.id)["available_at"] >= clock() + 120


def test_retry_after_is_capped_and_a_retry_past_the_age_limit_dies_now(db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE)
    assert outbox.fail_job(db, job, "503", True, clock(), 10, 86400,
                           retry_after_seconds=100_000_000, retry_after_cap_seconds=900) \
        == "pending"
    assert clock() + 900 >= outbox.get_job(db, job.id)["available_at"] >= clock() + 450
    # a wait that would end past the age limit counts against it: dead now, not in 15 min
    clock.advance(86_400 - 600)
    job = outbox.claim_next_job(db, clock(), LEASE)
    assert outbox.fail_job(db, job, "503", True, clock(), 10, 86400, retry_after_seconds=900,
                           retry_after_cap_seconds=900) == "dead"


def test_claim_jobs_respects_lanes_and_never_runs_an_urgent_job_beside_others(db, clock):
    for n in range(4):
        outbox.enqueue_job(db, "n8n.forward", f"ai-{n}", {}, ordering_key=f"c{n}", now=clock())
    outbox.enqueue_job(db, "ml.import", "ml-0", {}, now=clock())
    lanes = {"n8n.forward": "n8n", "ml.import": "ml", "intake": "database"}
    # a lane with room for two takes two; the other lane's job is not held back by it
    jobs = outbox.claim_jobs(db, clock(), LEASE, 10, lanes=lanes,
                             lane_room={"n8n": 2, "ml": 2, "database": 1})
    assert sorted(j.dedupe_key for j in jobs) == ["ai-0", "ai-1", "ml-0"]
    # an urgent job is claimed alone, and while it runs only urgent jobs are claimed
    outbox.enqueue_job(db, "intake", "in-0", {}, ordering_key="intake", now=clock())
    outbox.enqueue_job(db, "intake", "in-1", {}, now=clock())
    jobs = outbox.claim_jobs(db, clock(), LEASE, 10, urgent_kinds=("intake",), lanes=lanes,
                             lane_room={"n8n": 2, "ml": 2, "database": 5})
    assert [j.dedupe_key for j in jobs] == ["in-0"]
    jobs = outbox.claim_jobs(db, clock(), LEASE, 10, urgent_kinds=("intake",), lanes=lanes,
                             lane_room={"n8n": 2, "ml": 2, "database": 5}, urgent_only=True)
    assert [j.dedupe_key for j in jobs] == ["in-1"]
    assert outbox.claim_jobs(db, clock(), LEASE, 10, urgent_kinds=("intake",), lanes=lanes,
                             lane_room={"n8n": 2, "ml": 2, "database": 5},
                             urgent_only=True) == []


def test_a_run_of_urgent_jobs_in_one_order_is_claimed_together_and_with_nothing_else(db, clock):
    lanes = {"n8n.forward": "n8n", "intake": "database"}
    outbox.enqueue_job(db, "n8n.forward", "ai-0", {}, now=clock())
    for n in range(5):
        outbox.enqueue_job(db, "intake", f"in-{n}", {}, ordering_key="intake", now=clock(),
                           available_at=clock() + (60 if n == 3 else 0))
    room = {"n8n": 5, "database": 5}

    def claim(limit):
        return [j.dedupe_key for j in outbox.claim_jobs(
            db, clock(), LEASE, limit, urgent_kinds=("intake",), lanes=lanes, lane_room=room,
            urgent_together=3)]

    # a caller that runs urgent jobs in turn takes the run behind the first, in order, and
    # however few free workers it has; nothing else comes with them
    assert claim(1) == ["in-0", "in-1", "in-2"]
    # in-3 is not due yet: in-4 waits for it (same order), and the n8n job may go
    for key in ("in-0", "in-1", "in-2"):
        outbox.complete_job(db, next(j for j in _running(db) if j.dedupe_key == key),
                            now=clock())
    assert claim(5) == ["ai-0"]
    outbox.complete_job(db, _running(db)[0], now=clock())
    clock.advance(61)
    assert claim(5) == ["in-3", "in-4"]


def _running(db):
    return [outbox._job(row, row["locked_by"], row["attempts"])
            for row in db.execute("SELECT * FROM jobs WHERE status = 'running'")]


def test_without_lanes_a_claim_takes_up_to_its_limit(db, clock):
    for n in range(6):
        outbox.enqueue_job(db, "k", f"j{n}", {}, now=clock())
    assert [j.dedupe_key for j in outbox.claim_jobs(db, clock(), LEASE, 5)] == \
        ["j0", "j1", "j2", "j3", "j4"]


def test_a_lost_lease_still_records_what_the_handler_did_outside(db, clock):
    outbox.enqueue_job(db, "k", "j", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE)
    clock.advance(LEASE + 1)
    taken_over = outbox.claim_next_job(db, clock(), LEASE)  # another worker took it over
    assert taken_over.id == job.id
    # the first worker's completion is refused, but its record of a message sent is kept
    assert not outbox.complete_job(db, job, {}, [FollowUp("k2", "f", {})], now=clock(),
                                   writes=lambda conn: db_manager.mapping_put(
                                       conn, "kommo-sent", "m-1", "j", now=clock()))
    assert db_manager.mapping_get(db, "kommo-sent", "m-1") == "j"
    assert outbox.get_job(db, dedupe_key="f") is None
    assert outbox.get_job(db, dedupe_key="j")["status"] == "running"


def test_ordering_key_runs_jobs_of_one_conversation_in_order(db, clock):
    for i in range(3):
        outbox.enqueue_job(db, "k", f"c1-{i}", {"i": i}, ordering_key="contact:1",
                               now=clock())
    outbox.enqueue_job(db, "k", "c2-0", {"i": 0}, ordering_key="contact:2", now=clock())
    a = outbox.claim_next_job(db, clock(), LEASE)
    b = outbox.claim_next_job(db, clock(), LEASE)
    assert (a.dedupe_key, b.dedupe_key) == ("c1-0", "c2-0")  # other contact is not blocked
    assert outbox.claim_next_job(db, clock(), LEASE) is None  # c1-1 waits for c1-0
    # c1-0 fails and is retried later: c1-1 must still wait (no overtaking)
    outbox.fail_job(db, a, "down", True, clock(), 10, 86400)
    assert outbox.claim_next_job(db, clock(), LEASE) is None
    clock.advance(10)
    a2 = outbox.claim_next_job(db, clock(), LEASE)
    assert a2.dedupe_key == "c1-0"
    outbox.complete_job(db, a2, now=clock())
    assert outbox.claim_next_job(db, clock(), LEASE).dedupe_key == "c1-1"


def test_complete_enqueues_follow_ups_atomically(db, clock):
    outbox.enqueue_job(db, "parent", "p", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE)
    outbox.complete_job(db, job, follow_ups=[FollowUp("child", "c", {"x": 1})], now=clock())
    assert outbox.get_job(db, dedupe_key="c")["status"] == "pending"


def test_follow_up_is_not_written_when_completion_is_lost(db, clock):
    outbox.enqueue_job(db, "parent", "p", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE, worker="w1")
    clock.advance(LEASE + 1)
    outbox.claim_next_job(db, clock(), LEASE, worker="w2")
    assert outbox.complete_job(db, job, follow_ups=[FollowUp("child", "c", {})],
                               now=clock()) is False
    assert outbox.get_job(db, dedupe_key="c") is None


def test_prune_deletes_a_backlog_bigger_than_one_batch(db, clock, monkeypatch):
    monkeypatch.setattr(db_manager, "PRUNE_BATCH_ROWS", 3)
    for i in range(7):
        outbox.enqueue_job(db, "k", f"old-{i}", {}, now=clock())
        outbox.complete_job(db, outbox.claim_next_job(db, clock(), LEASE), now=clock())
    assert outbox.prune_jobs(db, clock() + 1) == 7
    assert outbox.list_jobs(db) == []


def test_batched_deletes_refuse_to_run_inside_a_transaction(db):
    # joined into the caller's transaction, every batch would hold the write lock at once
    with db_manager.transaction(db), pytest.raises(RuntimeError):
        db_manager.delete_in_batches(db, "events", "received_at < ?", (0,))


def test_prune_removes_old_done_jobs_but_keeps_dead_ones(db, clock):
    for key in ("old", "dead"):
        outbox.enqueue_job(db, "k", key, {}, now=clock())
    done = outbox.claim_next_job(db, clock(), LEASE)
    outbox.complete_job(db, done, now=clock())
    dead = outbox.claim_next_job(db, clock(), LEASE)
    outbox.fail_job(db, dead, "x", False, clock(), 1, 1)
    assert outbox.prune_jobs(db, clock() + 1) == 1
    assert [j["status"] for j in outbox.list_jobs(db)] == ["dead"]


def test_run_next_job_maps_handler_outcomes(settings, db, clock):
    calls = []

    def ok(ctx, job):
        calls.append(job.payload)
        return {"sent": True}, [FollowUp("after", "after-1", {})]

    def peer_down(ctx, job):
        raise KommoError(503, "unavailable", True)

    def rejected(ctx, job):
        raise JobFailed("talk closed", retryable=False)

    dead_notes = []
    ctx = JobContext(settings, db, now=clock)
    handlers = {"ok": ok, "down": peer_down, "rejected": rejected,
                "after": lambda c, j: None, "note": lambda c, j: {"noted": j.payload["why"]}}
    on_dead = {"rejected": lambda c, j, err: dead_notes.append(err) or
               [FollowUp("note", "note-1", {"why": err})]}
    for kind in ("ok", "down", "rejected", "unknown"):
        outbox.enqueue_job(db, kind, kind, {"k": kind}, now=clock())
    while run_next_job(ctx, handlers, on_dead):
        pass
    assert calls == [{"k": "ok"}]
    status = {j["dedupe_key"]: j["status"] for j in outbox.list_jobs(db)}
    assert status["ok"] == "done" and status["after-1"] == "done"
    assert status["down"] == "pending" and status["rejected"] == "dead"
    assert status["unknown"] == "dead" and status["note-1"] == "done"
    assert dead_notes and "talk closed" in dead_notes[0]


def test_urgent_kinds_are_claimed_before_older_due_jobs(db, clock):
    outbox.enqueue_job(db, "reply", "older", {}, now=clock())
    clock.advance(5)
    outbox.enqueue_job(db, "intake", "newer", {}, now=clock())
    first = outbox.claim_next_job(db, clock(), LEASE, urgent_kinds=("intake",))
    second = outbox.claim_next_job(db, clock(), LEASE, urgent_kinds=("intake",))
    assert (first.dedupe_key, second.dedupe_key) == ("newer", "older")


def _stage(db, key, ordering_key=None, now=None, payload=None):
    with db_manager.transaction(db):
        return outbox.stage_job(db, "intake", key, payload or {"key": key},
                                ordering_key=ordering_key, max_attempts=3, now=now)


def test_staged_jobs_are_counted_at_once_and_become_jobs_in_staging_order(db, clock):
    outbox.enqueue_job(db, "intake", "running-one", {}, ordering_key="in", now=clock())
    running = outbox.claim_next_job(db, clock(), LEASE)
    clock.advance(1)
    assert _stage(db, "s1", ordering_key="in", now=clock())
    clock.advance(1)
    assert _stage(db, "s2", ordering_key="in", now=clock())
    # waiting to be moved, they already count as pending and due, and wake the poller
    stats = outbox.queue_stats(db, clock())
    assert (stats["pending"], stats["due"], stats["oldest_due_seconds"]) == (2, 2, 1.0)
    assert outbox.next_job_due_at(db) == clock() - 1
    # a claim moves them into jobs; their ordering key still waits for the running job
    assert outbox.claim_next_job(db, clock(), LEASE) is None
    moved = outbox.list_jobs(db, kind="intake")
    assert [(j["dedupe_key"], j["status"], j["max_attempts"]) for j in moved] == [
        ("s2", "pending", 3), ("s1", "pending", 3), ("running-one", "running", None)]
    assert moved[1]["available_at"] == moved[1]["created_at"] == clock() - 1
    assert outbox.count_staged_jobs(db) == 0
    outbox.complete_job(db, running, now=clock())
    order = [outbox.claim_next_job(db, clock(), LEASE) for _ in range(2)]
    assert [j.dedupe_key for j in order[:1]] == ["s1"] and order[1] is None
    outbox.complete_job(db, order[0], now=clock())
    assert outbox.claim_next_job(db, clock(), LEASE).payload == {"key": "s2"}


def test_a_key_staged_or_enqueued_more_than_once_becomes_one_job(db, clock):
    def stage(key, mark):
        return _stage(db, key, now=clock(), payload={"copy": mark})

    # copies staged before the move are all staged; the move keeps the first
    assert stage("k1", 1) and stage("k1", 2) and stage("k1", 3)
    assert outbox.queue_stats(db, clock())["staged"] == 3
    outbox.claim_next_job(db, clock(), LEASE)
    assert outbox.count_staged_jobs(db) == 0
    assert [j["payload"] for j in outbox.list_jobs(db)] == [{"copy": 1}]
    # a key already in jobs, moved or enqueued, is not staged
    assert not stage("k1", 4)
    outbox.enqueue_job(db, "other", "k2", {}, now=clock())
    assert not stage("k2", 1)
    assert outbox.count_staged_jobs(db) == 0
    # a key staged, then enqueued before the move: the enqueued job holds it
    assert stage("k3", 1)
    assert outbox.enqueue_job(db, "other", "k3", {"x": 1}, now=clock()) is not None
    outbox.claim_next_job(db, clock(), LEASE)
    assert outbox.get_job(db, dedupe_key="k3")["payload"] == {"x": 1}
    assert sorted(j["dedupe_key"] for j in outbox.list_jobs(db)) == ["k1", "k2", "k3"]


def test_copies_of_a_key_in_different_move_batches_become_one_job(db, clock, monkeypatch):
    monkeypatch.setattr(outbox, "STAGED_MOVE_BATCH", 2)
    for key in ("x", "y", "x", "z", "x", "y"):
        assert _stage(db, key, now=clock())
    claimed = []
    while (job := outbox.claim_next_job(db, clock() + 10, LEASE)) is not None:
        claimed.append(job.dedupe_key)
        outbox.complete_job(db, job, now=clock())
    assert claimed == ["x", "y", "z"]
    assert outbox.count_staged_jobs(db) == 0
    assert outbox.queue_stats(db, clock())["done"] == 3


def test_a_staged_backlog_moves_a_batch_per_claim_in_order(db, clock, monkeypatch):
    monkeypatch.setattr(outbox, "STAGED_MOVE_BATCH", 3)
    for i in range(7):  # one timestamp: the claim order can only come from the staging order
        assert _stage(db, f"b{i}", now=clock())
    claimed = []
    while (job := outbox.claim_next_job(db, clock() + 10, LEASE)) is not None:
        claimed.append(job.dedupe_key)
        staged = outbox.count_staged_jobs(db)
        assert staged == max(0, 7 - 3 * len(claimed))  # one batch per claim, no more
        outbox.complete_job(db, job, now=clock())
    assert claimed == [f"b{i}" for i in range(7)]


def test_atomic_handler_commits_its_writes_with_the_completion_or_not_at_all(settings, db,
                                                                             clock):
    failures = [RuntimeError("crashed half-way")]

    def apply(ctx, job):
        db_manager.mapping_put(ctx.conn, "applied", job.dedupe_key, {"n": 1}, now=ctx.now())
        if failures:
            raise failures.pop()
        return {"applied": True}, [FollowUp("after", "after-1", {})]

    apply.atomic = True
    ctx = JobContext(settings, db, now=clock)
    handlers = {"apply": apply, "after": lambda c, j: None}
    outbox.enqueue_job(db, "apply", "d1", {}, now=clock())
    run_next_job(ctx, handlers)
    # the failed run left nothing behind
    assert db_manager.mapping_get(db, "applied", "d1") is None
    assert outbox.get_job(db, dedupe_key="d1")["status"] == "pending"
    assert outbox.get_job(db, dedupe_key="after-1") is None
    clock.advance(3600)
    while run_next_job(ctx, handlers):
        pass
    job = outbox.get_job(db, dedupe_key="d1")
    assert job["status"] == "done" and job["result"] == {"applied": True}
    assert db_manager.mapping_get(db, "applied", "d1") == {"n": 1}
    assert outbox.get_job(db, dedupe_key="after-1")["status"] == "done"


def test_atomic_handler_that_lost_its_lease_writes_nothing(settings, db, clock):
    def slow_apply(ctx, job):
        db_manager.mapping_put(ctx.conn, "applied", job.dedupe_key, {"n": 1}, now=ctx.now())
        # meanwhile the lease expired and another poller took the job over
        db.execute("UPDATE jobs SET locked_by = 'someone-else' WHERE id = ?", (job.id,))
        return {"applied": True}

    slow_apply.atomic = True
    outbox.enqueue_job(db, "apply", "d2", {}, now=clock())
    run_next_job(JobContext(settings, db, now=clock), {"apply": slow_apply})
    assert db_manager.mapping_get(db, "applied", "d2") is None
    assert outbox.get_job(db, dedupe_key="d2")["status"] == "running"


def _migrate_in_process(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        conn = db_manager.connect(path)
        results.put(("ok", db_manager.migrate(conn)))
    except Exception as exc:  # reported to the parent
        results.put(("error", repr(exc)))


def test_migrations_run_concurrently_from_two_processes(tmp_path):
    path = str(tmp_path / "race.db")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_migrate_in_process, args=(path, barrier, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = [results.get(timeout=5) for _ in procs]
    assert outcomes == [("ok", len(db_manager.MIGRATIONS))] * 2
    conn = db_manager.connect(path)
    assert db_manager.schema_version(conn) == len(db_manager.MIGRATIONS)
    assert db_manager.migrate(conn) == len(db_manager.MIGRATIONS)  # idempotent


def test_web_commits_do_not_checkpoint_below_the_web_threshold(settings, clock):
    web = web_common.connection(settings.database_path)
    db_manager.migrate(web)
    db_size = os.path.getsize(settings.database_path)
    for i in range(400):  # ~1,500 WAL pages: past SQLite's default threshold of 1,000
        with db_manager.transaction(web):
            outbox.enqueue_job(web, "intake", f"k{i}", {"body": "x" * 12000}, now=clock())
    # no webhook ack paid for a checkpoint: every page is still only in the WAL
    assert os.path.getsize(settings.database_path + "-wal") > 1000 * 4096
    assert os.path.getsize(settings.database_path) == db_size
    # the poller's next commit (a heartbeat) copies them into the database file
    poller = db_manager.connect(settings.database_path)
    db_manager.beat(poller, "poller", clock())
    assert os.path.getsize(settings.database_path) > db_size + 400 * 12000
    poller.close()
    web_common._local.conns.pop(settings.database_path).close()


def test_a_database_of_the_first_release_is_brought_up_to_date(tmp_path):
    path = str(tmp_path / "first.db")
    old = sqlite3.connect(path)
    old.executescript((Path(__file__).parent / "fixtures" / "schema_first_release.sql").read_text())
    old.execute("INSERT INTO kommo_conversations (kommo_contact_id, kommo_lead_id, updated_at)"
                " VALUES ('93589657', '28455849', 1.0)")
    old.execute("INSERT INTO bot_states (kommo_contact_id, status, paused_by, reason, since_at,"
                " updated_at) VALUES ('93589657', 'paused', 'Ana', 'vou atender', 5.0, 5.0)")
    old.commit()
    old.close()
    conn = db_manager.connect(path)
    assert db_manager.migrate(conn) == len(db_manager.MIGRATIONS)
    state = whatsapp_store.get_bot_state(conn, "93589657")
    assert (state["status"], state["changed_by"], state["reason"]) == ("paused", "Ana",
                                                                       "vou atender")
    assert whatsapp_store.contact_of_lead(conn, "28455849") == "93589657"
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "kommo_messages_received" in indexes and "kommo_conversations_lead" not in indexes


def test_migration_6_keeps_the_staged_jobs_and_drops_their_unique_index(tmp_path, monkeypatch):
    conn = db_manager.connect(str(tmp_path / "v5.db"))
    with monkeypatch.context() as m:
        m.setattr(db_manager, "MIGRATIONS", db_manager.MIGRATIONS[:5])
        assert db_manager.migrate(conn) == 5
    rows = [(1, "kommo.intake", "a", "kommo-intake", '{"n":1}', 7, 1.5),
            (2, "kommo.intake", "b", None, '{"n":2}', None, 2.5)]
    for row in rows:  # staged by the version before, waiting for the poller
        conn.execute("INSERT INTO staged_jobs (id, kind, dedupe_key, ordering_key, payload,"
                     " max_attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
    assert db_manager.migrate(conn) == len(db_manager.MIGRATIONS)
    assert [tuple(r) for r in conn.execute(
        "SELECT id, kind, dedupe_key, ordering_key, payload, max_attempts, created_at"
        " FROM staged_jobs ORDER BY id")] == rows
    assert not conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                            " AND tbl_name = 'staged_jobs'").fetchall()
    with db_manager.transaction(conn):
        assert outbox.stage_job(conn, "kommo.intake", "a", {}, now=2.0)
    outbox.claim_next_job(conn, 3.0, LEASE)
    assert [j["dedupe_key"] for j in outbox.list_jobs(conn)] == ["b", "a"]


def test_a_database_of_a_newer_ponte_is_refused_and_left_alone(tmp_path):
    conn = db_manager.connect(str(tmp_path / "newer.db"))
    db_manager.migrate(conn)
    newer = len(db_manager.MIGRATIONS) + 1
    conn.execute(f"PRAGMA user_version = {newer}")
    with pytest.raises(db_manager.DatabaseError, match=f"versão {newer} do esquema"):
        db_manager.migrate(conn)
    assert db_manager.schema_version(conn) == newer and not conn.in_transaction


def test_connect_uses_wal_and_foreign_keys(db):
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 5000


def test_transaction_rolls_back_everything_on_error(db, clock):
    with pytest.raises(RuntimeError):
        with db_manager.transaction(db):
            outbox.enqueue_job(db, "k", "x", {}, now=clock())
            raise RuntimeError("half-way")
    assert outbox.get_job(db, dedupe_key="x") is None


def test_a_writer_waits_for_the_write_lock_and_gets_it_soon_after_release(db, settings, clock):
    holder = db_manager.connect(settings.database_path)
    holder.execute("BEGIN IMMEDIATE")
    threading.Timer(0.23, lambda: holder.execute("COMMIT")).start()
    started = time.monotonic()
    with db_manager.transaction(db):
        outbox.enqueue_job(db, "k", "after-wait", {}, now=clock())
    waited = time.monotonic() - started
    # Released at 0.23 s; SQLite's own busy handler tries at 0.228 s and then, sleeping 100 ms,
    # only at 0.328 s.
    assert 0.225 <= waited < 0.30
    assert outbox.get_job(db, dedupe_key="after-wait")["status"] == "pending"
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == db_manager.BUSY_TIMEOUT_MS


def test_a_writer_gives_up_after_the_busy_timeout(db, settings, clock, monkeypatch):
    monkeypatch.setattr(db_manager, "BUSY_TIMEOUT_MS", 150)
    holder = db_manager.connect(settings.database_path)
    holder.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        with db_manager.transaction(db):
            outbox.enqueue_job(db, "k", "never", {}, now=clock())
    assert 0.14 <= time.monotonic() - started < 1.0
    holder.execute("ROLLBACK")
    assert outbox.get_job(db, dedupe_key="never") is None and not db.in_transaction


def test_cross_process_lock_is_exclusive_until_expiry(db, clock):
    assert db_manager.acquire_lock(db, "refresh:kommo", "a", 30, now=clock())
    assert not db_manager.acquire_lock(db, "refresh:kommo", "b", 30, now=clock())
    clock.advance(31)
    assert db_manager.acquire_lock(db, "refresh:kommo", "b", 30, now=clock())
    db_manager.release_lock(db, "refresh:kommo", "b")
    assert db_manager.acquire_lock(db, "refresh:kommo", "a", 30, now=clock())


def test_a_job_whose_worker_keeps_dying_goes_dead_at_max_attempts(db, clock):
    job_id = outbox.enqueue_job(db, "k", "crasher", {}, max_attempts=3, now=clock())
    for _ in range(3):
        assert outbox.bury_worn_out_jobs(db, clock(), 10, 86400) == []
        assert outbox.claim_next_job(db, clock(), LEASE) is not None
        clock.advance(LEASE + 1)  # the worker died: never completed
    told = []
    buried = outbox.bury_worn_out_jobs(
        db, clock(), 10, 86400,
        on_dead=lambda job, error: told.append(error) or [FollowUp("note", "n", {"e": error})])
    assert [j.id for j in buried] == [job_id]
    assert outbox.claim_next_job(db, clock(), LEASE).dedupe_key == "n"  # the note, not it
    row = outbox.get_job(db, job_id)
    assert row["status"] == "dead" and "lease expired" in row["last_error"] and told


def test_dead_letter_follow_ups_are_written_with_the_failure(db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), LEASE)
    status = outbox.fail_job(db, job, "gone", False, clock(), 5, 100,
                             on_dead=lambda j, e: [FollowUp("note", "note-a", {"why": e})])
    assert status == "dead"
    assert outbox.get_job(db, dedupe_key="note-a")["payload"] == {"why": "gone"}


def test_next_due_time_ignores_jobs_blocked_by_their_conversation(db, clock):
    # A is waiting 10 minutes to retry; B (same conversation) is due but must wait for A.
    outbox.enqueue_job(db, "k", "A", {}, available_at=clock() + 600, ordering_key="c",
                           now=clock())
    outbox.enqueue_job(db, "k", "B", {}, available_at=clock(), ordering_key="c",
                           now=clock())
    assert outbox.claim_next_job(db, clock(), LEASE) is None
    # the poller must sleep until A is due, not spin on B
    assert outbox.next_job_due_at(db) == clock() + 600


def test_jobs_of_a_dead_poller_are_released_at_once(db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    outbox.enqueue_job(db, "k", "b", {}, now=clock())
    outbox.claim_next_job(db, clock(), LEASE, worker="poller-111-1000")
    outbox.claim_next_job(db, clock(), LEASE, worker="poller-222-1000")
    released = outbox.release_orphaned_jobs(db, "poller-", lambda name: name == "222-1000",
                                                clock())
    assert released == 1
    again = outbox.claim_next_job(db, clock(), LEASE, worker="poller-333")
    assert again.dedupe_key == "a" and again.attempt == 2
    assert outbox.claim_next_job(db, clock(), LEASE) is None  # b's worker is alive


def test_a_deferred_job_shows_as_held_back_and_dies_at_the_age_limit(settings, db, clock):
    from job_runner import JobDeferred
    notes = []

    def waits(ctx, job):
        raise JobDeferred(ctx.now() + 300)  # e.g. the account is disconnected

    handlers = {"k.waits": waits}
    on_dead = {"k.waits": lambda ctx, job, error: notes.append(error) or []}
    outbox.enqueue_job(db, "k.waits", "w", {}, now=clock())
    ctx = JobContext(settings, db, now=clock)
    run_next_job(ctx, handlers, on_dead)
    # THEN it waits without spending an attempt, and an operator sees it waiting
    job = outbox.get_job(db, dedupe_key="w")
    assert (job["status"], job["attempts"]) == ("pending", 0) and "deferred" in job["last_error"]
    assert outbox.queue_stats(db, clock())["held_back"] == 1
    # WHEN it is still waiting once JOB_MAX_AGE_SECONDS have passed
    clock.advance(settings.job_max_age_seconds)
    run_next_job(ctx, handlers, on_dead)
    # THEN it dies, with its note to the human, instead of going out days late
    assert outbox.get_job(db, dedupe_key="w")["status"] == "dead" and len(notes) == 1
