"""Kommo's form bodies decoded by ponte's own parser, checked against the standard library's
`urllib.parse.parse_qsl` (what werkzeug and browsers agree on)."""
from __future__ import annotations

import random
import urllib.parse

import pytest

import kommo_api
from kommo_api import KommoParseError, form_fields, key_parts, parse_kommo_webhook
from tests.conftest import payload_text

KEYS = ["account[id]", "account[subdomain]", "message[add][0][text]", "message[add][0][id]",
        "message[add][1][author][name]", "leads[note][0][note][text]", "add[0][chat_id]",
        "message[add][0][attachment][link]", "x", "a_b[]"]
VALUE_CHARS = "aZ09 +&=%/?#[]çãé😀\n\t"


def _random_body(rng: random.Random) -> str:
    pairs = [(rng.choice(KEYS), "".join(rng.choice(VALUE_CHARS) for _ in range(rng.randint(0, 12))))
             for _ in range(rng.randint(1, 15))]
    body = urllib.parse.urlencode(pairs, quote_via=rng.choice([urllib.parse.quote,
                                                               urllib.parse.quote_plus]))
    if rng.random() < 0.2:
        body = body.replace("%5B", "[").replace("%5D", "]")  # brackets sent unescaped
    if rng.random() < 0.2:
        body += "&&" + rng.choice(KEYS)  # empty pair, pair without '='
    return body


def test_fields_decode_exactly_like_the_standard_library():
    rng = random.Random(7)
    for _ in range(500):
        body = _random_body(rng)
        expected = [(key_parts(k), v)
                    for k, v in urllib.parse.parse_qsl(body, keep_blank_values=True)]
        assert form_fields(body.encode()) == expected, body


def test_invalid_utf8_escapes_are_replaced_like_the_standard_library():
    body = "account[id]=1&message[add][0][text]=ol%E1%20%C3%A9"
    assert form_fields(body.encode()) == [
        (("account", "id"), "1"), (("message", "add", "0", "text"), "ol\ufffd é")]


@pytest.mark.parametrize("key", ["", "[x]", "a[b", "a]b[", "1a[b]", "a b", "a[b]c"])
def test_keys_not_in_php_style_are_refused(key):
    with pytest.raises(KommoParseError, match="malformed key"):
        form_fields(f"{urllib.parse.quote(key)}=1".encode())


def test_split_keys_are_remembered_up_to_a_bound(monkeypatch):
    monkeypatch.setattr(kommo_api, "_KEY_PARTS_CACHE", {})
    monkeypatch.setattr(kommo_api, "_KEY_PARTS_CACHE_MAX", 50)
    names = ("".join(chr(97 + (i // 26 ** d) % 26) for d in range(3)) for i in range(500))
    form_fields("&".join(f"{name}[a]=1" for name in names).encode())
    assert len(kommo_api._KEY_PARTS_CACHE) == 50


def test_real_bodies_parse_to_the_same_events_as_before():
    hook = parse_kommo_webhook(payload_text("kommo/add_message_incoming_text.form").strip()
                               .encode())
    [message] = hook.messages
    assert hook.account_id and message.from_customer and message.text
    note = parse_kommo_webhook(payload_text("kommo/note_lead_pausar.form").strip().encode())
    assert note.notes[0].text.lower().startswith("#pausar")
