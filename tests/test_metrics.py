"""/metrics: prometheus_client's text, the counters of every process added up (web workers and
the poller's threads), the database's gauges, and METRICS_TOKEN.

The metric files of one test process are shared by its tests (prometheus_client fixes its folder
once per process), so counters are compared before and after."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

import alerts
import credentials
import db_manager
import meli_auth
import outbox
import ponte_metrics
import whatsapp_store
from job_runner import JobContext
from standins import kommo as kommo_standin
from standins.support import free_port, wait_for
from tests.bridge_a_harness import BridgeA
from tests.conftest import ROOT, venv_bin
from webhook_server import create_app

TOKEN = "metrics-token-for-tests-0123"


def samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a /metrics text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def scrape(client, **kw) -> dict:
    response = client.get("/metrics", **kw)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return samples(response.get_data(as_text=True))


@pytest.fixture
def bridge(make_settings, serve, clock):
    return BridgeA(make_settings, serve, clock)


def test_webhooks_are_counted_by_peer_event_and_outcome(bridge):
    before = scrape(bridge.web)
    form = kommo_standin.message_form("oi", message_id="m-1", created_at=1_790_000_000)
    bridge.kommo_posts(form)
    bridge.run_jobs()
    bridge.kommo_posts(form)  # Kommo delivers it again
    bridge.kommo_posts("x=1", secret="wrong-secret-wrong-secret-000")
    after = scrape(bridge.web)
    key = dict(peer="kommo", event="add_message")
    assert value(after, "ponte_webhooks_total", **key, outcome="recorded") - \
        value(before, "ponte_webhooks_total", **key, outcome="recorded") == 1
    assert value(after, "ponte_webhooks_total", **key, outcome="duplicate") - \
        value(before, "ponte_webhooks_total", **key, outcome="duplicate") == 1
    refused = dict(peer="kommo", event="none", outcome="refused")
    assert value(after, "ponte_webhooks_total", **refused) - \
        value(before, "ponte_webhooks_total", **refused) == 1


def test_jobs_and_peer_calls_are_counted_with_durations_and_errors(bridge):
    before = scrape(bridge.web)
    bridge.n8n_mode(mode="down")
    bridge.customer_says("oi")
    bridge.run_jobs()
    after = scrape(bridge.web)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ponte_job_runs_total", kind="kommo.intake", outcome="done") == 1
    assert delta("ponte_job_runs_total", kind="n8n.forward_message", outcome="retry") == 1
    assert delta("ponte_job_duration_seconds_count", kind="n8n.forward_message") == 1
    assert delta("ponte_peer_errors_total", peer="n8n", status="503") == 1
    assert delta("ponte_peer_call_duration_seconds_count", peer="n8n") == 1
    assert delta("ponte_peer_call_duration_seconds_bucket", peer="n8n", le="+Inf") == 1


def test_database_gauges(bridge, clock):
    db = bridge.db
    bridge.customer_says("oi")
    whatsapp_store.set_paused(db, "555", "Ana", "note", "", clock(), None)
    db_manager.beat(db, "poller", now=clock() - 4)
    found = scrape(bridge.web)
    assert value(found, "ponte_jobs", status="pending") == 1  # the name of 0.2.0
    assert value(found, "ponte_queue_depth") == 1
    assert value(found, "ponte_paused_bots") == 1
    assert value(found, "ponte_poller_heartbeat_age_seconds") == 4
    assert value(found, "ponte_account_connected", provider="kommo") == 1


def test_token_expiry_dead_jobs_and_alerts(make_settings, clock):
    settings = make_settings()
    app = create_app(settings, clock=clock)
    conn = db_manager.connect(settings.database_path)
    credentials.store(conn, meli_auth.PROVIDER, "a", "r", clock() + 5400, clock())
    outbox.enqueue_job(conn, "ml.sync_pack", "p-1", {}, now=clock())
    outbox.fail_job(conn, outbox.claim_next_job(conn, clock(), 30), "x", False, clock(), 5, 100)
    alerts.check(JobContext(settings, conn, now=clock))
    found = scrape(app.test_client())
    assert value(found, "ponte_token_expiry_seconds", provider="mercadolivre") == 5400
    assert value(found, "ponte_dead_jobs", kind="ml.sync_pack") == 1
    assert value(found, "ponte_alerts_firing", alert="dead_jobs") == 1


def test_rate_limit_429s_per_pool_are_exposed(bridge, clock):
    bridge.kommo_fails(path_prefix="/api/v4/talks", status=429, count=1, retry_after="1")
    bridge.customer_says("oi")
    bridge.run_jobs()
    found = scrape(bridge.web)
    assert value(found, "ponte_rate_limited_total", pool="kommo") == 1
    assert value(found, "ponte_rate_limit_calls_total", pool="kommo") >= 1


def test_metrics_token_is_required_when_set(make_settings, clock):
    client = create_app(make_settings(METRICS_TOKEN=TOKEN), clock=clock).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "ponte_jobs" in client.get(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).get_data(as_text=True)


def test_metrics_are_open_without_a_token(client_without_token):
    assert client_without_token.get("/metrics").status_code == 200


@pytest.fixture
def client_without_token(make_settings, clock):
    return create_app(make_settings(), clock=clock).test_client()


OTHER_PROCESS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import config, ponte_metrics
    s = config.load_settings({env!r})
    assert ponte_metrics.setup(s)
    for _ in range(3):
        ponte_metrics.observe_job("test.other_process", "done", 0.2)
""")


def test_counters_of_another_process_add_up(settings, clock):
    # GIVEN the web app in this process and a poller-like process writing its own counters
    client = create_app(settings, clock=clock).test_client()
    before = value(scrape(client), "ponte_job_runs_total", kind="test.other_process",
                   outcome="done")
    env = {"DATABASE_PATH": settings.database_path, "LOG_DIR": settings.log_dir,
           "ENVIRONMENT": "test"}
    subprocess.run([sys.executable, "-c", OTHER_PROCESS.format(root=str(ROOT), env=env)],
                   check=True, timeout=60)
    # THEN this process's /metrics counts them
    found = scrape(client)
    assert value(found, "ponte_job_runs_total", kind="test.other_process",
                 outcome="done") - before == 3
    assert value(found, "ponte_job_duration_seconds_count", kind="test.other_process") >= 3


def test_a_file_that_vanishes_while_metrics_are_read_still_gives_200(settings, clock,
                                                                    monkeypatch):
    from prometheus_client import multiprocess
    # GIVEN this process's counters, and a dead process's file in the shared folder
    client = create_app(settings, clock=clock).test_client()
    ponte_metrics.observe_job("test.vanishing_file", "done", 0.1)
    folder = ponte_metrics.metrics_dir(settings.database_path)
    doomed = os.path.join(folder, "counter_999999999.db")
    with open(doomed, "wb") as f:
        f.write(b"\0" * 16)
    read = multiprocess.MmapedDict.read_all_values_from_file

    def read_after_a_starting_process_removed_it(path):
        if path == doomed and os.path.exists(doomed):
            os.remove(doomed)  # listed by the scrape, removed by remove_dead_files meanwhile
        return read(path)

    monkeypatch.setattr(multiprocess.MmapedDict, "read_all_values_from_file",
                        staticmethod(read_after_a_starting_process_removed_it))
    # WHEN /metrics is scraped THEN it answers 200 with every live counter and gauge
    found = scrape(client)
    assert not os.path.exists(doomed)
    assert value(found, "ponte_job_runs_total", kind="test.vanishing_file", outcome="done") >= 1
    assert ("ponte_jobs", frozenset({("status", "pending")})) in found


def test_files_of_dead_processes_are_removed_at_start_and_live_ones_kept(tmp_path):
    live = tmp_path / f"counter_{os.getpid()}.db"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout.strip()
    dead = tmp_path / f"counter_{dead_pid}.db"
    live.write_bytes(b"")
    dead.write_bytes(b"")
    assert ponte_metrics.remove_dead_files(str(tmp_path)) == 1
    assert live.exists() and not dead.exists()


def test_webhook_peer_of_each_url():
    assert ponte_metrics.webhook_peer("/webhooks/kommo/abc") == "kommo"
    assert ponte_metrics.webhook_peer("/webhooks/chatwoot") == "chatwoot"
    assert ponte_metrics.webhook_peer("/webhook") == "chatwoot"
    assert ponte_metrics.webhook_peer("/webhooks/mercadolivre") == "mercadolivre"
    assert ponte_metrics.webhook_peer("/send-response") == "n8n"
    assert ponte_metrics.webhook_peer("/mercadolivre/send-response") == "n8n"
    assert ponte_metrics.webhook_peer("/health") is None
    assert ponte_metrics.webhook_peer("/webhooksx") is None


def test_gunicorn_workers_and_the_poller_process_add_up_in_one_metrics(tmp_path):
    # GIVEN the two programs Supervisor runs: Gunicorn with 2 workers, and the poller
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update({"PATH": f"{venv_bin()}:{os.environ['PATH']}", "PORT": str(port),
                "HOST": "127.0.0.1", "WEB_WORKERS": "2", "ENVIRONMENT": "test",
                "DATABASE_PATH": str(tmp_path / "data" / "ponte.db"),
                "LOG_DIR": str(tmp_path / "logs"), "PONTE_ENV_FILE": str(tmp_path / "no.env")})
    (tmp_path / "data").mkdir()
    conn = db_manager.connect(env["DATABASE_PATH"])
    db_manager.migrate(conn)
    # a job no handler knows: the poller's worker thread runs it once, and it dies
    outbox.enqueue_job(conn, "test.unknown_kind", "u-1", {})
    procs = [subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn_conf.py",
                               "webhook_server:create_app()"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([sys.executable, "poller.py"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(base + "/health", timeout=2).status_code == 200, 30,
                 interval=0.2, what="/health 200", ignoring=(requests.RequestException,))
        # WHEN 20 webhooks arrive on fresh connections (either worker answers each)
        for _ in range(20):
            # (no bridge is on: the URL answers 404, a refused webhook all the same)
            assert requests.post(base + "/webhooks/kommo/x", data="a=1", timeout=5,
                                 headers={"Connection": "close"}).status_code == 404
        wait_for(lambda: outbox.list_jobs(conn, status="dead"), 30, interval=0.1,
                 what="the unknown job dead")
        # THEN every scrape, whichever worker answers it, counts all of them
        for _ in range(4):
            found = samples(requests.get(base + "/metrics", timeout=5,
                                         headers={"Connection": "close"}).text)
            assert value(found, "ponte_webhooks_total", peer="kommo", event="none",
                         outcome="refused") == 20
            assert value(found, "ponte_job_runs_total", kind="test.unknown_kind",
                         outcome="dead") == 1
        assert (tmp_path / "data" / "metrics").is_dir()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_n8n_answers_are_counted_as_accepted_send_response(bridge):
    before = scrape(bridge.web)
    bridge.customer_says("oi")
    bridge.run_jobs()
    assert bridge.n8n_answers_later({"contact_id": "93589657",
                                     "response": "Mais alguma dúvida?"}).status_code == 202
    assert bridge.n8n_answers_later({"conversation_id": "1874", "response_text": "x"},
                                    key="wrong").status_code == 401
    after = scrape(bridge.web)
    for outcome in ("accepted", "refused"):
        labels = dict(peer="n8n", event="send_response", outcome=outcome)
        assert value(after, "ponte_webhooks_total", **labels) - \
            value(before, "ponte_webhooks_total", **labels) == 1
