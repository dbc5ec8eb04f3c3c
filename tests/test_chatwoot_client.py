"""ChatwootClient against the stand-in, and the stand-in's OpenAPI check itself (so the
`assert_spec_clean()` of the flow tests is not vacuous)."""
from __future__ import annotations

import pytest
import requests

from chatwoot_api import ChatwootClient, ChatwootError
from standins import chatwoot as standin_chatwoot
from tests.meli_support import PNG_BYTES, SALES_INBOX, bridge, messages_of  # noqa: F401


@pytest.fixture
def chatwoot(serve):
    served = serve(standin_chatwoot.create_app())
    return served, ChatwootClient(served.url, standin_chatwoot.DEFAULT_TOKEN, 1)


def _state(served) -> dict:
    return requests.get(f"{served.url}/_standin/state", timeout=5).json()


def test_requests_that_break_the_openapi_spec_are_refused_and_listed(chatwoot):
    served, _client = chatwoot
    headers = {"Api-Access-Token": standin_chatwoot.DEFAULT_TOKEN}
    bad = requests.post(f"{served.url}/api/v1/accounts/1/contacts", json={"name": "sem caixa"},
                        headers=headers, timeout=5)
    assert bad.status_code == 422
    wrong_type = requests.post(f"{served.url}/api/v1/accounts/1/contacts/filter",
                               json={"payload": [{"attribute_key": "identifier",
                                                  "filter_operator": "equal_to",
                                                  "values": ["x"], "query_operator": None}]},
                               headers=headers, timeout=5)
    assert wrong_type.status_code == 422
    violations = _state(served)["spec_violations"]
    assert any("'inbox_id' is a required property" in v for v in violations)
    assert any("query_operator" in v or "None is not" in v for v in violations)


def test_underscore_token_header_is_dropped_like_behind_nginx(chatwoot):
    served, _client = chatwoot
    answer = requests.post(f"{served.url}/api/v1/accounts/1/contacts/filter",
                           json={"payload": []},
                           headers={"api_access_token": standin_chatwoot.DEFAULT_TOKEN},
                           timeout=5)
    assert answer.status_code == 401


def test_contact_identifier_taken_is_found_and_reused(chatwoot):
    served, client = chatwoot
    first = client.create_contact(7, "COMPRADOR", "meli:42", "meli:42")
    with pytest.raises(ChatwootError) as err:
        client.create_contact(8, "COMPRADOR", "meli:42", "meli:42")
    assert err.value.status == 422 and not err.value.retryable
    assert client.find_contact_by_identifier("meli:42")["id"] == first["contact"]["id"]
    client.create_contact_inbox(first["contact"]["id"], 8, "meli:42")
    assert {ci["inbox_id"] for ci in _state(served)["contact_inboxes"]} == {7, 8}
    assert _state(served)["spec_violations"] == []


def test_download_stops_at_the_size_limit(chatwoot):
    served, client = chatwoot
    contact = client.create_contact(7, "C", "meli:1", "meli:1")["contact"]
    conv = client.create_conversation(7, contact["id"], "meli:1")
    message = client.create_message(conv["id"], "foto", message_type="incoming",
                                    attachments=[("a.png", PNG_BYTES * 100, "image/png")])
    url = message["attachments"][0]["data_url"]
    data, content_type = client.download(url, max_bytes=len(PNG_BYTES) * 100)
    assert data == PNG_BYTES * 100 and content_type == "image/png"
    with pytest.raises(ChatwootError) as err:
        client.download(url, max_bytes=len(PNG_BYTES) * 10)
    assert err.value.status == 413 and not err.value.retryable


def test_attachment_over_25_mb_is_not_sent_and_the_text_is(bridge):
    sale = bridge.sale(buyer_id=801)
    bridge.buyer_writes(sale["conversation_id"], "Manda o catálogo?")
    bridge.poll()
    conv = bridge.conversations(SALES_INBOX)[0]
    big = b"%PDF-1.4\n" + b"0" * (25 * 1024 * 1024)
    bridge.agent_replies(conv["id"], "Segue o link do catálogo: loja.example/catalogo",
                         attachments=[("catalogo.pdf", big, "application/pdf")])
    bridge.drain()
    state = bridge.ml_state()
    (sent,) = state["sent_messages"]
    assert sent["attachments"] == [] and state["uploaded"] == {}
    notes = [m for m in messages_of(bridge.conversations(SALES_INBOX)[0]) if m["private"]]
    assert any("catalogo.pdf (maior que 25 MB)" in n["content"] for n in notes)


def test_standin_failure_after_applying_answers_with_the_asked_status(chatwoot):
    """`apply: true` processes the call and loses only its answer: a JSON 503, not Flask's
    HTML 500 for an after_request that returned a tuple."""
    served, client = chatwoot
    requests.post(f"{served.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/contacts", "method": "POST",
                        "status": 503, "apply": True}, timeout=5)
    headers = {"Api-Access-Token": standin_chatwoot.DEFAULT_TOKEN}
    lost = requests.post(f"{served.url}/api/v1/accounts/1/contacts",
                         json={"name": "Ana", "inbox_id": SALES_INBOX}, headers=headers,
                         timeout=5)
    assert lost.status_code == 503
    assert "standin failure" in lost.json()["error"]
    assert len(_state(served)["contacts"]) == 1
