"""Issue 14, across HTTP, on bridge B's routes and questions: a signed Chatwoot event with text no
store can hold, sane delivery ids, replies deleted in Chatwoot before they went (answers, sale
messages, a split message midway); Mercado Livre notifications without `user_id` or with ids in
non-ASCII digits; 25 questions when Mercado Livre pages at 10; the OAuth start behind ADMIN_TOKEN.
Helpers are test_hardening's."""
from __future__ import annotations

import json

import pytest
import requests

import meli_store
from tests.bridge_a_harness import ADMIN
from tests.meli_support import (QUESTIONS_INBOX, SALES_INBOX, WEBHOOK_SECRET, Bridge,  # noqa: F401
                                bridge, messages_of, sign)
from tests.test_hardening import (UNSTORABLE, _cw_reply, _notification, _post_chatwoot, _with,
                                  snapshot)


def _delete(b: Bridge, message_id: int) -> dict:
    answer = requests.post(f"{b.cw.url}/_standin/delete/{message_id}",
                           json={"deliver": True, "timestamp": int(b.clock())}, timeout=10)
    return answer.json()


@pytest.mark.parametrize("text", UNSTORABLE)
def test_signed_chatwoot_event_with_unstorable_text_is_ignored_with_200(bridge, text):
    raw = _with(_cw_reply(), "event", text)
    before = snapshot(bridge.conn)
    answer = _post_chatwoot(bridge, raw)
    assert answer.status_code == 200 and answer.json()["ignored"] == "unstorable_text"
    assert snapshot(bridge.conn) == before


def test_notification_without_user_id_is_ignored(bridge):
    before = snapshot(bridge.conn)
    answer = requests.post(f"{bridge.web.url}/webhooks/mercadolivre",
                           json=_notification(user_id=None), timeout=5)
    assert answer.status_code == 200 and answer.json()["ignored"] == "no_user_id"
    assert snapshot(bridge.conn) == before
    answer = requests.post(f"{bridge.web.url}/webhooks/mercadolivre",
                           json=_notification(user_id=123), timeout=5)
    assert answer.json()["ignored"] == "other_user" and snapshot(bridge.conn) == before


def test_25_questions_reach_chatwoot_when_mercado_livre_pages_at_10(bridge):
    # GIVEN a Mercado Livre that answers at most 10 items a page, whatever limit is asked
    bridge.ml_post("/_standin/options", {"max_page_size": 10})
    asked = {bridge.ask(f"pergunta {n}", buyer_id=3000 + n) for n in range(25)}
    # WHEN the poller runs
    bridge.poll()
    # THEN every question has its conversation
    imported = {int(c["custom_attributes"]["meli_question_id"])
                for c in bridge.conversations(QUESTIONS_INBOX)}
    assert imported == asked
    offsets = [int(c["query"]["offset"]) for c in bridge.ml_state()["calls"]
               if c["path"] == "/questions/search"]
    assert offsets[:3] == [0, 10, 20]


def test_oauth_start_needs_the_admin_token_and_writes_nothing_without_it(bridge):
    url = f"{bridge.web.url}/oauth/mercadolivre/start"
    before = snapshot(bridge.conn)
    # a browser is sent to the console (login, then the "Conectar Mercado Livre" button)
    for _ in range(3):
        page = requests.get(url, allow_redirects=False, timeout=5)
        assert page.status_code == 303 and page.headers["Location"].endswith("/admin/conexoes")
    wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, allow_redirects=False,
                         timeout=5)
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert requests.get(url, headers={"Authorization": "Basic eDp5"}, allow_redirects=False,
                        timeout=5).status_code == 401
    assert snapshot(bridge.conn) == before
    # with the token the seller goes to Mercado Livre (and the state is remembered)
    start = requests.get(url, headers={"Authorization": f"Bearer {ADMIN}"},
                         allow_redirects=False, timeout=5)
    assert start.status_code == 302 and "/authorization?" in start.headers["Location"]
    assert snapshot(bridge.conn) != before


def test_answer_deleted_in_chatwoot_before_it_went_is_not_published(bridge):
    qid = bridge.ask("Tem na cor azul?")
    bridge.poll()
    (conv,) = bridge.conversations(QUESTIONS_INBOX)
    # GIVEN the agent answered, and deleted the answer before ponte sent it
    hook = bridge.agent_replies(conv["id"], "Temos sim!")
    assert hook["delivered_status"] == 200
    deleted = _delete(bridge, hook["message_id"])
    assert deleted["delivered_status"] == 200 and deleted["payload"]["event"] == "message_updated"
    # WHEN the poller runs the reply's job
    bridge.drain()
    # THEN nothing was published and the question is still open for another answer
    state = bridge.ml_state()
    assert state["answers"] == []
    assert state["questions"][str(qid)]["status"] == "UNANSWERED"
    assert meli_store.get_answer(bridge.conn, qid) is None
    again = bridge.agent_replies(conv["id"], "Temos sim, na cor azul!")
    assert again["delivered_status"] == 200
    bridge.drain()
    assert [a["text"] for a in bridge.ml_state()["answers"]] == ["Temos sim, na cor azul!"]


def test_sale_message_deleted_in_chatwoot_before_it_went_is_not_sent(bridge):
    pack = bridge.sale(buyer_id=8806)["conversation_id"]
    bridge.buyer_writes(pack, "Chegou quebrado")
    bridge.poll()
    (conv,) = bridge.conversations(SALES_INBOX)
    hook = bridge.agent_replies(conv["id"], "Mensagem errada, era para outro cliente")
    _delete(bridge, hook["message_id"])
    bridge.drain()
    assert bridge.ml_state()["sent_messages"] == []
    # the agent's next reply goes as usual
    bridge.agent_replies(conv["id"], "Vamos trocar, enviaremos a etiqueta.")
    bridge.drain()
    assert [m["text"] for m in bridge.ml_state()["sent_messages"]] == [
        "Vamos trocar, enviaremos a etiqueta."]


def test_split_message_deleted_midway_stops_and_tells_the_agent(bridge):
    pack = bridge.sale(buyer_id=8808)["conversation_id"]
    bridge.buyer_writes(pack, "Explica?")
    bridge.poll()
    (conv,) = bridge.conversations(SALES_INBOX)
    text = " ".join(f"Parte da explicação número {n}." for n in range(30))
    # GIVEN the first of three parts went, and Mercado Livre failed the second
    bridge.fail_ml(f"/messages/packs/{pack}/sellers", 500, count=1, method="POST", after=1)
    hook = bridge.agent_replies(conv["id"], text)
    bridge.drain()
    assert len(bridge.ml_state()["sent_messages"]) == 1
    # WHEN the agent deletes the message before the retry
    _delete(bridge, hook["message_id"])
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN the rest is not sent, and a note says what the buyer already has
    assert len(bridge.ml_state()["sent_messages"]) == 1
    (conv,) = bridge.conversations(SALES_INBOX)
    notes = [m["content"] for m in messages_of(conv) if m["private"]]
    assert any("apagada no Chatwoot depois de 1 de 3 partes" in n for n in notes), notes


@pytest.mark.parametrize("resource", ["/questions/１２３", "/questions/²", "/orders/１２"])
def test_notification_resource_ids_are_ascii_digits(bridge, resource):
    before = snapshot(bridge.conn)
    topic = "questions" if resource.startswith("/questions") else "orders_v2"
    answer = requests.post(f"{bridge.web.url}/webhooks/mercadolivre",
                           json=_notification(resource=resource, topic=topic), timeout=5)
    assert answer.status_code == 200 and answer.json()["ignored"] == "topic"
    assert snapshot(bridge.conn) == before


def test_chatwoot_delivery_id_is_kept_only_when_sane(bridge):
    body = _cw_reply()
    body["event"] = "conversation_status_changed"  # ignored, recorded under its delivery id
    for delivery in ("5b1f3c1e-1c2a-4f5e-9d8c-1a2b3c4d5e6f", "x" * 5000, "a b"):
        raw = json.dumps({**body, "id": len(delivery)}).encode()
        ts = int(bridge.clock())
        answer = requests.post(f"{bridge.web.url}/webhooks/chatwoot", data=raw, timeout=5,
                               headers={"Content-Type": "application/json",
                                        "X-Chatwoot-Timestamp": str(ts),
                                        "X-Chatwoot-Signature": sign(WEBHOOK_SECRET, ts, raw),
                                        "X-Chatwoot-Delivery": delivery})
        assert answer.status_code == 200
    keys = [r[0] for r in bridge.conn.execute("SELECT dedupe_key FROM events ORDER BY id")]
    assert keys[0] == "chatwoot-delivery:5b1f3c1e-1c2a-4f5e-9d8c-1a2b3c4d5e6f"
    assert len(keys) == 3 and all(len(k) == len("chatwoot-delivery:") + 32 for k in keys[1:])
