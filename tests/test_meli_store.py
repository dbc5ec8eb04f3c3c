"""Bridge B's state in its own tables (meli_store): migration 7 carries every mappings row over,
each writer changes only its columns, jobs of one buyer or conversation run one at a time even
with two workers, and retention deletes only what no live conversation needs."""
from __future__ import annotations

import threading

import bridges
import db_manager
import meli_jobs
import meli_store as store
from chatwoot_api import ChatwootClient
from job_runner import JobContext, run_next_job
from tests.meli_support import (QUESTIONS_INBOX, SALES_INBOX, Bridge, bridge,  # noqa: F401
                                messages_of)

BUYER = "1944693439"
ITEM = "MLB3737188005"

# Values as bridge B wrote them into `mappings` before migration 7 (namespace, key, value).
OLD_MAPPINGS = [
    ("ml_question", "13000000001", {"conversation_id": 42, "item_id": ITEM, "buyer_id": BUYER,
                                    "message_id": 501, "checks": 2,
                                    "check_key": "ml-question-check:13000000001:2",
                                    "mirror_posting": True}),
    ("ml_question", "13000000002", {"opening": True}),
    ("ml_question", "13000000003", {"conversation_id": 43, "item_id": ITEM, "buyer_id": BUYER,
                                    "message_id": 502, "closed": "DELETED"}),
    ("ml_question_thread", f"{BUYER}:{ITEM}", [
        {"question_id": "13000000001", "conversation_id": 42, "text": "Tem em 110v?"},
        {"question_id": "13000000003", "conversation_id": 43, "text": "E em 220v?"}]),
    ("cw_contact", BUYER, {"contact_id": 9}),
    ("cw_contact_inbox", f"{BUYER}:7", {"source_id": f"meli:{BUYER}"}),
    ("cw_contact_inbox", "8802:8", {"source_id": "meli:8802"}),
    ("cw_conversation", "42", {"kind": "question", "question_id": "13000000001",
                               "item_id": ITEM, "buyer_id": BUYER}),
    ("cw_conversation", "44", {"kind": "sale", "pack_id": "2000008888", "buyer_id": "8802"}),
    ("ml_pack", "2000008888", {"conversation_id": 44, "buyer_id": "8802", "summary_posted": True,
                               "summary": "🛒 Venda no Mercado Livre\nPedido(s): 2000008888"}),
    ("ml_pack", "2000009999", {"opening": True}),
    ("ml_message", "0193aa", {"chatwoot_message_id": 601}),
    ("ml_message", "0193ab", {"sent_by_ponte": True}),
    ("ml_message", "0193ac", {"posting": True}),
    ("ml_message", "0193ad", {"sent_by_ponte": True, "chatwoot_message_id": 700}),
    ("ml_message", "0193ae", {"sent_by_ponte": True, "chatwoot_message_id": 700}),
    ("ml_unread", "last", {"2000008888": 2, "2000007777": 1}),
    ("ml_unread", "forgotten", {"2000008888": 3, "2000006666": 1}),
    ("ml_item", ITEM, {"id": ITEM, "title": "Espaçador E Nivelador", "price": 62.96,
                       "currency_id": "BRL", "permalink": f"https://produto.mercadolivre.com.br/{ITEM}",
                       "thumbnail": "http://http2.mlstatic.com/D_1.jpg",
                       "secure_thumbnail": "https://http2.mlstatic.com/D_1.jpg",
                       "status": "active", "fetched_at": 1790000100.5}),
    ("cw_outgoing", "700", {"parts_sent": 2, "attachment_ids": ["att-1"],
                            "ml_message_ids": ["0193ad", "0193ae"],
                            "skipped": ["foto.heic (formato não aceito: use JPG, PNG, PDF ou TXT)"],
                            "in_flight": None}),
    ("cw_outgoing", "701", {"in_flight": True, "reached": [[1790000200.0, 1790000230.0]]}),
    ("cw_outgoing", "702", {"parts_sent": 1, "attachment_ids": None, "ml_message_ids": [],
                            "skipped": [], "in_flight": 1}),
    ("ml_answered", "13000000001", {"chatwoot_message_id": 701}),
    ("ml_answered", "13000000003", {"mirrored": True}),
]
NOT_BRIDGE_B = [("ml_oauth_state", "st-1", {"verifier": "v", "used": False}),
                ("n8n-correlation", "c-1", {"contact_id": "93589657"}),
                ("ml_poll", "questions_full_sweep_at", 1790000000.0)]


def test_migration_7_moves_every_bridge_b_mapping_into_its_table(tmp_path, monkeypatch):
    # GIVEN a database at version 6 with bridge B's state in mappings
    conn = db_manager.connect(str(tmp_path / "v6.db"))
    with monkeypatch.context() as m:
        m.setattr(db_manager, "MIGRATIONS", db_manager.MIGRATIONS[:6])
        assert db_manager.migrate(conn) == 6
    with db_manager.transaction(conn):
        for namespace, key, value in OLD_MAPPINGS + NOT_BRIDGE_B:
            db_manager.mapping_put(conn, namespace, key, value, now=1790000300.0)
    # WHEN it migrates
    assert db_manager.migrate(conn) >= 7
    # THEN every value is in its column
    q1 = store.get_question(conn, "13000000001")
    assert (q1.ml_item_id, q1.ml_buyer_id, q1.question_text, q1.chatwoot_conversation_id,
            q1.chatwoot_message_id, q1.sweep_checks, q1.sweep_check_key, q1.mirror_posting,
            q1.closed_status, q1.opening) == (
        ITEM, BUYER, "Tem em 110v?", 42, 501, 2, "ml-question-check:13000000001:2", True,
        None, False)
    assert q1.imported_at == 1790000300.0
    q2 = store.get_question(conn, "13000000002")
    assert q2.opening and q2.chatwoot_conversation_id is None and q2.imported_at is None
    assert store.get_question(conn, "13000000003").closed_status == "DELETED"
    assert [(t.ml_question_id, t.chatwoot_conversation_id, t.question_text)
            for t in store.question_thread(conn, BUYER, ITEM)] == [
        ("13000000001", 42, "Tem em 110v?"), ("13000000003", 43, "E em 220v?")]
    assert store.get_contact(conn, BUYER).chatwoot_contact_id == 9
    assert store.has_contact_inbox(conn, BUYER, 7) and store.has_contact_inbox(conn, "8802", 8)
    assert not store.has_contact_inbox(conn, BUYER, 8)
    question_conv, sale_conv = store.get_conversation(conn, 42), store.get_conversation(conn, 44)
    assert (question_conv.kind, question_conv.ml_question_id, question_conv.ml_item_id,
            question_conv.ml_buyer_id) == ("question", "13000000001", ITEM, BUYER)
    assert (sale_conv.kind, sale_conv.ml_pack_id, sale_conv.ml_buyer_id) == ("sale",
                                                                             "2000008888", "8802")
    pack = store.get_pack(conn, "2000008888")
    assert (pack.chatwoot_conversation_id, pack.ml_buyer_id, pack.summary_posted,
            pack.order_summary, pack.opening) == (
        44, "8802", True, "🛒 Venda no Mercado Livre\nPedido(s): 2000008888", False)
    assert store.get_pack(conn, "2000009999").opening
    messages = store.get_ml_messages(conn, ["0193aa", "0193ab", "0193ac", "0193ad", "0193ae"])
    assert {k: (v.chatwoot_message_id, v.sent_by_ponte, v.posting, v.reply_part)
            for k, v in messages.items()} == {
        "0193aa": (601, False, False, None), "0193ab": (None, True, False, None),
        "0193ac": (None, False, True, None), "0193ad": (700, True, False, 0),
        "0193ae": (700, True, False, 1)}
    assert store.reply_ml_message_ids(conn, 700) == ["0193ad", "0193ae"]
    assert store.unread_snapshot(conn) == {"2000008888": 2, "2000007777": 1}
    assert store.forgotten_counts(conn) == {"2000008888": 3, "2000006666": 1}
    item = store.get_item(conn, ITEM)
    assert item.as_info() == OLD_MAPPINGS[18][2]
    sent, answering, resuming = (store.get_reply(conn, i) for i in (700, 701, 702))
    assert (sent.parts_sent, sent.in_flight_part, sent.attachment_ids,
            sent.skipped_attachments) == (
        2, None, ["att-1"], ["foto.heic (formato não aceito: use JPG, PNG, PDF ou TXT)"])
    assert (answering.parts_sent, answering.in_flight_part, answering.attachment_ids) == (0, 0,
                                                                                         None)
    assert store.unknown_posts(conn, 701) == [(1790000200.0, 1790000230.0)]
    assert (resuming.parts_sent, resuming.in_flight_part, resuming.attachment_ids) == (1, 1, None)
    ours, mirrored = store.get_answer(conn, "13000000001"), store.get_answer(conn, "13000000003")
    assert (ours.answered_by, ours.chatwoot_message_id) == ("ponte", 701)
    assert (mirrored.answered_by, mirrored.chatwoot_message_id) == ("mercadolivre", None)
    # AND only the moved rows left mappings: the OAuth state, bridge A's and the watermark stay
    left = {(r[0], r[1]) for r in conn.execute("SELECT namespace, key FROM mappings")}
    assert left == {(n, k) for n, k, _ in NOT_BRIDGE_B}
    assert store.full_sweep_at(conn) == 1790000000.0


def test_a_sync_marking_a_message_as_ponte_s_keeps_the_chatwoot_id_a_reply_recorded(db, clock):
    # GIVEN a reply recorded its part (its Chatwoot message) while a sale's sync ran beside it
    with db_manager.transaction(db):
        store.start_reply_part(db, 700, 0, clock())
    store.record_part_sent(db, 700, 0, "0193ad", "2000008888", clock())
    # WHEN the sync, which read the message as unknown, marks it sent by ponte
    store.mark_sent_by_ponte(db, "0193ad", "2000008888", clock())
    # THEN both facts hold (a whole-value write would have lost the reply's)
    known = store.get_ml_message(db, "0193ad")
    assert (known.sent_by_ponte, known.chatwoot_message_id, known.reply_part) == (True, 700, 0)
    assert store.get_reply(db, 700).parts_sent == 1


def test_replies_forgetting_packs_while_a_poll_saves_its_snapshot_lose_nothing(db, clock):
    # GIVEN a snapshot with two packs
    with db_manager.transaction(db):
        store.save_unread_snapshot(db, {"p1": 1, "p2": 2}, {}, clock())
    # WHEN replies in four threads, each with its own connection, forget p1 25 times each
    path = db.execute("PRAGMA database_list").fetchone()[2]

    def forget():
        conn = db_manager.connect(path)
        for _ in range(25):
            store.forget_unread(conn, "p1", clock())
        conn.close()

    threads = [threading.Thread(target=forget) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # THEN every forget counted, and p2 is untouched
    assert store.forgotten_counts(db) == {"p1": 100}
    assert store.unread_snapshot(db) == {"p2": 2}


def test_two_questions_of_one_buyer_on_one_item_in_two_workers_cite_each_other(bridge,
                                                                               monkeypatch):
    # GIVEN a buyer asked twice about one item, both imports queued
    first = bridge.ask("Tem em 110v?")
    second = bridge.ask("E em 220v?")
    assert meli_jobs.poll_questions(bridge.ctx)["enqueued"] == 2
    # AND the first import holds on while it creates its conversation, until the second
    # worker has either started the second import or found nothing it may run
    first_inside, second_moved = threading.Event(), threading.Event()
    real_create = ChatwootClient.create_conversation
    calls = []

    def create_conversation(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            first_inside.set()
            assert second_moved.wait(10)
        else:
            second_moved.set()
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(ChatwootClient, "create_conversation", create_conversation)
    handlers, on_dead = bridges.handlers()
    claimed = {}

    def worker(name: str, start: threading.Event | None):
        if start is not None:
            assert start.wait(10)
        ctx = JobContext(bridge.settings, db_manager.connect(bridge.settings.database_path),
                         now=bridge.clock)
        job = run_next_job(ctx, handlers, on_dead, worker=name)
        claimed[name] = job and job.payload["question"]["id"]
        second_moved.set()
        ctx.conn.close()

    # WHEN two workers, each with its own connection, run at the same time
    threads = [threading.Thread(target=worker, args=("a", None)),
               threading.Thread(target=worker, args=("b", first_inside))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    bridge.drain()
    # THEN the second worker did not run the buyer's other import beside the first
    assert claimed == {"a": first, "b": None}
    # AND one contact, one conversation per question with its one message, the later citing
    # the earlier
    assert len(bridge.cw_state()["contacts"]) == 1
    conversations = sorted(bridge.conversations(QUESTIONS_INBOX), key=lambda c: c["id"])
    assert [c["custom_attributes"]["meli_question_id"] for c in conversations] == [
        str(first), str(second)]
    assert [len(messages_of(c)) for c in conversations] == [1, 1]
    assert f"conversa #{conversations[0]['id']}" in messages_of(conversations[1])[0]["content"]
    assert [t.ml_question_id for t in store.question_thread(bridge.conn, BUYER, ITEM)] == [
        str(first), str(second)]


def test_prune_deletes_settled_questions_and_caches_but_keeps_what_live_conversations_need(
        make_settings, serve, clock):
    # GIVEN one attempt per job; a question answered by the agent, a question still open, and a
    # sale whose buyer wrote, with an agent reply that died (Mercado Livre refused it)
    b = Bridge(make_settings, serve, clock, JOB_MAX_ATTEMPTS=1)
    answered = b.ask("Tem em 110v?")
    still_open = b.ask("Tem azul?", buyer_id=1944693441, item_id="MLB1")
    pack = b.sale(buyer_id=8810)["conversation_id"]
    b.buyer_writes(pack, "Oi")
    b.poll()
    by_question = {c["custom_attributes"]["meli_question_id"]: c["id"]
                   for c in b.conversations(QUESTIONS_INBOX)}
    b.agent_replies(by_question[str(answered)], "Tem sim.")
    b.drain()
    assert store.get_answer(b.conn, answered).answered_by == store.ANSWERED_BY_PONTE
    [sale_conv] = b.conversations(SALES_INBOX)
    b.fail_ml(f"/messages/packs/{pack}/sellers", 429, method="POST")
    dead_reply = b.agent_replies(sale_conv["id"], "Enviamos hoje.")
    b.drain()
    assert b.jobs(status="dead", kind="chatwoot.forward_reply")
    assert store.get_item(b.conn, ITEM) is not None
    # WHEN retention (7 days) has passed and the poller prunes
    clock.advance(8 * 86400)
    b.poller.prune()
    # THEN the item cache and the settled question (its answer, its conversation row) are gone
    assert store.get_item(b.conn, ITEM) is None and store.get_item(b.conn, "MLB1") is None
    assert store.get_question(b.conn, answered) is None
    assert store.get_answer(b.conn, answered) is None
    assert store.get_conversation(b.conn, by_question[str(answered)]) is None
    # AND what live conversations need stays: the open question, the sale, its message map,
    # the contacts, and the progress of the reply an operator may still retry
    assert store.get_question(b.conn, still_open).chatwoot_message_id
    assert store.get_conversation(b.conn, by_question[str(still_open)]).kind == "question"
    assert store.get_pack(b.conn, pack).chatwoot_conversation_id == sale_conv["id"]
    assert store.get_conversation(b.conn, sale_conv["id"]).ml_pack_id == str(pack)
    assert store.get_contact(b.conn, BUYER) and store.get_contact(b.conn, "8810")
    assert store.get_reply(b.conn, dead_reply["message_id"]) is not None
    # WHEN the buyer writes again and the open question is polled again
    b.buyer_writes(pack, "E o rastreio?")
    b.poll()
    # THEN nothing is mirrored or imported twice
    [sale_conv] = b.conversations(SALES_INBOX)
    assert [m["content"] for m in messages_of(sale_conv)
            if m["message_type_name"] == "incoming"] == ["Oi", "E o rastreio?"]
    assert len(b.conversations(QUESTIONS_INBOX)) == 2
