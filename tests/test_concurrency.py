"""Many conversations at once: the poller's worker pool against stand-ins with latency (an AI
that takes its time, a Kommo that allows 7 requests a second), across HTTP."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

import db_manager
import outbox
from poller import Poller
from standins import chatwoot as standin_chatwoot
from standins import kommo as kommo_standin
from standins import mercadolivre as standin_ml
from standins import n8n as n8n_standin
from standins.support import wait_for
from tests.bridge_a_harness import N8N_KEY, SECRET, BridgeA
from tests.meli_support import QUESTIONS_INBOX, SALES_INBOX, SELLER, bridge_env

ROOT = Path(__file__).resolve().parent.parent
AI_SECONDS = 0.6


def _contact(n: int) -> dict:
    """Form fields of customer number `n` (its own contact, lead and talk)."""
    return {"contact_id": str(1000 + n), "lead_id": str(5000 + n), "talk_id": str(9000 + n)}


def _calls_by_contact(bridge: BridgeA) -> dict[str, list[dict]]:
    calls = requests.get(bridge.n8n.url + "/_standin/calls").json()["calls"]
    by_contact: dict[str, list[dict]] = {}
    for call in calls:
        by_contact.setdefault(call["body"]["contact_id"], []).append(call)
    return by_contact


def test_one_contact_keeps_its_order_while_other_contacts_run_in_parallel(make_settings, serve,
                                                                          clock):
    # GIVEN an AI that takes 0.6 s per answer, and the poller's daemon loop running
    bridge = BridgeA(make_settings, serve, clock)
    bridge.n8n_mode(delay=AI_SECONDS)
    first = _contact(0)
    calls_of = lambda contact: _calls_by_contact(bridge).get(contact["contact_id"], [])  # noqa: E731
    with bridge.poller_running():
        # WHEN one customer writes three times, each while the AI works on the one before,
        # and six other customers write meanwhile
        bridge.customer_says("primeira", **first)
        wait_for(lambda: calls_of(first), timeout=5, interval=0.01, what="first call")
        for n in range(1, 7):
            bridge.customer_says(f"oi do cliente {n}", **_contact(n))
        bridge.customer_says("segunda", **first)
        wait_for(lambda: len(calls_of(first)) == 2, timeout=5, interval=0.01, what="2nd call")
        bridge.customer_says("terceira", **first)
        wait_for(lambda: len(bridge.kommo_state()["sent"]) == 9, timeout=10, interval=0.05,
                 what="nine replies")
    # THEN the first customer's answers reach its chat in the order it wrote ...
    replies = bridge.chat_messages(talk_id=first["talk_id"])
    assert [next(w for w in ("primeira", "segunda", "terceira") if w in r) for r in replies] == \
        ["primeira", "segunda", "terceira"]
    # ... its n8n calls never overlapped (each started after the previous one answered) ...
    own = [c["at"] for c in calls_of(first)]
    assert len(own) == 3 and all(b - a >= AI_SECONDS * 0.9 for a, b in zip(own, own[1:]))
    # ... and the six others were all with the AI at the same time, none waiting for another
    others = sorted(calls_of(_contact(n))[0]["at"] for n in range(1, 7))
    assert others[-1] - others[0] < AI_SECONDS * 0.9
    assert all(len(bridge.chat_messages(talk_id=_contact(n)["talk_id"])) == 1 for n in range(1, 7))


def test_a_slow_ai_holds_only_its_own_lane(make_settings, serve, clock):
    # GIVEN a pool of 4 where n8n may use 2, and an AI that takes 0.6 s
    bridge = BridgeA(make_settings, serve, clock, POLLER_CONCURRENCY=4,
                     POLLER_LANE_LIMITS="n8n=2")
    bridge.n8n_mode(delay=AI_SECONDS)
    # WHEN six customers write at once
    for n in range(6):
        bridge.customer_says(f"oi {n}", **_contact(n))
    bridge.run_jobs()
    # THEN n8n never had more than two calls at once (three waves), and everyone was answered
    starts = sorted(c["at"] for calls in _calls_by_contact(bridge).values() for c in calls)
    assert len(starts) == 6
    overlapping = max(sum(1 for t in starts if s <= t < s + AI_SECONDS * 0.9) for s in starts)
    assert overlapping == 2
    assert all(len(bridge.chat_messages(talk_id=_contact(n)["talk_id"])) == 1 for n in range(6))


def test_customers_waiting_on_the_ai_hold_no_database_connection(make_settings, serve, clock):
    # GIVEN a pool of 16 (12 for n8n) and an AI that takes 0.6 s
    bridge = BridgeA(make_settings, serve, clock, POLLER_CONCURRENCY=16)
    bridge.n8n_mode(delay=AI_SECONDS)
    with bridge.poller_running():
        # WHEN ten customers write at once
        for n in range(10):
            bridge.customer_says(f"oi do cliente {n}", **_contact(n))
        wait_for(lambda: len(bridge.kommo_state()["sent"]) == 10, timeout=10, interval=0.05,
                 what="ten replies")
        bridge.poller.heartbeat()
    # THEN all ten were with the AI at the same time (the last asked before the first answered)
    starts = sorted(calls[0]["at"] for calls in _calls_by_contact(bridge).values())
    assert len(starts) == 10 and starts[-1] - starts[0] < AI_SECONDS
    # ... while the workers, in /health, had opened fewer database connections than there were
    # jobs waiting on the AI: a job gives its connection back while it waits
    poller = bridge.api("get", "/health").get_json()["poller"]
    assert 1 <= poller["db_connections"] < 10, poller


def test_mercado_livre_question_reaches_chatwoot_while_the_ai_is_busy(make_settings, serve,
                                                                      tmp_path):
    # GIVEN both bridges on one poller (the daemon loop, real clock), and an AI that takes 4 s
    kommo = serve(kommo_standin.create_app(max_rps=0))
    n8n = serve(n8n_standin.create_app(api_key=N8N_KEY, latency_seconds=4.0))
    ml = serve(standin_ml.create_app(SELLER))
    cw = serve(standin_chatwoot.create_app())
    settings = make_settings(**bridge_env(ml.url, cw.url), KOMMO_BASE_URL=kommo.url,
                             KOMMO_WEBHOOK_SECRET=SECRET,
                             KOMMO_ACCESS_TOKEN=kommo_standin.DEFAULT_TOKEN,
                             N8N_WEBHOOK_URL=n8n.url + "/webhook/ponte", N8N_API_KEY=N8N_KEY,
                             BOT_DEBOUNCE_SECONDS=0, KOMMO_MAX_RPS=0, ML_POLL_QUESTIONS_SECONDS=1)
    from webhook_server import create_app
    web = create_app(settings).test_client()
    requests.post(f"{cw.url}/_standin/inboxes", json=[
        {"id": QUESTIONS_INBOX, "webhook_url": "http://127.0.0.1:9/"},
        {"id": SALES_INBOX, "webhook_url": "http://127.0.0.1:9/"}])
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    poller = Poller(settings, conn)
    loop = threading.Thread(target=poller.run_forever, daemon=True)
    loop.start()
    try:
        # WHEN ten customers write on WhatsApp, and while n8n works on them a buyer asks on ML
        for n in range(10):
            web.post(f"/webhooks/kommo/{SECRET}", data=kommo_standin.message_form(
                f"oi {n}", **_contact(n)).encode(),
                content_type="application/x-www-form-urlencoded")
        wait_for(lambda: len(requests.get(n8n.url + "/_standin/calls").json()["calls"]) == 10,
                 timeout=10, interval=0.02, what="ten n8n calls in flight")
        requests.post(f"{ml.url}/_standin/items",
                      json=[{"id": "MLB3737188005", "title": "Espaçador", "price": 62.96}])
        asked_at = time.time()
        requests.post(f"{ml.url}/_standin/questions", json=[
            {"text": "Tem pronta entrega?", "item_id": "MLB3737188005", "buyer_id": 1944693439}])
        # THEN the question is in Chatwoot within 3 s, before the AI answered anybody
        wait_for(lambda: requests.get(f"{cw.url}/_standin/state").json()["conversations"],
                 timeout=3, interval=0.05, what="the question's conversation in Chatwoot")
        reached_after = time.time() - asked_at
        assert reached_after <= 3
        assert requests.get(f"{kommo.url}/_standin/state").json()["sent"] == []
        # ... and then every customer gets an answer
        wait_for(lambda: len(requests.get(f"{kommo.url}/_standin/state").json()["sent"]) == 10,
                 timeout=15, interval=0.1, what="ten replies in Kommo")
    finally:
        poller.request_stop()
        loop.join(30)
    assert not loop.is_alive()


def test_kommo_never_sees_more_than_its_limit_in_any_second(make_settings, serve, clock):
    # GIVEN a Kommo that answers 429 past 7 requests in any one-second window
    bridge = BridgeA(make_settings, serve, clock, kommo_max_rps=7, KOMMO_MAX_RPS=7)
    # WHEN 25 customers write at once and an instant AI answers them all
    for n in range(25):
        bridge.customer_says(f"oi {n}", **_contact(n))
    bridge.run_jobs()
    # THEN every answer went out, none was refused, and no second held more than 7 requests
    assert len(bridge.kommo_state()["sent"]) == 25
    rate = requests.get(bridge.kommo.url + "/_standin/rate").json()
    assert rate["rate_limited"] == 0 and rate["max_in_any_window"] <= 7


def test_held_back_jobs_show_in_health_and_admin_jobs(make_settings, serve, clock):
    # GIVEN n8n answering 503 with a Retry-After of years
    bridge = BridgeA(make_settings, serve, clock)
    bridge.n8n_mode(fail_next=1, fail_status=503)
    bridge.customer_says("oi")
    bridge.run_jobs()
    job = outbox.list_jobs(bridge.db, kind="n8n.forward_message")[0]
    # THEN the job waits for a retry, and the operator sees for how long
    assert job["status"] == "pending" and job["attempts"] == 1
    listed = bridge.api("get", "/admin/jobs?status=pending").get_json()["jobs"][0]
    assert listed["held_back_seconds"] == 0 and listed["next_attempt_in_seconds"] > 0
    clock.advance(1800)
    db_manager.beat(bridge.db, "poller", now=clock())
    health = bridge.web.get("/health").get_json()
    assert health["queue"]["held_back"] == 1 and health["status"] == "degraded"
    assert any("aguardando nova tentativa" in w for w in health["warnings"])


# --- kill -9 with jobs in flight ----------------------------------------------------------------

def test_poller_killed_again_and_again_with_jobs_in_flight_loses_and_doubles_nothing(
        make_settings, serve, clock, tmp_path):
    # GIVEN an AI that takes 0.4 s, four workers, and 40 customer messages (20 contacts, two
    # each): about four seconds of work, to be cut by the kills
    bridge = BridgeA(make_settings, serve, clock)
    bridge.n8n_mode(delay=0.4)
    clock.t = time.time()
    texts = {}
    for n in range(40):
        who = _contact(n % 20)
        text = f"mensagem {n}"
        texts[text] = who["talk_id"]
        assert bridge.customer_says(text, created_at=int(time.time()), **who).status_code == 200
    env = {**os.environ, "PONTE_ENV_FILE": str(tmp_path / "none.env"),
           **{k: str(v) for k, v in {
               "DATABASE_PATH": bridge.settings.database_path, "LOG_DIR": str(tmp_path / "logs"),
               "KOMMO_BASE_URL": bridge.settings.kommo_base_url, "KOMMO_WEBHOOK_SECRET": SECRET,
               "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN,
               "N8N_WEBHOOK_URL": bridge.settings.n8n_webhook_url, "N8N_API_KEY": N8N_KEY,
               "KOMMO_MAX_RPS": 0, "JOB_LEASE_SECONDS": 30, "BOT_DEBOUNCE_SECONDS": 0,
               "LOG_LEVEL": "WARNING", "POLLER_CONCURRENCY": 4}.items()}}
    rng = random.Random(13)
    kills = 0
    # WHEN the poller is killed with SIGKILL at random moments, again and again
    killed_in_flight = 0
    while kills < 15:
        proc = subprocess.Popen([sys.executable, "poller.py"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: (db_manager.last_beat(bridge.db, "poller") or {}).get("pid")
                 == proc.pid, timeout=30, interval=0.02, what="the poller to start")
        time.sleep(rng.uniform(0.05, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        killed_in_flight += outbox.queue_stats(bridge.db)["running"] > 0
    assert killed_in_flight >= 5, "the kills should land while jobs run"
    # THEN a poller left alone delivers everything: each message answered, none twice
    proc = subprocess.Popen([sys.executable, "poller.py"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: outbox.queue_stats(bridge.db)["pending"] == 0
                 and outbox.queue_stats(bridge.db)["running"] == 0,
                 timeout=60, interval=0.2, what="the queue to empty")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert outbox.queue_stats(bridge.db)["dead"] == 0
    sent = bridge.kommo_state()["sent"]
    for text, talk_id in texts.items():
        answers = [m for m in sent if m["talk_id"] == talk_id and f"“{text}" in m["text"]
                   or m["talk_id"] == talk_id and text in m["text"]]
        assert answers, f"{text} was never answered"
    assert len(sent) == len({(m["talk_id"], m["text"]) for m in sent}), "a reply was sent twice"


def test_a_peer_asking_to_wait_for_years_is_retried_within_the_cap(make_settings, serve, clock):
    # GIVEN Kommo answering the reply with 503 and Retry-After: 100000000 (about three years)
    bridge = BridgeA(make_settings, serve, clock)
    bridge.kommo_fails(path_prefix="/api/v4/talks", status=503, count=1, retry_after="100000000")
    bridge.customer_says("oi")
    bridge.run_jobs()
    job = outbox.list_jobs(bridge.db, kind="kommo.send_reply")[0]
    # THEN the reply waits at most RETRY_AFTER_MAX_SECONDS (15 min), not years ...
    assert job["status"] == "pending" and 0 < job["available_at"] - clock() <= 900
    # ... and goes out once that wait is over
    clock.advance(900)
    bridge.run_jobs()
    assert len(bridge.chat_messages()) == 1


def test_a_job_running_past_its_lease_is_not_started_again(make_settings, clock):
    # GIVEN a lease of 1 s and a job that takes 3 s, in the daemon loop on the real clock
    settings = make_settings(JOB_LEASE_SECONDS=1)
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    runs = []

    def slow(ctx, job):
        runs.append(job.attempt)
        time.sleep(3)

    import poller as poller_module
    old, poller_module.HEARTBEAT_SECONDS = poller_module.HEARTBEAT_SECONDS, 0.2
    poller = Poller(settings, conn, handlers={"t.slow": slow}, on_dead={})
    outbox.enqueue_job(conn, "t.slow", "slow", {})
    loop = threading.Thread(target=poller.run_forever, daemon=True)
    loop.start()
    try:
        wait_for(lambda: outbox.get_job(conn, dedupe_key="slow")["status"] == "done",
                 timeout=15, interval=0.1, what="the slow job to finish")
    finally:
        poller.request_stop()
        loop.join(15)
        poller_module.HEARTBEAT_SECONDS = old
    # THEN it ran once: the heartbeat kept its lease while it ran
    assert runs == [1]


def test_a_newly_due_job_of_an_idle_peer_gets_the_next_free_worker(make_settings, clock):
    # GIVEN a pool of 4 full of n8n and Kommo work, with more of both waiting
    settings = make_settings(POLLER_CONCURRENCY=4, POLLER_LANE_LIMITS="n8n=3,kommo=3")
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    started, release = [], {}

    def work(ctx, job):
        started.append(job.dedupe_key)
        release.setdefault(job.dedupe_key, threading.Event()).wait(10)

    handlers = {"n8n.call": work, "kommo.send": work, "ml.fetch": work}
    poller = Poller(settings, conn, clock=clock, handlers=handlers, on_dead={})
    for n in range(6):
        outbox.enqueue_job(conn, "n8n.call", f"ai-{n}", {}, ordering_key=f"a{n}", now=clock())
        outbox.enqueue_job(conn, "kommo.send", f"k-{n}", {}, ordering_key=f"k{n}", now=clock())
    assert poller.pool.dispatch() == 4
    wait_for(lambda: len(started) == 4, timeout=5, interval=0.01, what="four jobs running")
    assert sorted(started) == ["ai-0", "ai-1", "k-0", "k-1"]  # the lanes took turns
    # WHEN a Mercado Livre job becomes due after the whole backlog, and one worker frees up
    clock.advance(1)
    outbox.enqueue_job(conn, "ml.fetch", "ml-1", {}, now=clock())
    release.setdefault("ml-1", threading.Event()).set()
    release.setdefault("ai-0", threading.Event()).set()
    wait_for(lambda: len(poller.pool.in_flight()) == 3, timeout=5, interval=0.01,
             what="one worker free")
    poller.pool.dispatch(max_jobs=1)
    wait_for(lambda: len(started) == 5, timeout=5, interval=0.01, what="a fifth job")
    # THEN that worker went to Mercado Livre, the least busy lane, not to the older backlog
    assert started[4] == "ml-1"
    for n in range(6):
        for key in (f"ai-{n}", f"k-{n}"):
            release.setdefault(key, threading.Event()).set()
    poller.drain()
    assert len(started) == 13


def test_deliveries_claimed_behind_one_that_fails_wait_for_its_retry(make_settings, clock):
    # GIVEN three recorded Kommo deliveries, in arrival order; applying the first fails once
    settings = make_settings()
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    applied = []

    def intake(ctx, job):
        if job.dedupe_key == "d1" and job.attempt == 1:
            raise KeyError("a defect that the next attempt does not meet")
        applied.append(job.dedupe_key)

    intake.atomic = intake.urgent = True
    poller = Poller(settings, conn, clock=clock, handlers={"kommo.intake": intake}, on_dead={})
    for key in ("d1", "d2", "d3"):
        outbox.enqueue_job(conn, "kommo.intake", key, {}, ordering_key="kommo-intake",
                           now=clock())
    # WHEN the poller's loop claims them as one run and the first fails
    poller.drain()
    # THEN the two behind it were not applied before it (a #pausar stays before the messages
    # that came after it) ...
    assert applied == []
    # ... and all three go, in order, once its retry is due
    clock.advance(3600)
    poller.drain()
    assert applied == ["d1", "d2", "d3"]


def test_an_unknown_lane_in_the_settings_stops_the_poller(make_settings, db):
    import config
    import pytest
    settings = make_settings(POLLER_LANE_LIMITS="mercadolivre=4")
    with pytest.raises(config.ConfigError, match="faixa desconhecida mercadolivre"):
        Poller(settings, db)


def test_a_connection_given_back_at_the_end_of_a_job_never_carries_its_transaction(
        make_settings):
    from worker_pool import ConnectionPool, LeasedConnection
    settings = make_settings()
    db_manager.migrate(db_manager.connect(settings.database_path))
    pool = ConnectionPool(settings.database_path)
    leased = LeasedConnection(pool)
    leased.execute("BEGIN IMMEDIATE")  # e.g. a COMMIT that failed left it open
    leased.execute("INSERT INTO locks (name, owner, locked_until) VALUES ('x', 'y', 0)")
    leased.release()  # mid-job (waiting on the AI, say): kept, transaction and all
    assert leased.in_transaction and pool.opened == 1
    leased.release(job_ended=True)  # the job ended: rolled back before the next job gets it
    again = LeasedConnection(pool)
    assert not again.in_transaction and pool.opened == 1
    assert again.execute("SELECT COUNT(*) FROM locks").fetchone()[0] == 0
    pool.close()
