"""Pre-sale questions: Mercado Livre question → Chatwoot conversation, agent reply → answer.
Everything crosses real loopback HTTP to the stand-ins; time is the injected clock."""
from __future__ import annotations


import requests

import meli_jobs
import meli_store
import outbox
from tests.meli_support import (QUESTIONS_INBOX, Bridge, PNG_BYTES, bridge,  # noqa: F401
                                messages_of)


def _only_conversation(b: Bridge) -> dict:
    conversations = b.conversations(QUESTIONS_INBOX)
    assert len(conversations) == 1, conversations
    return conversations[0]


def test_new_question_becomes_one_conversation_with_item_context(bridge):
    # GIVEN a buyer asked about an item
    qid = bridge.ask("Serve no modelo 2019? Tem pronta entrega?", price=1234.5)
    # WHEN the poller runs
    bridge.poll()
    # THEN one conversation in the questions inbox, contact meli:<buyer> named by nickname
    conv = _only_conversation(bridge)
    assert conv["custom_attributes"]["meli_question_id"] == str(qid)
    assert conv["custom_attributes"]["meli_item_id"] == "MLB3737188005"
    contact = bridge.cw_state()["contacts"][0]
    assert contact["identifier"] == "meli:1944693439"
    assert contact["name"] == "COMPRADOR1944693439"
    (message,) = messages_of(conv)
    assert message["message_type_name"] == "incoming" and message["private"] is False
    assert message["source_id"] == f"meli:question:{qid}"
    text = message["content"]
    assert text.startswith("Serve no modelo 2019? Tem pronta entrega?")
    assert "Espaçador E Nivelador Para Piso" in text and "R$ 1.234,50" in text
    assert "https://produto.mercadolivre.com.br/MLB3737188005" in text
    assert message["attachments"][0]["file_type"] == "image"  # the item's thumbnail
    bridge.assert_spec_clean()


def test_same_question_by_poll_and_notification_twice_across_restart_is_one_message(bridge):
    qid = bridge.ask("Qual a voltagem?")
    # GIVEN the notification arrives twice (same id) and once more with another id
    for nid in ("n1", "n1", "n2"):
        assert bridge.notify_ml("questions", f"/questions/{qid}", nid).status_code == 200
    bridge.poll()
    # WHEN ponte restarts and sees the question again by poll and by notification
    bridge.restart()
    assert bridge.notify_ml("questions", f"/questions/{qid}", "n3").status_code == 200
    bridge.poll()
    bridge.poll()
    # THEN one conversation, one message
    conv = _only_conversation(bridge)
    assert len(messages_of(conv)) == 1
    assert len(bridge.cw_state()["contacts"]) == 1


def test_idle_poll_cycle_costs_two_api_calls(bridge):
    bridge.poll()
    requests.post(f"{bridge.ml.url}/_standin/calls/clear")
    bridge.poll()
    calls = [c["path"] for c in bridge.ml_state()["calls"]]
    assert calls == ["/questions/search", "/messages/unread"]


def test_agent_reply_answers_the_question_and_marks_the_conversation(make_settings, serve,
                                                                     clock):
    b = Bridge(make_settings, serve, clock, CHATWOOT_RESOLVE_ANSWERED="true")
    qid = b.ask("Tem na cor azul?")
    b.poll()
    conv = _only_conversation(b)
    # WHEN the agent replies (markdown in Chatwoot's editor)
    hook = b.agent_replies(conv["id"], "**Temos sim!** Envio hoje.")
    assert hook["delivered_status"] == 200
    b.drain()
    # THEN the answer is on Mercado Livre as plain text
    state = b.ml_state()
    assert [a["text"] for a in state["answers"]] == ["Temos sim! Envio hoje."]
    assert state["questions"][str(qid)]["status"] == "ANSWERED"
    conv = _only_conversation(b)
    assert "respondida" in conv["labels"]
    assert conv["custom_attributes"]["meli_answered"] is True
    assert conv["custom_attributes"]["meli_question_id"] == str(qid)  # merged, not replaced
    assert conv["status"] == "resolved"
    reply = [m for m in messages_of(conv) if m["id"] == hook["message_id"]][0]
    assert reply["status"] == "delivered"
    b.assert_spec_clean()


def test_same_chatwoot_delivery_twice_gives_one_answer(bridge):
    bridge.ask("Aceita troca?")
    bridge.poll()
    conv = _only_conversation(bridge)
    hook = bridge.agent_replies(conv["id"], "Aceitamos em até 7 dias.")
    assert bridge.redeliver(hook).status_code == 200
    bridge.drain()
    assert bridge.redeliver(hook).status_code == 200
    bridge.restart()
    bridge.drain()
    assert len(bridge.ml_state()["answers"]) == 1


def test_second_reply_to_an_answered_question_is_refused_with_a_note(bridge):
    bridge.ask("Tem garantia?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.agent_replies(conv["id"], "Sim, 90 dias.")
    bridge.drain()
    second = bridge.agent_replies(conv["id"], "Esqueci: e nota fiscal também.")
    bridge.drain()
    assert len(bridge.ml_state()["answers"]) == 1
    messages = messages_of(_only_conversation(bridge))
    notes = [m for m in messages if m["private"]]
    assert any("já foi respondida" in n["content"] for n in notes)
    assert [m for m in messages if m["id"] == second["message_id"]][0]["status"] == "failed"


def test_too_long_answer_is_refused_with_a_note_and_never_retried(bridge):
    bridge.ask("Qual o tamanho?")
    bridge.poll()
    conv = _only_conversation(bridge)
    hook = bridge.agent_replies(conv["id"], "a" * 2001)
    bridge.drain()
    assert bridge.ml_state()["answers"] == []
    messages = messages_of(_only_conversation(bridge))
    assert any(m["private"] and "2.001 caracteres" not in m["content"]
               and "2001 caracteres" in m["content"] for m in messages)
    assert _status(messages, hook["message_id"]) == "failed"
    assert bridge.jobs(status="pending") == [] and bridge.jobs(status="dead") == []


def test_deleted_question_gives_a_note_in_portuguese(bridge):
    qid = bridge.ask("Ainda tem?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.ml_post(f"/_standin/questions/{qid}", {"status": "DELETED"})
    hook = bridge.agent_replies(conv["id"], "Tem sim!")
    bridge.drain()
    messages = messages_of(_only_conversation(bridge))
    assert any(m["private"] and "excluída" in m["content"] for m in messages)
    assert _status(messages, hook["message_id"]) == "failed"


def test_closed_item_gives_a_note(bridge):
    bridge.ask("Chega até sexta?", item_id="MLB999")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.ml_post("/_standin/items", [{"id": "MLB999", "status": "closed"}])
    bridge.agent_replies(conv["id"], "Chega sim.")
    bridge.drain()
    messages = messages_of(_only_conversation(bridge))
    assert any(m["private"] and "pausado ou encerrado" in m["content"] for m in messages)
    assert bridge.ml_state()["answers"] == []


def test_answer_typed_on_mercado_livre_is_mirrored_and_never_sent_back(bridge):
    qid = bridge.ask("Faz entrega no sábado?")
    bridge.poll()
    bridge.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Fazemos sim."})
    bridge.notify_ml("questions", f"/questions/{qid}", "answered-1")
    bridge.drain()
    conv = _only_conversation(bridge)
    mirrored = [m for m in messages_of(conv) if m["source_id"] == f"meli:answer:{qid}"]
    assert len(mirrored) == 1 and mirrored[0]["message_type_name"] == "outgoing"
    assert mirrored[0]["content"] == "Fazemos sim."
    # Chatwoot echoes the mirrored message as an outgoing "agent" message: not forwarded
    echo = bridge.echo_of(mirrored[0]["id"])
    assert echo["delivered_status"] == 200
    bridge.drain()
    assert bridge.ml_state()["answers"] == []
    assert "respondida-no-ml" in conv["labels"]


def test_answer_with_attachment_sends_text_and_notes_the_attachment(bridge):
    bridge.ask("Tem foto da etiqueta?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.agent_replies(conv["id"], "Tem sim, veja a foto.",
                         attachments=[("etiqueta.png", PNG_BYTES, "image/png")])
    bridge.drain()
    assert [a["text"] for a in bridge.ml_state()["answers"]] == ["Tem sim, veja a foto."]
    notes = [m for m in messages_of(_only_conversation(bridge)) if m["private"]]
    assert any("não aceitam anexos" in n["content"] and "etiqueta.png" in n["content"]
               for n in notes)


def test_questions_of_same_buyer_and_item_get_own_conversations_that_cite_each_other(bridge):
    first = bridge.ask("Tem em 110v?")
    bridge.poll()
    second = bridge.ask("E em 220v?")
    bridge.poll()
    conversations = sorted(bridge.conversations(QUESTIONS_INBOX), key=lambda c: c["id"])
    assert [c["custom_attributes"]["meli_question_id"] for c in conversations] == [
        str(first), str(second)]
    assert f"conversa #{conversations[0]['id']}" in messages_of(conversations[1])[0]["content"]
    assert len(bridge.cw_state()["contacts"]) == 1


def test_polling_pages_through_many_questions_oldest_first(bridge):
    bridge.ml_post("/_standin/items", [{"id": "MLB1", "title": "Item"}])
    bridge.ml_post("/_standin/questions", [
        {"text": f"pergunta {n}", "item_id": "MLB1", "buyer_id": 1000 + n,
         "date_created": f"2026-03-10T10:{n // 60:02d}:{n % 60:02d}.000-04:00"}
        for n in range(120)])
    result = meli_jobs.poll_questions(bridge.ctx)
    assert result == {"enqueued": 120, "pages": 3, "full_sweep": True}
    jobs = sorted(bridge.jobs(kind="ml.import_question", status="pending", limit=500), key=lambda j: j["id"])
    assert [j["payload"]["question"]["text"] for j in jobs[:2]] == ["pergunta 0", "pergunta 1"]


def test_question_import_survives_chatwoot_failure_without_duplicates(bridge):
    bridge.ask("Tem estoque?")
    requests.post(f"{bridge.cw.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/conversations/42/messages",
                        "status": 500, "count": 1})
    bridge.poll()
    (job,) = bridge.jobs(kind="ml.import_question")
    assert job["status"] == "pending" and job["attempts"] == 1
    bridge.clock.advance(3600)
    bridge.drain()
    conv = _only_conversation(bridge)
    assert len(messages_of(conv)) == 1
    assert outbox.get_job(bridge.conn, job_id=job["id"])["status"] == "done"


def test_question_answered_on_mercado_livre_before_its_conversation_exists(bridge):
    # GIVEN a question whose conversation Chatwoot refused to create (an import under way)
    qid = bridge.ask("Serve no modelo 2020?")
    requests.post(f"{bridge.cw.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/conversations", "method": "POST",
                        "status": 500, "count": 1})
    bridge.poll()
    assert bridge.jobs(kind="ml.import_question")[0]["status"] == "pending"
    # WHEN the seller answers it on Mercado Livre and the notification comes first
    bridge.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Serve sim."})
    bridge.notify_ml("questions", f"/questions/{qid}", "answered-early")
    bridge.drain()
    # THEN the notification's job ends quietly: there is no conversation to mirror into yet
    (fetch,) = bridge.jobs(kind="ml.fetch_question")
    assert fetch["status"] == "done" and fetch["result"]["status"] == "nothing_to_do"


def test_import_that_died_while_chatwoot_was_down_is_rearmed_by_a_later_poll(
        make_settings, serve, clock):
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    b.ask("Tem pronta entrega?")
    requests.post(f"{b.cw.url}/_standin/fail", json={"path_prefix": "/api/", "status": 503,
                                                     "count": 1})
    b.poll()
    (job,) = b.jobs(kind="ml.import_question")
    assert job["status"] == "dead"
    b.clock.advance(600)
    b.poll()  # too soon: stays dead, visible to the operator
    assert b.jobs(kind="ml.import_question")[0]["status"] == "dead"
    b.clock.advance(3600)
    b.poll()  # the question is still unanswered on Mercado Livre: try again
    conv = _only_conversation(b)
    assert len(messages_of(conv)) == 1


def test_idle_poll_stays_one_call_with_a_backlog_of_open_questions(bridge):
    bridge.ml_post("/_standin/items", [{"id": "MLB1", "title": "Item"}])
    bridge.ml_post("/_standin/questions", [
        {"text": f"pergunta {n}", "item_id": "MLB1", "buyer_id": 2000 + n,
         "date_created": f"2026-03-10T10:{n // 60:02d}:{n % 60:02d}.000-04:00"}
        for n in range(120)])
    bridge.poll()  # all 120 imported, none answered: they stay UNANSWERED on Mercado Livre
    requests.post(f"{bridge.ml.url}/_standin/calls/clear")
    assert meli_jobs.poll_questions(bridge.ctx)["pages"] == 1
    # a new question is found on the first (newest) page, then one more page confirms
    newest = bridge.ask("pergunta nova", item_id="MLB1", buyer_id=9999,
                        date_created="2026-03-11T09:00:00.000-04:00")
    assert meli_jobs.poll_questions(bridge.ctx) == {"enqueued": 1, "pages": 2,
                                                     "full_sweep": False}
    bridge.drain()
    assert len(bridge.conversations(QUESTIONS_INBOX)) == 121
    assert bridge.jobs(kind="ml.import_question", limit=1)[0]["payload"]["question"]["id"] == \
        newest
    # once an hour the sweep walks the whole list again
    bridge.clock.advance(3600)
    assert meli_jobs.poll_questions(bridge.ctx)["pages"] == 3


def test_chatwoot_down_after_the_answer_went_out_retries_only_the_marking(bridge):
    bridge.ask("Tem manual em português?")
    bridge.poll()
    conv = _only_conversation(bridge)
    # Chatwoot fails the label call right after Mercado Livre accepted the answer
    requests.post(f"{bridge.cw.url}/_standin/fail", json={
        "path_prefix": f"/api/v1/accounts/1/conversations/{conv['id']}/labels", "status": 502,
        "count": 1})
    hook = bridge.agent_replies(conv["id"], "Tem sim.")
    bridge.drain()
    assert len(bridge.ml_state()["answers"]) == 1
    assert bridge.jobs(kind="chatwoot.mark_answered")[0]["status"] == "pending"
    bridge.clock.advance(3600)
    bridge.drain()
    assert len(bridge.ml_state()["answers"]) == 1  # the answer is never sent twice
    conv = _only_conversation(bridge)
    assert "respondida" in conv["labels"]
    _assert_delivered_without_note(conv, hook["message_id"])


def test_mercado_livre_down_while_agent_answers_a_question_delivers_later(bridge):
    bridge.ask("Qual a garantia?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.fail_ml("/answers", 503, count=3)
    bridge.agent_replies(conv["id"], "Um ano de garantia.")
    for _ in range(5):
        bridge.drain()
        bridge.clock.advance(900)
    assert [a["text"] for a in bridge.ml_state()["answers"]] == ["Um ano de garantia."]
    assert bridge.jobs(status="dead") == []
    assert "respondida" in _only_conversation(bridge)["labels"]


def test_conversation_created_but_answer_lost_is_reused_not_duplicated(bridge):
    # GIVEN Chatwoot creates the conversation but its answer is lost (a 503 after the fact)
    bridge.ask("Tem azul?")
    requests.post(f"{bridge.cw.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/conversations", "method": "POST",
                        "status": 503, "apply": True})
    bridge.poll()
    assert len(bridge.conversations(QUESTIONS_INBOX)) == 1
    # WHEN the import is retried
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN the question is one conversation with its one message
    conv = _only_conversation(bridge)
    assert [m["content"].splitlines()[0] for m in messages_of(conv)] == ["Tem azul?"]
    assert bridge.jobs(status="dead") == []
    bridge.assert_spec_clean()


def test_our_answer_stored_altered_by_mercado_livre_is_not_mirrored_back(bridge):
    # GIVEN Mercado Livre stores answers with the whitespace collapsed
    bridge.ml_post("/_standin/options", {"normalize_answers": True})
    qid = bridge.ask("Serve no modelo 2019?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.agent_replies(conv["id"], "Serve  sim,\ncom o kit.")
    bridge.drain()
    assert [a["text"] for a in bridge.ml_state()["answers"]] == ["Serve sim, com o kit."]
    # WHEN the questions notification for that answer arrives
    bridge.notify_ml("questions", f"/questions/{qid}", "answered-by-us")
    bridge.drain()
    # THEN our own answer is not shown again as typed on Mercado Livre
    conv = _only_conversation(bridge)
    assert not any(m["source_id"] == f"meli:answer:{qid}" for m in messages_of(conv))
    assert "respondida-no-ml" not in conv["labels"] and "respondida" in conv["labels"]


def test_answer_taken_by_mercado_livre_whose_reply_was_lost_counts_as_ours_on_retry(bridge):
    # GIVEN Mercado Livre alters the stored text and its answer to our POST is lost
    bridge.ml_post("/_standin/options", {"normalize_answers": True})
    bridge.ask("Tem garantia?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.fail_ml("/answers", 503, method="POST", apply=True)
    hook = bridge.agent_replies(conv["id"], "Tem  sim, um ano.")
    bridge.drain()
    # WHEN the reply is retried (Mercado Livre now says the question is answered)
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN it counts as delivered, with no "already answered" note
    conv = _only_conversation(bridge)
    assert len(bridge.ml_state()["answers"]) == 1
    _assert_delivered_without_note(conv, hook["message_id"])


def test_mirrored_answer_is_not_posted_again_after_old_jobs_are_pruned(bridge):
    # GIVEN an answer typed on Mercado Livre, mirrored once
    qid = bridge.ask("Entrega no sábado?")
    bridge.poll()
    bridge.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Entregamos."})
    bridge.notify_ml("questions", f"/questions/{qid}", "answered-1")
    bridge.drain()
    # WHEN finished jobs are pruned and Mercado Livre notifies about the question again
    bridge.clock.advance(40 * 86400)
    bridge.poller.prune(older_than=bridge.clock())
    bridge.notify_ml("questions", f"/questions/{qid}", "answered-2")
    bridge.drain()
    # THEN the answer is in the conversation once
    conv = _only_conversation(bridge)
    assert len([m for m in messages_of(conv) if m["source_id"] == f"meli:answer:{qid}"]) == 1


def test_answer_typed_on_mercado_livre_without_a_notification_is_mirrored_by_the_sweep(bridge):
    # GIVEN an imported question, answered directly on Mercado Livre; no notification arrives
    qid = bridge.ask("Serve 2019?")
    other = bridge.ask("Tem preto?", buyer_id=1944693440)
    bridge.poll()
    bridge.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Serve sim"})
    # WHEN the hourly full sweep runs (and again an hour later)
    for _ in range(2):
        bridge.clock.advance(3700)
        bridge.poll()
    # THEN the answer shows in its conversation once, labelled; the open question is untouched
    by_question = {c["custom_attributes"]["meli_question_id"]: c
                   for c in bridge.conversations(QUESTIONS_INBOX)}
    conv = by_question[str(qid)]
    assert [m["content"] for m in messages_of(conv)
            if m["source_id"] == f"meli:answer:{qid}"] == ["Serve sim"]
    assert "respondida-no-ml" in conv["labels"]
    assert len(messages_of(by_question[str(other)])) == 1
    checks = [j for j in bridge.jobs(kind="ml.fetch_question")]
    assert [j["payload"]["question_id"] for j in checks] == [str(qid)]


def test_deleted_question_is_reread_by_one_sweep_only(bridge):
    qid = bridge.ask("Ainda tem?")
    bridge.poll()
    bridge.ml_post(f"/_standin/questions/{qid}", {"status": "DELETED"})
    for _ in range(3):
        bridge.clock.advance(3700)
        bridge.poll()
    assert len(bridge.jobs(kind="ml.fetch_question")) == 1


def test_import_rearmed_after_dying_once_the_conversation_existed_reuses_it(
        make_settings, serve, clock):
    # GIVEN one attempt per job, and Chatwoot creates the conversation but loses the answer
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    b.ask("Tem pronta entrega?")
    requests.post(f"{b.cw.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/conversations", "method": "POST",
                        "status": 503, "apply": True})
    b.poll()
    assert b.jobs(kind="ml.import_question")[0]["status"] == "dead"
    # WHEN a later poll re-arms the import (a fresh attempt count)
    b.clock.advance(3700)
    b.poll()
    # THEN the question is still one conversation with one message
    conv = _only_conversation(b)
    assert len(messages_of(conv)) == 1


def test_notification_while_our_answer_is_being_retried_does_not_mirror_it(bridge):
    # GIVEN Mercado Livre took the agent's answer but its reply was lost (retry pending)
    qid = bridge.ask("Aceita troca?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.fail_ml("/answers", 503, method="POST", apply=True)
    hook = bridge.agent_replies(conv["id"], "Aceitamos em até 7 dias.")
    bridge.drain()
    # WHEN the questions notification for that answer arrives before the retry
    bridge.notify_ml("questions", f"/questions/{qid}", "answered-meanwhile")
    bridge.drain()
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN the answer counts as ours: delivered, not mirrored, no note
    conv = _only_conversation(bridge)
    assert not any(m["source_id"] == f"meli:answer:{qid}" for m in messages_of(conv))
    assert "respondida-no-ml" not in conv["labels"]
    _assert_delivered_without_note(conv, hook["message_id"])


def test_retry_after_a_plain_outage_does_not_swallow_an_answer_typed_on_mercado_livre(bridge):
    # GIVEN Mercado Livre is down (503, nothing stored) when the agent answers
    qid = bridge.ask("Tem garantia?")
    bridge.poll()
    conv = _only_conversation(bridge)
    bridge.fail_ml("/answers", 503, method="POST")
    hook = bridge.agent_replies(conv["id"], "Sim, 12 meses.")
    bridge.drain()
    # WHEN the seller answers on Mercado Livre's site meanwhile, and its notification arrives
    bridge.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Garantia de 90 dias."})
    bridge.notify_ml("questions", f"/questions/{qid}", "seller-typed")
    bridge.clock.advance(3600)
    bridge.drain()
    # THEN the agent's text is not marked delivered, the agent is told why, and the answer
    # the buyer sees is mirrored into the conversation
    conv = _only_conversation(bridge)
    msgs = messages_of(conv)
    assert _status(msgs, hook["message_id"]) == "failed"
    assert any(m["private"] and "respondida no Mercado Livre" in m["content"] for m in msgs)
    assert [m["content"] for m in msgs if m.get("source_id") == f"meli:answer:{qid}"] == \
        ["Garantia de 90 dias."]
    assert bridge.ml_state()["answers"] == []  # the agent's text never reached Mercado Livre


def test_sweep_rotates_through_questions_whose_check_changes_nothing(make_settings, serve,
                                                                      clock, monkeypatch):
    # GIVEN one check slot per sweep, one attempt per job, and two imported questions that
    # left UNANSWERED but whose re-read keeps failing
    import meli_questions
    monkeypatch.setattr(meli_questions, "SWEEP_CHECK_MAX", 1)
    monkeypatch.setattr(meli_questions, "SWEEP_CHECK_LIMIT", 3, raising=False)
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    first = b.ask("Tem azul?")
    second = b.ask("Tem verde?", buyer_id=1944693441)
    b.poll()
    for qid in (first, second):
        b.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Sim"})
        b.fail_ml(f"/questions/{qid}", 500, count=1000, method="GET")
    # WHEN three hourly sweeps run
    checked = []
    for _ in range(3):
        b.clock.advance(3700)
        b.poll()
        checked.append(sorted({j["payload"]["question_id"] for j in
                               b.jobs(kind="ml.fetch_question")}))
    # THEN the second sweep takes the other question, and a question whose check died gets
    # no new dead job the hour after
    assert checked == [[str(first)], [str(first), str(second)], [str(first), str(second)]]
    assert len(b.jobs(kind="ml.fetch_question")) == 2
    # AND after SWEEP_CHECK_LIMIT slots each, the sweep leaves them alone
    for _ in range(4):
        b.clock.advance(3700)
        b.poll()
    for qid in (first, second):
        known = meli_store.get_question(b.conn, qid)
        assert (known.sweep_checks, known.closed_status) == (3, meli_store.CLOSED_UNSETTLED)


def test_question_under_review_is_not_closed_and_its_later_answer_is_mirrored(bridge):
    # GIVEN an imported question put under review by Mercado Livre
    qid = bridge.ask("Tem garantia?")
    bridge.poll()
    bridge.ml_post(f"/_standin/questions/{qid}", {"status": "UNDER_REVIEW"})
    bridge.clock.advance(3700)
    bridge.poll()
    # WHEN it comes back and the seller answers it on Mercado Livre's site (no notification)
    bridge.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Sim, 1 ano."})
    bridge.clock.advance(3700)
    bridge.poll()
    # THEN the next sweep still re-reads it and the answer shows in the conversation
    conv = _only_conversation(bridge)
    assert [m["content"] for m in messages_of(conv)
            if m["source_id"] == f"meli:answer:{qid}"] == ["Sim, 1 ano."]


def test_dead_mirror_rearmed_by_an_operator_does_not_post_the_answer_twice(make_settings,
                                                                             serve, clock):
    # GIVEN one attempt per job; the seller answers on Mercado Livre's site, and Chatwoot
    # stores the mirrored answer but loses its reply
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    qid = b.ask("Tem preto?")
    b.poll()
    b.ml_post(f"/_standin/questions/{qid}", {"answer_text": "Tem sim."})
    requests.post(f"{b.cw.url}/_standin/fail",
                  json={"path_prefix": "/api/v1/accounts/1/conversations/", "method": "POST",
                        "status": 503, "apply": True}, timeout=5)
    b.notify_ml("questions", f"/questions/{qid}", "seller-typed")
    b.drain()
    [dead] = b.jobs(status="dead", kind="ml.mirror_answer")
    # WHEN an operator re-arms it (attempts reset to 0)
    assert outbox.retry_dead_job(b.conn, dead["id"], clock())
    b.drain()
    # THEN the answer is in the conversation once, labelled
    conv = _only_conversation(b)
    assert [m["content"] for m in messages_of(conv)
            if m["source_id"] == f"meli:answer:{qid}"] == ["Tem sim."]
    assert "respondida-no-ml" in conv["labels"]


def _status(messages: list[dict], message_id) -> str:
    return next(m for m in messages if m["id"] == message_id)["status"]


def _assert_delivered_without_note(conv: dict, message_id) -> None:
    assert _status(messages_of(conv), message_id) == "delivered"
    assert not any(m["private"] for m in messages_of(conv))
