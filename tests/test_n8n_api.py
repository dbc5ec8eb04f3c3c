"""Reading n8n's answers and validating /send-response bodies (pure functions)."""
from __future__ import annotations

import pytest

from n8n_api import extract_answer, parse_send_response


@pytest.mark.parametrize("answer,texts", [
    ({"output": "oi"}, ["oi"]),
    ({"answer": "a"}, ["a"]), ({"text": "t"}, ["t"]), ({"response": "r"}, ["r"]),
    ({"response_text": "rt"}, ["rt"]), ({"message": "m"}, ["m"]),
    ({"output": ["um", "dois"]}, ["um", "dois"]),
    ([{"output": "primeiro item"}], ["primeiro item"]),
    ("texto puro", ["texto puro"]),
    ({"output": {"text": "aninhado"}}, ["aninhado"]),
    ({}, None), (None, None), ("", None), ({"output": "   "}, None),
    ({"message": "Workflow was started"}, None),
    ({"message": "Workflow executed successfully but the last node did not return any data"},
     None),
])
def test_extract_answer(answer, texts):
    assert extract_answer(answer) == texts


def test_parse_send_response_accepts_aliases_and_flags():
    a = parse_send_response({"contact_id": 5, "output": "oi", "should_handoff": "true"})
    assert a.contact_id == "5" and a.texts == ("oi",) and a.should_handoff and a.should_send
    b = parse_send_response({"conversation_id": "1874", "should_send": False,
                             "should_handoff": True})
    assert b.texts == () and not b.should_send
    # read like a synchronous answer: an AI Agent node's item passed along whole
    c = parse_send_response({"contact_id": 5, "output": {"text": ["oi", "tudo bem?"]}})
    assert c.texts == ("oi", "tudo bem?")


@pytest.mark.parametrize("body", [[], {"response_text": "x"}, {"conversation_id": "1"},
                                  {"conversation_id": "1", "response_text": "  "}])
def test_parse_send_response_rejects(body):
    with pytest.raises(ValueError):
        parse_send_response(body)
