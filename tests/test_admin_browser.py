"""The console end to end in a real headless Chromium (Debian's `chromium`, driven by Playwright):
log in, pause and resume a contact, retry a dead job, connect Mercado Livre through the
stand-in's authorization page — ponte, Mercado Livre and Chatwoot on local ports.

Takes a screenshot of each page; `PONTE_SCREENSHOT_DIR=docs` writes them where the README shows
them (docs/console-*.png), otherwise they go to the test's temporary folder.
Skipped, with the reason, only when there is no Chromium (`.ci/run` installs it).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import credentials
import db_manager
import outbox
import whatsapp_store
from standins import chatwoot as standin_chatwoot
from standins import mercadolivre as standin_ml
from standins.support import ServedApp, free_port
from tests.meli_support import SELLER, bridge_env
from webhook_server import create_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("PONTE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync",
                 "--disable-dev-shm-usage"]  # Docker's /dev/shm is 64 MB: Chromium would crash
TOKEN = "admin-token-for-tests-123"
HOUR = 3600

if not os.path.exists(CHROMIUM):
    pytest.skip(f"sem Chromium em {CHROMIUM} (apt-get install chromium): o teste do painel no "
                "navegador não roda", allow_module_level=True)
# Pinned in requirements-dev.txt: a missing package is a broken environment, not a skip.
from playwright import sync_api  # noqa: E402


@pytest.fixture
def ponte(make_settings, clock, serve):
    """ponte with both bridges, pointed at the Mercado Livre and Chatwoot stand-ins, with a
    day of simulated traffic in its database."""
    ml = serve(standin_ml.create_app(SELLER))
    cw = serve(standin_chatwoot.create_app())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = make_settings(**bridge_env(
        ml.url, cw.url, ML_REDIRECT_URI=f"{url}/oauth/mercadolivre/callback",
        PUBLIC_BASE_URL=url, KOMMO_BASE_URL="http://127.0.0.1:9",
        KOMMO_WEBHOOK_SECRET="kommo-webhook-secret-0123456789",
        KOMMO_ACCESS_TOKEN="kommo-long-lived", N8N_WEBHOOK_URL="http://127.0.0.1:9/n8n",
        N8N_API_KEY="n8n-key-0123456789"))
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    seed_day(conn, clock())
    web = ServedApp(create_app(settings, clock=clock), port=port)
    yield {"url": url, "conn": conn, "ml": ml, "settings": settings}
    web.stop()
    conn.close()


def seed_day(conn, now: float) -> None:
    """Contacts (one paused by a seller), a day of webhooks and jobs, a dead n8n job, a Mercado
    Livre question and a sale with their Chatwoot conversations, a fresh poller heartbeat."""
    people = [("93589657", "Maria Souza", "2201"), ("93589700", "João Pereira", "2202"),
              ("93589711", "Ana Lima", "2203")]
    with db_manager.transaction(conn):
        for i, (contact, name, lead) in enumerate(people):
            whatsapp_store.upsert_conversation(conn, contact, lead, f"18{i}", f"chat-{i}", name,
                                               "waba", now - i * 600)
            whatsapp_store.insert_message(conn, f"m-{contact}", contact, "Olá", "text", [],
                                          now - i * 600, now - i * 600, "sent", None)
        whatsapp_store.set_paused(conn, "93589700", "Carla (vendas)", "seller",
                                  "cliente pediu desconto", now - 1800, now + 22 * HOUR)
        for hour in range(24):
            for n in range((hour * 7) % 11 + 2):
                at = now - hour * HOUR - n * 97
                db_manager.record_event(conn, "kommo", f"kommo-msg:{hour}-{n}", "message",
                                        "queued", now=at)
                conn.execute(
                    "INSERT INTO jobs (kind, dedupe_key, payload, status, attempts,"
                    " available_at, created_at, updated_at, finished_at)"
                    " VALUES ('kommo.send_reply', ?, '{}', 'done', 1, ?, ?, ?, ?)",
                    (f"reply-{hour}-{n}", at, at, at + 3, at + 3))
        outbox.enqueue_job(conn, "n8n.forward_message", "kommo-msg:dead-1",
                           {"contact_id": "93589711", "lead_id": "2203",
                            "batch_key": "kommo-msg:dead-1"}, now=now - 900)
        conn.execute("INSERT INTO ml_questions (ml_question_id, ml_item_id, ml_buyer_id,"
                     " question_text, chatwoot_conversation_id, imported_at, updated_at)"
                     " VALUES ('13001', 'MLB1001', '5501', 'Tem na cor azul? Entrega em"
                     " Campinas?', 41, ?, ?)", (now - 2 * HOUR, now - 2 * HOUR))
        conn.execute("INSERT INTO ml_items (ml_item_id, title, permalink, fetched_at) VALUES"
                     " ('MLB1001', 'Camiseta básica algodão', 'https://produto.mercadolivre"
                     ".com.br/MLB-1001', ?)", (now,))
        conn.execute("INSERT INTO ml_packs (ml_pack_id, chatwoot_conversation_id, ml_buyer_id,"
                     " order_summary, updated_at) VALUES ('2000004871', 42, '5502',"
                     " 'Pedido 2000004871: 2x Camiseta básica algodão — R$ 79,80', ?)",
                     (now - 5 * HOUR,))
    job = outbox.claim_next_job(conn, now - 890, 60)
    outbox.fail_job(conn, job, "n8n respondeu 502 Bad Gateway (o workflow está ativo?)",
                    retryable=False, now=now - 880, max_attempts=5, max_age_seconds=86400)
    db_manager.beat(conn, "poller", now=now - 4)


@pytest.fixture
def browser_page(tmp_path):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900}, locale="pt-BR")
        context.grant_permissions(["clipboard-read", "clipboard-write"])
        page = context.new_page()
        page.set_default_timeout(15_000)
        yield page
        context.close()


@pytest.fixture
def shots(tmp_path):
    folder = Path(os.environ.get("PONTE_SCREENSHOT_DIR") or tmp_path)
    if not folder.is_absolute():
        folder = ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)

    def shot(page, name: str) -> Path:
        path = folder / f"console-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5_000, f"screenshot {name} is empty"
        return path

    return shot


def test_the_console_in_a_real_browser(ponte, browser_page, shots):
    page, url, conn = browser_page, ponte["url"], ponte["conn"]

    # GIVEN a seller who opens the console: the login page
    page.goto(f"{url}/admin")
    assert page.url.startswith(f"{url}/admin/login")
    assert page.locator("h1").inner_text() == "Entrar no painel"
    shots(page, "login")
    page.fill("#token", "token-errado")
    page.click("button[type=submit]")
    assert page.locator(".bad").inner_text() == "Token incorreto."
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/admin")
    assert page.locator("h1").inner_text() == "Visão geral"
    assert "falhando" in page.locator("#parceiro-n8n").inner_text()
    assert page.locator("svg.chart rect").count() == 72
    shots(page, "visao-geral")

    # WHEN they pause Maria's bot with a reason, THEN the state and the page say so
    page.click("nav >> text=Contatos")
    maria = page.locator("#contato-93589657")
    maria.locator("input[name=reason]").fill("vou negociar o frete")
    maria.locator("button", has_text="Pausar bot").click()
    page.wait_for_url("**/admin/contatos?aviso=pausado")
    assert "Bot pausado para o contato" in page.locator(".notice").inner_text()
    assert "pausado" in page.locator("#contato-93589657 .estado").inner_text()
    state = whatsapp_store.get_bot_state(conn, "93589657")
    assert (state["status"], state["reason"]) == ("paused", "vou negociar o frete")
    shots(page, "contatos")
    page.locator("#contato-93589657").locator("button", has_text="Reativar bot").click()
    page.wait_for_url("**/admin/contatos?aviso=reativado")
    assert "ativo" in page.locator("#contato-93589657 .estado").inner_text()
    assert whatsapp_store.get_bot_state(conn, "93589657")["status"] == "active"

    # WHEN they retry the dead job, THEN it is back in the queue
    page.click("nav >> text=Fila")
    dead = conn.execute("SELECT id FROM jobs WHERE status = 'dead'").fetchone()[0]
    assert "502 Bad Gateway" in page.locator(f"#job-{dead}").inner_text()
    shots(page, "fila")
    page.locator(f"#job-{dead}").locator("button", has_text="Tentar de novo").click()
    page.wait_for_url("**/admin/fila?aviso=reenfileirado")
    assert outbox.get_job(conn, dead)["status"] == "pending"

    # The Mercado Livre ⇄ Chatwoot conversations, with their links
    page.click("nav >> text=Conversas")
    assert page.locator("a", has_text="conversa 41").get_attribute("href").endswith(
        "/app/accounts/1/conversations/41")
    shots(page, "conversas")

    # WHEN they connect Mercado Livre, THEN the stand-in's consent page sends them back
    # connected, with a new token pair stored
    page.click("nav >> text=Conexões")
    first_url = page.locator("ul.urls input").first.input_value()
    assert first_url == f"{url}/webhooks/kommo/<KOMMO_WEBHOOK_SECRET>"
    shots(page, "conexoes")
    page.locator("ul.urls .copy-button").first.click()  # the one script of the console
    page.wait_for_selector("ul.urls .copy-button:text('Copiado!')")
    assert page.evaluate("navigator.clipboard.readText()") == first_url
    before = credentials.get(conn, "mercadolivre")
    page.locator("#conexao-mercadolivre button").click()
    page.wait_for_url(f"{url}/oauth/mercadolivre/callback*")
    assert page.locator("h1").inner_text() == "Mercado Livre conectado"
    after = credentials.get(conn, "mercadolivre")
    assert after is not None and after.ok
    assert before is None or after.access_token != before.access_token
    page.goto(f"{url}/admin/conexoes")
    assert "conectada" in page.locator("#conexao-mercadolivre").inner_text()

    # On a phone: the overview in a narrow viewport, no sideways scroll
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{url}/admin")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    shots(page, "celular")

    # Logging out ends the session
    page.click("text=Sair")
    page.wait_for_url("**/admin/login?aviso=saiu")
    page.goto(f"{url}/admin/fila")
    assert page.url.startswith(f"{url}/admin/login")
