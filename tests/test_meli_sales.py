"""Post-sale messages: every message of a sale in one Chatwoot conversation, in order, with the
order summary on top; agents' replies (350-character parts, attachments, the MLB messaging
agent, blocked conversations) back to Mercado Livre; outages, 429 and order of delivery."""
from __future__ import annotations

import base64

import outbox
from tests.meli_support import (AGENT_MLB, JPEG_BYTES, PDF_BYTES, SALES_INBOX, Bridge,  # noqa
                                bridge, messages_of)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _sale_conversation(b: Bridge) -> dict:
    conversations = b.conversations(SALES_INBOX)
    assert len(conversations) == 1, conversations
    return conversations[0]


def _public(conv: dict) -> list[dict]:
    return [m for m in messages_of(conv) if not m["private"]]


def test_sale_messages_land_in_one_conversation_in_order_with_summary_on_top(bridge):
    # GIVEN a paid sale (pack) where the buyer wrote twice, with a photo
    sale = bridge.sale(buyer_id=6427433, nickname="COMPRADOR_XYZ",
                       items=[{"id": "MLB3737188005", "title": "Espaçador 1,5 Mm 500pçs",
                               "quantity": 2, "unit_price": 62.96}])
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Chegou com a caixa amassada, segue foto.",
                        attachments=[{"filename": "caixa.jpg", "type": "image/jpeg",
                                      "data_b64": _b64(JPEG_BYTES)}],
                        created="2026-03-11T12:05:40.000Z")
    bridge.buyer_writes(pack, "Podem trocar?", created="2026-03-11T12:06:00.000Z")
    # WHEN the poller runs
    bridge.poll()
    # THEN one conversation in the sales inbox, summary first, then the messages in order
    conv = _sale_conversation(bridge)
    assert conv["custom_attributes"]["meli_pack_id"] == pack
    messages = messages_of(conv)
    assert messages[0]["private"] is True and messages[0]["content"].startswith(
        "🛒 Venda no Mercado Livre")
    summary = messages[0]["content"]
    assert "COMPRADOR_XYZ" in summary and "2 × Espaçador 1,5 Mm 500pçs" in summary
    assert "R$ 125,92" in summary
    assert [m["content"] for m in messages[1:]] == ["Chegou com a caixa amassada, segue foto.",
                                                    "Podem trocar?"]
    assert all(m["message_type_name"] == "incoming" for m in messages[1:])
    # the buyer's photo arrived with its real bytes
    attachment = messages[1]["attachments"][0]
    import requests
    data = requests.get(f"{bridge.cw.url}/_standin/blob/{attachment['id']}").content
    assert data == JPEG_BYTES
    # reading with mark_as_read=false keeps the conversation unread on Mercado Livre
    assert any(c["path"].startswith("/messages/packs/") and c["query"].get("mark_as_read")
               == "false" for c in bridge.ml_state()["calls"])
    bridge.assert_spec_clean()


def test_order_without_pack_uses_the_order_id(bridge):
    sale = bridge.sale(buyer_id=555, pack=False, nickname_in_order=False, nickname="SEMPACK")
    assert sale["pack_id"] is None
    bridge.buyer_writes(sale["conversation_id"], "Qual o prazo?")
    bridge.poll()
    conv = _sale_conversation(bridge)
    assert conv["custom_attributes"]["meli_pack_id"] == str(sale["order_id"])
    assert "SEMPACK" in messages_of(conv)[0]["content"]  # nickname read from /users
    assert [m["content"] for m in _public(conv)] == ["Qual o prazo?"]


def test_same_message_by_poll_and_notification_twice_across_restart_is_one_message(bridge):
    sale = bridge.sale(buyer_id=777)
    pack = sale["conversation_id"]
    message_id = bridge.buyer_writes(pack, "Oi, tudo bem?")
    for nid in ("m1", "m1", "m2"):
        assert bridge.notify_ml("messages", message_id, nid).status_code == 200
    bridge.poll()
    bridge.restart()
    bridge.notify_ml("messages", message_id, "m3")
    bridge.notify_ml("orders_v2", f"/orders/{sale['order_id']}", "o1")
    bridge.poll()
    bridge.drain()
    conv = _sale_conversation(bridge)
    assert [m["content"] for m in _public(conv)] == ["Oi, tudo bem?"]
    assert len([m for m in messages_of(conv) if m["private"]]) == 1  # one summary


def test_a_new_buyer_message_after_reading_is_picked_up_by_the_unread_poll(bridge):
    sale = bridge.sale(buyer_id=778)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "primeira")
    bridge.poll()
    conv = _sale_conversation(bridge)
    bridge.agent_replies(conv["id"], "Olá!")
    bridge.drain()  # the reply reads the pack normally: messages become read
    bridge.poll()
    bridge.buyer_writes(pack, "segunda")  # unread count is 1 again, like before
    bridge.poll()
    texts = [m["content"] for m in _public(_sale_conversation(bridge))]
    assert texts == ["primeira", "Olá!", "segunda"]


def test_reply_typed_on_mercado_livre_appears_as_ours_and_is_never_sent_back(bridge):
    sale = bridge.sale(buyer_id=779)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Tem nota fiscal?")
    bridge.poll()
    bridge.buyer_writes(pack, "Tem sim, vai na caixa.", **{"from": "seller"})
    bridge.notify_ml("orders_v2", f"/orders/{sale['order_id']}", "o-2")
    bridge.drain()
    conv = _sale_conversation(bridge)
    mirrored = [m for m in _public(conv) if m["content"] == "Tem sim, vai na caixa."]
    assert len(mirrored) == 1 and mirrored[0]["message_type_name"] == "outgoing"
    assert mirrored[0]["source_id"].startswith("meli:msg:")
    assert bridge.echo_of(mirrored[0]["id"])["delivered_status"] == 200
    bridge.drain()
    assert bridge.ml_state()["sent_messages"] == []


def test_agent_reply_goes_to_the_buyer_and_is_not_mirrored_back(bridge):
    sale = bridge.sale(buyer_id=780)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Já enviou?")
    bridge.poll()
    conv = _sale_conversation(bridge)
    hook = bridge.agent_replies(conv["id"], "Enviamos hoje, código AB123.")
    bridge.drain()
    (sent,) = bridge.ml_state()["sent_messages"]
    assert sent == {**sent, "pack_id": pack, "to": "780", "text": "Enviamos hoje, código AB123."}
    bridge.poll()  # the pack now holds our message: it must not come back as a new one
    bridge.notify_ml("orders_v2", f"/orders/{sale['order_id']}", "o-3")
    bridge.drain()
    conv = _sale_conversation(bridge)
    assert [m["content"] for m in _public(conv)] == ["Já enviou?", "Enviamos hoje, código AB123."]
    assert [m for m in messages_of(conv) if m["id"] == hook["message_id"]][0]["status"] == \
        "delivered"


def test_mlb_mediated_sale_replies_to_the_messaging_agent(bridge):
    sale = bridge.sale(buyer_id=781, mediated=True)
    bridge.buyer_writes(sale["conversation_id"], "Quero trocar o tamanho.")
    bridge.poll()
    bridge.agent_replies(_sale_conversation(bridge)["id"], "Claro, abra a troca pelo app.")
    bridge.drain()
    (sent,) = bridge.ml_state()["sent_messages"]
    assert sent["to"] == str(AGENT_MLB)


def test_long_reply_is_split_into_ordered_parts_of_at_most_350(bridge):
    sale = bridge.sale(buyer_id=782)
    bridge.buyer_writes(sale["conversation_id"], "Me explica a garantia?")
    bridge.poll()
    text = " ".join(f"Frase número {n} da explicação da garantia." for n in range(22))
    assert 700 < len(text) < 1050
    bridge.agent_replies(_sale_conversation(bridge)["id"], text)
    bridge.drain()
    parts = [m["text"] for m in bridge.ml_state()["sent_messages"]]
    assert len(parts) == 3 and all(len(p) <= 350 for p in parts)
    assert " ".join(parts) == text


def test_long_reply_in_a_mediated_sale_is_refused_with_a_note(bridge):
    sale = bridge.sale(buyer_id=783, mediated=True)
    bridge.buyer_writes(sale["conversation_id"], "Dúvida")
    bridge.poll()
    hook = bridge.agent_replies(_sale_conversation(bridge)["id"], "x " * 200)
    bridge.drain()
    assert bridge.ml_state()["sent_messages"] == []
    messages = messages_of(_sale_conversation(bridge))
    assert any(m["private"] and "agente de IA" in m["content"] for m in messages)
    assert [m for m in messages if m["id"] == hook["message_id"]][0]["status"] == "failed"


def test_blocked_conversation_gives_a_note_with_the_reason_in_words(bridge):
    sale = bridge.sale(buyer_id=784)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Cadê meu pedido?")
    bridge.poll()
    bridge.ml_post(f"/_standin/packs/{pack}/status",
                   {"status": "blocked", "substatus": "blocked_by_mediation"})
    hook = bridge.agent_replies(_sale_conversation(bridge)["id"], "Vamos verificar.")
    bridge.drain()
    assert bridge.ml_state()["sent_messages"] == []
    messages = messages_of(_sale_conversation(bridge))
    assert any(m["private"] and "mediação em andamento" in m["content"] for m in messages)
    assert [m for m in messages if m["id"] == hook["message_id"]][0]["status"] == "failed"


def test_agent_attachments_go_to_mercado_livre_with_real_bytes(bridge):
    sale = bridge.sale(buyer_id=785)
    bridge.buyer_writes(sale["conversation_id"], "Manda a nota?")
    bridge.poll()
    bridge.agent_replies(_sale_conversation(bridge)["id"], "Segue a nota e a foto.",
                         attachments=[("nota.pdf", PDF_BYTES, "application/pdf"),
                                      ("foto.jpg", JPEG_BYTES, "image/jpeg"),
                                      ("planilha.xlsx", b"PK\x03\x04xlsx",
                                       "application/vnd.openxmlformats-officedocument."
                                       "spreadsheetml.sheet")])
    bridge.drain()
    state = bridge.ml_state()
    (sent,) = state["sent_messages"]
    assert sent["text"] == "Segue a nota e a foto." and len(sent["attachments"]) == 2
    uploaded = {v["original_filename"]: base64.b64decode(v["data_b64"])
                for v in state["uploaded"].values()}
    assert uploaded == {"nota.pdf": PDF_BYTES, "foto.jpg": JPEG_BYTES}
    notes = [m for m in messages_of(_sale_conversation(bridge)) if m["private"]]
    assert any("planilha.xlsx" in n["content"] and "não foram enviados" in n["content"]
               for n in notes)
    assert all(c["query"].get("site_id") == "MLB" for c in state["calls"]
               if c["path"] == "/messages/attachments")


def test_attachment_only_reply_sends_the_file_with_its_name_as_text(bridge):
    sale = bridge.sale(buyer_id=786)
    bridge.buyer_writes(sale["conversation_id"], "Foto da etiqueta?")
    bridge.poll()
    bridge.agent_replies(_sale_conversation(bridge)["id"], "",
                         attachments=[("etiqueta.png", JPEG_BYTES, "image/png")])
    bridge.drain()
    (sent,) = bridge.ml_state()["sent_messages"]
    assert sent["text"] == "Anexo: etiqueta.png" and len(sent["attachments"]) == 1


def test_mercado_livre_down_while_agent_answers_delivers_later_in_order(bridge):
    sale = bridge.sale(buyer_id=787)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Oi?")
    bridge.poll()
    conv = _sale_conversation(bridge)
    # GIVEN Mercado Livre answers 503 to everything about this sale for a while
    bridge.fail_ml(f"/messages/packs/{pack}", 503, count=6)
    bridge.agent_replies(conv["id"], "Primeira resposta.")
    bridge.agent_replies(conv["id"], "Segunda resposta.")
    bridge.drain()
    assert bridge.ml_state()["sent_messages"] == []
    pending = bridge.jobs(kind="chatwoot.forward_reply", status="pending")
    assert len(pending) == 2
    # WHEN time passes and Mercado Livre comes back
    for _ in range(8):
        bridge.clock.advance(1000)
        bridge.drain()
    # THEN both arrive, in the order the agent wrote them, once
    assert [m["text"] for m in bridge.ml_state()["sent_messages"]] == [
        "Primeira resposta.", "Segunda resposta."]
    assert bridge.jobs(status="dead") == []


def test_unreachable_mercado_livre_is_retried_later(bridge):
    from poller import Poller
    from standins.support import free_port

    sale = bridge.sale(buyer_id=788)
    bridge.buyer_writes(sale["conversation_id"], "Oi")
    bridge.poll()
    conv = _sale_conversation(bridge)
    # GIVEN a poller that cannot reach Mercado Livre (connection refused)
    unreachable = bridge.settings.replace(ml_api_base_url=f"http://127.0.0.1:{free_port()}")
    cut_off = Poller(unreachable, bridge.conn, clock=bridge.clock)
    bridge.agent_replies(conv["id"], "Resposta")
    cut_off.drain()
    (job,) = bridge.jobs(kind="chatwoot.forward_reply")
    assert job["status"] == "pending" and "connection error" in job["last_error"]
    # WHEN the network is back (a poller with the real address) and the backoff has passed
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN the reply is delivered once
    assert [m["text"] for m in bridge.ml_state()["sent_messages"]] == ["Resposta"]


def test_429_is_honoured_with_retry_after_and_backoff(bridge):
    sale = bridge.sale(buyer_id=789)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Oi")
    bridge.poll()
    bridge.fail_ml(f"/messages/packs/{pack}", 429, count=1, retry_after=120)
    bridge.agent_replies(_sale_conversation(bridge)["id"], "Resposta")
    bridge.drain()
    (job,) = bridge.jobs(kind="chatwoot.forward_reply")
    assert job["status"] == "pending" and job["available_at"] >= bridge.clock() + 120
    bridge.clock.advance(60)
    bridge.drain()
    assert bridge.ml_state()["sent_messages"] == []  # not before Retry-After
    bridge.clock.advance(61)
    bridge.drain()
    assert len(bridge.ml_state()["sent_messages"]) == 1


def test_reply_that_never_gets_through_ends_with_a_note_not_silence(make_settings, serve, clock):
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=2)
    sale = b.sale(buyer_id=790)
    pack = sale["conversation_id"]
    b.buyer_writes(pack, "Oi")
    b.poll()
    b.fail_ml(f"/messages/packs/{pack}", 503, count=50)
    hook = b.agent_replies(_sale_conversation(b)["id"], "Resposta")
    b.drain()
    b.clock.advance(3600)
    b.drain()
    assert b.jobs(kind="chatwoot.forward_reply", status="dead")
    b.drain()
    messages = messages_of(_sale_conversation(b))
    assert any(m["private"] and "não consegui entregar" in m["content"] for m in messages)
    assert [m for m in messages if m["id"] == hook["message_id"]][0]["status"] == "failed"


def test_split_reply_interrupted_midway_resumes_without_resending(bridge):
    sale = bridge.sale(buyer_id=791)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Explica?")
    bridge.poll()
    text = " ".join(f"Parte da explicação número {n}." for n in range(30))
    # GIVEN the first part goes through and the second POST gets a 500
    bridge.fail_ml(f"/messages/packs/{pack}/sellers", 500, count=1, method="POST", after=1)
    bridge.agent_replies(_sale_conversation(bridge)["id"], text)
    bridge.drain()
    assert len(bridge.ml_state()["sent_messages"]) == 1
    # WHEN the job is retried
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN it resumes at part 2: every part once, in order
    sent = [m["text"] for m in bridge.ml_state()["sent_messages"]]
    assert " ".join(sent) == text and len(sent) == len(set(sent)) == 3


def test_typographic_characters_are_made_plain_for_post_sale(bridge):
    sale = bridge.sale(buyer_id=792)
    bridge.buyer_writes(sale["conversation_id"], "Oi")
    bridge.poll()
    bridge.agent_replies(_sale_conversation(bridge)["id"],
                         "“Prazo” — 3 a 5 dias… combinado? 👍")
    bridge.drain()
    (sent,) = bridge.ml_state()["sent_messages"]
    assert sent["text"] == '"Prazo" - 3 a 5 dias... combinado? 👍'


def test_buyer_message_that_arrives_just_before_the_reply_is_not_lost(bridge):
    sale = bridge.sale(buyer_id=793)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "primeira")
    bridge.poll()
    conv = _sale_conversation(bridge)
    # GIVEN a new buyer message that no poll has seen yet
    bridge.buyer_writes(pack, "segunda, antes da resposta")
    # WHEN the agent's reply reads the conversation (which marks everything read on ML)
    bridge.agent_replies(conv["id"], "Resposta")
    bridge.drain()
    bridge.poll()
    # THEN the new message still reaches Chatwoot
    texts = [m["content"] for m in _public(_sale_conversation(bridge))]
    assert "segunda, antes da resposta" in texts and texts.count("Resposta") == 1


def test_sale_sync_that_died_is_queued_again_by_the_next_unread_poll(make_settings, serve, clock):
    import requests

    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    sale = b.sale(buyer_id=794)
    b.buyer_writes(sale["conversation_id"], "Alguém aí?")
    requests.post(f"{b.cw.url}/_standin/fail", json={"path_prefix": "/api/", "status": 503,
                                                     "count": 1})
    b.poll()
    assert b.jobs(kind="ml.sync_pack")[0]["status"] == "dead"
    b.poll()  # same unread count as before, but the last sync died: try again
    assert [m["content"] for m in _public(_sale_conversation(b))] == ["Alguém aí?"]


def test_buyer_message_with_more_files_than_chatwoot_takes_is_split(bridge):
    sale = bridge.sale(buyer_id=795)
    files = [{"filename": f"foto{n}.jpg", "type": "image/jpeg",
              "data_b64": _b64(JPEG_BYTES + bytes([n]))} for n in range(17)]
    bridge.buyer_writes(sale["conversation_id"], "Seguem as fotos", attachments=files)
    bridge.poll()
    public = _public(_sale_conversation(bridge))
    assert [len(m.get("attachments", [])) for m in public] == [15, 2]
    assert public[0]["content"] == "Seguem as fotos"
    bridge.assert_spec_clean()


def test_unreachable_chatwoot_attachment_does_not_hold_the_text_forever(bridge):
    import requests

    sale = bridge.sale(buyer_id=796)
    bridge.buyer_writes(sale["conversation_id"], "Oi")
    bridge.poll()
    requests.post(f"{bridge.cw.url}/_standin/fail", json={
        "path_prefix": "/rails/active_storage/", "status": 503, "count": 100})
    bridge.agent_replies(_sale_conversation(bridge)["id"], "Segue o comprovante.",
                         attachments=[("comprovante.pdf", PDF_BYTES, "application/pdf")])
    for _ in range(4):
        bridge.drain()
        bridge.clock.advance(900)
    (sent,) = bridge.ml_state()["sent_messages"]
    assert sent["text"] == "Segue o comprovante." and sent["attachments"] == []
    notes = [m for m in messages_of(_sale_conversation(bridge)) if m["private"]]
    assert any("comprovante.pdf" in n["content"] and "FRONTEND_URL" in n["content"]
               for n in notes)


def test_buyer_writing_again_before_the_next_poll_after_a_reply_is_not_lost(bridge):
    # GIVEN no notifications reach ponte, the buyer wrote, the poll imported it, an agent
    # answered (the reply reads the pack with mark_as_read: its unread count goes to 0)
    sale = bridge.sale(buyer_id=7781)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "primeira")
    bridge.poll()
    bridge.agent_replies(_sale_conversation(bridge)["id"], "Olá!")
    bridge.drain()
    # WHEN the buyer writes again before the next poll (the count is 1 again, as before)
    bridge.buyer_writes(pack, "segunda")
    for _ in range(2):
        bridge.clock.advance(60)
        bridge.poll()
    # THEN the second message is imported all the same
    texts = [m["content"] for m in _public(_sale_conversation(bridge))]
    assert texts == ["primeira", "Olá!", "segunda"]


def test_pack_that_leaves_the_unread_list_is_synced(bridge):
    # GIVEN a buyer message the poll imported (the pack is in the unread list)
    sale = bridge.sale(buyer_id=7782)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Qual o prazo?")
    bridge.poll()
    # WHEN the seller answers on Mercado Livre's site (the pack leaves /messages/unread; no
    # notification reaches ponte)
    bridge.buyer_writes(pack, "Chega amanhã.", **{"from": "seller"})
    bridge.ml_post(f"/_standin/packs/{pack}/read", {})
    bridge.clock.advance(60)
    bridge.poll()
    # THEN the seller's answer shows in the conversation
    texts = [m["content"] for m in _public(_sale_conversation(bridge))]
    assert texts == ["Qual o prazo?", "Chega amanhã."]


def test_part_accepted_by_mercado_livre_whose_answer_was_lost_is_not_sent_twice(bridge):
    sale = bridge.sale(buyer_id=7901)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Oi")
    bridge.poll()
    # GIVEN Mercado Livre takes the reply but its answer is lost (a 503 after the fact)
    bridge.fail_ml(f"/messages/packs/{pack}/sellers", 503, method="POST", apply=True)
    bridge.agent_replies(_sale_conversation(bridge)["id"], "Enviamos hoje.")
    bridge.drain()
    # WHEN the job is retried
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN the reply went once, and the agent's message is marked delivered
    assert [m["text"] for m in bridge.ml_state()["sent_messages"]] == ["Enviamos hoje."]
    conv = _sale_conversation(bridge)
    assert [m["status"] for m in _public(conv) if m["content"] == "Enviamos hoje."] == [
        "delivered"]
    assert bridge.jobs(status="dead") == []


def test_split_reply_whose_second_part_timed_out_after_being_taken_resumes_at_the_third(bridge):
    sale = bridge.sale(buyer_id=7902)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Explica?")
    bridge.poll()
    text = " ".join(f"Parte da explicação número {n}." for n in range(30))
    # GIVEN part 2 is taken by Mercado Livre but answers after the client's timeout
    bridge.ctx.clients.meli.timeout_seconds = 0.5
    bridge.fail_ml(f"/messages/packs/{pack}/sellers", 500, method="POST", after=1, apply=True,
                   sleep=1.0)
    bridge.agent_replies(_sale_conversation(bridge)["id"], text)
    bridge.drain()
    # WHEN the job is retried
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN every part went once, in order
    sent = [m["text"] for m in bridge.ml_state()["sent_messages"]]
    assert " ".join(sent) == text and len(sent) == 3


def test_sale_conversation_created_but_answer_timed_out_is_reused_not_duplicated(bridge):
    import requests

    sale = bridge.sale(buyer_id=7903)
    bridge.buyer_writes(sale["conversation_id"], "Oi, chegou?")
    # GIVEN Chatwoot creates the sale's conversation but answers after the client's timeout
    bridge.ctx.clients.chatwoot.timeout_seconds = 0.5
    requests.post(f"{bridge.cw.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/conversations", "method": "POST",
                        "status": 500, "apply": True, "sleep": 1.0})
    bridge.poll()
    # WHEN the sync is retried
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN one conversation, one summary, one message
    conv = _sale_conversation(bridge)
    assert len([m for m in messages_of(conv) if m["private"]]) == 1
    assert [m["content"] for m in _public(conv)] == ["Oi, chegou?"]
    bridge.assert_spec_clean()


def test_files_past_the_fifteenth_survive_a_failed_overflow_message(bridge):
    import requests

    # GIVEN a buyer message with 17 photos (Chatwoot takes 15 a message)
    sale = bridge.sale(buyer_id=7951)
    files = [{"filename": f"foto{n}.jpg", "type": "image/jpeg",
              "data_b64": _b64(JPEG_BYTES + bytes([n]))} for n in range(17)]
    bridge.buyer_writes(sale["conversation_id"], "Seguem as fotos", attachments=files)
    # and Chatwoot fails the message that carries the last two (summary, first 15, then it)
    requests.post(f"{bridge.cw.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/conversations/", "method": "POST",
                        "status": 503, "after": 2})
    bridge.poll()
    # WHEN the sync is retried
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN all 17 photos are in the conversation, the text once
    public = _public(_sale_conversation(bridge))
    assert [m["content"] for m in public] == ["Seguem as fotos", "📎"]
    assert [len(m["attachments"]) for m in public] == [15, 2]
    assert bridge.jobs(status="dead") == []


def test_reply_to_a_sale_mercado_livre_does_not_know_gives_a_note_at_once(bridge):
    sale = bridge.sale(buyer_id=7961)
    pack = sale["conversation_id"]
    bridge.buyer_writes(pack, "Oi")
    bridge.poll()
    # GIVEN Mercado Livre answers 404 for the sale's conversation
    bridge.fail_ml(f"/messages/packs/{pack}/sellers", 404, method="GET",
                   body={"message": "conversation not found", "error": "not_found",
                         "status": 404, "cause": []})
    hook = bridge.agent_replies(_sale_conversation(bridge)["id"], "Enviamos hoje.")
    bridge.drain()
    bridge.drain()
    # THEN the agent reads why at once (not "send again when Mercado Livre is back")
    messages = messages_of(_sale_conversation(bridge))
    notes = [m["content"] for m in messages if m["private"]][1:]
    assert len(notes) == 1 and "não encontrou a conversa desta venda" in notes[0]
    assert [m for m in messages if m["id"] == hook["message_id"]][0]["status"] == "failed"
    assert bridge.ml_state()["sent_messages"] == []


def test_attachment_only_reply_whose_files_all_fail_says_nothing_was_sent(bridge):
    sale = bridge.sale(buyer_id=7962)
    bridge.buyer_writes(sale["conversation_id"], "Manda a planilha?")
    bridge.poll()
    bridge.agent_replies(_sale_conversation(bridge)["id"], "",
                         attachments=[("planilha.xlsx", b"PK\x03\x04xlsx",
                                       "application/vnd.openxmlformats-officedocument."
                                       "spreadsheetml.sheet")])
    bridge.drain()
    bridge.drain()
    notes = [m["content"] for m in messages_of(_sale_conversation(bridge)) if m["private"]][1:]
    assert len(notes) == 1 and "nada foi enviado" in notes[0] and "planilha.xlsx" in notes[0]
    assert "o texto foi" not in notes[0]
    assert bridge.ml_state()["sent_messages"] == []


def test_dead_reply_rearmed_by_an_operator_does_not_send_the_lost_part_again(make_settings,
                                                                              serve, clock):
    # GIVEN one attempt per job, and Mercado Livre takes the reply but its answer is lost
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    pack = b.sale(buyer_id=8801)["conversation_id"]
    b.buyer_writes(pack, "Oi")
    b.poll()
    b.fail_ml(f"/messages/packs/{pack}/sellers", 503, method="POST", apply=True)
    hook = b.agent_replies(_sale_conversation(b)["id"], "Enviamos hoje.")
    b.drain()
    [dead] = b.jobs(status="dead", kind="chatwoot.forward_reply")
    # THEN the agent is told it may have been delivered
    notes = [m["content"] for m in messages_of(_sale_conversation(b)) if m["private"]]
    assert any("pode ter sido entregue" in n for n in notes), notes
    # WHEN an operator re-arms it (attempts reset to 0)
    assert outbox.retry_dead_job(b.conn, dead["id"], clock())
    b.drain()
    # THEN the part Mercado Livre already has is not sent twice
    assert [m["text"] for m in b.ml_state()["sent_messages"]] == ["Enviamos hoje."]
    reply = [m for m in messages_of(_sale_conversation(b)) if m["id"] == hook["message_id"]][0]
    assert reply["status"] == "delivered"


def test_reply_that_died_before_reaching_mercado_livre_says_it_was_not_delivered(
        make_settings, serve, clock):
    # GIVEN one attempt per job and Mercado Livre refusing the send outright (nothing stored)
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    pack = b.sale(buyer_id=8804)["conversation_id"]
    b.buyer_writes(pack, "Oi")
    b.poll()
    b.fail_ml(f"/messages/packs/{pack}/sellers", 429, method="POST")
    b.agent_replies(_sale_conversation(b)["id"], "Enviamos hoje.")
    b.drain()
    # THEN the gave-up note does not claim it may have been delivered
    notes = [m["content"] for m in messages_of(_sale_conversation(b)) if m["private"]]
    assert any("não consegui entregar" in n for n in notes), notes
    assert not any("pode ter sido entregue" in n for n in notes)


def test_sync_that_died_after_chatwoot_took_the_message_does_not_duplicate_it(make_settings,
                                                                               serve, clock):
    # GIVEN one attempt per job, and Chatwoot stores the buyer's message but loses its answer
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    pack = b.sync_dies_after_chatwoot_took_the_message(buyer_id=8803)
    # WHEN later polls queue fresh sync jobs (attempt 1 again)
    for _ in range(2):
        b.clock.advance(120)
        b.poll()
    # THEN the message is in Chatwoot once
    assert [m["content"] for m in _public(_sale_conversation(b))] == ["Cadê meu pedido?"]


def test_lost_part_stored_with_whitespace_collapsed_is_not_sent_again(bridge):
    # GIVEN Mercado Livre stores sale messages with the whitespace collapsed, takes the reply
    # and loses its answer
    bridge.ml_post("/_standin/options", {"normalize_messages": True})
    pack = bridge.sale(buyer_id=8805)["conversation_id"]
    bridge.buyer_writes(pack, "Oi")
    bridge.poll()
    bridge.fail_ml(f"/messages/packs/{pack}/sellers", 503, method="POST", apply=True)
    hook = bridge.agent_replies(_sale_conversation(bridge)["id"], "Enviamos  hoje,\nobrigado.")
    bridge.drain()
    # WHEN the reply is retried
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN the part Mercado Livre already has is recognised and not sent twice
    assert [m["text"] for m in bridge.ml_state()["sent_messages"]] == ["Enviamos hoje, obrigado."]
    reply = [m for m in messages_of(_sale_conversation(bridge))
             if m["id"] == hook["message_id"]][0]
    assert reply["status"] == "delivered"


def test_poll_racing_a_reply_does_not_lose_the_buyers_next_message(bridge, monkeypatch):
    # GIVEN a sale with one unread message and an agent reply queued
    import meli_sales
    pack = bridge.sale(buyer_id=8802)["conversation_id"]
    bridge.buyer_writes(pack, "primeira")
    bridge.poll()
    bridge.agent_replies(_sale_conversation(bridge)["id"], "Olá!")
    real = meli_sales.ml

    class Racing:
        """The unread poll's GET answers (count 1) before the reply runs, and its snapshot is
        written after the reply read the pack with mark_as_read."""

        def __init__(self, client):
            self.client = client

        def __getattr__(self, name):
            return getattr(self.client, name)

        def unread_messages(self):
            answer = self.client.unread_messages()
            monkeypatch.setattr(meli_sales, "ml", real)
            bridge.drain()
            return answer

    monkeypatch.setattr(meli_sales, "ml", lambda ctx: Racing(real(ctx)))
    # WHEN that poll races the reply, and then the buyer writes again (count 1 again)
    meli_sales.poll_messages(bridge.ctx)
    bridge.drain()
    bridge.buyer_writes(pack, "segunda")
    for _ in range(3):
        bridge.clock.advance(60)
        bridge.poll()
    # THEN the buyer's second message reaches Chatwoot
    assert [m["content"] for m in _public(_sale_conversation(bridge))] == \
        ["primeira", "Olá!", "segunda"]
