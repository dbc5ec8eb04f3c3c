"""Test harness of bridge B: ponte's web app and poller wired to the stand-in Mercado Livre and
Chatwoot servers, all on loopback HTTP, with the injected clock."""
from __future__ import annotations

import base64
import json

import pytest
import requests

import db_manager
import meli_jobs
import outbox
import webhook_server
from poller import Poller
from standins import chatwoot as standin_chatwoot
from standins import mercadolivre as standin_ml

SELLER = 779432305
CLIENT_ID = standin_ml.DEFAULT_CLIENT_ID
WEBHOOK_SECRET = "standin-webhook-secret"
QUESTIONS_INBOX = 7
SALES_INBOX = 8
AGENT_MLB = standin_ml.AGENT_MLB

# Real bytes for attachments both ways.
PNG_BYTES = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
PDF_BYTES = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
JPEG_BYTES = standin_ml.TINY_JPEG + b"\x00" * 64


def bridge_env(ml_url: str, cw_url: str, **extra) -> dict:
    """The settings of a bridge B install pointing at the stand-ins."""
    env = {"ML_CLIENT_ID": CLIENT_ID, "ML_CLIENT_SECRET": standin_ml.DEFAULT_CLIENT_SECRET,
           "ML_SELLER_ID": SELLER, "ML_SITE_ID": "MLB", "ML_API_BASE_URL": ml_url,
           "ML_AUTH_BASE_URL": ml_url, "ML_ACCESS_TOKEN": "APP_USR-standin-initial",
           "ML_REFRESH_TOKEN": "TG-standin-initial",
           "ML_REDIRECT_URI": "http://127.0.0.1:9/oauth/mercadolivre/callback",
           "CHATWOOT_BASE_URL": cw_url, "CHATWOOT_API_TOKEN": standin_chatwoot.DEFAULT_TOKEN,
           "CHATWOOT_ACCOUNT_ID": 1, "CHATWOOT_QUESTIONS_INBOX_ID": QUESTIONS_INBOX,
           "CHATWOOT_SALES_INBOX_ID": SALES_INBOX, "CHATWOOT_WEBHOOK_SECRET": WEBHOOK_SECRET}
    env.update(extra)
    return env


class Bridge:
    """One running install: `.web` (served ponte), `.ml` / `.cw` (served stand-ins), a poller
    driven by hand, and helpers to act as the seller, the buyer and the agent."""

    def __init__(self, make_settings, serve, clock, **env):
        self.clock = clock
        self.ml = serve(standin_ml.create_app(SELLER))
        self.cw = serve(standin_chatwoot.create_app())
        self.settings = make_settings(**bridge_env(self.ml.url, self.cw.url, **env))
        self.conn = db_manager.connect(self.settings.database_path)
        db_manager.migrate(self.conn)
        self.app = webhook_server.create_app(self.settings, clock=clock)
        self.web = serve(self.app)
        requests.post(f"{self.cw.url}/_standin/inboxes", json=[
            {"id": QUESTIONS_INBOX, "webhook_url": f"{self.web.url}/webhooks/chatwoot"},
            {"id": SALES_INBOX, "webhook_url": f"{self.web.url}/webhooks/chatwoot"}])
        self.restart()

    # --- ponte ----------------------------------------------------------------------------------

    def restart(self):
        """A new poller process: fresh connection and fresh clients, same database."""
        self.poller = Poller(self.settings, db_manager.connect(self.settings.database_path),
                             clock=self.clock)
        return self.poller

    @property
    def ctx(self):
        return self.poller.ctx

    def poll(self) -> int:
        """One poll of questions and unread messages, then run every due job."""
        meli_jobs.poll_questions(self.ctx)
        meli_jobs.poll_messages(self.ctx)
        return self.drain()

    def drain(self) -> int:
        return self.poller.drain()

    def jobs(self, **kw) -> list[dict]:
        return outbox.list_jobs(self.conn, **kw)

    def notify_ml(self, topic: str, resource: str, notification_id: str | None = None):
        """A Mercado Livre notification POSTed to ponte."""
        body = {"_id": notification_id or f"n-{topic}-{resource}", "resource": resource,
                "user_id": str(SELLER), "topic": topic, "application_id": int(CLIENT_ID),
                "attempts": 1, "sent": "2026-03-10T18:22:32.464Z",
                "received": "2026-03-10T18:22:32.438Z"}
        return requests.post(f"{self.web.url}/webhooks/mercadolivre", json=body, timeout=5)

    # --- Mercado Livre stand-in -----------------------------------------------------------------

    def ml_post(self, path: str, body) -> dict:
        answer = requests.post(f"{self.ml.url}{path}", json=body, timeout=5)
        answer.raise_for_status()
        return answer.json()

    def ml_state(self) -> dict:
        return requests.get(f"{self.ml.url}/_standin/state", timeout=5).json()

    def ask(self, text: str, item_id: str = "MLB3737188005", buyer_id: int = 1944693439,
            title: str = "Espaçador E Nivelador Para Piso 1,5 Mm 500pçs", price: float = 62.96,
            **kw) -> int:
        """A buyer asks a question on an item."""
        self.ml_post("/_standin/items", [{"id": item_id, "title": title, "price": price}])
        return self.ml_post("/_standin/questions", [{"text": text, "item_id": item_id,
                                                     "buyer_id": buyer_id, **kw}])["ids"][0]

    def sale(self, **kw) -> dict:
        return self.ml_post("/_standin/sales", kw)

    def buyer_writes(self, pack: str, text: str, attachments=None, **kw) -> str:
        return self.ml_post(f"/_standin/packs/{pack}/messages",
                            {"text": text, "attachments": attachments or [], **kw})["id"]

    def fail_ml(self, path_prefix: str, status: int, count: int = 1, **kw):
        self.ml_post("/_standin/fail", {"path_prefix": path_prefix, "status": status,
                                        "count": count, **kw})

    def sync_dies_after_chatwoot_took_the_message(self, buyer_id: int) -> str:
        """A sale whose buyer writes once; Chatwoot stores that message but its answer is lost,
        and the sync job (one attempt per job: JOB_MAX_ATTEMPTS=1) dies. Returns the pack."""
        pack = self.sale(buyer_id=buyer_id)["conversation_id"]
        self.buyer_writes(pack, "Cadê meu pedido?")
        requests.post(f"{self.cw.url}/_standin/fail",
                      json={"path_prefix": "/api/v1/accounts/1/conversations/", "method": "POST",
                            "status": 503, "after": 1, "apply": True}, timeout=5)
        self.poll()
        assert self.jobs(status="dead", kind="ml.sync_pack")
        return pack

    # --- Chatwoot stand-in ----------------------------------------------------------------------

    def cw_state(self) -> dict:
        return requests.get(f"{self.cw.url}/_standin/state", timeout=5).json()

    def conversations(self, inbox_id: int | None = None) -> list[dict]:
        return [c for c in self.cw_state()["conversations"]
                if inbox_id is None or c["inbox_id"] == inbox_id]

    def agent_replies(self, conversation_id: int, content: str, deliver: bool = True,
                      attachments=None, **kw) -> dict:
        """An agent types in Chatwoot; Chatwoot's signed webhook reaches ponte."""
        body = {"conversation_id": conversation_id, "content": content, "deliver": deliver,
                "timestamp": int(self.clock()),
                "attachments": [{"filename": name, "content_type": mime,
                                 "data_b64": base64.b64encode(data).decode()}
                                for name, data, mime in (attachments or [])], **kw}
        answer = requests.post(f"{self.cw.url}/_standin/agent_reply", json=body, timeout=10)
        answer.raise_for_status()
        return answer.json()

    def redeliver(self, webhook: dict) -> requests.Response:
        """Send the exact same Chatwoot delivery to ponte again."""
        return requests.post(f"{self.web.url}/webhooks/chatwoot",
                             data=webhook["raw_body"].encode(), headers=webhook["headers"],
                             timeout=5)

    def echo_of(self, message_id: int) -> dict:
        """The signed webhook Chatwoot sends for a message ponte created, delivered to ponte."""
        answer = requests.post(f"{self.cw.url}/_standin/webhook/{message_id}",
                               json={"deliver": True, "timestamp": int(self.clock())}, timeout=10)
        return answer.json()

    def assert_spec_clean(self):
        state = self.cw_state()
        assert state["spec_available"], "Chatwoot OpenAPI spec not found"
        assert state["spec_violations"] == []


def messages_of(conversation: dict) -> list[dict]:
    return conversation["all_messages"]


def sign(secret: str, timestamp: int, raw: bytes) -> str:
    import chatwoot_api

    return chatwoot_api.sign_chatwoot_body(secret, timestamp, raw)


@pytest.fixture
def bridge(make_settings, serve, clock) -> Bridge:
    b = Bridge(make_settings, serve, clock)
    yield b
    b.poller.conn.close()
    b.conn.close()


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()
