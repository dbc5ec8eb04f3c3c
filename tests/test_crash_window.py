"""The crash window of bridge A, across HTTP: a Kommo write whose job runs again after its
worker died mid-call (or after an answer that may have reached Kommo) is read back from Kommo
before it is repeated; the n8n call of one burst carries one Idempotency-Key on every retry."""
from __future__ import annotations

import logging
import time

import pytest
import requests

import outbox
import whatsapp_jobs
import whatsapp_resend
from job_runner import JobContext
from kommo_api import KommoWritten, parse_lead_notes, parse_talk_messages
from tests.bridge_a_harness import BridgeA
from whatsapp_intake import ADD_NOTE, SEND_REPLY

ANSWER = "Entregamos em Campinas em até 2 dias úteis."


@pytest.fixture
def bridge(make_settings, serve, clock):
    return BridgeA(make_settings, serve, clock, n8n_mode="empty")


def _reply_job_waiting(bridge, text=ANSWER):
    """GIVEN a customer question whose answer n8n posted later: one reply job is due."""
    bridge.customer_says("Vocês entregam em Campinas?")
    bridge.run_jobs()
    assert bridge.n8n_answers_later({"conversation_id": "1874", "response_text": text,
                                     "correlation_id": "corr-1"}).status_code == 202


def _run_then_die(bridge, kind):
    """The poller claims the next job and runs its handler (the Kommo call happens), then dies
    before the job is marked done: the job stays `running` under a lease."""
    job = outbox.claim_next_job(bridge.db, bridge.clock(), bridge.settings.job_lease_seconds,
                                worker="dead-poller")
    assert job.kind == kind
    whatsapp_jobs.HANDLERS[kind](JobContext(bridge.settings, bridge.db, now=bridge.clock), job)
    assert outbox.get_job(bridge.db, job.id)["status"] == "running"
    return job


def _kommo_gets(bridge, path_part):
    return [r for r in bridge.kommo_state()["requests"]
            if r["method"] == "GET" and path_part in r["path"]]


def test_reply_that_reached_kommo_before_the_worker_died_is_not_sent_again(bridge):
    _reply_job_waiting(bridge)
    job = _run_then_die(bridge, SEND_REPLY)
    assert bridge.chat_messages() == [ANSWER]
    # WHEN the lease ends and a poller takes the job again
    bridge.clock.advance(bridge.settings.job_lease_seconds + 1)
    bridge.run_jobs()
    # THEN it finds the message in the talk and completes without sending it twice
    assert bridge.chat_messages() == [ANSWER]
    done = outbox.get_job(bridge.db, job.id)
    assert done["status"] == "done" and done["result"]["already_delivered"] is True
    assert len(_kommo_gets(bridge, "/talks/1874/messages")) == 1


def test_refused_read_back_sends_again_and_says_it_is_unverified(bridge, caplog):
    _reply_job_waiting(bridge)
    job = _run_then_die(bridge, SEND_REPLY)
    # GIVEN a token without the "External chat history" scope
    bridge.kommo_fails(path_prefix="/api/v4/talks/1874/messages", method="GET", status=403)
    bridge.clock.advance(bridge.settings.job_lease_seconds + 1)
    with caplog.at_level(logging.WARNING, logger="ponte.whatsapp"):
        bridge.run_jobs()
    # THEN the reply is sent again (better twice than never) and the log says it was a guess
    assert bridge.chat_messages() == [ANSWER, ANSWER]
    assert outbox.get_job(bridge.db, job.id)["status"] == "done"
    unverified = [r for r in caplog.records if r.getMessage() == "reply_resend_unverified"]
    assert len(unverified) == 1 and unverified[0].reason.startswith("403")


def test_reply_whose_earlier_attempt_never_reached_kommo_is_sent_without_a_read_back(bridge):
    _reply_job_waiting(bridge)
    # GIVEN Kommo refusing the first send with 429 (nothing was sent)
    bridge.kommo_fails(path_prefix="/api/v4/talks/1874/send_message", status=429)
    bridge.run_jobs()
    assert bridge.chat_messages() == []
    bridge.clock.advance(60)
    bridge.run_jobs()
    assert bridge.chat_messages() == [ANSWER]
    assert _kommo_gets(bridge, "/messages") == []


def test_first_attempts_make_no_read_back_calls(bridge):
    _reply_job_waiting(bridge)
    bridge.run_jobs()
    assert bridge.chat_messages() == [ANSWER]
    assert [r for r in bridge.kommo_state()["requests"] if r["method"] == "GET"] == []


def test_reply_timed_out_after_reaching_kommo_is_not_sent_again(bridge):
    # GIVEN a send that reached Kommo but whose answer was a 503 (may have reached)
    _reply_job_waiting(bridge)
    job = _run_then_die(bridge, SEND_REPLY)
    outbox.fail_job(bridge.db, job, "kommo 503: lost answer", True, bridge.clock(), 5, 86400)
    bridge.clock.advance(3600)
    bridge.run_jobs()
    assert bridge.chat_messages() == [ANSWER]
    assert outbox.get_job(bridge.db, job.id)["status"] == "done"


def test_the_same_words_said_earlier_in_the_talk_do_not_count_as_delivered(bridge):
    # GIVEN the answer already said in this talk an hour ago (Kommo's stamps are real time)
    bridge.clock.t = time.time()
    _reply_job_waiting(bridge)
    bridge.run_jobs()
    with bridge.kommo_app.config["STATE"].lock:
        bridge.kommo_app.config["STATE"].sent[0]["at"] -= 3600
    # AND a new question whose reply job, with the same words, died after marking its send
    # and before the request left
    bridge.customer_says("E para Santos?")
    bridge.run_jobs()
    bridge.n8n_answers_later({"conversation_id": "1874", "response_text": ANSWER,
                              "correlation_id": "corr-2"})
    job = outbox.claim_next_job(bridge.db, bridge.clock(), bridge.settings.job_lease_seconds)
    with whatsapp_resend.kommo_write(bridge.db, job, bridge.clock()):
        pass
    # WHEN the job runs again
    bridge.clock.advance(bridge.settings.job_lease_seconds + 1)
    bridge.run_jobs()
    # THEN the hour-old copy is not taken for this one: the answer is sent
    assert bridge.chat_messages() == [ANSWER, ANSWER]
    assert len(_kommo_gets(bridge, "/talks/1874/messages")) == 1


def test_note_that_reached_kommo_before_the_worker_died_is_not_added_again(bridge):
    # GIVEN a seller's #pausar whose confirmation note is due
    bridge.customer_says("oi")
    bridge.run_jobs()
    bridge.seller_notes("#pausar almoço")
    while not outbox.list_jobs(bridge.db, status="pending", kind=ADD_NOTE):
        assert bridge.run_jobs(max_jobs=1) == 1
    job = _run_then_die(bridge, ADD_NOTE)
    notes = bridge.lead_notes()
    assert len(notes) == 1 and notes[0].startswith("🤖 Bot pausado")
    bridge.clock.advance(bridge.settings.job_lease_seconds + 1)
    bridge.run_jobs()
    assert bridge.lead_notes() == notes
    assert outbox.get_job(bridge.db, job.id)["status"] == "done"


def test_salesbot_reply_that_ran_before_the_worker_died_is_not_run_again(make_settings, serve,
                                                                          clock):
    bridge = BridgeA(make_settings, serve, clock, n8n_mode="empty", KOMMO_REPLY_MODE="salesbot",
                     KOMMO_SALESBOT_ID=77, KOMMO_REPLY_FIELD_ID=2991944)
    requests.post(bridge.kommo.url + "/_standin/leads",
                  json={"lead_id": "28455849", "contacts": ["93589657"], "talk_id": "1874"})
    _reply_job_waiting(bridge)
    _run_then_die(bridge, SEND_REPLY)
    assert len(bridge.kommo_state()["bot_runs"]) == 1
    bridge.clock.advance(bridge.settings.job_lease_seconds + 1)
    bridge.run_jobs()
    assert len(bridge.kommo_state()["bot_runs"]) == 1


def test_the_n8n_call_of_one_burst_carries_one_idempotency_key_on_every_retry(bridge):
    # GIVEN n8n failing the first call of a burst
    bridge.n8n_mode(fail_next=1)
    bridge.customer_says("oi", message_id="m-1")
    bridge.run_jobs()
    bridge.clock.advance(60)
    bridge.run_jobs()
    bridge.customer_says("outra pergunta", message_id="m-2")
    bridge.run_jobs()
    calls = requests.get(bridge.n8n.url + "/_standin/calls").json()["calls"]
    # THEN the retry repeats the key (header and body); a new burst has a new one
    keys = [c["idempotency_key"] for c in calls]
    assert len(calls) == 3 and keys[0] == keys[1] != keys[2]
    assert all(c["body"]["idempotency_key"] == c["idempotency_key"] for c in calls)
    assert keys[0] == calls[0]["body"]["correlation_id"]


# --- pure parts ---------------------------------------------------------------------------------

def test_talk_messages_parse_as_kommo_lists_them():
    answer = {"_embedded": {"messages": [
        {"id": "5b21", "type": "incoming", "message_type": "text", "text": "Oi",
         "author": {"type": "external", "name": "Isaias"}},
        {"id": "9c3e", "type": "outgoing", "text": ANSWER, "created_at": "1790000100",
         "author": {"type": "bot"}},
        "not a message"]}}
    assert parse_talk_messages(answer) == [
        KommoWritten("5b21", "incoming", "external", "Oi", 0),
        KommoWritten("9c3e", "outgoing", "bot", ANSWER, 1790000100)]
    assert parse_talk_messages(None) == [] and parse_talk_messages({"_embedded": []}) == []


def test_lead_notes_parse_with_their_text_in_params():
    answer = {"_embedded": {"notes": [
        {"id": 42709325, "note_type": "common", "created_at": 1540407495,
         "params": {"text": "🤖 Bot pausado."}}, {"id": 7, "params": None}]}}
    assert parse_lead_notes(answer) == [
        KommoWritten("42709325", "note", "", "🤖 Bot pausado.", 1540407495),
        KommoWritten("7", "note", "", "", 0)]


def test_a_match_needs_the_same_text_our_author_and_no_earlier_stamp():
    since = 1_790_000_000
    ours = KommoWritten("a", "outgoing", "bot", ANSWER + "  \r\n", since + 5)
    seller = KommoWritten("b", "outgoing", "internal", ANSWER, since + 5)
    old = KommoWritten("c", "outgoing", "bot", ANSWER,
                       since - whatsapp_resend.CLOCK_SKEW_SECONDS - 1)
    unstamped = KommoWritten("d", "outgoing", "bot", ANSWER, 0)
    customer = KommoWritten("e", "incoming", "bot", ANSWER, since + 5)
    find = whatsapp_resend.find_written
    bots = whatsapp_resend.OUR_AUTHOR_TYPES
    assert find([seller, old, customer, ours], ANSWER, since, bots) is ours
    assert find([seller, old, customer], ANSWER, since, bots) is None
    assert find([unstamped], ANSWER, since, bots) is unstamped
    assert find([ours], "outra coisa", since, bots) is None
    assert find([seller], ANSWER, since, None) is seller


def test_a_busy_read_back_is_asked_again_later_instead_of_sending_blind(bridge):
    _reply_job_waiting(bridge)
    job = _run_then_die(bridge, SEND_REPLY)
    # GIVEN Kommo answering the read-back with 503 once (busy after a restart)
    bridge.kommo_fails(path_prefix="/api/v4/talks/1874/messages", method="GET", status=503)
    bridge.clock.advance(bridge.settings.job_lease_seconds + 1)
    bridge.run_jobs()
    # THEN nothing is sent while Kommo can't tell; the job asks again later and finds it
    assert bridge.chat_messages() == [ANSWER]
    assert outbox.get_job(bridge.db, job.id)["status"] == "pending"
    bridge.clock.advance(60)
    bridge.run_jobs()
    assert bridge.chat_messages() == [ANSWER]
    done = outbox.get_job(bridge.db, job.id)
    assert done["status"] == "done" and done["result"]["already_delivered"] is True


def test_a_short_answer_of_an_earlier_reply_is_not_taken_for_this_one(bridge):
    # GIVEN "Certo!" sent a moment ago as the answer to an earlier question
    _reply_job_waiting(bridge, text="Certo!")
    bridge.run_jobs()
    assert bridge.chat_messages() == ["Certo!"]
    # AND a second "Certo!" whose worker died after marking its send, before the request left
    bridge.customer_says("Pode mandar amanhã?")
    bridge.run_jobs()
    assert bridge.n8n_answers_later({"conversation_id": "1874", "response_text": "Certo!",
                                     "correlation_id": "corr-2"}).status_code == 202
    job = outbox.claim_next_job(bridge.db, bridge.clock(), bridge.settings.job_lease_seconds,
                                worker="dead-poller")
    with whatsapp_resend.kommo_write(bridge.db, job, bridge.clock()):
        pass  # died here: the marker says "started", the message never left
    # WHEN the job runs again
    bridge.clock.advance(bridge.settings.job_lease_seconds + 1)
    bridge.run_jobs()
    # THEN the earlier "Certo!" (another reply's own message) does not count: it is sent
    assert bridge.chat_messages() == ["Certo!", "Certo!"]
