"""Pure functions of the Mercado Livre and Chatwoot modules, on the reference's sample bodies."""
from __future__ import annotations

import json

import pytest

import chatwoot_api
import mercado_livre_api as ml
import meli_texts
from tests.conftest import PAYLOADS


def _ml(name: str):
    return json.loads((PAYLOADS / "mercadolivre" / f"{name}.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("body,expected", [
    ({"_id": "a", "topic": "questions", "resource": "/questions/13012345678", "user_id": 419059118},
     ("questions", "13012345678", "419059118")),
    ({"id": "b", "topic": "messages", "resource": "fd1d2e37ad004ede9e0bf25d1215002d",
      "user_id": "779432305", "actions": ["created"]},
     ("messages", "fd1d2e37ad004ede9e0bf25d1215002d", "779432305")),
    ({"_id": "c", "topic": "orders_v2", "resource": "/orders/2000009713473608", "user_id": 1},
     ("orders_v2", "2000009713473608", "1")),
])
def test_notifications_of_the_topics_we_use(body, expected):
    note = ml.parse_notification(body)
    assert (note.topic, note.resource_id, note.user_id) == expected


@pytest.mark.parametrize("body", [None, [], {}, {"topic": "items", "resource": "/items/MLB1"},
                                  {"topic": "questions", "resource": "/questions/abc"},
                                  {"topic": "questions", "resource": "https://evil/questions/1"}])
def test_notifications_we_ignore(body):
    assert ml.parse_notification(body) is None


def test_notification_without_id_gets_a_stable_one():
    body = {"topic": "questions", "resource": "/questions/1", "sent": "2026-03-10T18:22:32Z"}
    assert ml.parse_notification(body).notification_id == \
        ml.parse_notification(dict(body)).notification_id


def test_pack_resources_in_every_documented_shape():
    assert ml.parse_pack_resource("/packs/2000006556183755/sellers/779432305") == (
        "2000006556183755", "779432305")
    assert ml.parse_pack_resource("/packs/1/seller/2") == ("1", "2")
    assert ml.parse_pack_resource("/packs/1/sellers/2/conversations/post_sale") == ("1", "2")
    assert ml.parse_pack_resource("/orders/1") is None


def test_buyer_of_a_question_in_both_v4_shapes():
    assert ml.buyer_id_of_question(_ml("question")) == "1944693439"
    assert ml.buyer_id_of_question({"id": 1, "buyer_id": 55}) == "55"


def test_reply_recipient_follows_the_latest_customer_side_sender():
    page = _ml("pack_messages")
    seller = "779432305"
    # the sample is agent-mediated: the buyer's message came from the MLB agent
    assert ml.reply_recipient(page["messages"], seller, "MLB") == "3037675074"
    assert ml.is_agent_mediated(page, "MLB")
    direct = [{"from": {"user_id": 6427433}, "message_date": {"created": "2026-01-01T00:00:00Z"}}]
    assert ml.reply_recipient(direct, seller, "MLB") == "6427433"
    assert ml.reply_recipient([], seller, "MLB", buyer_id="6427433") == "3037675074"
    assert ml.reply_recipient([], seller, "MLA", buyer_id="6427433") == "6427433"
    # no buyer known and no messaging agent on the site: no guessed recipient
    assert ml.reply_recipient([], seller, "MEC") == ""


def test_split_message_keeps_every_character_in_order_and_under_the_limit():
    text = ("Primeiro parágrafo curto.\n\n" + "palavra " * 90 + "\n\n" +
            "x" * 800 + " fim")
    parts = ml.split_message(text)
    assert all(0 < len(p) <= 350 for p in parts)
    assert "".join(parts).replace(" ", "").replace("\n", "") == \
        text.replace(" ", "").replace("\n", "")
    assert ml.split_message("curto") == ["curto"]
    assert ml.split_message("a" * 350) == ["a" * 350]
    assert len(ml.split_message("a" * 351)) == 2


def test_attachment_types_mercado_livre_accepts():
    assert ml.attachment_mime("nota.pdf", "application/pdf") == "application/pdf"
    assert ml.attachment_mime("foto.JPG", "") == "image/jpeg"
    assert ml.attachment_mime("foto", "image/jpg") == "image/jpeg"
    assert ml.attachment_mime("s3-object-without-extension", "image/png") == "image/png"
    assert ml.attachment_mime("planilha.xlsx", "application/vnd.ms-excel") is None
    assert ml.attachment_mime("video.mp4", "video/mp4") is None
    assert ml.attachment_mime("arquivo.bin", "application/octet-stream") is None


def test_authorization_url_per_site_with_pkce():
    verifier, challenge = ml.pkce_pair()
    assert 43 <= len(verifier) <= 128 and "=" not in challenge
    url = ml.authorization_url(ml.auth_base_url("MLB"), "123", "https://p/cb", "st", challenge)
    assert url.startswith("https://auth.mercadolivre.com.br/authorization?response_type=code")
    assert "code_challenge_method=S256" in url and "redirect_uri=https%3A%2F%2Fp%2Fcb" in url
    assert ml.auth_base_url("MLA") == "https://auth.mercadolibre.com.ar"
    assert ml.auth_base_url("MLB", "http://127.0.0.1:9/") == "http://127.0.0.1:9"


def test_error_codes_from_the_three_error_shapes():
    def code(name, status):
        return ml.MercadoLivreError(status, "", False, body=_ml(name)).code

    assert code("error_1", 400) == "not_unanswered_question"
    assert code("error_2", 400) == "invalid_grant"
    assert code("error_3", 403) == "blocked_conversation_send_message_forbidden"


def test_markdown_from_chatwoots_editor_becomes_plain_text():
    assert chatwoot_api.markdown_to_text("**Olá** _tudo_ bem?\\\nLinha 2") == "Olá _tudo_ bem?\nLinha 2"
    assert chatwoot_api.markdown_to_text("Veja [o manual](https://x.example/m.pdf)") == \
        "Veja o manual (https://x.example/m.pdf)"
    assert chatwoot_api.markdown_to_text("2*3*4 = 24") == "2*3*4 = 24"


def test_money_and_summary_in_portuguese():
    assert meli_texts.money(1234.5) == "R$ 1.234,50"
    summary = meli_texts.order_summary("2000006556183755", _ml("orders_search")["results"])
    assert "2 × Espaçador E Nivelador Para Piso 1,5 Mm 500pçs — R$ 62,96" in summary
    assert "Total: R$ 125,92" in summary and "Situação: paga" in summary
    assert "COMPRADOR_XYZ (ID 6427433)" in summary


def test_blocked_substatus_in_words():
    assert "mediação" in meli_texts.sale_blocked("blocked_by_mediation")
    assert "blocked_by_something_new" in meli_texts.sale_blocked("blocked_by_something_new")


def test_dates_shown_to_agents_are_brasilia_time():
    import meli_texts
    assert meli_texts._date("2026-01-07T14:23:12.000-04:00") == "07/01/2026 15:23"
    assert meli_texts._date("2026-01-07T14:23:12Z") == "07/01/2026 11:23"
    assert meli_texts._date("not a date") == "not a date"
