"""/health tells the truth: `degraded` (200, a reason in Portuguese) when a configured bridge's
account was never connected, is disconnected, or its polls or calls keep failing; `unhealthy`
(503) only for what a restart can fix (database, poller)."""
from __future__ import annotations

import requests

import credentials
import db_manager
import meli_auth
import meli_jobs
import task_runs
from tests.bridge_a_harness import BridgeA
from tests.meli_support import Bridge, bridge_env
from tests.meli_support import bridge  # noqa: F401  (fixture)
from webhook_server import create_app

NO_ML_TOKENS = {"ML_ACCESS_TOKEN": "", "ML_REFRESH_TOKEN": ""}


def _health(app_or_url, clock=None) -> tuple[int, dict]:
    if isinstance(app_or_url, str):
        r = requests.get(app_or_url + "/health", timeout=5)
        return r.status_code, r.json()
    r = app_or_url.test_client().get("/health")
    return r.status_code, r.get_json()


def _scheduled(name: str):
    return next(task for _, task in meli_jobs.SCHEDULES if task.__name__ == name)


def test_mercadolivre_never_connected_is_degraded_not_ok(make_settings, clock):
    # GIVEN bridge B configured but the seller never connected Mercado Livre
    settings = make_settings(**bridge_env("http://127.0.0.1:9", "http://127.0.0.1:9",
                                          **NO_ML_TOKENS))
    app = create_app(settings, clock=clock)
    db_manager.beat(db_manager.connect(settings.database_path), "poller", now=clock())
    # THEN /health says so, in Portuguese, with 200 (a restart cannot fix it)
    status, body = _health(app)
    assert status == 200 and body["status"] == "degraded"
    assert body["accounts"] == {"mercadolivre": "never_connected"}
    assert any("conta Mercado Livre nunca foi conectada" in w and "/admin/conexoes" in w
               for w in body["warnings"])


def test_a_kommo_oauth_install_never_connected_is_degraded(make_settings, clock):
    settings = make_settings(KOMMO_BASE_URL="http://127.0.0.1:9", N8N_WEBHOOK_URL="http://x.y/n",
                             KOMMO_WEBHOOK_SECRET="s" * 32, N8N_API_KEY="k" * 20,
                             KOMMO_CLIENT_ID="cid", KOMMO_CLIENT_SECRET="csecret")
    app = create_app(settings, clock=clock)
    db_manager.beat(db_manager.connect(settings.database_path), "poller", now=clock())
    status, body = _health(app)
    assert status == 200 and body["accounts"] == {"kommo": "never_connected"}
    assert any("conta Kommo nunca foi conectada" in w for w in body["warnings"])


def test_a_working_install_is_ok(bridge, clock):  # noqa: F811
    bridge.ask("Tem pronta entrega?")
    _scheduled("poll_questions")(bridge.ctx)
    bridge.drain()
    db_manager.beat(bridge.conn, "poller", now=clock())
    status, body = _health(bridge.web.url)
    assert (status, body["status"]) == (200, "ok"), body
    assert body["accounts"] == {"mercadolivre": "ok"} and body["alerts"] == []


def test_polls_that_keep_failing_make_health_degraded_until_one_works(bridge, clock):  # noqa: F811
    # GIVEN a connected account but a Mercado Livre API that keeps failing
    db_manager.beat(bridge.conn, "poller", now=clock())
    poll = _scheduled("poll_questions")
    bridge.fail_ml("/questions/search", 503, count=task_runs.FAILING_AFTER)
    for attempt in range(task_runs.FAILING_AFTER):
        status, body = _health(bridge.web.url)
        assert body["status"] == "ok", (attempt, body)  # a blip or two is not "keeps failing"
        poll(bridge.ctx)
    # THEN degraded, naming the poll and its error; the account itself is still connected
    status, body = _health(bridge.web.url)
    assert status == 200 and body["status"] == "degraded"
    assert body["accounts"] == {"mercadolivre": "ok"}
    assert any("busca de perguntas do Mercado Livre falhou 3 vezes seguidas" in w and "503" in w
               for w in body["warnings"]), body
    # WHEN a poll works again
    poll(bridge.ctx)
    status, body = _health(bridge.web.url)
    assert body["status"] == "ok", body


def test_a_dead_token_with_the_api_unreachable_is_not_ok(make_settings, serve, clock):
    # GIVEN a Mercado Livre API nobody answers and a token the refresh could not renew
    b = Bridge(make_settings, serve, clock, ML_API_BASE_URL="http://127.0.0.1:9")
    credentials.store(b.conn, meli_auth.PROVIDER, "APP_USR-x", "TG-y", clock() + 3600, clock())
    db_manager.beat(b.conn, "poller", now=clock())
    for _ in range(task_runs.FAILING_AFTER):
        _scheduled("poll_questions")(b.ctx)
    status, body = _health(b.web.url)
    assert status == 200 and body["status"] == "degraded"
    assert any("falhou 3 vezes seguidas" in w and "connection error" in w
               for w in body["warnings"]), body
    # WHEN the token is refused too: the account is reported once, not also its polls
    credentials.mark_disconnected(b.conn, meli_auth.PROVIDER, "refresh recusado (invalid_grant)",
                                  clock())
    status, body = _health(b.web.url)
    assert body["accounts"] == {"mercadolivre": "disconnected"}
    assert [w for w in body["warnings"] if "Mercado Livre" in w] == [
        "conta Mercado Livre está desconectada (refresh recusado (invalid_grant)): nada flui por "
        "ela; conecte em /admin/conexoes"]
    b.poller.conn.close()


def test_a_peer_whose_calls_only_fail_makes_health_degraded(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock)
    bridge.n8n_mode(mode="down")
    bridge.customer_says("oi")
    bridge.run_jobs()
    db_manager.beat(bridge.db, "poller", now=clock())
    response = bridge.web.get("/health")
    body = response.get_json()
    assert response.status_code == 200 and body["status"] == "degraded"
    assert any(w.startswith("n8n (agente de IA): 1 job(s) com falha e nenhum sucesso") and
               "503" in w for w in body["warnings"]), body
    assert body["accounts"] == {"kommo": "ok"}  # a long-lived token from the environment


def test_only_database_and_poller_make_health_unhealthy(make_settings, clock):
    settings = make_settings(**bridge_env("http://127.0.0.1:9", "http://127.0.0.1:9",
                                          **NO_ML_TOKENS))
    app = create_app(settings, clock=clock)
    status, body = _health(app)  # no heartbeat yet: a restart can fix it
    assert status == 503 and body["status"] == "unhealthy"
    assert any("poller" in p for p in body["problems"])
    assert not any("Mercado Livre" in p for p in body["problems"])  # that one is a warning
