"""POST /webhooks/mercadolivre: always 200 at once, never a call to Mercado Livre inside the
request, one job per notification id, other sellers' and unknown topics ignored."""
from __future__ import annotations

import json

import requests

import outbox
from tests.conftest import PAYLOADS
from tests.meli_support import SELLER, bridge  # noqa: F401


def _payload(name: str) -> dict:
    return json.loads((PAYLOADS / "mercadolivre" / f"{name}.json").read_text(encoding="utf-8"))


def _post(b, body):
    return requests.post(f"{b.web.url}/webhooks/mercadolivre", json=body, timeout=5)


def test_notification_is_recorded_without_calling_mercado_livre(bridge):
    body = dict(_payload("notification_1"), user_id=str(SELLER))
    requests.post(f"{bridge.ml.url}/_standin/calls/clear")
    answer = _post(bridge, body)
    assert answer.status_code == 200 and answer.json()["queued"] is True
    assert bridge.ml_state()["calls"] == []  # fetched later by the poller, with our token
    (job,) = outbox.list_jobs(bridge.conn)
    assert job["kind"] == "ml.fetch_question" and job["payload"] == {"question_id": "13012345678"}
    assert job["dedupe_key"] == "ml-notif:f9f08571-1f65-4c46-9e0a-c0f43faa1557"


def test_repeated_notification_makes_one_job(bridge):
    body = dict(_payload("notification_2"), user_id=SELLER)
    for attempt in (1, 2, 3):
        assert _post(bridge, dict(body, attempts=attempt)).status_code == 200
    (job,) = outbox.list_jobs(bridge.conn)
    assert job["kind"] == "ml.fetch_message"
    assert job["payload"] == {"message_id": "fd1d2e37ad004ede9e0bf25d1215002d"}


def test_other_seller_unknown_topic_and_garbage_get_200_and_no_job(bridge):
    assert _post(bridge, dict(_payload("notification_1"), user_id="1")).json()["ignored"] == \
        "other_user"
    assert _post(bridge, dict(_payload("notification_1"), topic="items",
                              resource="/items/MLB1", user_id=str(SELLER))).json()["ignored"] \
        == "topic"
    garbage = requests.post(f"{bridge.web.url}/webhooks/mercadolivre", data=b"not json",
                            headers={"Content-Type": "application/json"}, timeout=5)
    assert garbage.status_code == 200 and garbage.json()["ignored"] == "invalid_json"
    assert outbox.list_jobs(bridge.conn) == []


def test_notification_for_a_question_that_is_gone_ends_quietly(bridge):
    _post(bridge, {"_id": "gone-1", "resource": "/questions/999", "user_id": str(SELLER),
                   "topic": "questions"})
    bridge.drain()
    (job,) = outbox.list_jobs(bridge.conn)
    assert job["status"] == "done" and job["result"] == {"status": "not_found"}
    assert bridge.conversations() == []


def test_orders_v2_notification_syncs_the_sale_messages(bridge):
    sale = bridge.sale(buyer_id=901)
    bridge.buyer_writes(sale["conversation_id"], "Pode enviar hoje?")
    _post(bridge, {"_id": "o-901", "resource": f"/orders/{sale['order_id']}",
                   "user_id": SELLER, "topic": "orders_v2"})
    bridge.drain()
    (conv,) = bridge.conversations()
    assert [m["content"] for m in conv["all_messages"] if not m["private"]] == [
        "Pode enviar hoje?"]


def test_resource_id_too_large_for_an_id_is_ignored(bridge):
    body = dict(_payload("notification_1"), user_id=str(SELLER),
                resource="/questions/99999999999999999999999999")
    assert _post(bridge, body).json()["ignored"] == "topic"
    assert outbox.list_jobs(bridge.conn) == []


def test_deeply_nested_notification_body_is_ignored_not_a_500(bridge):
    raw = b"[" * 100000 + b"]" * 100000
    answer = requests.post(f"{bridge.web.url}/webhooks/mercadolivre", data=raw,
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 200
    assert bridge.jobs() == []
