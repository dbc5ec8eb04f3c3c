"""Bridge A at its edges: bad input changes nothing, the bot API, Kommo OAuth, and crashes."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

import credentials
import db_manager
import kommo_auth
import kommo_webhook
import outbox
from standins import kommo as kommo_standin
from tests.bridge_a_harness import N8N_KEY, SECRET, BridgeA
from tests.conftest import payload_text

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bridge(make_settings, serve, clock):
    return BridgeA(make_settings, serve, clock)


NOTHING = {"events": 0, "jobs": 0, "messages": 0}


def test_wrong_secret_is_401_and_records_nothing(bridge):
    body = payload_text("kommo/add_message_incoming_text.form").strip()
    response = bridge.kommo_posts(body, secret="wrong-secret")
    assert response.status_code == 401 and response.get_json()["error"] == "bad_secret"
    response = bridge.web.post("/webhooks/kommo", data=body,
                               content_type="application/x-www-form-urlencoded")
    assert response.status_code == 401
    assert bridge.counts() == NOTHING


@pytest.mark.parametrize("body,content_type,status", [
    ("", "application/x-www-form-urlencoded", 400),
    ("foo=bar", "application/x-www-form-urlencoded", 400),
    ("message[add][0]=x&message[add][0][id]=y", "application/x-www-form-urlencoded", 400),
    ("message]]add=1", "application/x-www-form-urlencoded", 400),
    ("account[id]=1&message[add][%C2%B2][id]=m1&message[add][%C2%B2][text]=oi",
     "application/x-www-form-urlencoded", 400),  # "²" passes str.isdigit() but not int()
    ("account[id]=1&message[add][0][id]=m1&message[add][0][created_at]=%C2%B2",
     "application/x-www-form-urlencoded", 400),
    ('{"message": {"add": []}}', "application/json", 415),
])
def test_malformed_bodies_get_4xx_json_and_record_nothing(bridge, body, content_type, status):
    response = bridge.web.post(f"/webhooks/kommo/{SECRET}", data=body, content_type=content_type)
    assert response.status_code == status and response.get_json()["error"]
    assert bridge.counts() == NOTHING


@pytest.mark.parametrize("field,value", [
    ("text][a", "1"), ("id][x", "1"), ("contact_id][z", "9"), ("attachment][link][a", "x"),
    ("created_at", "99999999999999999999"), ("created_at", "ontem")])
def test_forged_field_values_get_400_and_record_nothing(bridge, field, value):
    body = kommo_standin.message_form("oi") + "&" + \
        urllib.parse.urlencode({f"message[add][0][{field}]": value})
    if field == "created_at":
        body = body.replace("message%5Badd%5D%5B0%5D%5Bcreated_at%5D=", "x=", 1)
    response = bridge.kommo_posts(body)
    assert response.status_code == 400, response.get_json()
    assert bridge.counts() == NOTHING


def test_forged_note_text_gets_400(bridge):
    body = kommo_standin.note_form("#pausar") + "&" + \
        urllib.parse.urlencode({"leads[note][0][note][text][a]": "1"})
    body = body.replace("leads%5Bnote%5D%5B0%5D%5Bnote%5D%5Btext%5D=%23pausar&", "", 1)
    assert bridge.kommo_posts(body).status_code == 400
    assert bridge.counts() == NOTHING


def test_huge_body_is_413_and_records_nothing(bridge):
    body = kommo_standin.message_form("x" * 2_000_000)
    response = bridge.kommo_posts(body)
    assert response.status_code == 413 and response.get_json()["error"] == "payload_too_large"
    assert bridge.counts() == NOTHING


def test_chunked_bodies_are_limited_too_and_read_whole(bridge, serve):
    web = serve(bridge.app)  # over real HTTP: a chunked body has no Content-Length
    url = f"{web.url}/webhooks/kommo/{SECRET}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    huge = kommo_standin.message_form("x" * 2_000_000).encode()
    response = requests.post(url, data=(huge[i:i + 65536] for i in range(0, len(huge), 65536)),
                             headers=headers)
    assert response.status_code == 413 and response.json()["error"] == "payload_too_large"
    assert bridge.counts() == NOTHING
    small = kommo_standin.message_form("oi, em pedaços").encode()
    response = requests.post(url, data=iter([small[:100], small[100:]]), headers=headers)
    assert response.json()["recorded"] == "queued"
    bridge.run_jobs()
    assert [c["message_text"] for c in bridge.n8n_calls()] == ["oi, em pedaços"]


def test_other_account_is_refused(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, KOMMO_ACCOUNT_ID="111")
    assert bridge.customer_says("oi").status_code == 401
    assert bridge.counts() == NOTHING


def test_url_check_and_url_variants(bridge):
    assert bridge.web.get(f"/webhooks/kommo/{SECRET}").status_code == 200
    assert bridge.web.get(f"/webhooks/kommo/{SECRET}/").status_code == 200
    body = kommo_standin.message_form("oi", message_id="q1")
    response = bridge.web.post(f"/webhooks/kommo?secret={SECRET}", data=body,
                               content_type="application/x-www-form-urlencoded")
    assert response.status_code == 200 and response.get_json()["recorded"] == "queued"
    bridge.run_jobs()
    assert [c["message_text"] for c in bridge.n8n_calls()] == ["oi"]


def test_other_methods_get_json_answers(bridge):
    head = bridge.web.head(f"/webhooks/kommo/{SECRET}")
    assert head.status_code == 200 and head.data == b""
    put = bridge.web.put(f"/webhooks/kommo/{SECRET}", data="x=1")
    assert put.status_code == 405 and put.get_json()["error"] == "method_not_allowed"
    assert put.headers["Allow"] == "GET, HEAD, POST" and put.headers["X-Request-Id"]
    # the secret is checked first: a wrong one learns nothing about the route
    assert bridge.web.put("/webhooks/kommo/wrong-secret", data="x=1").status_code == 401
    assert bridge.counts() == NOTHING


def test_bad_content_length_and_unexpected_errors_get_json_answers(bridge, monkeypatch):
    body = kommo_standin.message_form("oi", message_id="cl-1")
    response = bridge.web.post(f"/webhooks/kommo/{SECRET}", data=body,
                               content_type="application/x-www-form-urlencoded",
                               environ_overrides={"CONTENT_LENGTH": "-1"})
    assert response.status_code == 400 and response.get_json()["error"] == "bad_content_length"
    # a defect anywhere in the handler: JSON 500 with the request id, nothing recorded
    def broken_parser(raw):
        raise RuntimeError("defect")

    monkeypatch.setattr(kommo_webhook, "parse_kommo_webhook", broken_parser)
    response = bridge.kommo_posts(body, headers={"X-Request-Id": "kommo-call-defect"})
    assert response.status_code == 500 and response.get_json() == {
        "error": "internal_error", "request_id": "kommo-call-defect",
        "message": "Erro interno; o webhook não foi gravado e o Kommo vai reenviá-lo."}
    assert bridge.counts() == NOTHING


def test_database_busy_past_the_timeout_is_a_json_500_and_kommo_retries(bridge, monkeypatch):
    monkeypatch.setattr(db_manager, "BUSY_TIMEOUT_MS", 150)
    holder = db_manager.connect(bridge.settings.database_path)
    holder.execute("BEGIN IMMEDIATE")  # another writer that never lets go
    body = kommo_standin.message_form("oi", message_id="busy-1")
    response = bridge.kommo_posts(body)
    holder.execute("ROLLBACK")
    assert response.status_code == 500 and response.get_json()["error"] == "internal_error"
    assert bridge.counts() == NOTHING
    # Kommo sends it again: recorded once, applied once
    assert bridge.kommo_posts(body).get_json()["recorded"] == "queued"
    bridge.run_jobs()
    assert [c["message_text"] for c in bridge.n8n_calls()] == ["oi"]
    logs = "".join(p.read_text() for p in Path(bridge.settings.log_dir).glob("*.log"))
    assert '"unhandled_error"' in logs and SECRET not in logs


def test_unhandled_events_are_recorded_as_ignored_and_answered_200(bridge):
    for name in ("add_lead", "add_talk"):
        response = bridge.kommo_posts(payload_text(f"kommo/{name}.form").strip())
        assert response.status_code == 200 and response.get_json()["recorded"] == "ignored"
    assert db_manager.count_events(bridge.db, status="ignored") == 2
    assert bridge.counts()["jobs"] == 0


def test_documented_variant_without_message_wrapper(bridge):
    body = kommo_standin.message_form("oi sem wrapper").replace("message%5Badd%5D", "add")
    response = bridge.kommo_posts(body)
    assert response.status_code == 200 and response.get_json()["recorded"] == "queued"
    bridge.run_jobs()
    assert bridge.intake_results() == [{"messages_new": 1}]
    assert [c["message_text"] for c in bridge.n8n_calls()] == ["oi sem wrapper"]


def test_several_messages_in_one_post_are_all_recorded(bridge):
    first = kommo_standin.message_form("um", message_id="a1", index=0)
    second = kommo_standin.message_form("dois", message_id="a2", index=1)
    response = bridge.kommo_posts(first + "&" + second.split("&", 3)[3])
    assert response.get_json()["recorded"] == "queued"
    bridge.run_jobs()
    assert bridge.intake_results() == [{"messages_new": 2}]


def test_media_message_attachments_reach_n8n(bridge):
    link = "https://amojo.kommo.com/attachments/abc/def/file.ogg"
    bridge.customer_says("", attachment={"type": "voice", "link": link, "file_name": "a.ogg"})
    bridge.run_jobs()
    call = bridge.n8n_calls()[0]
    assert call["attachments"] == [{"type": "voice", "link": link, "file_name": "a.ogg"}]


def test_webhook_secret_never_reaches_the_logs(bridge):
    bridge.kommo_posts(kommo_standin.message_form("oi"),
                       headers={"X-Request-Id": "kommo-call-4711"})
    bridge.run_jobs()
    bridge.seller_notes("#pausar")
    bridge.run_jobs()
    logs = "".join(p.read_text() for p in Path(bridge.settings.log_dir).glob("*.log"))
    assert "kommo_webhook_applied" in logs and "n8n_forwarded" in logs
    # the poller's lines about that delivery carry the request id of the webhook call
    assert any('"kind": "kommo.intake"' in line and '"request_id": "kommo-call-4711"' in line
               and '"job_done"' in line for line in logs.splitlines())
    assert SECRET not in logs and N8N_KEY not in logs and kommo_standin.DEFAULT_TOKEN not in logs


# --- bot API ----------------------------------------------------------------------------------

def test_bot_api_pause_status_resume_and_list(bridge):
    bridge.customer_says("oi")
    bridge.run_jobs()
    assert bridge.api("get", "/bot/status/93589657", token="nope").status_code == 401
    response = bridge.api("post", "/bot/pause/93589657", json={"reason": "negociação"})
    assert response.status_code == 200 and response.get_json()["paused"] is True
    status = bridge.api("get", "/bot/status/93589657", token=N8N_KEY).get_json()
    assert status["status"] == "paused" and status["reason"] == "negociação"
    assert bridge.api("get", "/bot/paused").get_json()["count"] == 1
    assert bridge.api("post", "/bot/resume/93589657").get_json()["status"] == "active"
    assert bridge.api("get", "/bot/paused").get_json()["count"] == 0
    bridge.run_jobs()
    assert bridge.lead_notes()[-2:] == ["🤖 Bot pausado. Vendedor assumindo conversa.\n"
                                        "Motivo: negociação",
                                        "🤖 Bot reativado. Assumindo atendimento automático."]


def test_bot_api_command_and_unknown_command(bridge):
    ok = bridge.api("post", "/bot/command", json={"contact_id": "5", "command": "#PAUSAR",
                                                  "by": "Ana"})
    assert ok.status_code == 200 and ok.get_json()["paused_by"] == "Ana"
    assert bridge.api("post", "/bot/command", json={"contact_id": "5",
                                                    "command": "explodir"}).status_code == 400
    assert bridge.api("post", "/bot/command", json={"command": "pausar"}).status_code == 400
    assert bridge.api("post", "/bot/pause/abc").status_code == 400
    for bad in ({"reason": 5}, {"reason": ["a"]}, {"reason": {"a": 1}}, {"by": 3}):
        assert bridge.api("post", "/bot/pause/5", json=bad).status_code == 400
    assert bridge.api("post", "/bot/command", json={"contact_id": "5", "command": "pausar",
                                                    "reason": {"a": 1}}).status_code == 400
    assert bridge.api("post", "/admin/jobs/99999999999999999999999/retry").status_code == 404
    # a body that is not a JSON object is refused and changes nothing
    for kwargs, status in (({"data": "{reason: x", "content_type": "application/json"}, 400),
                           ({"data": "[" * 100_000, "content_type": "application/json"}, 400),
                           ({"json": ["pausar"]}, 400),
                           ({"data": "reason=x", "content_type": "text/plain"}, 415)):
        refused = bridge.api("post", "/bot/resume/5", **kwargs)
        assert refused.status_code == status and refused.get_json()["error"]
    # state exists without any prior conversation
    assert bridge.api("get", "/bot/status/5").get_json()["status"] == "paused"


# --- Kommo OAuth ------------------------------------------------------------------------------

@pytest.fixture
def oauth_bridge(make_settings, serve, clock):
    return BridgeA(make_settings, serve, clock, KOMMO_ACCESS_TOKEN="",
                   KOMMO_CLIENT_ID="standin-client", KOMMO_CLIENT_SECRET="standin-secret",
                   KOMMO_REDIRECT_URI="https://ponte.example.com.br/oauth/callback")


def test_oauth_callback_checks_state_and_stores_tokens(oauth_bridge):
    bridge = oauth_bridge
    assert bridge.web.get("/oauth/callback?code=abc&state=forged").status_code == 400
    status = bridge.api("get", "/oauth/status").get_json()
    assert status["connected"] is False and "state=" in status["authorize_url"]
    state = status["authorize_url"].split("state=")[1].split("&")[0]
    response = bridge.web.get(f"/oauth/callback?code=abc&state={state}&referer=minhaloja.kommo.com")
    assert response.status_code == 200
    assert bridge.web.get(f"/oauth/callback?code=abc&state={state}").status_code == 400  # used
    assert bridge.api("get", "/oauth/status").get_json()["connected"] is True
    bridge.customer_says("oi")
    bridge.run_jobs()
    assert len(bridge.chat_messages()) == 1


def test_expiring_token_is_refreshed_once_and_401_triggers_one_refresh(oauth_bridge, clock):
    bridge = oauth_bridge
    state = bridge.api("get", "/oauth/status").get_json()["authorize_url"].split("state=")[1]
    bridge.web.get(f"/oauth/callback?code=abc&state={state.split('&')[0]}")
    clock.advance(86400 - 60)  # inside the refresh margin
    bridge.customer_says("oi")
    bridge.run_jobs()
    grants = [c["grant_type"] for c in bridge.kommo_state()["token_calls"]]
    assert grants == ["authorization_code", "refresh_token"]
    # Kommo revokes the access token: one refresh, then the call succeeds
    bridge.kommo_app.config["STATE"].valid_tokens.clear()
    source = kommo_auth.TokenSource(bridge.settings, bridge.db, clock)
    stale = source.access_token()
    bridge.kommo_app.config["STATE"].valid_tokens.discard(stale)
    bridge.customer_says("de novo", message_id="m2")
    bridge.run_jobs()
    grants = [c["grant_type"] for c in bridge.kommo_state()["token_calls"]]
    assert grants.count("refresh_token") == 2 and len(bridge.chat_messages()) == 2


def test_rejected_refresh_marks_kommo_disconnected_in_health(oauth_bridge, clock):
    bridge = oauth_bridge
    credentials.store(bridge.db, "kommo", "old-access", "revoked-refresh", clock() + 10, clock())
    bridge.customer_says("oi")
    bridge.run_jobs()
    db_manager.beat(bridge.db, "poller", now=clock())
    health = bridge.web.get("/health").get_json()
    assert health["accounts"]["kommo"] == "disconnected" and health["status"] == "degraded"


# --- crash ------------------------------------------------------------------------------------

CRASHING_POLLER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import config, db_manager
    from poller import Poller
    s = config.load_settings({env!r})
    conn = db_manager.connect(s.database_path)
    print("running", flush=True)
    Poller(s, conn).drain()
""")


def test_poller_killed_mid_job_then_reply_sent_exactly_once(bridge, clock, tmp_path):
    # GIVEN a slow n8n, and a poller process (on the real clock) working on the message
    clock.t = time.time()
    bridge.customer_says("oi", created_at=int(clock()))
    bridge.n8n_mode(delay=30)
    env = {k: str(v) for k, v in {
        "DATABASE_PATH": bridge.settings.database_path, "LOG_DIR": str(tmp_path / "l"),
        "KOMMO_BASE_URL": bridge.settings.kommo_base_url, "KOMMO_WEBHOOK_SECRET": SECRET,
        "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN,
        "N8N_WEBHOOK_URL": bridge.settings.n8n_webhook_url, "N8N_API_KEY": N8N_KEY,
        "KOMMO_MAX_RPS": 0, "JOB_LEASE_SECONDS": 30, "BOT_DEBOUNCE_SECONDS": 0}.items()}
    script = CRASHING_POLLER.format(root=str(ROOT), env=env)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "running"
    deadline = time.monotonic() + 20
    while not bridge.n8n_calls() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(bridge.n8n_calls()) == 1
    # WHEN it is killed in the middle of the job
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    job = outbox.list_jobs(bridge.db, kind="n8n.forward_message")[0]
    assert job["status"] == "running"
    # THEN a restarted poller takes the job once its lease ends, and the reply goes out once
    bridge.n8n_mode(delay=0)
    bridge.run_jobs()
    assert bridge.chat_messages() == []  # lease still held by the dead worker
    bridge.clock.t = time.time() + 31
    bridge.run_jobs()
    bridge.run_jobs()
    assert len(bridge.chat_messages()) == 1
    assert outbox.get_job(bridge.db, job["id"])["status"] == "done"


def test_operators_see_deliveries_waiting_for_the_poller(bridge):
    bridge.customer_says("oi")
    assert bridge.api("get", "/admin/jobs").get_json()["staged"] == 1
    queue = bridge.web.get("/health").get_json()["queue"]
    assert (queue["staged"], queue["pending"], queue["due"]) == (1, 1, 1)
    assert 'ponte_jobs{status="staged"} 1' in bridge.web.get("/metrics").get_data(as_text=True)
    bridge.run_jobs()
    assert bridge.api("get", "/admin/jobs").get_json()["staged"] == 0
