"""The console at /admin, across HTTP (ponte served on a local port, requests as the browser):
login and its cookie, a wrong token, session expiry, CSRF refusals that change nothing, the
forms that pause/resume a bot, retry/discard a dead job and start an OAuth connection, and what
each page shows (and never shows: secrets)."""
from __future__ import annotations

import html
import re
import urllib.parse

import pytest
import requests

import admin_console
import admin_session
import admin_data
import db_manager
import kommo_auth
import meli_auth
import outbox
import whatsapp_store
from webhook_server import create_app

TOKEN = "admin-token-for-tests-123"
SECRETS = {"KOMMO_WEBHOOK_SECRET": "kommo-webhook-secret-0123456789",
           "N8N_API_KEY": "n8n-key-secret-value", "KOMMO_ACCESS_TOKEN": "kommo-long-lived-token-x"}
WHATSAPP_ENV = {"KOMMO_BASE_URL": "http://127.0.0.1:9", "N8N_WEBHOOK_URL": "http://127.0.0.1:9/n8n",
                **SECRETS}
CONTACT, LEAD = "93589657", "2201"


@pytest.fixture(autouse=True)
def no_login_delay(monkeypatch):
    """The wrong-token slowdown is recorded instead of waited for."""
    slept: list[float] = []
    monkeypatch.setattr(admin_console, "_sleep", slept.append)
    monkeypatch.setattr(admin_console, "throttle", admin_session.LoginThrottle())
    return slept


class Console:
    """ponte served over HTTP with the injected clock, and a browser-like session."""

    def __init__(self, settings, clock, serve):
        self.settings, self.clock = settings, clock
        self.app = create_app(settings, clock=clock)
        self.url = serve(self.app).url
        self.http = requests.Session()
        self.conn = db_manager.connect(settings.database_path)

    def get(self, path, **kw):
        return self.http.get(self.url + path, allow_redirects=False, timeout=5, **kw)

    def post(self, path, data=None, **kw):
        return self.http.post(self.url + path, data=data or {}, allow_redirects=False,
                              timeout=5, **kw)

    def login(self, token=TOKEN):
        return self.post("/admin/login", {"token": token})

    def csrf(self, path="/admin"):
        page = self.get(path)
        assert page.status_code == 200, page.text
        return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


@pytest.fixture
def console(make_settings, clock, serve):
    return Console(make_settings(**WHATSAPP_ENV), clock, serve)


def seed_contact(conn, clock, contact=CONTACT, name="Maria Souza", lead=LEAD):
    with db_manager.transaction(conn):
        whatsapp_store.upsert_conversation(conn, contact, lead, "1874", "chat-1", name,
                                           "waba", clock())
        whatsapp_store.insert_message(conn, f"m-{contact}", contact, "Olá", "text", [],
                                      clock(), clock(), "sent", None)


def dead_job(conn, clock, kind="n8n.forward_message", key="kommo-msg:dead-1",
             error="n8n respondeu 500"):
    """A job that died: claimed and failed without retry."""
    with db_manager.transaction(conn):
        outbox.enqueue_job(conn, kind, key, {"contact_id": CONTACT}, now=clock())
    job = outbox.claim_next_job(conn, clock(), 60)
    outbox.fail_job(conn, job, error, retryable=False, now=clock(), max_attempts=5,
                    max_age_seconds=86400)
    return job.id


def job_count(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


# --- login, cookie, logout ------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/admin", "/admin/contatos", "/admin/fila", "/admin/conversas",
                                  "/admin/conexoes"])
def test_every_page_sends_a_visitor_without_session_to_the_login(console, path):
    r = console.get(path)
    assert r.status_code == 303
    assert r.headers["Location"] == "/admin/login?" + urllib.parse.urlencode({"next": path})
    login = console.get(r.headers["Location"])
    assert login.status_code == 200 and "Entrar no painel" in login.text
    assert 'name="token"' in login.text and '<meta name="viewport"' in login.text


def test_login_sets_a_signed_httponly_strict_cookie_with_an_expiry(console):
    r = console.post("/admin/login", {"token": TOKEN, "next": "/admin/fila"})
    assert r.status_code == 303 and r.headers["Location"] == "/admin/fila"
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith(admin_session.COOKIE_NAME + "=")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/admin",
                      f"Max-Age={admin_session.SESSION_MAX_AGE_SECONDS}", "Expires="):
        assert attribute in cookie
    assert TOKEN not in cookie
    assert console.get("/admin/fila").status_code == 200


def test_login_never_redirects_away_from_the_console(console):
    for target in ("https://evil.example/", "//evil.example/admin", "/admin/../x", "/health"):
        r = console.post("/admin/login", {"token": TOKEN, "next": target})
        assert r.headers["Location"] == "/admin", target


def test_a_wrong_token_changes_nothing_and_is_slowed_down(console, no_login_delay):
    r = console.login("wrong-token")
    assert r.status_code == 401 and "Token incorreto." in r.text
    assert "Set-Cookie" not in r.headers and not console.http.cookies
    assert no_login_delay == [admin_session.LOGIN_FAILURE_DELAY_SECONDS]
    assert console.get("/admin").status_code == 303


def test_an_address_that_keeps_guessing_is_refused_until_the_window_ends(console, clock,
                                                                         no_login_delay):
    for _ in range(admin_session.LOGIN_FAILURE_LIMIT):
        assert console.login("wrong").status_code == 401
    refused = console.login(TOKEN)  # even the right one: the address is on hold
    assert refused.status_code == 429 and "Muitas tentativas" in refused.text
    assert "Set-Cookie" not in refused.headers
    clock.advance(admin_session.LOGIN_FAILURE_WINDOW_SECONDS + 1)
    assert console.login(TOKEN).status_code == 303
    assert console.get("/admin").status_code == 200


def test_the_session_expires_and_the_console_asks_to_log_in_again(console, clock):
    console.login()
    clock.advance(admin_session.SESSION_MAX_AGE_SECONDS - 5)
    assert console.get("/admin").status_code == 200
    clock.advance(10)
    r = console.get("/admin/contatos")
    assert r.status_code == 303 and "aviso=expirou" in r.headers["Location"]
    assert "Sua sessão expirou" in console.get(r.headers["Location"]).text


def test_a_tampered_or_foreign_cookie_is_no_session(console, clock, make_settings, serve):
    console.login()
    value = console.http.cookies[admin_session.COOKIE_NAME]
    body, signature = value.split(".")
    content = admin_session._unb64(body).replace(b'"exp":', b'"exp":9')  # a longer session
    forged = admin_session._b64(content) + "." + signature
    console.http.cookies.clear()
    console.http.cookies.set(admin_session.COOKIE_NAME, forged, path="/admin")
    assert console.get("/admin").status_code == 303
    # A new ADMIN_TOKEN ends every session made with the old one.
    other, _ = admin_session.make_session("another-admin-token-456", clock())
    console.http.cookies.clear()
    console.http.cookies.set(admin_session.COOKIE_NAME, other, path="/admin")
    assert console.get("/admin").status_code == 303
    assert admin_session.read_session(TOKEN, value, clock()) is not None


def test_logout_ends_the_session(console):
    console.login()
    r = console.post("/admin/sair", {"csrf_token": console.csrf()})
    assert r.status_code == 303 and r.headers["Location"] == "/admin/login?aviso=saiu"
    assert console.get("/admin").status_code == 303


def test_without_admin_token_the_console_is_closed(make_settings, clock, serve):
    console = Console(make_settings(ADMIN_TOKEN=""), clock, serve)
    assert "defina a variável" in console.get("/admin/login").text
    r = console.login("")
    assert r.status_code == 401 and "Set-Cookie" not in r.headers


# --- CSRF -----------------------------------------------------------------------------------

def test_forms_without_a_valid_csrf_token_are_refused_and_change_nothing(console, clock):
    seed_contact(console.conn, clock)
    job_id = dead_job(console.conn, clock)
    console.login()
    valid = console.csrf()
    other = Console.__new__(Console)  # a second browser: its own session, its own token
    other.url, other.http = console.url, requests.Session()
    other.login()
    foreign = other.csrf()
    jobs_before = job_count(console.conn)
    for token in (None, "", "x" * 32, foreign):
        data = {} if token is None else {"csrf_token": token}
        for path, extra in ((f"/admin/contatos/{CONTACT}/pausar", {"reason": "teste"}),
                            (f"/admin/contatos/{CONTACT}/voltar", {}),
                            (f"/admin/fila/{job_id}/tentar-de-novo", {}),
                            (f"/admin/fila/{job_id}/descartar", {"reason": "lixo"}),
                            ("/admin/conexoes/mercadolivre", {}),
                            ("/admin/sair", {})):
            r = console.post(path, {**data, **extra})
            assert r.status_code == 403, (path, token)
            assert "Nada foi alterado" in r.text
    assert whatsapp_store.get_bot_state(console.conn, CONTACT)["status"] == "active"
    assert outbox.get_job(console.conn, job_id)["status"] == "dead"
    assert job_count(console.conn) == jobs_before  # no confirmation note queued
    assert console.conn.execute("SELECT COUNT(*) FROM mappings WHERE namespace = ?",
                                (meli_auth.STATE_NAMESPACE,)).fetchone()[0] == 0
    assert console.get("/admin").status_code == 200  # the refused logout did not log out
    assert valid != foreign


def test_a_form_posted_without_session_goes_to_the_login_and_changes_nothing(console, clock):
    seed_contact(console.conn, clock)
    r = console.post(f"/admin/contatos/{CONTACT}/pausar", {"csrf_token": "x"})
    assert r.status_code == 303 and r.headers["Location"].startswith("/admin/login")
    assert whatsapp_store.get_bot_state(console.conn, CONTACT)["status"] == "active"


# --- Contatos -------------------------------------------------------------------------------

def test_pause_and_resume_a_contact_from_the_console(console, clock):
    seed_contact(console.conn, clock)
    seed_contact(console.conn, clock, contact="555", name="João", lead="77")
    console.login()
    page = console.get("/admin/contatos")
    assert "Maria Souza" in page.text and "João" in page.text and "ativo" in page.text
    r = console.post(f"/admin/contatos/{CONTACT}/pausar",
                     {"csrf_token": console.csrf(), "reason": "cliente quer desconto"})
    assert r.status_code == 303 and "aviso=pausado" in r.headers["Location"]
    state = whatsapp_store.get_bot_state(console.conn, CONTACT)
    assert (state["status"], state["changed_by"], state["reason"]) == \
        ("paused", admin_console.CONSOLE_ACTOR, "cliente quer desconto")
    note = outbox.list_jobs(console.conn, kind="kommo.add_note")[0]
    assert note["payload"]["lead_id"] == LEAD and "Bot pausado" in note["payload"]["text"]
    page = console.get(r.headers["Location"])
    assert "Bot pausado para o contato" in page.text and "cliente quer desconto" in page.text
    row = page.text.split(f'id="contato-{CONTACT}"')[1].split("</tr>")[0]
    assert "pausado" in row and "Reativar bot" in row and admin_console.CONSOLE_ACTOR in row
    assert "há 0 s" in row  # its last message
    console.post(f"/admin/contatos/{CONTACT}/voltar", {"csrf_token": console.csrf()})
    assert whatsapp_store.get_bot_state(console.conn, CONTACT)["status"] == "active"
    assert whatsapp_store.get_bot_state(console.conn, "555")["status"] == "active"


def test_contacts_search_by_name_or_id(console, clock):
    seed_contact(console.conn, clock)
    seed_contact(console.conn, clock, contact="555", name="João 100%", lead="77")
    console.login()
    assert "João" not in console.get("/admin/contatos", params={"q": "maria"}).text
    assert "Maria" not in console.get("/admin/contatos", params={"q": "555"}).text
    assert "Maria" not in console.get("/admin/contatos", params={"q": "100%"}).text
    assert "Nenhum contato encontrado" in console.get("/admin/contatos",
                                                      params={"q": "ninguém"}).text


def test_a_bad_contact_id_changes_nothing(console):
    console.login()
    for bad in ("abc", "١٢٣", "1" * 21):
        r = console.post(f"/admin/contatos/{bad}/pausar", {"csrf_token": console.csrf()})
        assert "aviso=contato-invalido" in r.headers["Location"], bad
    assert console.conn.execute("SELECT COUNT(*) FROM bot_states").fetchone()[0] == 0


# --- Fila -----------------------------------------------------------------------------------

def test_retry_a_dead_job_from_the_console(console, clock):
    job_id = dead_job(console.conn, clock)
    console.login()
    page = console.get("/admin/fila")  # dead jobs by default
    assert f'id="job-{job_id}"' in page.text and "n8n respondeu 500" in page.text
    assert "Tentar de novo" in page.text
    assert '"contact_id": "93589657"' in html.unescape(page.text)  # the payload
    r = console.post(f"/admin/fila/{job_id}/tentar-de-novo", {"csrf_token": console.csrf()})
    assert "aviso=reenfileirado" in r.headers["Location"]
    assert outbox.get_job(console.conn, job_id)["status"] == "pending"
    again = console.post(f"/admin/fila/{job_id}/tentar-de-novo", {"csrf_token": console.csrf()})
    assert "aviso=nao-morto" in again.headers["Location"]


def test_discard_a_dead_job_needs_a_reason_and_keeps_it(console, clock):
    job_id = dead_job(console.conn, clock)
    console.login()
    r = console.post(f"/admin/fila/{job_id}/descartar", {"csrf_token": console.csrf(),
                                                         "reason": "  "})
    assert "aviso=motivo" in r.headers["Location"]
    assert outbox.get_job(console.conn, job_id)["status"] == "dead"
    console.post(f"/admin/fila/{job_id}/descartar", {"csrf_token": console.csrf(),
                                                     "reason": "cliente desistiu"})
    job = outbox.get_job(console.conn, job_id)
    assert job["status"] == "done" and job["last_error"] == "n8n respondeu 500"
    assert job["result"]["discarded"] is True and job["result"]["reason"] == "cliente desistiu"
    page = console.get("/admin/fila", params={"status": "done"})
    assert "descartado" in page.text and "cliente desistiu" in page.text


def test_the_json_routes_for_scripts_still_answer_with_bearer(console, clock):
    job_id = dead_job(console.conn, clock)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(console.url + "/admin/jobs?status=dead", headers=bearer,
                        timeout=5).json()["jobs"][0]["id"] == job_id
    assert requests.get(console.url + "/admin/jobs", timeout=5).status_code == 401
    r = requests.post(f"{console.url}/admin/jobs/{job_id}/retry", headers=bearer, timeout=5)
    assert r.status_code == 202 and outbox.get_job(console.conn, job_id)["status"] == "pending"


def test_discard_dead_job_only_touches_dead_jobs(db, clock):
    with db_manager.transaction(db):
        pending = outbox.enqueue_job(db, "kommo.add_note", "k1", {}, now=clock())
    assert not outbox.discard_dead_job(db, pending, "x", clock())
    assert not outbox.discard_dead_job(db, 2**63, "x", clock())
    assert outbox.get_job(db, pending)["status"] == "pending"


# --- Visão geral, Conversas, Conexões -------------------------------------------------------

def test_overview_shows_bridges_accounts_peer_health_queue_errors_and_traffic(console, clock):
    conn = console.conn
    with db_manager.transaction(conn):
        db_manager.record_event(conn, "kommo", "kommo-msg:1", "message", "queued", now=clock())
        outbox.enqueue_job(conn, "kommo.send_reply", "r1", {}, now=clock())
    job = outbox.claim_next_job(conn, clock(), 60)
    outbox.complete_job(conn, job, now=clock())
    dead_job(conn, clock, error="n8n fora do ar (503)")
    db_manager.beat(conn, "poller", now=clock())
    console.login()
    page = console.get("/admin").text
    assert "Visão geral" in page and "ligada" in page and "desligada" in page
    kommo = page.split('id="parceiro-kommo"')[1].split("</tr>")[0]
    n8n = page.split('id="parceiro-n8n"')[1].split("</tr>")[0]
    assert ">ok<" in kommo and "falhando" in n8n and "n8n fora do ar (503)" in n8n
    assert "Últimos erros" in page and "n8n fora do ar (503)" in page
    assert '<svg class="chart"' in page and "1 recebidos, 1 concluídos, 1 com falha" in page
    assert "no ar" in page  # the poller's heartbeat
    assert 'id="conta-kommo"' in page and "conectada" in page


def test_pages_never_show_a_secret(console, clock):
    seed_contact(console.conn, clock)
    console.login()
    for path in ("/admin", "/admin/contatos", "/admin/fila", "/admin/conversas",
                 "/admin/conexoes", "/admin/login"):
        text = console.get(path).text
        for name, value in [("ADMIN_TOKEN", TOKEN), *SECRETS.items()]:
            assert value not in text, (path, name)
    page = console.get("/admin/conexoes").text
    assert "/webhooks/kommo/&lt;KOMMO_WEBHOOK_SECRET&gt;" in page
    assert "✗ falta <code>ML_CLIENT_ID</code>" in page and "✓ <code>N8N_API_KEY</code>" in page


def test_connections_start_the_mercadolivre_authorization(make_settings, clock, serve):
    from tests.meli_support import bridge_env
    console = Console(make_settings(**bridge_env("http://127.0.0.1:9", "http://127.0.0.1:8",
                                                 ML_AUTH_BASE_URL="https://auth.example")),
                      clock, serve)
    console.login()
    page = console.get("/admin/conexoes")
    assert "Reconectar Mercado Livre" in page.text or "Conectar Mercado Livre" in page.text
    r = console.post("/admin/conexoes/mercadolivre", {"csrf_token": console.csrf()})
    assert r.status_code == 303
    location = urllib.parse.urlsplit(r.headers["Location"])
    query = urllib.parse.parse_qs(location.query)
    assert location.netloc == "auth.example" and location.path == "/authorization"
    saved = db_manager.mapping_get(console.conn, meli_auth.STATE_NAMESPACE, query["state"][0])
    assert saved and saved["used"] is False


def test_connections_say_why_kommo_cannot_be_reconnected_with_a_long_lived_token(console):
    console.login()
    r = console.post("/admin/conexoes/kommo", {"csrf_token": console.csrf()})
    assert "aviso=kommo-token" in r.headers["Location"]
    assert "token de longa duração" in console.get(r.headers["Location"]).text


def test_conversations_link_questions_and_sales_to_chatwoot(make_settings, clock, serve):
    from tests.meli_support import bridge_env
    console = Console(make_settings(**bridge_env("http://127.0.0.1:9", "https://cw.example")),
                      clock, serve)
    conn = console.conn
    conn.execute("INSERT INTO ml_questions (ml_question_id, ml_item_id, ml_buyer_id,"
                 " question_text, chatwoot_conversation_id, imported_at, updated_at)"
                 " VALUES ('13001', 'MLB1', '55', 'Tem na cor azul?', 41, ?, ?)",
                 (clock(), clock()))
    conn.execute("INSERT INTO ml_items (ml_item_id, title, permalink, fetched_at) VALUES"
                 " ('MLB1', 'Camiseta', 'https://produto.example/MLB1', ?)", (clock(),))
    conn.execute("INSERT INTO ml_packs (ml_pack_id, chatwoot_conversation_id, ml_buyer_id,"
                 " order_summary, updated_at) VALUES ('2000001', 42, '55', 'Pedido: 1x Camiseta',"
                 " ?)", (clock(),))
    conn.commit()
    console.login()
    page = console.get("/admin/conversas").text
    assert "Tem na cor azul?" in page and 'href="https://produto.example/MLB1"' in page
    assert 'href="https://cw.example/app/accounts/1/conversations/41"' in page
    assert 'href="https://cw.example/app/accounts/1/conversations/42"' in page
    assert "Pedido: 1x Camiseta" in page and "aguardando" in page


def test_pages_are_not_cached_nor_framed(console):
    console.login()
    r = console.get("/admin")
    assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]


# --- admin_data -----------------------------------------------------------------------------

def test_traffic_by_hour_puts_each_event_and_job_in_its_hour(db, clock, settings):
    now = clock()
    with db_manager.transaction(db):
        db_manager.record_event(db, "kommo", "e1", "message", "queued", now=now - 3 * 3600)
        db_manager.record_event(db, "kommo", "e2", "message", "queued", now=now)
        db_manager.record_event(db, "kommo", "e3", "message", "queued", now=now - 25 * 3600)
    hours = admin_data.traffic_by_hour(db, now)
    assert len(hours) == 24 and hours[-1]["start_at"] <= now < hours[-1]["start_at"] + 3600
    assert [h["inbound"] for h in hours].count(1) == 2 and hours[-1]["inbound"] == 1
    three_ago = [h for h in hours if h["start_at"] <= now - 3 * 3600 < h["start_at"] + 3600]
    assert three_ago[0]["inbound"] == 1


def test_peer_health_ignores_discarded_jobs_and_old_failures(db, clock, make_settings):
    s = make_settings(**WHATSAPP_ENV)
    old = dead_job(db, clock, key="old")
    clock.advance(2 * 3600)
    assert [p["status"] for p in admin_data.peer_health(db, s, clock())] == ["idle", "idle"]
    fresh = dead_job(db, clock, key="fresh")
    n8n = {p["lane"]: p for p in admin_data.peer_health(db, s, clock())}["n8n"]
    assert (n8n["status"], n8n["failed"], n8n["ok"]) == ("failing", 1, 0)
    outbox.discard_dead_job(db, fresh, "ok", clock())
    n8n = {p["lane"]: p for p in admin_data.peer_health(db, s, clock())}["n8n"]
    assert (n8n["status"], n8n["ok"]) == ("idle", 0)
    assert old


def test_the_cookie_is_secure_when_ponte_is_served_over_https(make_settings, clock, serve):
    console = Console(make_settings(PUBLIC_BASE_URL="https://ponte.example"), clock, serve)
    cookie = console.login().headers["Set-Cookie"]
    assert "; Secure" in cookie and "HttpOnly" in cookie


def test_connections_start_the_kommo_authorization_in_oauth_mode(make_settings, clock, serve):
    env = {k: v for k, v in WHATSAPP_ENV.items() if k != "KOMMO_ACCESS_TOKEN"}
    console = Console(make_settings(**env, KOMMO_CLIENT_ID="kommo-client",
                                    KOMMO_CLIENT_SECRET="kommo-client-secret-value"),
                      clock, serve)
    console.login()
    page = console.get("/admin/conexoes").text
    assert "Conectar Kommo" in page and "kommo-client-secret-value" not in page
    r = console.post("/admin/conexoes/kommo", {"csrf_token": console.csrf()})
    assert r.status_code == 303 and r.headers["Location"].startswith(kommo_auth.AUTHORIZE_URL)
    state = urllib.parse.parse_qs(urllib.parse.urlsplit(r.headers["Location"]).query)["state"][0]
    assert kommo_auth.check_state(console.conn, state, clock(), consume=False)
