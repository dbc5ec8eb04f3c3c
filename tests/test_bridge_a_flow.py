"""Bridge A end to end across the HTTP boundary: Kommo webhook → ponte → n8n → ponte → Kommo
chat, with the sellers' commands. Real-shaped Kommo bodies (tests/fixtures/payloads/kommo)."""
from __future__ import annotations

import pytest

import db_manager
import outbox
import whatsapp_intake
import whatsapp_jobs
import whatsapp_store
from tests.bridge_a_harness import N8N_KEY, BridgeA
from tests.conftest import payload_text


@pytest.fixture
def bridge(make_settings, serve, clock):
    return BridgeA(make_settings, serve, clock)


def test_customer_message_reaches_n8n_and_the_answer_lands_in_the_whatsapp_chat(bridge):
    # GIVEN the real-shaped add_message body Kommo posts
    response = bridge.kommo_posts(payload_text("kommo/add_message_incoming_text.form").strip())
    assert response.status_code == 200
    # WHEN the poller runs
    bridge.run_jobs()
    # THEN n8n got the fields existing workflows read, plus ours
    [call] = bridge.n8n_calls()
    assert call["message_text"] == "Olá, vocês entregam em Campinas?"
    assert call["conversation_id"] == "1874" and call["contact_id"] == "93589657"
    assert call["chat_type"] == "whatsapp" and call["lead_id"] == "28455849"
    assert call["talk_id"] == "1874" and call["contact_name"] == "Maria Souza"
    assert call["message_id"] == "d3bac6d3-1b5e-40c2-a054-4e0cfe283edb"
    assert call["timestamp"].endswith("-03:00") and call["correlation_id"]
    assert [m["text"] for m in call["messages"]] == ["Olá, vocês entregam em Campinas?"]
    # AND the answer went into the same WhatsApp talk
    [reply] = bridge.chat_messages()
    assert "Entregamos" in reply


def test_one_message_delivered_five_times_gives_one_n8n_call_and_one_reply(bridge):
    body = payload_text("kommo/add_message_incoming_text.form").strip()
    for _ in range(5):
        assert bridge.kommo_posts(body).status_code == 200
        bridge.run_jobs()
    assert len(bridge.n8n_calls()) == 1 and len(bridge.chat_messages()) == 1


def test_retries_that_arrive_before_the_poller_runs_are_applied_once(bridge):
    body = payload_text("kommo/add_message_incoming_text.form").strip()
    # the ack does not look for copies still staged (that index costs a page per webhook)...
    answers = [bridge.kommo_posts(body).get_json()["recorded"] for _ in range(5)]
    assert answers == ["queued"] * 5
    # a re-delivery whose body differs (another account link) is caught by the message id
    bridge.kommo_posts(body.replace("minhaloja", "minhaloja2"))
    bridge.run_jobs()
    # ...the poller's move keeps one job per body
    assert bridge.intake_results() == [{"messages_new": 1}, {"messages_duplicate": 1}]
    assert len(bridge.n8n_calls()) == 1 and len(bridge.chat_messages()) == 1
    # once the job is in the queue, a re-delivery is answered as a duplicate
    assert bridge.kommo_posts(body).get_json()["recorded"] == "duplicate"
    bridge.run_jobs()
    assert len(bridge.intake_results()) == 2 and len(bridge.n8n_calls()) == 1


def test_a_delivery_that_fails_half_way_leaves_nothing_and_is_applied_once_later(
        bridge, clock, monkeypatch):
    # GIVEN applying the delivery breaks after the message was written (a defect, a crash)
    real_insert_message, failures = whatsapp_store.insert_message, [RuntimeError("crash")]

    def insert_message_then_break_once(*args, **kwargs):
        real_insert_message(*args, **kwargs)
        if failures:
            raise failures.pop()

    monkeypatch.setattr(whatsapp_store, "insert_message", insert_message_then_break_once)
    bridge.customer_says("oi", message_id="m-crash")
    bridge.run_jobs()
    # THEN nothing of it was kept, and the delivery waits for its retry
    assert bridge.counts()["messages"] == 0 and bridge.n8n_calls() == []
    assert outbox.list_jobs(bridge.db, kind="n8n.forward_message") == []
    assert outbox.list_jobs(bridge.db, kind="kommo.intake")[0]["status"] == "pending"
    # WHEN it is retried, THEN it is applied once: one n8n call, one reply
    clock.advance(60)
    bridge.run_jobs()
    assert bridge.counts()["messages"] == 1
    assert len(bridge.n8n_calls()) == 1 and len(bridge.chat_messages()) == 1


def test_a_delivery_that_keeps_failing_is_reported_on_the_lead(bridge, clock, monkeypatch):
    monkeypatch.setattr(whatsapp_store, "upsert_conversation",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("defect")))
    bridge.customer_says("oi", message_id="m-dead")
    for _ in range(4):
        bridge.run_jobs()
        clock.advance(3600)
    assert outbox.list_jobs(bridge.db, kind="kommo.intake")[0]["status"] == "dead"
    assert bridge.lead_notes()[-1] == whatsapp_jobs.INTAKE_DEAD_NOTE
    assert bridge.n8n_calls() == []


def test_a_command_older_than_the_bots_last_change_does_not_undo_it(bridge, clock):
    bridge.customer_says("oi")
    bridge.run_jobs()
    bridge.seller_notes("#voltar", note_id="31")  # written by a seller...
    clock.advance(1)
    pause = bridge.api("post", "/bot/pause/93589657", json={"by": "Ana"})  # ...then, via the API
    assert pause.get_json()["status"] == "paused"
    bridge.run_jobs()  # the note is applied after the newer API pause
    assert bridge.bot_state()["status"] == "paused"
    assert bridge.lead_notes()[-1].startswith("🤖 Comando #voltar não aplicado")


def test_a_message_from_during_a_pause_is_not_sent_after_the_resume(bridge, clock):
    bridge.customer_says("oi", message_id="m1")
    bridge.run_jobs()
    bridge.api("post", "/bot/pause/93589657")
    clock.advance(1)
    bridge.customer_says("ainda aí?", message_id="m2")  # arrives while paused...
    clock.advance(1)
    bridge.api("post", "/bot/resume/93589657")  # ...and is applied after the resume
    bridge.run_jobs()
    assert [c["message_text"] for c in bridge.n8n_calls()] == ["oi"]
    assert bridge.db.execute("SELECT status FROM kommo_messages WHERE kommo_message_id = 'm2'"
                             ).fetchone()[0] == "skipped_paused"


def test_resuming_a_bot_that_was_not_paused_does_not_hold_back_a_message(bridge, clock):
    bridge.customer_says("oi", message_id="m1")
    bridge.run_jobs()
    clock.advance(1)
    bridge.customer_says("e o frete?", message_id="m2")  # arrives with the bot active...
    clock.advance(1)
    assert bridge.api("post", "/bot/resume/93589657").status_code == 200  # ...a no-op resume
    bridge.run_jobs()
    assert [c["message_text"] for c in bridge.n8n_calls()] == ["oi", "e o frete?"]


def test_deliveries_are_applied_in_arrival_order(bridge):
    # GIVEN the seller's #pausar note arrives just before the customer's next message, and the
    # poller gets to both only afterwards
    bridge.customer_says("oi", message_id="m1")
    bridge.run_jobs()
    bridge.seller_notes("#pausar")
    bridge.customer_says("alguém aí?", message_id="m2")
    # WHEN the poller runs
    bridge.run_jobs()
    # THEN the note took effect first: the message is kept, not sent to n8n
    assert len(bridge.n8n_calls()) == 1
    assert bridge.db.execute("SELECT status FROM kommo_messages WHERE kommo_message_id = 'm2'"
                             ).fetchone()[0] == "skipped_paused"


def test_burst_in_the_debounce_window_becomes_one_call_in_order(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, BOT_DEBOUNCE_SECONDS=3,
                     BOT_DEBOUNCE_MAX_SECONDS=15)
    for i, text in enumerate(["oi", "tudo bem?", "queria saber do frete", "para Campinas"]):
        bridge.customer_says(text, created_at=1_790_000_000 + i)
        clock.advance(1)
        bridge.run_jobs()
        assert bridge.n8n_calls() == []  # window still open
    clock.advance(3)
    bridge.run_jobs()
    [call] = bridge.n8n_calls()
    assert [m["text"] for m in call["messages"]] == ["oi", "tudo bem?", "queria saber do frete",
                                                     "para Campinas"]
    assert call["message_text"] == "oi\ntudo bem?\nqueria saber do frete\npara Campinas"
    assert len(bridge.chat_messages()) == 1


def test_debounce_window_is_capped_by_the_maximum(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, BOT_DEBOUNCE_SECONDS=3,
                     BOT_DEBOUNCE_MAX_SECONDS=5)
    for i in range(4):  # a message every 2 s would keep a plain debounce open forever
        bridge.customer_says(f"parte {i}")
        clock.advance(2)
        bridge.run_jobs()
    clock.advance(5)
    bridge.run_jobs()
    calls = bridge.n8n_calls()
    assert len(calls) == 2
    assert [m["text"] for m in calls[0]["messages"]] == ["parte 0", "parte 1", "parte 2"]


def test_customer_typing_pausar_does_not_control_the_bot(bridge):
    bridge.customer_says("#pausar")
    bridge.run_jobs()
    assert bridge.bot_state()["status"] == "active"
    assert bridge.n8n_calls()[0]["message_text"] == "#pausar"


def test_seller_note_pauses_then_voltar_resumes(bridge):
    bridge.customer_says("olá")
    bridge.run_jobs()
    # WHEN the seller writes #pausar in a note on the lead (real-shaped note_lead body)
    assert bridge.kommo_posts(payload_text("kommo/note_lead_pausar.form").strip()).status_code \
        == 200
    # THEN the bot is paused as soon as the poller applies the delivery, before it confirms
    assert bridge.run_jobs(max_jobs=1) == 1
    assert bridge.bot_state()["status"] == "paused"
    assert "🤖 Bot pausado. Vendedor assumindo conversa." not in bridge.lead_notes()
    bridge.run_jobs()
    assert bridge.lead_notes()[-1] == "🤖 Bot pausado. Vendedor assumindo conversa."
    # AND the customer's next messages are kept but not sent to n8n
    bridge.customer_says("alguém aí?")
    bridge.run_jobs()
    assert len(bridge.n8n_calls()) == 1
    assert bridge.db.execute("SELECT status FROM kommo_messages WHERE text = 'alguém aí?'"
                             ).fetchone()[0] == "skipped_paused"
    # WHEN the seller writes #voltar
    bridge.seller_notes("#Voltar", note_id="213313360")
    bridge.run_jobs()
    assert bridge.bot_state()["status"] == "active"
    assert bridge.lead_notes()[-1] == "🤖 Bot reativado. Assumindo atendimento automático."
    bridge.customer_says("e agora?")
    bridge.run_jobs()
    assert len(bridge.n8n_calls()) == 2


def test_same_note_delivered_twice_is_applied_and_confirmed_once(bridge):
    bridge.customer_says("olá")
    note = payload_text("kommo/note_lead_pausar.form").strip()
    bridge.kommo_posts(note)
    bridge.kommo_posts(note)  # the same body: recorded once
    bridge.kommo_posts(note.replace("minhaloja", "minhaloja2"))  # another body, same note id
    bridge.run_jobs()
    assert bridge.intake_results()[1:] == [{"commands": ["pause"]},
                                           {"ignored": ["note 213313359: already applied"]}]
    assert bridge.bot_state()["pause_count"] == 1
    assert bridge.lead_notes().count("🤖 Bot pausado. Vendedor assumindo conversa.") == 1


def test_note_on_a_lead_never_seen_finds_its_contact_through_kommo(bridge):
    bridge.kommo_app.config["STATE"].leads["555"] = {"contacts": ["777"]}
    bridge.seller_notes("#pausar cliente VIP", lead_id="555", note_id="9001")
    bridge.run_jobs()
    state = bridge.bot_state("777")
    assert state["status"] == "paused" and state["reason"] == "cliente VIP"
    assert bridge.lead_notes("555")[-1].startswith("🤖 Bot pausado.")


def test_pause_then_resume_on_a_lead_never_seen_apply_in_the_order_written(bridge):
    # GIVEN a Kommo that takes a while to name a lead's contact (each command asks it)
    bridge.kommo_app.config["STATE"].leads["555"] = {"contacts": ["777"]}
    # WHEN the seller writes #pausar and then #voltar on that lead
    bridge.seller_notes("#pausar", lead_id="555", note_id="9101")
    bridge.seller_notes("#voltar", lead_id="555", note_id="9102")
    bridge.run_jobs()
    # THEN the last word stands, and the notes on the lead say so in that order
    assert bridge.bot_state("777")["status"] == "active"
    notes = [n for n in bridge.lead_notes("555") if n.startswith("🤖")]
    assert notes[0].startswith("🤖 Bot pausado.") and notes[1].startswith("🤖 Bot reativado.")
    commands = [j for j in outbox.list_jobs(bridge.db, kind="kommo.bot_command")]
    assert {j["ordering_key"] for j in commands} == {"kommo-lead:555"}


def test_status_and_help_are_answered_on_the_lead(bridge):
    bridge.customer_says("oi")
    bridge.seller_notes("#pausar almoço", note_id="1")
    bridge.seller_notes("#status", note_id="2")
    bridge.seller_notes("#ajuda", note_id="3")
    bridge.run_jobs()
    status, help_text = bridge.lead_notes()[-2:]
    assert "PAUSADO" in status and "usuário 9040358" in status and "almoço" in status
    assert "#pausar" in help_text and "#voltar" in help_text and "#status" in help_text


def test_notes_written_by_integrations_and_plain_notes_change_nothing(bridge):
    bridge.customer_says("oi")
    bridge.seller_notes("#pausar", created_by="0", note_id="10")
    bridge.seller_notes("cliente ligou pedindo boleto", note_id="11")
    bridge.run_jobs()
    assert bridge.bot_state()["status"] == "active"


def test_auto_resume_after_the_configured_hours(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, BOT_AUTO_RESUME_HOURS=2)
    bridge.customer_says("oi")
    bridge.seller_notes("#pausar")
    bridge.run_jobs()
    assert "Reativação automática" in bridge.lead_notes()[-1]
    ctx = bridge.poller.ctx
    clock.advance(2 * 3600 - 10)
    assert whatsapp_jobs.auto_resume(ctx) == 0
    clock.advance(20)
    assert whatsapp_jobs.auto_resume(ctx) == 1
    bridge.run_jobs()
    assert bridge.bot_state()["status"] == "active"
    assert bridge.lead_notes()[-1].startswith("🤖 Bot reativado.")


def test_answer_produced_before_a_pause_is_not_delivered(bridge):
    bridge.customer_says("quero falar com alguém")
    assert bridge.run_jobs(max_jobs=2) == 2  # applied, n8n answered; the reply job is queued
    assert len(bridge.n8n_calls()) == 1 and bridge.chat_messages() == []
    bridge.seller_notes("#pausar")
    bridge.run_jobs()
    assert len(bridge.n8n_calls()) == 1 and bridge.chat_messages() == []
    reply = outbox.list_jobs(bridge.db, kind="kommo.send_reply")[0]
    assert reply["status"] == "done" and reply["result"] == {"suppressed": "paused"}


def test_late_asynchronous_answer_after_pause_is_not_delivered(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, n8n_mode="empty")
    bridge.customer_says("oi")
    bridge.run_jobs()
    correlation = bridge.n8n_calls()[0]["correlation_id"]
    bridge.seller_notes("#pausar")
    bridge.seller_notes("#voltar", note_id="2")  # even after #voltar: that answer is stale
    bridge.run_jobs()
    response = bridge.n8n_answers_later({"conversation_id": "1874", "response_text": "oi!",
                                         "correlation_id": correlation})
    assert response.status_code == 202 and response.get_json()["suppressed"] is True
    bridge.run_jobs()
    assert bridge.chat_messages() == []


def test_asynchronous_answer_through_send_response(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, n8n_mode="empty")
    bridge.customer_says("oi")
    bridge.run_jobs()
    correlation = bridge.n8n_calls()[0]["correlation_id"]
    body = {"conversation_id": "1874", "response_text": "Olá! Como posso ajudar?",
            "correlation_id": correlation}
    assert bridge.n8n_answers_later(body).status_code == 202
    assert bridge.n8n_answers_later(body).status_code == 202  # n8n retried: still one reply
    by_contact = {"contact_id": "93589657", "response": "Mais alguma dúvida?"}
    assert bridge.n8n_answers_later(by_contact).status_code == 202
    bridge.run_jobs()
    assert bridge.chat_messages() == ["Olá! Como posso ajudar?", "Mais alguma dúvida?"]


def test_send_response_validation(bridge):
    bridge.customer_says("oi")
    bridge.run_jobs()
    assert bridge.n8n_answers_later({"conversation_id": "1874", "response_text": "x"},
                                    key="wrong").status_code == 401
    assert bridge.n8n_answers_later({"conversation_id": "999", "response_text": "x"}
                                    ).status_code == 404
    assert bridge.n8n_answers_later({"conversation_id": "1874"}).status_code == 400
    bad = bridge.web.post("/send-response", data="{oops", content_type="application/json",
                          headers={"Authorization": f"Bearer {N8N_KEY}"})
    assert bad.status_code == 400 and bad.get_json()["error"] == "bad_json"
    deep = bridge.web.post("/send-response", data="[" * 100_000, content_type="application/json",
                           headers={"Authorization": f"Bearer {N8N_KEY}"})
    assert deep.status_code == 400 and deep.get_json()["error"] == "bad_json"
    wrong_type = bridge.n8n_answers_later({"conversation_id": "1874", "response_text": 123})
    assert wrong_type.status_code == 400
    assert "response_text deve ser um texto" in wrong_type.get_json()["message"]
    # an item passed along whole: the text is used, the object beside it is not an error
    whole_item = bridge.n8n_answers_later({"conversation_id": "1874", "response_text": "Oi!",
                                           "message": {"role": "assistant"}, "text": 0})
    assert whole_item.status_code == 202


@pytest.fixture
def async_bridge(make_settings, serve, clock):
    """An n8n workflow that answers through /send-response, after the customer's message was
    forwarded."""
    return BridgeA(make_settings, serve, clock, n8n_mode="empty")


def test_should_send_false_sends_nothing_and_handoff_pauses_with_a_note(async_bridge):
    bridge = async_bridge
    bridge.customer_says("quero um humano")
    bridge.run_jobs()
    response = bridge.n8n_answers_later({"contact_id": "93589657", "response_text": "ok",
                                         "should_send": False, "should_handoff": True})
    assert response.status_code == 202 and response.get_json()["handoff"] is True
    state = bridge.bot_state()
    assert state["status"] == "paused" and state["paused_by_kind"] == "ai"
    bridge.run_jobs()
    assert "o assistente pediu um humano" in bridge.lead_notes()[-1].lower()
    assert bridge.chat_messages() == []  # should_send false: nothing to the customer


def test_handoff_farewell_reaches_the_customer_and_then_the_bot_is_quiet(async_bridge):
    bridge = async_bridge
    bridge.customer_says("quero falar com um humano")
    bridge.run_jobs()
    response = bridge.n8n_answers_later({"conversation_id": "1874", "should_handoff": True,
                                         "response_text": "Vou te passar para um atendente.",
                                         "correlation_id": "c-handoff"})
    assert response.get_json()["queued"] == 1 and response.get_json()["handoff"] is True
    bridge.run_jobs()
    assert bridge.chat_messages() == ["Vou te passar para um atendente."]
    assert bridge.bot_state()["paused_by_kind"] == "ai"
    later = bridge.n8n_answers_later({"conversation_id": "1874", "response_text": "mais algo",
                                      "correlation_id": "c-later"})
    assert later.get_json()["suppressed"] is True
    bridge.run_jobs()
    assert bridge.chat_messages() == ["Vou te passar para um atendente."]


def test_send_response_without_correlation_id_is_deduplicated(async_bridge):
    bridge = async_bridge
    bridge.customer_says("oi")
    bridge.run_jobs()
    body = {"contact_id": "93589657", "response_text": "Olá!"}
    assert bridge.n8n_answers_later(body).get_json()["queued"] == 1
    assert bridge.n8n_answers_later(body).get_json()["duplicate"] is True
    bridge.clock.advance(600)  # later retries are reported as duplicates too, not dropped
    assert bridge.n8n_answers_later(body).get_json()["duplicate"] is True
    bridge.run_jobs()
    assert bridge.chat_messages().count("Olá!") == 1
    # past the retry window the same words are a new answer, sent once more (and deduplicated)
    bridge.clock.advance(whatsapp_intake.ASYNC_RETRY_WINDOW_SECONDS)
    assert bridge.n8n_answers_later(body).get_json()["queued"] == 1
    assert bridge.n8n_answers_later(body).get_json()["duplicate"] is True
    bridge.run_jobs()
    assert bridge.chat_messages().count("Olá!") == 2


def test_a_list_answer_becomes_several_messages_in_order(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, n8n_mode="list")
    bridge.customer_says("quanto custa o frete?")
    bridge.run_jobs()
    sent = bridge.chat_messages()
    assert len(sent) == 2 and sent[1] == "Posso ajudar em mais alguma coisa?"


def test_n8n_down_for_a_while_then_delivered_in_order_per_contact(bridge, clock):
    bridge.n8n_mode(mode="down")
    bridge.customer_says("primeira", message_id="m1")
    bridge.run_jobs()
    bridge.customer_says("segunda", message_id="m2")
    bridge.customer_says("outro cliente", contact_id="42", talk_id="2000", lead_id="4242",
                         message_id="m3")
    for _ in range(3):
        clock.advance(60)
        bridge.run_jobs()
    assert bridge.chat_messages() == []
    bridge.n8n_mode(mode="sync")
    clock.advance(600)
    bridge.run_jobs()
    texts = [c["message_text"] for c in bridge.n8n_calls() if c["contact_id"] == "93589657"]
    assert texts[-2:] == ["primeira", "segunda"]
    replies = bridge.chat_messages("1874")
    assert len(replies) == 2 and "primeira" in replies[0] and "segunda" in replies[1]
    assert len(bridge.chat_messages("2000")) == 1


def test_retention_drops_old_messages_and_short_lived_ids_but_not_a_burst_still_waiting(
        bridge, clock):
    # GIVEN a message answered long ago, and another contact's burst waiting for n8n to be back
    bridge.customer_says("antiga", message_id="old")
    bridge.run_jobs()
    bridge.n8n_mode(mode="down")
    bridge.customer_says("esperando", contact_id="42", talk_id="2000", lead_id="4242",
                         message_id="waiting")
    bridge.run_jobs()
    bridge.kommo_posts(payload_text("kommo/add_lead.form").strip())  # recorded as ignored
    assert db_manager.count_events(bridge.db) > 0
    namespaces = "SELECT DISTINCT namespace FROM mappings"
    assert {"n8n-correlation", "kommo-sent"} <= {r[0] for r in bridge.db.execute(namespaces)}
    # WHEN the retention (JOB_RETENTION_DAYS=7) has passed and the poller prunes
    clock.advance(8 * 86400)
    bridge.poller.prune()
    # THEN the old message, the old event and the short-lived ids are gone; the waiting burst
    # stays
    assert db_manager.count_events(bridge.db) == 0
    messages = bridge.db.execute("SELECT kommo_message_id FROM kommo_messages").fetchall()
    assert [r[0] for r in messages] == ["waiting"]
    assert not {"n8n-correlation", "kommo-sent"} & {r[0] for r in bridge.db.execute(namespaces)}
    assert outbox.list_jobs(bridge.db, kind=whatsapp_intake.FORWARD)[0]["status"] == "pending"


def test_n8n_never_answers_then_seller_gets_a_note_and_customer_the_fallback_once(
        make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, n8n_mode="down", JOB_MAX_ATTEMPTS=3,
                     BOT_FALLBACK_MESSAGE="Já já um atendente te responde!")
    bridge.customer_says("oi")
    for _ in range(5):
        bridge.run_jobs()
        clock.advance(1000)
    assert len(bridge.n8n_calls()) == 3
    assert "não respondeu" in bridge.lead_notes()[-1]
    assert bridge.chat_messages() == ["Já já um atendente te responde!"]


def test_fallback_is_not_sent_after_the_seller_paused(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, n8n_mode="down", JOB_MAX_ATTEMPTS=1,
                     BOT_FALLBACK_MESSAGE="Já já te respondemos")
    bridge.customer_says("oi")
    assert bridge.run_jobs(max_jobs=2) == 2  # applied; n8n fails for good: note + fallback queued
    assert outbox.list_jobs(bridge.db, kind="n8n.forward_message")[0]["status"] == "dead"
    bridge.seller_notes("#pausar")  # ...and the seller takes over before they run
    bridge.run_jobs()
    assert "não respondeu" in " ".join(bridge.lead_notes())
    assert bridge.chat_messages() == []


def test_burst_waiting_for_retry_is_dropped_after_a_pause_and_resume(bridge, clock):
    bridge.n8n_mode(mode="down")
    bridge.customer_says("preço do frete?")
    bridge.run_jobs()  # n8n down: the burst waits for its retry
    bridge.seller_notes("#pausar", note_id="1")
    bridge.seller_notes("#voltar", note_id="2")
    bridge.n8n_mode(mode="sync")
    clock.advance(600)
    bridge.run_jobs()
    assert len(bridge.n8n_calls()) == 1  # only the failed attempt; the seller handled it
    assert bridge.chat_messages() == []


def test_pause_on_another_lead_of_the_same_contact_applies_to_the_contact(bridge):
    bridge.customer_says("oi", lead_id="111", message_id="x1")
    bridge.customer_says("de novo", lead_id="222", message_id="x2")
    bridge.run_jobs()
    bridge.seller_notes("#pausar", lead_id="111", note_id="5")
    bridge.customer_says("e aí?", lead_id="222", message_id="x3")
    bridge.run_jobs()
    assert bridge.bot_state()["status"] == "paused"
    assert [c["message_text"] for c in bridge.n8n_calls()] == ["oi\nde novo"]


def test_a_command_that_cannot_be_applied_is_reported_on_the_lead(bridge, clock):
    bridge.seller_notes("#pausar", lead_id="999", note_id="7")  # Kommo: lead not found
    bridge.run_jobs()
    assert bridge.lead_notes("999")[-1].startswith("⚠️ Não consegui aplicar o comando #pausar")


def test_auto_resume_does_not_undo_a_new_pause(make_settings, serve, clock):
    import whatsapp_store
    bridge = BridgeA(make_settings, serve, clock, BOT_AUTO_RESUME_HOURS=1)
    bridge.customer_says("oi")
    bridge.seller_notes("#pausar", note_id="1")
    bridge.run_jobs()
    clock.advance(3601)
    due = whatsapp_store.due_auto_resumes(bridge.db, clock())
    bridge.seller_notes("#pausar de novo", note_id="2")  # lands between select and update
    bridge.run_jobs()
    assert not whatsapp_store.set_active(bridge.db, "93589657", "auto", clock(),
                                         only_if_pause_count=due[0]["pause_count"])
    assert bridge.bot_state()["status"] == "paused"


def test_our_own_reply_reported_back_by_kommo_does_not_pause(make_settings, serve, clock):
    from standins import kommo as k
    bridge = BridgeA(make_settings, serve, clock, BOT_PAUSE_ON_HUMAN_REPLY="true")
    bridge.customer_says("oi")
    bridge.run_jobs()
    sent = bridge.kommo_state()["sent"][0]
    bridge.kommo_posts(k.outgoing_form(sent["text"], message_id=sent["id"]))
    bridge.run_jobs()
    assert bridge.intake_results()[-1] == {"ignored": [f"message {sent['id']}: our own reply"]}
    assert bridge.bot_state()["status"] == "active"


def test_closed_talk_is_not_retried_and_the_seller_is_told(bridge):
    bridge.kommo_app.config["STATE"].closed_talks.add("1874")
    bridge.customer_says("oi")
    bridge.run_jobs()
    reply = outbox.list_jobs(bridge.db, kind="kommo.send_reply")[0]
    assert reply["status"] == "dead" and reply["attempts"] == 1
    assert "conversa está fechada" in bridge.lead_notes()[-1]


def test_kommo_down_while_replying_then_delivered(bridge, clock):
    bridge.kommo_fails(path_prefix="/api/v4/talks", status=503, count=2)
    bridge.customer_says("oi")
    bridge.run_jobs()
    assert bridge.chat_messages() == []
    for _ in range(2):
        clock.advance(60)
        bridge.run_jobs()
    assert len(bridge.chat_messages()) == 1 and len(bridge.n8n_calls()) == 1


def test_salesbot_reply_mode_writes_the_field_then_runs_the_bot(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, KOMMO_REPLY_MODE="salesbot",
                     KOMMO_SALESBOT_ID="321", KOMMO_REPLY_FIELD_ID="2991944",
                     n8n_mode="list")
    bridge.customer_says("oi")
    bridge.run_jobs()
    state = bridge.kommo_state()
    assert len(state["bot_runs"]) == 1  # second answer waits: one bot per lead at a time
    assert state["bot_runs"][0]["text"]["2991944"].startswith("Olá")
    clock.advance(10)
    bridge.run_jobs()
    runs = bridge.kommo_state()["bot_runs"]
    assert len(runs) == 2 and runs[1]["text"]["2991944"] == "Posso ajudar em mais alguma coisa?"
    assert bridge.chat_messages() == []


def test_seller_chat_message_with_a_command_pauses(bridge):
    from standins import kommo as k
    bridge.customer_says("oi")
    bridge.kommo_posts(k.outgoing_form("#pausar"))
    bridge.run_jobs()
    assert bridge.bot_state()["status"] == "paused"


def test_pause_on_human_reply(make_settings, serve, clock):
    from standins import kommo as k
    bridge = BridgeA(make_settings, serve, clock, BOT_PAUSE_ON_HUMAN_REPLY="true")
    bridge.customer_says("oi")
    bridge.kommo_posts(k.outgoing_form("Oi Maria, aqui é o João!"))
    bridge.run_jobs()
    assert bridge.bot_state()["paused_by_kind"] == "human_reply"
    assert "vendedor respondeu no chat" in bridge.lead_notes()[-1]
