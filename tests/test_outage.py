"""Issue 14, proof suite 3 — peer outages and duplicate deliveries, each peer in turn.

An outage here has three phases, as real ones do: the peer answers 503 to everything, then
nothing listens on its port (connection refused: the stand-in's server is stopped), then it is
back on the same port. Customers, buyers and agents keep writing through all of it. Afterwards
everything acknowledged is delivered, exactly once, in order per conversation, and no job is
dead.

Then every kind of webhook delivered five times (twice before the poller runs, three times
after) has exactly one effect.

Single cases of these already live beside their flows (tests/test_bridge_a_flow.py:
`test_kommo_down_while_replying_then_delivered`, `test_n8n_down_for_a_while_...`,
`test_same_note_delivered_twice_...`; tests/test_meli_sales.py:
`test_mercado_livre_down_while_agent_answers_...`, `test_unreachable_mercado_livre_...`); this file
runs the three phases end to end for each peer, several conversations at once.
All in one process with the injected clock: backoffs are skipped, never waited for.
"""
from __future__ import annotations

import pytest
import requests

import outbox
from standins import kommo as kommo_standin
from standins.support import ServedApp
from tests.bridge_a_harness import BridgeA
from tests.meli_support import (QUESTIONS_INBOX, SALES_INBOX, SELLER,  # noqa: F401
                                Bridge, bridge, messages_of)

CONTACTS = [{"contact_id": str(7100 + n), "lead_id": str(7200 + n), "talk_id": str(7300 + n),
             "name": f"Cliente {n}"} for n in range(3)]
PHASE_ROUNDS = 3


class Outage:
    """Drives one stand-in through an outage. `fail`/`heal` switch its 503s on and off (through
    its inspection routes, which keep answering while it fails)."""

    def __init__(self, served: ServedApp, fail, heal):
        self.served, self.fail, self.heal = served, fail, heal
        self.restarted: ServedApp | None = None

    def answers_503(self):
        self.fail()

    def refuses_connections(self):
        self.heal()
        self.served.stop()
        with pytest.raises(requests.ConnectionError):
            requests.get(self.served.url + "/", timeout=2)

    def comes_back(self) -> ServedApp:
        self.restarted = ServedApp(self.served.app, port=self.served.port)
        return self.restarted

    def stop(self):
        if self.restarted is not None:
            self.restarted.stop()


def _fail_rule(url: str, status: int = 503):
    return lambda: requests.post(url + "/_standin/fail", json={
        "path_prefix": "/", "status": status, "count": 10**6}, timeout=5).raise_for_status()


def _clear_rules(url: str):
    return lambda: requests.post(url + "/_standin/fail", json={"clear": True},
                                 timeout=5).raise_for_status()


def _idle(conn) -> bool:
    stats = outbox.queue_stats(conn)
    return stats["pending"] == 0 and stats["running"] == 0 and stats["staged"] == 0


def _waiting_errors(conn) -> str:
    """The last errors of the jobs waiting for another attempt, as one text."""
    return "\n".join(j["last_error"] or "" for j in outbox.list_jobs(conn, status="pending"))


def _assert_phase_failed(conn, phase_number: int):
    """The outage was felt: jobs wait with the phase's error (503, then a refused connection)."""
    expected = "503" if phase_number == 1 else "connection"
    assert expected in _waiting_errors(conn), _waiting_errors(conn)


def _rounds(clock, run, n: int, step_seconds: float):
    for _ in range(n):
        clock.advance(step_seconds)
        run()


def _until_idle(clock, run, conn, step_seconds: float = 900, limit: int = 20):
    """Time passes in backoff-sized steps until every job has run (the peer is back)."""
    for _ in range(limit):
        run()
        if _idle(conn):
            return
        clock.advance(step_seconds)
    raise AssertionError(f"jobs still waiting: {outbox.queue_stats(conn)}")


# --- bridge A: Kommo and n8n ------------------------------------------------------------------

def _bridge_a_through_an_outage(a: BridgeA, clock, outage: Outage) -> dict[str, list[str]]:
    """Three customers write three messages each, one message per customer in each phase.
    Returns {talk_id: texts in the order written}."""
    written: dict[str, list[str]] = {c["talk_id"]: [] for c in CONTACTS}
    phases = [outage.answers_503, outage.refuses_connections, outage.comes_back]
    for phase_number, phase in enumerate(phases, start=1):
        phase()
        for contact in CONTACTS:
            text = f"mensagem {phase_number} de {contact['name']}"
            answer = a.customer_says(text, created_at=int(clock()), **contact)
            assert answer.status_code == 200  # the web never needs the peer to acknowledge
            written[contact["talk_id"]].append(text)
        if phase_number < len(phases):
            _rounds(clock, a.run_jobs, PHASE_ROUNDS, 30 * phase_number)
            _assert_phase_failed(a.db, phase_number)
    _until_idle(clock, a.run_jobs, a.db)
    return written


def _assert_answered_in_order_once(a: BridgeA, written: dict[str, list[str]]):
    """Each message is in exactly one reply (the n8n stand-in's answer quotes what it was asked;
    messages that waited together behind an outage are asked together, as a burst is), and the
    replies of a conversation follow the order the customer wrote in."""
    for talk_id, texts in written.items():
        replies = "\n".join(a.chat_messages(talk_id))
        assert [replies.count(text) for text in texts] == [1] * len(texts), (talk_id, replies)
        positions = [replies.index(text) for text in texts]
        assert positions == sorted(positions), (talk_id, replies)
    assert outbox.list_jobs(a.db, status="dead") == []


def _asked_lines(calls: list[dict]) -> list[str]:
    return sorted(line for call in calls for line in call["message_text"].splitlines())


def test_kommo_503_then_refused_then_back_delivers_every_reply_once_in_order(
        make_settings, serve, clock):
    a = BridgeA(make_settings, serve, clock)
    outage = Outage(a.kommo, _fail_rule(a.kommo.url), _clear_rules(a.kommo.url))
    try:
        written = _bridge_a_through_an_outage(a, clock, outage)
        _assert_answered_in_order_once(a, written)
        # n8n was asked once per message: the replies waited, not the questions
        assert _asked_lines(a.n8n_calls()) == sorted(t for texts in written.values() for t in texts)
    finally:
        outage.stop()


def test_n8n_503_then_refused_then_back_answers_every_message_once_in_order(
        make_settings, serve, clock):
    a = BridgeA(make_settings, serve, clock)
    outage = Outage(a.n8n, lambda: a.n8n_mode(mode="down"), lambda: a.n8n_mode(mode="sync"))
    try:
        written = _bridge_a_through_an_outage(a, clock, outage)
        _assert_answered_in_order_once(a, written)
        # every repeated call to n8n for one message carried the same Idempotency-Key
        calls = requests.get(a.n8n.url + "/_standin/calls", timeout=5).json()["calls"]
        keys: dict[str, set] = {}
        for call in calls:
            keys.setdefault(call["body"]["message_text"], set()).add(call["idempotency_key"])
        answered = {m["text"] for m in a.kommo_state()["sent"]}
        assert len(answered) == len(a.kommo_state()["sent"])
        assert all(len(k) == 1 and None not in k for k in keys.values()), keys
    finally:
        outage.stop()


# --- bridge B: Mercado Livre and Chatwoot -----------------------------------------------------

def _sales(b: Bridge, n: int) -> list[tuple[str, int]]:
    """`n` sales whose buyers wrote once, polled into Chatwoot: [(pack, conversation id)]."""
    packs = []
    for i in range(n):
        pack = b.sale(buyer_id=9100 + i)["conversation_id"]
        b.buyer_writes(pack, f"Oi, sou o comprador {i}")
        packs.append(pack)
    b.poll()
    by_pack = {c["custom_attributes"].get("meli_pack_id"): c["id"]
               for c in b.conversations(SALES_INBOX)}
    return [(pack, by_pack[pack]) for pack in packs]


def test_mercado_livre_503_then_refused_then_back_sends_every_agent_reply_once_in_order(
        bridge):
    b = bridge
    sales = _sales(b, 3)
    outage = Outage(b.ml, _fail_rule(b.ml.url), _clear_rules(b.ml.url))
    written: dict[str, list[str]] = {pack: [] for pack, _ in sales}
    try:
        for phase_number, phase in enumerate(
                [outage.answers_503, outage.refuses_connections, outage.comes_back], start=1):
            phase()
            for pack, conversation_id in sales:
                text = f"Resposta {phase_number} para o pacote {pack}"
                # the agent's reply reaches ponte (acknowledged); only Mercado Livre is away
                assert b.agent_replies(conversation_id, text)["delivered_status"] == 200
                written[pack].append(text)
            if phase_number < 3:
                _rounds(b.clock, b.drain, PHASE_ROUNDS, 30 * phase_number)
                _assert_phase_failed(b.conn, phase_number)
        _until_idle(b.clock, b.drain, b.conn)
        sent = b.ml_state()["sent_messages"]
        for pack, texts in written.items():
            assert [m["text"] for m in sent if str(m["pack_id"]) == pack] == texts, (pack, sent)
        assert len(sent) == sum(len(t) for t in written.values())
        assert b.jobs(status="dead") == []
    finally:
        outage.stop()


def test_chatwoot_503_then_refused_then_back_brings_every_buyer_message_once_in_order(bridge):
    b = bridge
    sales = _sales(b, 3)
    outage = Outage(b.cw, _fail_rule(b.cw.url), _clear_rules(b.cw.url))
    written: dict[int, list[str]] = {conversation_id: [f"Oi, sou o comprador {i}"]
                                     for i, (_, conversation_id) in enumerate(sales)}
    try:
        for phase_number, phase in enumerate(
                [outage.answers_503, outage.refuses_connections, outage.comes_back], start=1):
            phase()
            for pack, conversation_id in sales:
                text = f"Mensagem {phase_number} do pacote {pack}"
                b.buyer_writes(pack, text)
                written[conversation_id].append(text)
            b.clock.advance(1)
            meli_poll_and_drain(b)
            if phase_number < 3:
                _rounds(b.clock, b.drain, PHASE_ROUNDS, 30 * phase_number)
                _assert_phase_failed(b.conn, phase_number)
        _until_idle(b.clock, lambda: meli_poll_and_drain(b), b.conn)
        conversations = {c["id"]: c for c in b.conversations(SALES_INBOX)}
        assert set(conversations) == set(written)  # no conversation made twice
        for conversation_id, texts in written.items():
            incoming = [m["content"] for m in messages_of(conversations[conversation_id])
                        if m["message_type_name"] == "incoming"]
            assert incoming == texts, conversation_id
        assert b.jobs(status="dead") == []
    finally:
        outage.stop()


def meli_poll_and_drain(b: Bridge):
    b.poll()


# --- five deliveries of each webhook kind: one effect ------------------------------------------------

def _five_times(send, run_jobs):
    """Deliver twice, let the poller run, deliver three more times, run again: every answer
    is a 2xx (a duplicate is acknowledged, never refused)."""
    answers = [send(), send()]
    run_jobs()
    answers += [send(), send(), send()]
    run_jobs()
    for answer in answers:
        status = getattr(answer, "status_code", None) or answer["delivered_status"]
        assert 200 <= status < 300, answer


@pytest.mark.parametrize("kind", ["customer_message", "seller_note", "seller_chat_command"])
def test_kommo_webhook_delivered_five_times_has_one_effect(make_settings, serve, clock, kind):
    a = BridgeA(make_settings, serve, clock)
    form = {"customer_message": kommo_standin.message_form("Vocês entregam em Campinas?",
                                                            message_id="dup-msg-1"),
            "seller_note": kommo_standin.note_form("#pausar almoço", note_id="555001"),
            "seller_chat_command": kommo_standin.outgoing_form("#pausar", message_id="dup-out-1")
            }[kind]
    if kind != "customer_message":
        a.customer_says("oi")  # a conversation to command
        a.run_jobs()
    _five_times(lambda: a.kommo_posts(form), a.run_jobs)
    if kind == "customer_message":
        assert len(a.n8n_calls()) == 1 and len(a.chat_messages()) == 1
    else:
        assert a.bot_state()["status"] == "paused"
        confirmations = [n for n in a.lead_notes() if n.startswith("🤖 Bot pausado")]
        assert len(confirmations) == 1, a.lead_notes()


def test_n8n_async_answer_delivered_five_times_is_sent_once(make_settings, serve, clock):
    a = BridgeA(make_settings, serve, clock, n8n_mode="empty")
    a.customer_says("Qual o prazo?")
    a.run_jobs()
    correlation = a.n8n_calls()[0]["bridge_correlation_id"]
    body = {"correlation_id": correlation, "contact_id": "93589657",
            "response_text": "Chega em 3 dias úteis."}
    _five_times(lambda: a.n8n_answers_later(body), a.run_jobs)
    assert a.chat_messages() == ["Chega em 3 dias úteis."]


def test_chatwoot_reply_delivered_five_times_is_sent_once(bridge):
    b = bridge
    (pack, conversation_id), = _sales(b, 1)
    hook = b.agent_replies(conversation_id, "Pode trocar sim.", deliver=False)
    _five_times(lambda: b.redeliver(hook), b.drain)
    assert [m["text"] for m in b.ml_state()["sent_messages"]] == ["Pode trocar sim."]


@pytest.mark.parametrize("topic", ["questions", "messages"])
def test_mercado_livre_notification_delivered_five_times_has_one_effect(bridge, topic):
    b = bridge
    if topic == "questions":
        qid = b.ask("Serve no piso de 60 cm?")
        resource = f"/questions/{qid}"
    else:
        pack = b.sale(buyer_id=9300)["conversation_id"]
        resource = f"/messages/{b.buyer_writes(pack, 'Chegou quebrado')}"
    _five_times(lambda: b.notify_ml(topic, resource, notification_id="n-dup-1"), b.drain)
    # Mercado Livre repeats a notification with a new _id as well: still one effect
    fresh_ids = iter(range(5))
    _five_times(lambda: b.notify_ml(topic, resource, notification_id=f"n-new-{next(fresh_ids)}"),
                b.drain)
    inbox = QUESTIONS_INBOX if topic == "questions" else SALES_INBOX
    (conversation,) = b.conversations(inbox)
    incoming = [m for m in messages_of(conversation) if m["message_type_name"] == "incoming"]
    assert len(incoming) == 1, messages_of(conversation)
