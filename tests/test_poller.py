"""The poller daemon: drains the outbox, wakes up fast on new work, stops warmly, and exits
non-zero when the database is unusable."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import db_manager
import outbox
from poller import Poller

ROOT = Path(__file__).resolve().parent.parent


def test_drain_runs_every_due_job_and_run_once_beats(settings, db, clock):
    seen = []
    poller = Poller(settings, db, clock=clock, handlers={"t.x": lambda c, j: seen.append(
        j.payload["n"])}, on_dead={})
    for n in range(5):
        outbox.enqueue_job(db, "t.x", f"k{n}", {"n": n}, now=clock())
    outbox.enqueue_job(db, "t.x", "later", {"n": 99}, available_at=clock() + 60, now=clock())
    assert poller.drain() == 5 and sorted(seen) == [0, 1, 2, 3, 4]  # no ordering key: any order
    assert poller.drain(max_jobs=3) == 0
    clock.advance(61)
    assert poller.drain() == 1 and seen[-1] == 99
    poller.heartbeat()
    assert db_manager.last_beat(db, "poller")["beat_at"] == clock()


def test_run_forever_picks_up_a_job_written_by_another_connection(settings, db):
    done = threading.Event()
    poller = Poller(settings, db_manager.connect(settings.database_path),
                    handlers={"t.x": lambda c, j: done.set()}, on_dead={})
    thread = threading.Thread(target=poller.run_forever, daemon=True)
    thread.start()
    try:
        time.sleep(0.2)  # let the loop go idle first: the point is waking from idle
        other = db_manager.connect(settings.database_path)
        with db_manager.transaction(other):
            outbox.enqueue_job(other, "t.x", "from-web", {})
        assert done.wait(10), "the idle poller never picked up the job"
    finally:
        poller.request_stop()
        thread.join(10)
    assert not thread.is_alive()


SLOW_POLLER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import config, db_manager, outbox
    from poller import Poller
    import signal
    s = config.load_settings({{"DATABASE_PATH": {db!r}, "LOG_DIR": {logs!r}}})
    conn = db_manager.connect(s.database_path); db_manager.migrate(conn)
    import threading
    printing = threading.Lock()  # two workers print at once: one whole line each
    def slow(ctx, job):
        with printing:
            print("started", flush=True)
        time.sleep(1.5)
        return {{"finished": True}}
    outbox.enqueue_job(conn, "t.slow", "slow-a", {{}}, ordering_key="a")
    outbox.enqueue_job(conn, "t.slow", "slow-b", {{}}, ordering_key="b")
    outbox.enqueue_job(conn, "t.slow", "next-a", {{}}, ordering_key="a")
    p = Poller(s, conn, handlers={{"t.slow": slow}}, on_dead={{}})
    signal.signal(signal.SIGTERM, p.request_stop)
    p.run_forever()
""")


def test_sigterm_lets_every_running_job_finish_and_starts_no_other(tmp_path):
    # GIVEN two conversations' slow jobs running side by side, and a later job of the first
    db = str(tmp_path / "p.db")
    script = SLOW_POLLER.format(root=str(ROOT), db=db, logs=str(tmp_path / "logs"))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert [proc.stdout.readline().strip() for _ in range(2)] == ["started", "started"]
    # WHEN the poller is asked to stop while both run
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    # THEN both finished, and the job waiting behind the first never started
    conn = db_manager.connect(db)
    status = {j["dedupe_key"]: j["status"] for j in outbox.list_jobs(conn)}
    assert status == {"slow-a": "done", "slow-b": "done", "next-a": "pending"}


def test_poller_exits_non_zero_when_the_database_is_unusable(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    env = {**os.environ, "DATABASE_PATH": str(blocker / "ponte.db"),
           "LOG_DIR": str(tmp_path / "logs"), "PONTE_ENV_FILE": str(tmp_path / "none.env")}
    result = subprocess.run([sys.executable, "poller.py"], cwd=ROOT, env=env, timeout=30,
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert "poller_database_failure" in result.stdout


def test_poller_refuses_to_start_with_a_broken_configuration(tmp_path):
    env = {**os.environ, "PORT": "nope", "ML_CLIENT_ID": "1", "LOG_DIR": str(tmp_path),
           "PONTE_ENV_FILE": str(tmp_path / "none.env")}
    result = subprocess.run([sys.executable, "poller.py"], cwd=ROOT, env=env, timeout=30,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "PORT inválido" in result.stderr and "ML_CLIENT_SECRET" in result.stderr


def test_heartbeat_stays_fresh_while_a_long_job_runs(settings, db):
    import time as _time
    started, release = threading.Event(), threading.Event()

    def long_job(ctx, job):
        started.set()
        release.wait(10)

    poller = Poller(settings, db_manager.connect(settings.database_path),
                    handlers={"t.long": long_job}, on_dead={})
    import poller as poller_module
    old = poller_module.HEARTBEAT_SECONDS
    poller_module.HEARTBEAT_SECONDS = 0.2
    outbox.enqueue_job(db, "t.long", "long", {})
    thread = threading.Thread(target=poller.run_forever, daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        first = db_manager.last_beat(db, "poller")["beat_at"]
        deadline = _time.monotonic() + 5
        while db_manager.last_beat(db, "poller")["beat_at"] == first and \
                _time.monotonic() < deadline:
            _time.sleep(0.05)
        beat = db_manager.last_beat(db, "poller")
        assert beat["beat_at"] > first and beat["info"]["busy_since"] is not None
    finally:
        release.set()
        poller.request_stop()
        thread.join(10)
        poller_module.HEARTBEAT_SECONDS = old


def test_health_reports_a_poller_stuck_in_one_job(make_settings, clock):
    from webhook_server import create_app
    s = make_settings()
    client = create_app(s, clock=clock).test_client()
    conn = db_manager.connect(s.database_path)
    db_manager.beat(conn, "poller", now=clock(), info={"busy_since": clock() - 1000})
    response = client.get("/health")
    assert response.status_code == 503 and "preso" in response.get_json()["problems"][0]
