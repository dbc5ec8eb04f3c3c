"""Rate limits that hold for the whole service: at most KOMMO_MAX_RPS (≤ 7) calls reach Kommo in
any one-second window, whatever thread or process makes them (the poller's jobs, a setup
command, the OAuth exchange); Mercado Livre's messaging pools likewise (500 a minute); a 429
blocks every caller until its Retry-After and is counted."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import requests
from flask import Flask

import config
import db_manager
import kommo_auth
import kommo_setup
import meli_auth
import peer_http
from tests.conftest import ROOT
from kommo_api import KommoClient, KommoError
from peer_http import (RateLimitWait, SharedRateLimiter, parse_retry_after, rate_limit_path,
                       rate_limit_stats, shared_limiter)
from standins import kommo as kommo_standin
from standins.kommo import max_in_window


class FakeTime:
    """A clock and a sleep that moves it: limiter waits without real time passing."""

    def __init__(self, start: float = 1_790_000_000.0):
        self.now = start
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _limiter(path, max_calls=2, window=1.0, fake=None, **kw) -> SharedRateLimiter:
    fake = fake or FakeTime()
    return SharedRateLimiter(str(path) if path else None, max_calls, window, pool="kommo",
                             clock=fake.clock, sleep=fake.sleep, **kw)


def _kommo_env(tmp_path, url, **extra) -> dict:
    return {"DATABASE_PATH": str(tmp_path / "ponte.db"), "LOG_DIR": str(tmp_path / "logs"),
            "ENVIRONMENT": "test", "KOMMO_BASE_URL": url,
            "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN, "KOMMO_MAX_RPS": "7",
            "KOMMO_CLIENT_ID": "standin-client", "KOMMO_CLIENT_SECRET": "standin-secret",
            **{k: str(v) for k, v in extra.items()}}


def _settings(env: dict):
    return config.load_settings(env, partial_bridges_ok=True)


@pytest.fixture
def conn(tmp_path):
    """The database the settings of `_kommo_env` point at (Kommo tokens live there)."""
    c = db_manager.connect(str(tmp_path / "ponte.db"))
    db_manager.migrate(c)
    yield c
    c.close()


# --- the sliding window ----------------------------------------------------------------------

def test_two_limiters_on_one_file_share_the_window(tmp_path):
    # GIVEN two limiters on the same file (two processes, or two threads' clients) and one clock
    fake = FakeTime()
    first, second = _limiter(tmp_path / "k.json", 3, fake=fake), \
        _limiter(tmp_path / "k.json", 3, fake=fake)
    t0, started = fake.now, []
    # WHEN they take turns for 12 calls
    for i in range(12):
        (first if i % 2 else second).acquire()
        started.append(fake.now - t0)
    # THEN no window of one second holds more than 3 calls, and it is not slower than needed
    assert max_in_window(started, 1.0) == 3
    assert started[-1] == pytest.approx(3 * 1.02)


def test_a_slot_is_held_until_the_answer_is_back(tmp_path):
    # GIVEN 2 calls a second, one sent at t=0 whose answer took 0.5 s, one instant
    fake = FakeTime()
    limiter = _limiter(tmp_path / "k.json", 2, fake=fake)
    t0 = fake.now
    with limiter.slot():
        fake.now += 0.5  # Kommo may have counted it as late as now
    limiter.acquire()
    # WHEN a third call comes
    waited = limiter.acquire()
    # THEN it waits a window after the first call's answer, not after its start
    assert fake.now - t0 == pytest.approx(0.5 + 1.02) and waited == pytest.approx(1.02)


def test_a_slot_of_a_dead_process_ends_on_its_own(tmp_path):
    # GIVEN one call a second and a process that took a slot and died before the answer
    fake = FakeTime()
    dead = _limiter(tmp_path / "k.json", 1, fake=fake)
    held = dead.slot(hold_seconds=5)
    held.__enter__()  # never exited
    t0 = fake.now
    # WHEN another process calls
    _limiter(tmp_path / "k.json", 1, fake=fake).acquire()
    # THEN it waited for the slot's hold time plus a window, polling meanwhile
    assert fake.now - t0 == pytest.approx(5 + 1.02)
    assert max(fake.slept) <= peer_http.IN_FLIGHT_POLL_SECONDS + 1e-9
    del held


def test_a_call_in_flight_is_waited_for_not_judged_by_its_hold_time(tmp_path):
    # GIVEN one call a second, a call in flight (held up to 60 s) and at most 10 s of waiting
    fake = FakeTime()
    t0 = fake.now
    held = _limiter(tmp_path / "k.json", 1, fake=fake).slot(hold_seconds=60)
    held.__enter__()

    def sleep_and_answer(seconds):  # its answer comes back 0.3 s later
        fake.sleep(seconds)
        if fake.now - t0 > 0.29 and not held_done:  # after 6 polls of 0.05 s
            held.__exit__(None, None, None)
            held_done.append(True)

    held_done: list[bool] = []
    other = _limiter(tmp_path / "k.json", 1, fake=fake, max_wait_seconds=10)
    other.sleep = sleep_and_answer
    # WHEN another call comes, THEN it waits a window after that answer instead of giving up
    assert other.acquire() == pytest.approx(0.3 + 1.02, abs=1e-3)


def test_a_wait_longer_than_allowed_raises_without_sleeping(tmp_path):
    fake = FakeTime()
    limiter = _limiter(tmp_path / "k.json", 1, window=60.0, fake=fake, max_wait_seconds=10)
    limiter.acquire()
    with pytest.raises(RateLimitWait) as err:
        limiter.acquire()
    assert err.value.wait_seconds == pytest.approx(61.2) and fake.slept == []
    assert limiter.stats()["calls"] == 1  # the refused call took no slot


def test_no_limit_still_honours_a_block(tmp_path):
    fake = FakeTime()
    limiter = _limiter(tmp_path / "k.json", 0, fake=fake)
    assert [limiter.acquire() for _ in range(50)] == [0.0] * 50
    limiter.block(3)
    assert limiter.acquire() == pytest.approx(3)


def test_a_damaged_state_file_is_forgotten_not_fatal(tmp_path):
    path = tmp_path / "k.json"
    path.write_text('{"slots": [["1.1", 17')  # a write cut short
    fake = FakeTime()
    limiter = _limiter(path, 2, fake=fake)
    assert limiter.acquire() == 0.0 and limiter.stats()["calls"] == 1
    assert json.loads(path.read_text())["calls"] == 1


def test_slots_from_a_clock_that_went_back_are_dropped(tmp_path):
    fake = FakeTime()
    ahead = _limiter(tmp_path / "k.json", 1, fake=FakeTime(fake.now + 3600))
    ahead.acquire()
    assert _limiter(tmp_path / "k.json", 1, fake=fake).acquire() == 0.0


def test_an_unusable_folder_falls_back_to_one_limit_per_process(tmp_path, caplog):
    # GIVEN a database path in a folder that does not exist
    missing = str(tmp_path / "no-such-dir" / "ponte.db")
    fake = FakeTime()
    with caplog.at_level(logging.WARNING, logger="ponte.peer"):
        first = shared_limiter(missing, "kommo", 1, 1.0, clock=fake.clock, sleep=fake.sleep)
    second = shared_limiter(missing, "kommo", 1, 1.0, clock=fake.clock, sleep=fake.sleep)
    # THEN the clients of this process still share one window, and the operator is told
    assert "rate_limit_state_unusable" in caplog.text
    first.acquire()
    assert second.acquire() == pytest.approx(1.02)


def test_the_state_lives_beside_the_database(tmp_path):
    db_path = str(tmp_path / "ponte.db")
    assert rate_limit_path(db_path, "kommo") == db_path + ".rate-kommo.json"
    assert shared_limiter("", "kommo", 7, 1.0).path is None
    assert shared_limiter(":memory:", "kommo", 7, 1.0).path is None
    with pytest.raises(ValueError):
        shared_limiter(db_path, "../etc/passwd", 7, 1.0)


@pytest.mark.parametrize("rate,expected", [(7, (7, 1.0)), (5.5, (5, 1.0)), (0.5, (1, 2.0)),
                                           (0, (0, 1.0)), (-3, (0, 1.0))])
def test_calls_per_window(rate, expected):
    assert peer_http.calls_per_window(rate) == expected


# --- Retry-After ------------------------------------------------------------------------------

@pytest.mark.parametrize("value,expected", [
    ("2", 2.0), (" 120 ", 120.0), (300, 300.0), (1.5, 1.5),
    ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # in the past: no wait
    ("Thu, 01 Jan 2026 00:00:10 GMT", 10.0),
    ("²", None), ("1²", None), ("٣", None), ("3.5", None), ("-5", None), ("", None),
    ("abc", None), ("9" * 40, None), ("Fri, 99 Foo 2026 99:99:99 GMT", None), (None, None),
    (True, None), (float("nan"), None), (float("inf"), None), (-1, None), ({"a": 1}, None),
])
def test_retry_after_is_parsed_strictly(value, expected):
    now = 1767225600.0  # 2026-01-01T00:00:00Z
    assert parse_retry_after(value, now=now) == expected


def _answering_429(headers=None, body=None) -> Flask:
    app = Flask("peer-429")

    @app.route("/api/v4/leads/<int:lead_id>/notes", methods=["POST"])
    def notes(lead_id):
        return body if body is not None else {"title": "Too Many Requests"}, 429, headers or {}

    return app


@pytest.mark.parametrize("headers,body,expected", [
    ({"Retry-After": "²"}, None, 2.0),                  # junk header: Kommo's default
    ({"Retry-After": "Mon, 99 Xyz"}, None, 2.0),
    ({}, {"retry_after": "abc"}, 2.0),                  # junk JSON body
    ({}, {"retry_after": [1]}, 2.0),
    ({}, {"retry_after": 30}, 30.0),                    # Kommo's JSON body
    ({"Retry-After": "4"}, {"retry_after": 30}, 4.0),   # the header wins
])
def test_a_kommo_429_with_any_retry_after_is_a_retryable_error(serve, tmp_path, conn, headers,
                                                               body, expected):
    client = KommoClient(serve(_answering_429(headers, body)).url, kommo_auth.TokenSource(
        _settings(_kommo_env(tmp_path, "http://x")), conn), max_rps=7,
        rate_limit_path=str(tmp_path / "ponte.db"))
    with pytest.raises(KommoError) as err:
        client.add_lead_note(1, "x")
    assert err.value.status == 429 and err.value.retryable
    assert err.value.retry_after_seconds == expected
    assert rate_limit_stats(str(tmp_path / "ponte.db"))["kommo"]["429"] == 1


# --- 429: every caller waits, it is counted ---------------------------------------------------

def test_a_429_holds_every_caller_until_retry_after_and_is_counted(serve, tmp_path, conn,
                                                                   caplog):
    # GIVEN Kommo answering the next call with 429 and Retry-After: 2
    app = kommo_standin.create_app(max_rps=0)
    url = serve(app).url
    requests.post(f"{url}/_standin/fail", json={"path_prefix": "/api/v4/leads", "status": 429,
                                                "retry_after": "2"}, timeout=5)
    settings = _settings(_kommo_env(tmp_path, url))
    fake = FakeTime()
    clients = [kommo_auth.build_client(settings, conn, now=fake.clock) for _ in range(3)]
    for c in clients:
        c.limiter.sleep = fake.sleep
    # WHEN one client gets the 429
    t0 = fake.now
    with caplog.at_level(logging.WARNING, logger="ponte.peer"):
        with pytest.raises(KommoError) as err:
            clients[0].add_lead_note(1, "primeira")
    # THEN the error is retryable with its Retry-After, logged and counted
    assert err.value.retryable and err.value.retry_after_seconds == 2
    assert not err.value.may_have_reached
    assert "peer_rate_limited" in caplog.text
    # AND every caller (this client and the others) waits 2 s before sending
    for c in clients:
        c.add_lead_note(1, "depois")
    assert fake.now - t0 == pytest.approx(2.0) and sum(fake.slept) == pytest.approx(2.0)
    stats = rate_limit_stats(settings.database_path)["kommo"]
    assert stats["429"] == 1 and stats["waited_seconds"] == pytest.approx(2.0)
    assert stats["calls"] == 4
    assert len(app.config["STATE"].notes) == 3


def test_a_long_retry_after_sends_the_job_back_to_the_outbox(serve, tmp_path, conn):
    # GIVEN Kommo asked for 300 s
    app = _answering_429(body={"retry_after": 300})
    settings = _settings(_kommo_env(tmp_path, serve(app).url))
    client = kommo_auth.build_client(settings, conn)
    with pytest.raises(KommoError):
        client.add_lead_note(1, "x")
    # WHEN another caller (a setup command, say) tries
    started = time.monotonic()
    with pytest.raises(KommoError) as err:
        kommo_setup._client(settings).add_lead_note(1, "y")
    # THEN it does not sleep 300 s: a retryable error that never left, with the time left
    assert time.monotonic() - started < 1
    assert err.value.status is None and err.value.retryable and not err.value.may_have_reached
    assert 298 <= err.value.retry_after_seconds <= 300


@pytest.mark.parametrize("builder, path", [
    (kommo_auth.build_client, "/api/v4/leads/1/notes"),
    (meli_auth.build_client, "/questions/1"),
])
def test_a_429_blocks_the_pool_for_retry_after_max_seconds_at_most(serve, tmp_path, conn,
                                                                   builder, path):
    # GIVEN RETRY_AFTER_MAX_SECONDS=30, and the peer asks for 600 s
    app = Flask("peer-429-long")

    @app.route("/<path:anything>", methods=["GET", "POST"])
    def too_many(anything):
        return {"message": "too many"}, 429, {"Retry-After": "600"}

    url = serve(app).url
    settings = _settings(_kommo_env(tmp_path, url, RETRY_AFTER_MAX_SECONDS=30,
                                    ML_API_BASE_URL=url))
    fake = FakeTime()
    client = builder(settings, conn, now=fake.clock)
    with pytest.raises(peer_http.PeerError) as err:
        client._request("GET", path, auth=False)
    # THEN the job waits 30 s, not 600 s, and so does every caller of the pool
    assert err.value.status == 429 and err.value.retry_after_seconds == 30
    blocked_until = rate_limit_stats(settings.database_path)[client.peer]["blocked_until"]
    assert blocked_until == pytest.approx(fake.now + 30)


@pytest.mark.parametrize("peer", ["kommo", "meli", "n8n", "chatwoot"])
def test_every_client_of_the_jobs_follows_retry_after_max_seconds(tmp_path, conn, peer):
    import job_runner
    settings = _settings(_kommo_env(tmp_path, "http://x", RETRY_AFTER_MAX_SECONDS=30))
    assert getattr(job_runner.Clients(settings, conn, time.time), peer).max_block_seconds == 30


def test_a_configured_cap_above_the_default_holds(tmp_path):
    fake = FakeTime()
    limiter = _limiter(tmp_path / "kommo.json", fake=fake)
    limiter.block(3600, max_seconds=7200)
    # a block longer than the default cap is kept, not taken for a clock far ahead
    with pytest.raises(RateLimitWait) as wait:
        limiter.acquire()
    assert wait.value.wait_seconds == pytest.approx(3600)


_CALL_AFTER_BLOCK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import config, kommo_auth
import db_manager
settings = config.load_settings(json.loads(sys.argv[2]), partial_bridges_ok=True)
conn = db_manager.connect(settings.database_path)
kommo_auth.build_client(settings, conn).add_lead_note(1, "outro processo")
"""


def test_a_429_holds_callers_in_other_processes(serve, tmp_path, conn):
    # GIVEN this process got a 429 with Retry-After: 2
    app = kommo_standin.create_app(max_rps=0)
    url = serve(app).url
    requests.post(f"{url}/_standin/fail", json={"path_prefix": "/api/v4/leads", "status": 429,
                                                "retry_after": "2"}, timeout=5)
    env = _kommo_env(tmp_path, url)
    with pytest.raises(KommoError):
        kommo_auth.build_client(_settings(env), conn).add_lead_note(1, "x")
    refused_at = app.config["STATE"].requests[-1]["at"]
    # WHEN another process calls Kommo right away
    subprocess.run([sys.executable, "-c", _CALL_AFTER_BLOCK, str(ROOT), json.dumps(env)],
                   check=True, timeout=30, cwd=tmp_path)
    # THEN its call reached Kommo only after the 2 s
    sent_at = app.config["STATE"].requests[-1]["at"]
    assert app.config["STATE"].notes[-1]["text"] == "outro processo"
    assert sent_at - refused_at >= 1.95


# --- the whole service: threads and processes against the Kommo stand-in ---------------------

_HAMMER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import config, kommo_api, kommo_auth, kommo_setup
settings = config.load_settings(json.loads(sys.argv[2]), partial_bridges_ok=True)
start_at, stop_at, kind = float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
if kind == "setup":  # what `./ponte kommo create-field` uses
    client = kommo_setup._client(settings)
    call = lambda: client.add_lead_note(7, "setup")
else:  # the OAuth code exchange of /oauth/callback
    client = kommo_auth._token_client(settings)
    call = lambda: client.exchange_token({
        "client_id": settings.kommo_client_id, "client_secret": settings.kommo_client_secret,
        "grant_type": "authorization_code", "code": "c0de", "redirect_uri": ""})
time.sleep(max(0.0, start_at - time.time()))
ok = errors = 0
while time.time() < stop_at:
    try:
        call()
        ok += 1
    except kommo_api.KommoError:
        errors += 1
print(json.dumps({"ok": ok, "errors": errors}))
"""


def test_threads_and_processes_never_exceed_kommo_limit(serve, tmp_path):
    # GIVEN Kommo answering 429 past 7 requests in any second, KOMMO_MAX_RPS=7
    app = kommo_standin.create_app(max_rps=7)
    url = serve(app).url
    env = _kommo_env(tmp_path, url)
    settings = _settings(env)
    db_manager.migrate(db_manager.connect(settings.database_path))
    start_at = time.time() + 2.0  # the processes need a moment to import
    stop_at = start_at + 3.0
    # WHEN a setup command and an OAuth exchange (two processes) and 8 job threads all call
    # Kommo as fast as they can for 3 s
    workers = [subprocess.Popen([sys.executable, "-c", _HAMMER, str(ROOT), json.dumps(env),
                                 str(start_at), str(stop_at), kind], stdout=subprocess.PIPE,
                                text=True, cwd=tmp_path) for kind in ("setup", "oauth")]
    results = []

    def job_thread():
        conn = db_manager.connect(settings.database_path)
        client = kommo_auth.build_client(settings, conn)
        ok = errors = 0
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            try:
                client.add_lead_note(1, "job")
                ok += 1
            except KommoError:
                errors += 1
        results.append({"ok": ok, "errors": errors})
        conn.close()

    threads = [threading.Thread(target=job_thread) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for w in workers:
        out, _ = w.communicate(timeout=30)
        results.append(json.loads(out))
    rate = requests.get(f"{url}/_standin/rate", timeout=5).json()
    # THEN Kommo never saw more than 7 in any second, and refused nothing
    assert rate["max_in_any_window"] <= 7, rate
    assert rate["rate_limited"] == 0 and all(r["errors"] == 0 for r in results), results
    # AND everyone got through, close to the limit (~6.8 a second)
    assert all(r["ok"] >= 1 for r in results[-2:]), results
    assert rate["requests"] >= 14, rate
    stats = rate_limit_stats(settings.database_path)["kommo"]
    assert stats["calls"] == rate["requests"] and stats["waited_seconds"] > 0


# --- the stand-in's rule ----------------------------------------------------------------------

def test_the_kommo_standin_refuses_the_eighth_call_in_a_second(serve):
    app = kommo_standin.create_app(max_rps=7)
    url = serve(app).url
    headers = {"Authorization": f"Bearer {kommo_standin.DEFAULT_TOKEN}"}
    codes = [requests.post(f"{url}/api/v4/leads/1/notes", headers=headers, timeout=5, json=[
        {"note_type": "common", "params": {"text": "x"}}]).status_code for _ in range(9)]
    assert codes == [200] * 7 + [429] * 2
    rate = requests.get(f"{url}/_standin/rate", timeout=5).json()
    assert rate == {**rate, "requests": 9, "rate_limited": 2, "max_in_any_window": 9}


def test_max_in_window():
    assert max_in_window([], 1.0) == 0
    assert max_in_window([0.0, 0.5, 1.0, 1.01, 2.5], 1.0) == 3
    assert max_in_window([0.0, 1.1, 2.2], 1.0) == 1


# --- wiring -----------------------------------------------------------------------------------

def test_every_kommo_client_shares_one_limit_of_at_most_7(tmp_path, conn):
    settings = _settings(_kommo_env(tmp_path, "http://kommo", KOMMO_MAX_RPS=10))
    clients = [kommo_auth.build_client(settings, conn), kommo_auth._token_client(settings),
               kommo_setup._client(settings)]
    path = rate_limit_path(settings.database_path, "kommo")
    assert {(c.limiter.path, c.limiter.max_calls, c.limiter.window_seconds)
            for c in clients} == {(path, 7, 1.0)}
    assert "KOMMO_MAX_RPS=10" in " ".join(config.warnings(settings.replace(
        enabled_bridges=("whatsapp",))))
    with pytest.raises(config.ConfigError, match="KOMMO_MAX_RPS"):
        _settings(_kommo_env(tmp_path, "http://kommo", KOMMO_MAX_RPS=-1))


def test_mercado_livre_messaging_reads_and_writes_are_two_pools_of_500_a_minute(tmp_path,
                                                                                    conn):
    settings = config.load_settings({"DATABASE_PATH": str(tmp_path / "ponte.db"),
                                     "ML_API_BASE_URL": "http://ml"}, partial_bridges_ok=True)
    client = meli_auth.build_client(settings, conn)
    read = client._limiter_for("GET", "/messages/packs/1/sellers/2")
    write = client._limiter_for("POST", "/messages/packs/1/sellers/2")
    other = client._limiter_for("GET", "/questions/search")
    assert (read.pool, read.max_calls, read.window_seconds) == \
        ("mercadolivre-messages-read", 500, 60.0)
    assert (write.pool, write.max_calls, write.window_seconds) == \
        ("mercadolivre-messages-write", 500, 60.0)
    assert (other.pool, other.max_calls) == ("mercadolivre", 0)  # no published number: 429s only
    assert os.path.dirname(read.path) == str(tmp_path)
    # a 429 on a send holds the sends, not the reads (Mercado Livre limits per resource)
    write.block(30)
    assert write.stats()["blocked_until"] > time.time() + 25
    assert read.stats()["blocked_until"] == 0 and not math.isnan(read.acquire())


def test_the_mercado_livre_ai_client_follows_retry_after_max_seconds(tmp_path, conn):
    import job_runner
    import meli_ai
    settings = _settings(_kommo_env(tmp_path, "http://x", RETRY_AFTER_MAX_SECONDS=30))
    ctx = job_runner.JobContext(settings, conn)
    assert meli_ai.ai_client(ctx).max_block_seconds == 30
