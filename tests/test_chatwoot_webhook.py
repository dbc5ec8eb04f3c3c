"""POST /webhooks/chatwoot (and /webhook): signature, freshness, and which events reach Mercado
Livre. Real-shaped payloads from tests/fixtures/payloads/chatwoot, signed like Chatwoot v4.13 signs."""
from __future__ import annotations

import copy
import json

import pytest
import requests

import chatwoot_api
import db_manager
import outbox
from meli_store import deleted_event_key
from tests.conftest import PAYLOADS
from tests.meli_support import WEBHOOK_SECRET, bridge, dumps, sign  # noqa: F401


def _payload(name: str) -> dict:
    return json.loads((PAYLOADS / "chatwoot" / f"{name}.json").read_text(encoding="utf-8"))


def _reply_payload(**changes) -> dict:
    body = _payload("message_created_outgoing_with_attachment")
    body.update(changes)
    return body


def _post(b, body, *, ts=None, secret=WEBHOOK_SECRET, path="/webhooks/chatwoot", headers=None,
          raw=None):
    raw = raw if raw is not None else dumps(body)
    ts = int(b.clock()) if ts is None else ts
    h = {"Content-Type": "application/json", "X-Chatwoot-Timestamp": str(ts),
         "X-Chatwoot-Signature": sign(secret, ts, raw), "X-Chatwoot-Delivery": f"d-{ts}-{len(raw)}"}
    h.update(headers or {})
    return requests.post(f"{b.web.url}{path}", data=raw, headers=h, timeout=5)


def _nothing_recorded(b) -> bool:
    return db_manager.count_events(b.conn) == 0 and outbox.list_jobs(b.conn) == []


def test_valid_signature_queues_the_agent_reply(bridge):
    answer = _post(bridge, _reply_payload())
    assert answer.status_code == 200 and answer.json()["queued"] is True
    (job,) = outbox.list_jobs(bridge.conn)
    assert job["kind"] == "chatwoot.forward_reply"
    assert job["dedupe_key"] == "chatwoot-msg:9876"
    assert job["ordering_key"] == "cw-out:42"
    assert job["payload"]["content"].startswith("Olá! Sim, é bivolt")
    assert job["payload"]["attachments"][0]["filename"] == "etiqueta.jpg"


def test_alias_path_of_the_seed_works(bridge):
    assert _post(bridge, _reply_payload(), path="/webhook").status_code == 200
    assert len(outbox.list_jobs(bridge.conn)) == 1


@pytest.mark.parametrize("case", ["bad_signature", "wrong_secret", "stale", "future", "missing",
                                  "tampered_body"])
def test_bad_or_stale_signature_is_401_and_records_nothing(bridge, case):
    body = _reply_payload()
    raw = dumps(body)
    ts = int(bridge.clock())
    headers = {}
    if case == "bad_signature":
        headers = {"X-Chatwoot-Signature": "sha256=" + "0" * 64}
    elif case == "wrong_secret":
        headers = {"X-Chatwoot-Signature": sign("other-secret", ts, raw)}
    elif case == "stale":
        ts -= 301
    elif case == "future":
        ts += 301
    elif case == "missing":
        answer = requests.post(f"{bridge.web.url}/webhooks/chatwoot", data=raw,
                               headers={"Content-Type": "application/json"}, timeout=5)
        assert answer.status_code == 401
        assert _nothing_recorded(bridge)
        return
    if case == "tampered_body":
        good = sign(WEBHOOK_SECRET, ts, raw)
        raw = raw.replace(b"bivolt", b"BIVOLT")
        headers = {"X-Chatwoot-Signature": good}
    answer = _post(bridge, body, ts=ts, headers=headers, raw=raw)
    assert answer.status_code == 401
    assert answer.json()["error"] == "invalid_signature"
    assert _nothing_recorded(bridge)


def test_body_only_hmac_like_the_seed_is_refused(bridge):
    """The seed project signed the body alone; Chatwoot signs "<timestamp>.<body>"."""
    import hashlib
    import hmac

    raw = dumps(_reply_payload())
    body_only = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    answer = _post(bridge, None, raw=raw, headers={"X-Chatwoot-Signature": body_only})
    assert answer.status_code == 401 and _nothing_recorded(bridge)


@pytest.mark.parametrize("name,changes,reason", [
    ("message_created_private_note", {}, "private"),
    ("message_created_incoming", {}, "message_type:incoming"),
    ("message_created_outgoing_with_attachment", {"message_type": "activity"},
     "message_type:activity"),
    ("message_created_outgoing_with_attachment", {"message_type": "template", "sender": None},
     "message_type:template"),
    ("message_created_outgoing_with_attachment", {"event": "message_updated"},
     "event:message_updated"),
    ("message_created_outgoing_with_attachment", {"source_id": "meli:msg:abc"}, "echo"),
    ("message_created_outgoing_with_attachment",
     {"content_attributes": {"ponte_origin": "mercadolivre"}}, "echo"),
    ("message_created_outgoing_with_attachment", {"inbox": {"id": 99, "name": "Outra"}},
     "other_inbox"),
    ("message_created_outgoing_with_attachment",
     {"content_attributes": {"automation_rule_id": 3}}, "automation"),
    ("message_created_outgoing_with_attachment",
     {"content_attributes": {"deleted": True}}, "deleted"),
    ("conversation_status_changed", {}, "event:conversation_status_changed"),
])
def test_events_that_must_never_reach_mercado_livre(bridge, name, changes, reason):
    body = copy.deepcopy(_payload(name))
    body.update(changes)
    answer = _post(bridge, body)
    assert answer.status_code == 200
    assert answer.json()["ignored"] == reason
    assert outbox.list_jobs(bridge.conn) == []


@pytest.mark.parametrize("changes,answer_key,value", [
    ({"content_attributes": {"deleted": True}}, "deleted", True),
    ({"content_attributes": '{"deleted": true}'}, "deleted", True),  # a JSON string, too
    ({"content_attributes": {"deleted": True}, "inbox": {"id": 99}}, "ignored",
     "event:message_updated"),
    ({"content_attributes": {"deleted": True}, "private": True}, "ignored",
     "event:message_updated"),
    ({"content_attributes": '{"deleted": tru'}, "ignored", "event:message_updated"),
    ({"content_attributes": {"deleted": True}, "conversation": "abc"}, "ignored",
     "event:message_updated"),
], ids=["deleted", "deleted-as-json-text", "other-inbox", "private", "bad-json-text",
        "no-conversation"])
def test_message_updated_is_read_once_as_a_deletion_or_ignored(bridge, changes, answer_key,
                                                               value):
    # GIVEN Chatwoot's message_updated for the agent's public reply 9876 (conversation 42)
    body = _reply_payload(event="message_updated", **changes)
    # WHEN it is classified, and when it reaches the webhook
    event, reason = chatwoot_api.classify_chatwoot_event(body, (7,))
    answer = _post(bridge, body)
    # THEN a deletion in our inbox is recorded for the reply's job to find; the rest ignored
    assert answer.status_code == 200 and answer.json()[answer_key] == value
    deleted = db_manager.event_recorded(bridge.conn, deleted_event_key(9876))
    assert deleted is (answer_key == "deleted")
    if deleted:
        assert (event, reason) == (chatwoot_api.DeletedMessage(9876, 42), "message_deleted")
    else:
        assert (event, reason) == (None, "event:message_updated")
    assert outbox.list_jobs(bridge.conn) == []


def test_message_updated_with_attributes_nested_too_deep_is_malformed_not_a_500(bridge):
    # content_attributes as JSON text deeper than Python parses: the deletion check raises
    # RecursionError, inside the one classification the route guards.
    body = _reply_payload(event="message_updated", content_attributes="[" * 100000)
    answer = _post(bridge, body)
    assert answer.status_code == 200 and answer.json()["ignored"] == "malformed"
    assert _nothing_recorded(bridge)


def test_private_note_is_ignored_even_when_its_conversation_shows_a_public_message(bridge):
    body = _payload("message_created_private_note")
    # conversation.messages[0] is the previous *public* agent message (chatwoot #14023)
    assert body["conversation"]["messages"][0]["private"] is False
    assert _post(bridge, body).json()["ignored"] == "private"


def test_invalid_json_with_valid_signature_still_gets_200(bridge):
    answer = _post(bridge, None, raw=b"{not json")
    assert answer.status_code == 200 and outbox.list_jobs(bridge.conn) == []


def test_url_token_mode_for_chatwoot_versions_that_do_not_sign(make_settings, serve, clock):
    from tests.meli_support import Bridge

    b = Bridge(make_settings, serve, clock, CHATWOOT_WEBHOOK_SECRET="",
               CHATWOOT_WEBHOOK_TOKEN="url-token-123456")
    raw = dumps(_reply_payload())
    bad = requests.post(f"{b.web.url}/webhooks/chatwoot?token=wrong", data=raw, timeout=5,
                        headers={"Content-Type": "application/json"})
    assert bad.status_code == 401
    good = requests.post(f"{b.web.url}/webhooks/chatwoot/url-token-123456", data=raw, timeout=5,
                         headers={"Content-Type": "application/json"})
    assert good.status_code == 200 and good.json()["queued"] is True


def test_our_own_messages_echoed_by_chatwoot_are_not_forwarded(bridge):
    """End to end: ponte creates the question message and later a private note; Chatwoot
    sends both back signed; neither becomes a job."""
    bridge.ask("Tem desconto no pix?")
    bridge.poll()
    conv = bridge.conversations()[0]
    incoming = conv["all_messages"][0]
    assert bridge.echo_of(incoming["id"])["delivered_status"] == 200
    note = bridge.agent_replies(conv["id"], "nota interna: cliente VIP", private=True)
    assert note["delivered_status"] == 200
    assert outbox.list_jobs(bridge.conn, kind="chatwoot.forward_reply") == []


def test_signature_helpers_match_chatwoots_ruby_formula():
    # OpenSSL::HMAC.hexdigest('SHA256', secret, "#{ts}.#{body}"), computed outside Python:
    # printf '%s' '1778421801.{"event":"message_created"}' | openssl dgst -sha256 -hmac s3cr3t
    raw = b'{"event":"message_created"}'
    expected = "sha256=cd3eae11a4071263f981444c70eef78380d95b961faeb02cfc498f7ba5a04e25"
    assert chatwoot_api.sign_chatwoot_body("s3cr3t", 1778421801, raw) == expected
    assert chatwoot_api.verify_chatwoot_signature("s3cr3t", "1778421801", raw, expected,
                                                  now=1778421801 + 299)
    assert not chatwoot_api.verify_chatwoot_signature("s3cr3t", "1778421801", raw, expected,
                                                      now=1778421801 + 301)
    assert not chatwoot_api.verify_chatwoot_signature("", "1778421801", raw, expected,
                                                      now=1778421801)


def test_each_inbox_may_have_its_own_secret(make_settings, serve, clock):
    from tests.meli_support import Bridge

    b = Bridge(make_settings, serve, clock,
               CHATWOOT_WEBHOOK_SECRET="secret-of-questions, secret-of-sales")
    assert _post(b, _reply_payload(), secret="secret-of-sales").status_code == 200
    assert _post(b, _reply_payload(id=9877), secret="secret-of-questions").status_code == 200
    assert _post(b, _reply_payload(id=9878), secret="other").status_code == 401
    assert len(outbox.list_jobs(b.conn)) == 2


@pytest.mark.parametrize("changes", [
    {"sender": ["user"]},
    {"conversation": "abc"},
    {"inbox": "7"},
    {"account": "x"},
    {"attachments": "zzz"},
    {"content": 123},
    {"id": True},
    {"id": 11.7},
    {"id": 10**30},
    {"id": "abc"},
    {"conversation": {"id": 3.5, "inbox_id": 7}},
], ids=lambda c: "-".join(f"{k}={str(v)[:8]}" for k, v in c.items()))
def test_signed_body_with_wrong_types_is_ignored_as_malformed_and_records_nothing(bridge,
                                                                                  changes):
    body = _reply_payload(**changes)
    answer = _post(bridge, body)
    assert answer.status_code == 200
    assert answer.json()["ignored"] == "malformed"
    assert _nothing_recorded(bridge)


@pytest.mark.parametrize("where,changes", [
    ("attachment", {"id": "abc"}),
    ("attachment", {"file_size": "big"}),
    ("conversation", {"labels": 5}),
    ("conversation", {"custom_attributes": [1]}),
])
def test_odd_optional_fields_of_a_signed_reply_do_not_break_it(bridge, where, changes):
    body = _reply_payload()
    if where == "attachment":
        body["attachments"][0].update(changes)
    else:
        body["conversation"].update(changes)
    answer = _post(bridge, body)
    assert answer.status_code == 200 and answer.json()["queued"] is True
    (job,) = outbox.list_jobs(bridge.conn)
    assert isinstance(job["payload"]["custom_attributes"], dict)
    assert all(isinstance(x, str) for x in job["payload"]["labels"])
    (attachment,) = job["payload"]["attachments"]
    assert isinstance(attachment["id"], int)
    assert attachment["file_size"] is None or isinstance(attachment["file_size"], int)


def test_deeply_nested_signed_body_is_ignored_not_a_500(bridge):
    # GIVEN a correctly signed body nested deeper than Python's JSON parser goes
    raw = b"[" * 100000 + b"]" * 100000
    ts = int(bridge.clock())
    headers = {"Content-Type": "application/json", "X-Chatwoot-Timestamp": str(ts),
               "X-Chatwoot-Signature": sign(WEBHOOK_SECRET, ts, raw)}
    # WHEN it reaches the webhook
    answer = requests.post(f"{bridge.web.url}/webhooks/chatwoot", data=raw, headers=headers,
                           timeout=10)
    # THEN 200 "invalid_json", nothing recorded or queued
    assert answer.status_code == 200
    assert answer.json()["ignored"] == "invalid_json"
    assert bridge.jobs() == []
    assert bridge.conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
