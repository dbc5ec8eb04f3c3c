"""Issue 14, across HTTP: hostile bytes in bodies, ids and numeric headers get a 4xx JSON answer
(or a peer's 200 `ignored`) and change nothing in the database; a Mercado Livre notification is
read as JSON whatever its content type; a sale's messages are paged by what Mercado Livre
returned; Chatwoot attachments keep their names; a crashed sync finds its message past a
conversation's 20 newest. (Bridge B's routes and questions: test_hardening_bridge_b.py.)"""
from __future__ import annotations

import json

import pytest
import requests

from standins import kommo as kommo_standin
from tests.bridge_a_harness import ADMIN, N8N_KEY, BridgeA
from tests.conftest import PAYLOADS
from tests.meli_support import (PDF_BYTES, QUESTIONS_INBOX, SALES_INBOX, SELLER,  # noqa: F401
                                WEBHOOK_SECRET, Bridge, bridge, messages_of, sign)


@pytest.fixture
def wa(make_settings, serve, clock) -> BridgeA:
    return BridgeA(make_settings, serve, clock)


def snapshot(conn) -> dict:
    """Every row of every table: a refused request must leave this unchanged."""
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    return {t: sorted(map(repr, map(tuple, conn.execute(f"SELECT * FROM {t}")))) for t in tables}


def _cw_reply() -> dict:
    path = PAYLOADS / "chatwoot" / "message_created_outgoing_with_attachment.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _post_chatwoot(b: Bridge, raw: bytes, timestamp=None, signature=None):
    ts = str(int(b.clock())) if timestamp is None else timestamp
    headers = {"Content-Type": "application/json", "X-Chatwoot-Timestamp": ts,
               "X-Chatwoot-Signature": signature or sign(WEBHOOK_SECRET, int(ts), raw)}
    return requests.post(f"{b.web.url}/webhooks/chatwoot", data=raw, headers=headers, timeout=5)


def _notification(**fields) -> dict:
    body = {"_id": "n-hardening", "resource": "/questions/13090845221", "user_id": SELLER,
            "topic": "questions", "application_id": 5503910054141466, "attempts": 1,
            "sent": "2026-03-10T18:22:32.464Z", "received": "2026-03-10T18:22:32.438Z"}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


# JSON text of strings no store can hold: lone surrogates (escaped, or as the bytes CESU-8
# writes, which json.loads(bytes) lets through) and NUL.
UNSTORABLE = [b'"\\ud800"', b'"x\\udfffy"', b'"\xed\xa0\x80"', b'"a\\u0000b"']


def _with(body: dict, field: str, json_text: bytes) -> bytes:
    """`body` as JSON bytes with `field` set to the raw JSON text `json_text`."""
    marker = "__HOSTILE__"
    raw = json.dumps({**body, field: marker}).encode()
    return raw.replace(f'"{marker}"'.encode(), json_text)


# --- bad bytes: one check for every body ---------------------------------------------------------

@pytest.mark.parametrize("timestamp", ["²", "¹²³", "1790000000²", "³ "])
def test_chatwoot_timestamp_in_non_ascii_digits_is_401_not_500(bridge, timestamp):
    raw = json.dumps(_cw_reply()).encode()
    before = snapshot(bridge.conn)
    # Latin-1 on the wire, as HTTP headers are: the server reads "²" back (PEP 3333).
    answer = _post_chatwoot(bridge, raw, timestamp=timestamp.encode("latin-1"),
                            signature="sha256=" + "0" * 64)
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_signature"
    assert snapshot(bridge.conn) == before


@pytest.mark.parametrize("text", UNSTORABLE)
@pytest.mark.parametrize("field", ["_id", "sent"])
def test_mercado_livre_notification_with_unstorable_text_is_ignored_with_200(bridge, field,
                                                                             text):
    body = _notification(**({"_id": None} if field == "sent" else {}))
    before = snapshot(bridge.conn)
    answer = requests.post(f"{bridge.web.url}/webhooks/mercadolivre", data=_with(body, field, text),
                           headers={"Content-Type": "application/json"}, timeout=5)
    assert answer.status_code == 200 and answer.json()["ignored"] == "invalid_json"
    assert snapshot(bridge.conn) == before


def _refused_as_unstorable(wa, path: str, body: dict, field: str, text: str, token: str):
    """POST `body` with `text` in `field`: a 400 `unstorable_text` that changes no table."""
    before = snapshot(wa.db)
    answer = wa.web.post(path, content_type="application/json", data=_with(body, field, text),
                         headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 400 and answer.get_json()["error"] == "unstorable_text"
    assert snapshot(wa.db) == before


@pytest.mark.parametrize("text", UNSTORABLE)
def test_n8n_answer_with_unstorable_contact_id_is_400(wa, text):
    _refused_as_unstorable(wa, "/send-response", {"output": "Olá!"}, "contact_id", text, N8N_KEY)


@pytest.mark.parametrize("text", UNSTORABLE)
def test_bot_pause_with_unstorable_reason_is_400(wa, text):
    _refused_as_unstorable(wa, "/bot/pause/93589657", {"by": "ana"}, "reason", text, ADMIN)
    assert wa.bot_state()["status"] == "active"


def test_kommo_form_with_nul_is_400_and_records_nothing(wa):
    before = snapshot(wa.db)
    answer = wa.kommo_posts(kommo_standin.message_form("oi\x00tudo bem?"))
    assert answer.status_code == 400 and answer.get_json()["error"] == "unstorable_text"
    assert snapshot(wa.db) == before
    assert wa.kommo_posts(kommo_standin.message_form("oi, tudo bem?")).status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/bot/pause/%C2%B2", None),                       # "²": str.isdigit() says yes
    ("/bot/pause/%EF%BC%91%EF%BC%92", None),           # "１２": int() reads 12
    ("/bot/resume/%EF%BC%91%EF%BC%92", None),
    ("/bot/pause/%20123", None),
    ("/bot/command", {"contact_id": "１２", "command": "pausar"}),
    ("/bot/command", {"contact_id": "²", "command": "pausar"}),
])
def test_contact_ids_are_ascii_digits_only(wa, path, body):
    before = snapshot(wa.db)
    answer = wa.api("post", path, json=body)
    assert answer.status_code == 400 and answer.get_json()["error"] == "bad_contact_id"
    assert wa.api("get", "/bot/status/%EF%BC%91%EF%BC%92").status_code == 400
    assert snapshot(wa.db) == before
    # the same call with ASCII digits works
    assert wa.api("post", "/bot/pause/12").status_code == 200


# --- Mercado Livre notifications ------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          None])
def test_notification_is_read_as_json_whatever_its_content_type(bridge, content_type):
    qid = bridge.ask("Tem garantia?")
    raw = json.dumps(_notification(resource=f"/questions/{qid}")).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    answer = requests.post(f"{bridge.web.url}/webhooks/mercadolivre", data=raw, headers=headers,
                           timeout=5)
    assert answer.status_code == 200 and answer.json()["queued"] is True
    bridge.drain()
    assert len(bridge.conversations(QUESTIONS_INBOX)) == 1


# --- Mercado Livre lists paged by what came back ----------------------------------------------

def test_pack_with_25_messages_reaches_chatwoot_when_mercado_livre_pages_at_10(bridge):
    bridge.ml_post("/_standin/options", {"max_page_size": 10})
    pack = bridge.sale(buyer_id=8804)["conversation_id"]
    for n in range(25):
        bridge.buyer_writes(pack, f"mensagem {n}", created=f"2026-03-11T12:{n:02d}:00.000Z")
    bridge.poll()
    (conv,) = bridge.conversations(SALES_INBOX)
    public = [m["content"] for m in messages_of(conv) if not m["private"]]
    assert public == [f"mensagem {n}" for n in range(25)]


# --- Chatwoot -----------------------------------------------------------------------------------

def test_attachment_name_reaches_mercado_livre_decoded(bridge):
    pack = bridge.sale(buyer_id=8805)["conversation_id"]
    bridge.buyer_writes(pack, "Manda a nota?")
    bridge.poll()
    (conv,) = bridge.conversations(SALES_INBOX)
    hook = bridge.agent_replies(conv["id"], "",
                                attachments=[("Nota fiscal nº 12.pdf", PDF_BYTES,
                                              "application/pdf")])
    assert "Nota%20fiscal" in hook["payload"]["attachments"][0]["data_url"]
    bridge.drain()
    state = bridge.ml_state()
    assert [v["original_filename"] for v in state["uploaded"].values()] == \
        ["Nota fiscal nº 12.pdf"]
    assert state["sent_messages"][0]["text"] == "Anexo: Nota fiscal nº 12.pdf"


def test_crashed_sync_finds_its_message_past_the_20_newest(make_settings, serve, clock):
    # GIVEN one attempt per job, and Chatwoot stores the buyer's message but loses its answer
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    b.sync_dies_after_chatwoot_took_the_message(buyer_id=8807)
    # ... and the agents wrote 25 private notes in the conversation meanwhile
    (conv,) = b.conversations(SALES_INBOX)
    for n in range(25):
        b.agent_replies(conv["id"], f"nota {n}", deliver=False, private=True)
    # WHEN later polls queue fresh sync jobs
    for _ in range(2):
        b.clock.advance(120)
        b.poll()
    # THEN the buyer's message is in Chatwoot once
    (conv,) = b.conversations(SALES_INBOX)
    assert [m["content"] for m in messages_of(conv) if not m["private"]] == ["Cadê meu pedido?"]


# --- the pure rules behind the above ----------------------------------------------------------

@pytest.mark.parametrize("offset,returned,paging,expected", [
    (0, 10, {"total": 25, "limit": 10}, 10),     # paged at 10 though 50 was asked
    (20, 5, {"total": 25, "limit": 10}, None),   # the last page
    (0, 0, {"total": 25}, None),                 # an empty page ends the list
    (0, 10, {"limit": 10}, 10),                  # no total: a full page of its size goes on
    (10, 7, {"limit": 10}, None),                #   and a short one ends it
    (0, 10, {}, None),                           # nothing said: 10 < 50 asked ends it
    (0, 10, {"total": "25", "limit": True}, 10),
])
def test_next_page_offset_moves_by_what_came_back(offset, returned, paging, expected):
    from meli_common import next_page_offset

    assert next_page_offset(offset, returned, paging, 50) == expected


@pytest.mark.parametrize("data_url,name", [
    ("https://cw.example/rails/active_storage/blobs/redirect/abc/Nota%20fiscal.pdf",
     "Nota fiscal.pdf"),
    ("https://cw.example/blobs/redirect/abc/a%2F..%2Fb.txt?x=1", "a_.._b.txt"),
    ("https://cw.example/blobs/redirect/abc/x%00y%0A.pdf", "x_y_.pdf"),
    ("https://cw.example/blobs/redirect/abc/%E9t%E9.pdf", "\ufffdt\ufffd.pdf"),
])
def test_attachment_names_are_decoded_and_made_safe(data_url, name):
    import chatwoot_api

    assert chatwoot_api._attachment_name({"data_url": data_url, "id": 1}) == name


@pytest.mark.parametrize("value,expected", [
    ("123", "123"), (123, "123"), ("²", None), ("１２", None), (" 1", None), ("", None),
    (True, None), ("1" * 21, None), (-1, None)])
def test_ascii_id(value, expected):
    import web_common

    assert web_common.ascii_id(value) == expected
