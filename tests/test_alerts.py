"""Alerts across HTTP: a condition fires one notice to ALERT_WEBHOOK_URL (a stand-in receiver),
nothing more while it lasts, one `resolved` notice when it clears; a receiver that is down holds
only its own lane; the poller-stale alert comes from the web process; the console shows them."""
from __future__ import annotations

import socket
import threading

import pytest
from flask import Flask, jsonify, request

import alerts
import credentials
import db_manager
import meli_auth
import outbox
import task_runs
from alerts import AlertName
from standins.support import wait_for
from tests.bridge_a_harness import BridgeA
from tests.meli_support import bridge_env
from tests.test_admin_console import Console


def receiver_app(status: int = 200) -> Flask:
    """The alert receiver: records each POST; `POST /_standin/status` changes its answer."""
    app = Flask("alert-receiver")
    state = {"status": status, "received": [], "refused": 0}
    lock = threading.Lock()

    @app.post("/alerts")
    def receive():
        with lock:
            if state["status"] >= 400:
                state["refused"] += 1
                return jsonify(error="down"), state["status"]
            state["received"].append(request.get_json())
        return jsonify(ok=True)

    @app.post("/_standin/status")
    def set_status():
        state["status"] = request.get_json()["status"]
        return jsonify(ok=True)

    app.config["STATE"] = state
    return app


class Receiver:
    def __init__(self, serve, status=200):
        self.app = receiver_app(status)
        self.url = serve(self.app).url + "/alerts"

    @property
    def notices(self) -> list[dict]:
        return list(self.app.config["STATE"]["received"])

    @property
    def refused(self) -> int:
        return self.app.config["STATE"]["refused"]

    def answers(self, status: int) -> None:
        self.app.config["STATE"]["status"] = status


def closed_port_url() -> str:
    """A loopback URL nobody listens on: a receiver that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/alerts"


@pytest.fixture
def receiver(serve):
    return Receiver(serve)


def check_and_deliver(bridge: BridgeA) -> None:
    """One run of the poller's alert task, then the queue (where the notices go out)."""
    alerts.check(bridge.poller.ctx)
    bridge.run_jobs()


def test_n8n_down_fires_one_alert_in_portuguese_then_resolves(make_settings, serve, clock,
                                                              receiver):
    # GIVEN n8n answering 503 and a receiver at ALERT_WEBHOOK_URL
    bridge = BridgeA(make_settings, serve, clock, ALERT_WEBHOOK_URL=receiver.url)
    bridge.n8n_mode(mode="down")
    db_manager.beat(bridge.db, "poller", now=clock())
    bridge.customer_says("oi")
    bridge.run_jobs()
    # WHEN the alert task runs (every ALERT_CHECK_SECONDS, 30 s: within 2 min of the failure)
    check_and_deliver(bridge)
    # THEN one firing notice, in Portuguese, with since and details
    assert [(n["alert"], n["status"]) for n in receiver.notices] == [
        (AlertName.N8N_FAILING, "firing")]
    notice = receiver.notices[0]
    assert "n8n (agente de IA) falhando" in notice["message"] and "503" in notice["message"]
    assert notice["since"].endswith("Z") and notice["since_at"] == clock()
    assert notice["details"]["failed_jobs"] == 1
    # and nothing more while it lasts, even with more failures
    clock.advance(30)
    bridge.customer_says("alô", message_id="m-2", created_at=int(clock()))
    bridge.run_jobs()
    check_and_deliver(bridge)
    assert len(receiver.notices) == 1
    # WHEN n8n is back and the messages go through
    bridge.n8n_mode(mode="sync")
    clock.advance(3600)
    db_manager.beat(bridge.db, "poller", now=clock())
    bridge.run_jobs()
    check_and_deliver(bridge)
    # THEN one resolved notice
    assert [(n["alert"], n["status"]) for n in receiver.notices] == [
        (AlertName.N8N_FAILING, "firing"), (AlertName.N8N_FAILING, "resolved")]
    assert receiver.notices[1]["message"].startswith("Resolvido: n8n")
    check_and_deliver(bridge)
    assert len(receiver.notices) == 2
    assert alerts.active(bridge.db) == []


def test_the_alert_task_runs_on_the_poller_every_alert_check_seconds(make_settings, serve,
                                                                      clock):
    bridge = BridgeA(make_settings, serve, clock, ALERT_CHECK_SECONDS=30)
    scheduled = {job.job_func.args[0]: job.interval for job in bridge.poller.scheduler.jobs}
    assert scheduled[alerts.check] == 30
    assert alerts.DELIVER_KIND in bridge.poller.handlers


def test_a_receiver_that_is_down_never_blocks_other_work(make_settings, serve, clock, receiver):
    # GIVEN a receiver answering 503 and a condition that fires (a dead job)
    receiver.answers(503)
    bridge = BridgeA(make_settings, serve, clock, ALERT_WEBHOOK_URL=receiver.url)
    outbox.enqueue_job(bridge.db, "kommo.add_note", "gone-1", {}, now=clock())
    job = outbox.claim_next_job(bridge.db, clock(), 30)
    outbox.fail_job(bridge.db, job, "kommo 400: bad", False, clock(), 5, 100)
    alerts.check(bridge.poller.ctx)
    # WHEN a customer writes while the notice is being sent (and refused)
    bridge.customer_says("oi")
    bridge.run_jobs()
    # THEN the customer got the answer; the notice waits for a retry in its own lane
    assert len(bridge.chat_messages()) == 1
    assert receiver.refused == 1
    [notice_job] = outbox.list_jobs(bridge.db, kind=alerts.DELIVER_KIND)
    assert notice_job["status"] == "pending" and "alert 503" in notice_job["last_error"]
    # WHEN the receiver is back and the retry is due
    receiver.answers(200)
    clock.advance(3600)
    bridge.run_jobs()
    # THEN the notice arrives, once
    assert [(n["alert"], n["status"]) for n in receiver.notices] == [
        (AlertName.DEAD_JOBS, "firing")]
    assert receiver.notices[0]["details"]["by_kind"] == {"kommo.add_note": 1}
    assert alerts.active(bridge.db)[0]["delivered_at"] == clock()


def test_a_receiver_nobody_listens_on_is_retried_and_never_alerts_about_itself(
        make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, ALERT_WEBHOOK_URL=closed_port_url())
    outbox.enqueue_job(bridge.db, "kommo.add_note", "gone-1", {}, now=clock())
    outbox.fail_job(bridge.db, outbox.claim_next_job(bridge.db, clock(), 30), "x", False,
                    clock(), 5, 100)
    alerts.check(bridge.poller.ctx)
    for _ in range(alerts.DELIVER_MAX_ATTEMPTS + 1):
        bridge.run_jobs()
        clock.advance(7200)
    [notice_job] = outbox.list_jobs(bridge.db, kind=alerts.DELIVER_KIND)
    assert notice_job["status"] == "dead" and "connection error" in notice_job["last_error"]
    # a dead notice is not one more "dead jobs" condition (no alert loop)
    assert alerts.evaluate(bridge.db, bridge.settings, clock())[AlertName.DEAD_JOBS].details[
        "dead"] == 1


def test_without_alert_webhook_url_alerts_are_kept_but_nothing_is_queued(make_settings, serve,
                                                                         clock):
    bridge = BridgeA(make_settings, serve, clock)
    outbox.enqueue_job(bridge.db, "kommo.add_note", "gone-1", {}, now=clock())
    outbox.fail_job(bridge.db, outbox.claim_next_job(bridge.db, clock(), 30), "x", False,
                    clock(), 5, 100)
    alerts.check(bridge.poller.ctx)
    assert [a["name"] for a in alerts.active(bridge.db)] == [AlertName.DEAD_JOBS]
    assert outbox.list_jobs(bridge.db, kind=alerts.DELIVER_KIND) == []


def test_poller_stale_is_fired_and_resolved_by_the_web_through_health(make_settings, serve,
                                                                      clock, receiver):
    # GIVEN a poller that stopped beating
    settings = make_settings(ALERT_WEBHOOK_URL=receiver.url)
    console = Console(settings, clock, serve)
    db_manager.beat(console.conn, "poller", now=clock())
    clock.advance(120)
    # WHEN /health is asked (Docker's HEALTHCHECK, every 30 s)
    health = console.get("/health")
    _join_deliveries()
    # THEN 503, the alert fires and the web process itself sends it (the outbox is stopped)
    assert health.status_code == 503
    assert [a["alert"] for a in health.json()["alerts"]] == [AlertName.POLLER_STALE]
    assert [(n["alert"], n["status"]) for n in receiver.notices] == [
        (AlertName.POLLER_STALE, "firing")]
    assert "Poller parado: último sinal há 120 s" in receiver.notices[0]["message"]
    assert outbox.list_jobs(console.conn, kind=alerts.DELIVER_KIND) == []
    console.get("/health")
    _join_deliveries()
    assert len(receiver.notices) == 1
    # WHEN the poller beats again
    db_manager.beat(console.conn, "poller", now=clock())
    assert console.get("/health").status_code == 200
    _join_deliveries()
    assert [(n["alert"], n["status"]) for n in receiver.notices] == [
        (AlertName.POLLER_STALE, "firing"), (AlertName.POLLER_STALE, "resolved")]


def test_poller_stale_notice_is_tried_again_after_the_receiver_failed(make_settings, serve,
                                                                      clock, receiver):
    receiver.answers(503)
    console = Console(make_settings(ALERT_WEBHOOK_URL=receiver.url), clock, serve)
    console.get("/health")
    _join_deliveries()
    assert receiver.refused == 1 and receiver.notices == []
    console.get("/health")  # too soon: not sent again
    _join_deliveries()
    assert receiver.refused == 1
    receiver.answers(200)
    clock.advance(alerts.WEB_RETRY_SECONDS + 1)
    console.get("/health")
    _join_deliveries()
    assert [(n["alert"], n["status"]) for n in receiver.notices] == [
        (AlertName.POLLER_STALE, "firing")]


def _join_deliveries() -> None:
    for thread in threading.enumerate():
        if thread.name == "alert-delivery":
            thread.join(10)


# --- each condition --------------------------------------------------------------------------

def _failed_job(conn, clock, kind: str, key: str, error: str, retryable=True):
    outbox.enqueue_job(conn, kind, key, {}, now=clock())
    job = outbox.claim_next_job(conn, clock(), 30)
    outbox.fail_job(conn, job, error, retryable, clock(), 5, 86400)


@pytest.mark.parametrize("status", [401, 402, 403, 429])
def test_kommo_auth_and_quota_errors_fire(settings, db, clock, status):
    _failed_job(db, clock, "kommo.send_reply", "r-1", f"kommo {status}: refused")
    found = alerts.evaluate(db, settings, clock())
    assert status in found[AlertName.KOMMO_REFUSING].details["statuses"]
    assert "Kommo recusando" in found[AlertName.KOMMO_REFUSING].message


def test_other_kommo_errors_and_a_later_success_do_not_fire(settings, db, clock):
    _failed_job(db, clock, "kommo.send_reply", "r-1", "kommo 500: oops")
    assert AlertName.KOMMO_REFUSING not in alerts.evaluate(db, settings, clock())
    _failed_job(db, clock, "kommo.send_reply", "r-2", "kommo 429: slow down")
    clock.advance(10)
    outbox.enqueue_job(db, "kommo.send_reply", "r-3", {}, now=clock())
    outbox.complete_job(db, outbox.claim_next_job(db, clock(), 30), {}, [], now=clock())
    assert AlertName.KOMMO_REFUSING not in alerts.evaluate(db, settings, clock())


def test_a_refused_token_fires_per_account(make_settings, clock):
    settings = make_settings(**bridge_env("http://127.0.0.1:9", "http://127.0.0.1:9"))
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    credentials.store(conn, meli_auth.PROVIDER, "a", "r", clock() + 3600, clock())
    assert alerts.evaluate(conn, settings, clock()) == {}
    credentials.mark_disconnected(conn, meli_auth.PROVIDER, "refresh recusado (invalid_grant)",
                                  clock())
    found = alerts.evaluate(conn, settings, clock())
    condition = found[f"{AlertName.TOKEN_REFUSED}:mercadolivre"]
    assert "Conta Mercado Livre desconectada: refresh recusado" in condition.message
    assert "/admin/conexoes" in condition.message


def test_jobs_overdue_fires_past_the_threshold(make_settings, clock):
    settings = make_settings(ALERT_JOBS_OVERDUE_SECONDS=300)
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    outbox.enqueue_job(conn, "kommo.send_reply", "r-1", {}, now=clock())
    clock.advance(299)
    assert AlertName.JOBS_OVERDUE not in alerts.evaluate(conn, settings, clock())
    clock.advance(2)
    found = alerts.evaluate(conn, settings, clock())
    assert "Fila atrasada: 1 job(s)" in found[AlertName.JOBS_OVERDUE].message


def test_polls_failing_three_times_in_a_row_fire(settings, db, clock):
    for _ in range(task_runs.FAILING_AFTER - 1):
        task_runs.record(db, "poll_questions", False, clock(), "ml no-status: connection error")
    assert AlertName.POLLS_FAILING not in alerts.evaluate(db, settings, clock())
    task_runs.record(db, "poll_questions", False, clock(), "ml no-status: connection error")
    found = alerts.evaluate(db, settings, clock())
    assert "busca de perguntas do Mercado Livre (3× seguidas" in \
        found[AlertName.POLLS_FAILING].message
    task_runs.record(db, "poll_questions", True, clock())
    assert AlertName.POLLS_FAILING not in alerts.evaluate(db, settings, clock())


def test_the_console_shows_active_alerts(make_settings, serve, clock):
    console = Console(make_settings(), clock, serve)
    console.login()
    assert "Alertas ativos" not in console.get("/admin").text
    _failed_job(console.conn, clock, "kommo.add_note", "n-1", "x", retryable=False)
    alerts.sync(console.conn, console.settings, clock(),
                alerts.evaluate(console.conn, console.settings, clock()), lambda n: True)
    page = console.get("/admin").text
    assert "Alertas ativos (1)" in page and "1 job(s) desistiram" in page
    assert "ALERT_WEBHOOK_URL" in page  # how to get them outside the console


def test_kommo_refusing_a_reply_across_http_fires_then_resolves(make_settings, serve, clock,
                                                                receiver):
    # GIVEN Kommo answering 402 (account not paid) to a reply: the reply dies (not retryable)
    bridge = BridgeA(make_settings, serve, clock, ALERT_WEBHOOK_URL=receiver.url)
    bridge.kommo_fails(path_prefix="/api/v4/talks", status=402, count=1)
    bridge.customer_says("oi")
    bridge.run_jobs()
    check_and_deliver(bridge)
    firing = {n["alert"]: n for n in receiver.notices}
    assert sorted(firing) == [AlertName.DEAD_JOBS, AlertName.KOMMO_REFUSING]
    assert "conta sem pagamento (402)" in firing[AlertName.KOMMO_REFUSING]["message"]
    assert firing[AlertName.KOMMO_REFUSING]["details"]["statuses"] == [402]
    # WHEN Kommo takes the next reply
    clock.advance(60)
    bridge.customer_says("alô", message_id="m-2", created_at=int(clock()))
    bridge.run_jobs()
    check_and_deliver(bridge)
    # THEN Kommo's alert resolves; the dead job's stays until an operator acts on it
    assert bridge.chat_messages()
    assert (receiver.notices[-1]["alert"], receiver.notices[-1]["status"]) == (
        AlertName.KOMMO_REFUSING, "resolved")
    assert [a["name"] for a in alerts.active(bridge.db)] == [AlertName.DEAD_JOBS]


def test_each_web_worker_watches_the_poller_without_any_health_request(make_settings, clock,
                                                                        receiver):
    # GIVEN a poller whose last heartbeat is old, and nobody asking /health
    settings = make_settings(ALERT_WEBHOOK_URL=receiver.url)
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    db_manager.beat(conn, "poller", now=clock() - 600)
    stop = threading.Event()
    # WHEN two web workers' watch threads run (gunicorn_conf.post_worker_init starts one each)
    watches = [alerts.start_poller_watch(settings, every_seconds=0.02, stop=stop, clock=clock)
               for _ in range(2)]
    try:
        wait_for(lambda: receiver.notices, 10, what="the poller-stale notice")
        wait_for(lambda: alerts.active(conn) and alerts.active(conn)[0]["delivered_at"], 10,
                 what="the notice recorded as delivered")
        # THEN one notice, however many workers watch
        assert [(n["alert"], n["status"]) for n in receiver.notices] == [
            (AlertName.POLLER_STALE, "firing")]
    finally:
        stop.set()
        for watch in watches:
            watch.join(5)
    _join_deliveries()
    assert len(receiver.notices) == 1


def test_gunicorn_workers_start_the_poller_watch(monkeypatch):
    import gunicorn_conf
    started = []
    monkeypatch.setattr(alerts, "start_poller_watch", started.append)
    monkeypatch.setattr(db_manager, "start_checkpointer", lambda path: None)
    gunicorn_conf.post_worker_init(worker=None)
    assert started == [gunicorn_conf._settings]
