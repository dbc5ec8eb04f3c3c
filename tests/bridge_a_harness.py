"""A GIVEN/WHEN/THEN harness for bridge A: ponte's web app and poller on a temp database,
with the Kommo and n8n stand-ins served on loopback."""
from __future__ import annotations

import contextlib
import threading

import requests

import db_manager
import outbox
import whatsapp_store
from poller import Poller
from standins import kommo as kommo_standin
from standins import n8n as n8n_standin
from webhook_server import create_app

SECRET = "kommo-hook-secret-0123456789abcdef"
N8N_KEY = "n8n-shared-key-for-tests"
ADMIN = "admin-token-for-tests-123"


class BridgeA:
    def __init__(self, make_settings, serve, clock, n8n_mode="sync", kommo_max_rps=0, **env):
        self.kommo_app = kommo_standin.create_app(max_rps=kommo_max_rps)
        self.n8n_app = n8n_standin.create_app(api_key=N8N_KEY, mode=n8n_mode)
        self.kommo = serve(self.kommo_app)
        self.n8n = serve(self.n8n_app)
        base_env = {"KOMMO_BASE_URL": self.kommo.url, "KOMMO_WEBHOOK_SECRET": SECRET,
                    "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN,
                    "N8N_WEBHOOK_URL": self.n8n.url + "/webhook/ponte", "N8N_API_KEY": N8N_KEY,
                    "BOT_DEBOUNCE_SECONDS": 0, "KOMMO_MAX_RPS": 0, "N8N_TIMEOUT_SECONDS": 5,
                    "JOB_LEASE_SECONDS": 30}
        base_env.update(env)
        self.settings = make_settings(**base_env)
        self.clock = clock
        self.app = create_app(self.settings, clock=clock)
        self.web = self.app.test_client()
        self.db = db_manager.connect(self.settings.database_path)
        self.poller = Poller(self.settings, self.db, clock=clock)

    # --- WHEN ---------------------------------------------------------------------------------
    def kommo_posts(self, form_body: str, secret: str = SECRET, **kw):
        return self.web.post(f"/webhooks/kommo/{secret}", data=form_body.encode(),
                             content_type="application/x-www-form-urlencoded", **kw)

    def customer_says(self, text: str, **kw):
        return self.kommo_posts(kommo_standin.message_form(text, **kw))

    def seller_notes(self, text: str, **kw):
        return self.kommo_posts(kommo_standin.note_form(text, **kw))

    def n8n_answers_later(self, body: dict, key: str = N8N_KEY):
        return self.web.post("/send-response", json=body,
                             headers={"Authorization": f"Bearer {key}"})

    def api(self, method: str, path: str, token: str = ADMIN, **kw):
        return getattr(self.web, method)(path, headers={"Authorization": f"Bearer {token}"}, **kw)

    def run_jobs(self, max_jobs=None) -> int:
        return self.poller.drain(max_jobs)

    @contextlib.contextmanager
    def poller_running(self):
        """The poller's daemon loop on a thread (as in production: it wakes on new webhooks),
        stopped warmly at the end."""
        loop = threading.Thread(target=self.poller.run_forever, daemon=True)
        loop.start()
        try:
            yield
        finally:
            self.poller.request_stop()
            loop.join(30)
        assert not loop.is_alive(), "the poller did not stop"

    # --- THEN ---------------------------------------------------------------------------------
    def n8n_calls(self) -> list[dict]:
        return [c["body"] for c in requests.get(self.n8n.url + "/_standin/calls").json()["calls"]]

    def kommo_state(self) -> dict:
        return requests.get(self.kommo.url + "/_standin/state").json()

    def chat_messages(self, talk_id="1874") -> list[str]:
        return [m["text"] for m in self.kommo_state()["sent"] if m["talk_id"] == talk_id]

    def lead_notes(self, lead_id="28455849") -> list[str]:
        return [n["text"] for n in self.kommo_state()["notes"] if n["lead_id"] == lead_id]

    def bot_state(self, contact_id="93589657") -> dict:
        return whatsapp_store.get_bot_state(self.db, contact_id)

    def n8n_mode(self, **body):
        requests.post(self.n8n.url + "/_standin/mode", json=body)

    def kommo_fails(self, **body):
        requests.post(self.kommo.url + "/_standin/fail", json=body)

    def intake_results(self) -> list[dict]:
        """What the poller made of each Kommo webhook (the `kommo.intake` jobs), oldest first."""
        jobs = outbox.list_jobs(self.db, kind="kommo.intake", limit=10_000)
        return [j["result"] for j in reversed(jobs)]

    def counts(self) -> dict:
        return {"events": db_manager.count_events(self.db),
                "jobs": len(outbox.list_jobs(self.db, limit=10_000))
                + outbox.count_staged_jobs(self.db),
                "messages": self.db.execute("SELECT COUNT(*) FROM kommo_messages").fetchone()[0]}
