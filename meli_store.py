"""SQL of bridge B (Mercado Livre ⇄ Chatwoot): questions and their answers, buyers' Chatwoot
contacts, conversations, sales (packs), the Mercado Livre message ↔ Chatwoot message map, the
unread snapshot, the item cache and the progress of agents' replies. The schema is migration 7
in db_manager, which moved these rows out of the `mappings` key-value table.

Owns: every statement on `ml_questions`, `ml_answers`, `cw_contacts`, `cw_contact_inboxes`,
`cw_conversations`, `ml_packs`, `ml_messages`, `ml_unread`, `ml_items`, `cw_replies` and
`cw_reply_unknown_posts`, the question sweep's watermark, the lookup of an agent's deleted reply
(the `events` row the Chatwoot webhook records, `deleted_event_key`), and what bridge B deletes
past retention (`prune`).
Must not: call a peer or decide anything (meli_questions, meli_sales and meli_jobs decide).

Concurrency (the poller runs jobs in N threads, each with its own connection): each write is
one statement that expresses its change in SQL (an upsert or an UPDATE that sets only the
columns it owns), so two jobs touching one row never undo each other's change; a read
followed by a write that depends on it runs inside one `db_manager.transaction()` (BEGIN
IMMEDIATE holds the write lock from the read on) or inside a job whose ordering key owns the
row. Every write function runs in its own transaction, or joins the caller's when called
inside `db_manager.transaction()`.

Retention (`prune`, past JOB_RETENTION_DAYS, a batch per transaction):
- deleted: the item cache (re-read from Mercado Livre when needed); questions settled long
  ago — answered, or closed with a final status — with their answer and their conversation
  row (a reply in that conversation still finds its question through the conversation's
  custom attributes, and Mercado Livre refuses a second answer); the progress of agents'
  replies whose `chatwoot.forward_reply` job is done or gone (a dead job may be retried by an
  operator and must resume, not resend); unread-snapshot rows of packs no longer unread.
- kept: everything a live conversation needs — questions still open or whose sweep gave up
  (UNSETTLED: the question may show up as unanswered again and must not be imported twice),
  sales (packs) and their conversations, the message map of every sale (a sale's sync reads
  all its messages and would mirror again any message it no longer knows), contacts and
  their inboxes (one per buyer).
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, fields
from typing import Any, Iterable

import db_manager
from db_manager import transaction

KIND_QUESTION = "question"
KIND_SALE = "sale"
ANSWERED_BY_PONTE = "ponte"                 # an agent's reply that ponte published
ANSWERED_BY_MERCADOLIVRE = "mercadolivre"   # typed on Mercado Livre, mirrored into Chatwoot
CLOSED_UNSETTLED = "UNSETTLED"              # the sweep gave up re-reading the question
ITEM_COLUMNS = ("title", "price", "currency_id", "permalink", "thumbnail", "secure_thumbnail",
                "status")
_ID_CHUNK = 500  # ids per IN (...) list

# The question sweep's watermark: one scalar written whole by the poll_questions task.
_POLL_NAMESPACE = "ml_poll"
_FULL_SWEEP_KEY = "questions_full_sweep_at"


@dataclass(frozen=True)
class MlQuestion:
    """A Mercado Livre question ponte has seen (`ml_questions`). `opening`: a run is creating
    its conversation (look before creating another); `mirror_posting`: a run is posting the
    answer typed on Mercado Livre; `sweep_*`: the hourly re-reads after it left UNANSWERED."""

    ml_question_id: str
    ml_item_id: str
    ml_buyer_id: str
    question_text: str
    chatwoot_conversation_id: int | None
    chatwoot_message_id: int | None
    opening: bool
    mirror_posting: bool
    sweep_checks: int
    sweep_check_key: str | None
    closed_status: str | None
    imported_at: float | None
    updated_at: float


@dataclass(frozen=True)
class MlAnswer:
    """Who answered a question (`ml_answers`): `ponte` (the agent's Chatwoot message) or
    `mercadolivre` (typed on Mercado Livre's site, mirrored)."""

    ml_question_id: str
    answered_by: str
    chatwoot_message_id: int | None
    answered_at: float


@dataclass(frozen=True)
class CwContact:
    """A buyer's Chatwoot contact (`cw_contacts`)."""

    ml_buyer_id: str
    chatwoot_contact_id: int
    updated_at: float


@dataclass(frozen=True)
class CwConversation:
    """What a Chatwoot conversation is about (`cw_conversations`): a question or a sale."""

    chatwoot_conversation_id: int
    kind: str
    ml_question_id: str | None
    ml_pack_id: str | None
    ml_item_id: str
    ml_buyer_id: str
    created_at: float | None


@dataclass(frozen=True)
class MlPack:
    """A sale (pack, or an order without a pack) and its one conversation (`ml_packs`)."""

    ml_pack_id: str
    chatwoot_conversation_id: int | None
    ml_buyer_id: str
    opening: bool
    order_summary: str
    summary_posted: bool
    updated_at: float


@dataclass(frozen=True)
class MlMessage:
    """A post-sale message of Mercado Livre (`ml_messages`): its Chatwoot message, whether
    ponte sent it (and as which part of the agent's reply), or `posting` while a run is
    mirroring it."""

    ml_message_id: str
    ml_pack_id: str
    chatwoot_message_id: int | None
    sent_by_ponte: bool
    posting: bool
    reply_part: int | None
    updated_at: float


@dataclass(frozen=True)
class MlItem:
    """An item's details as last read from Mercado Livre (`ml_items`)."""

    ml_item_id: str
    title: str | None
    price: float | None
    currency_id: str | None
    permalink: str | None
    thumbnail: str | None
    secure_thumbnail: str | None
    status: str | None
    fetched_at: float

    def as_info(self) -> dict:
        """The item in Mercado Livre's field names (what meli_texts reads)."""
        return {"id": self.ml_item_id, **{c: getattr(self, c) for c in ITEM_COLUMNS},
                "fetched_at": self.fetched_at}


@dataclass(frozen=True)
class CwReply:
    """How far an agent's reply went to Mercado Livre (`cw_replies`): parts sent, the part
    whose send's outcome is unknown (`in_flight_part`; 0 for a question's answer), the
    attachments uploaded (None: not yet) and those skipped."""

    chatwoot_message_id: int
    parts_sent: int
    in_flight_part: int | None
    attachment_ids: list | None
    skipped_attachments: list
    updated_at: float


def _load(cls, row: sqlite3.Row | None):
    if row is None:
        return None
    values: dict[str, Any] = {}
    for f in fields(cls):
        value = row[f.name]
        if f.type == "bool":
            value = bool(value)
        values[f.name] = value
    return cls(**values)


def _chunks(ids: Iterable) -> Iterable[list[str]]:
    ids = [str(i) for i in ids]
    for start in range(0, len(ids), _ID_CHUNK):
        yield ids[start:start + _ID_CHUNK]


# --- questions ---------------------------------------------------------------------------------

def get_question(conn: sqlite3.Connection, ml_question_id) -> MlQuestion | None:
    """A question ponte has seen, or None."""
    return _load(MlQuestion, conn.execute("SELECT * FROM ml_questions WHERE ml_question_id = ?",
                                          (str(ml_question_id),)).fetchone())


def mark_question_opening(conn: sqlite3.Connection, ml_question_id, ml_item_id: str,
                          ml_buyer_id: str, now: float) -> None:
    """A run is about to create the question's conversation."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO ml_questions (ml_question_id, ml_item_id, ml_buyer_id, opening,"
            " updated_at) VALUES (?, ?, ?, 1, ?) ON CONFLICT(ml_question_id) DO UPDATE SET"
            " opening = 1, updated_at = excluded.updated_at",
            (str(ml_question_id), ml_item_id, ml_buyer_id, now))


def record_question_conversation(conn: sqlite3.Connection, ml_question_id, ml_item_id: str,
                                 ml_buyer_id: str, question_text: str,
                                 chatwoot_conversation_id: int, now: float) -> None:
    """The question's conversation exists: the question joins its buyer's thread on the item,
    and the conversation is known to be about it (one transaction)."""
    qid = str(ml_question_id)
    with transaction(conn):
        conn.execute(
            "INSERT INTO ml_questions (ml_question_id, ml_item_id, ml_buyer_id, question_text,"
            " chatwoot_conversation_id, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(ml_question_id) DO UPDATE SET ml_item_id = excluded.ml_item_id,"
            " ml_buyer_id = excluded.ml_buyer_id, question_text = excluded.question_text,"
            " chatwoot_conversation_id = excluded.chatwoot_conversation_id, opening = 0,"
            " updated_at = excluded.updated_at",
            (qid, ml_item_id, ml_buyer_id, question_text, int(chatwoot_conversation_id), now))
        _insert_conversation(conn, int(chatwoot_conversation_id), KIND_QUESTION, qid, None,
                             ml_item_id, ml_buyer_id, now)


def record_question_message(conn: sqlite3.Connection, ml_question_id,
                            chatwoot_message_id: int, now: float) -> None:
    """The question's incoming message is in its conversation: imported."""
    with transaction(conn):
        conn.execute("UPDATE ml_questions SET chatwoot_message_id = ?, imported_at = ?,"
                     " updated_at = ? WHERE ml_question_id = ?",
                     (int(chatwoot_message_id), now, now, str(ml_question_id)))


def question_thread(conn: sqlite3.Connection, ml_buyer_id: str,
                    ml_item_id: str) -> list[MlQuestion]:
    """The buyer's questions on the item that have a conversation, in the order they got it."""
    return [_load(MlQuestion, row) for row in conn.execute(
        "SELECT * FROM ml_questions WHERE ml_buyer_id = ? AND ml_item_id = ?"
        " AND chatwoot_conversation_id IS NOT NULL ORDER BY chatwoot_conversation_id",
        (str(ml_buyer_id), str(ml_item_id)))]


def open_question_ids(conn: sqlite3.Connection) -> list[str]:
    """Imported questions neither answered nor closed, the longest untouched first (each sweep
    check bumps `updated_at`, moving the question to the back)."""
    return [row[0] for row in conn.execute(
        "SELECT ml_question_id FROM ml_questions WHERE chatwoot_message_id IS NOT NULL"
        " AND closed_status IS NULL AND NOT EXISTS (SELECT 1 FROM ml_answers AS a"
        " WHERE a.ml_question_id = ml_questions.ml_question_id)"
        " ORDER BY updated_at, ml_question_id")]


def count_sweep_check(conn: sqlite3.Connection, ml_question_id, check_key: str, limit: int,
                      now: float) -> MlQuestion | None:
    """One more sweep slot spent on the question (re-read by the job `check_key`); after
    `limit` slots the question is closed as UNSETTLED. Returns the row as changed."""
    with transaction(conn):
        conn.execute(
            "UPDATE ml_questions SET sweep_checks = sweep_checks + 1, sweep_check_key = ?,"
            " closed_status = CASE WHEN sweep_checks + 1 >= ? AND closed_status IS NULL"
            " THEN ? ELSE closed_status END, updated_at = ? WHERE ml_question_id = ?",
            (check_key, int(limit), CLOSED_UNSETTLED, now, str(ml_question_id)))
        return get_question(conn, ml_question_id)


def close_question(conn: sqlite3.Connection, ml_question_id, status: str, now: float) -> bool:
    """An imported question reached a final status (sweeps stop re-reading it). True when it
    was open."""
    with transaction(conn):
        return conn.execute(
            "UPDATE ml_questions SET closed_status = ?, updated_at = ? WHERE ml_question_id = ?"
            " AND chatwoot_message_id IS NOT NULL AND closed_status IS NULL",
            (status, now, str(ml_question_id))).rowcount == 1


def mark_mirror_posting(conn: sqlite3.Connection, ml_question_id, now: float) -> None:
    """A run is about to post the answer typed on Mercado Livre into the conversation."""
    with transaction(conn):
        conn.execute("UPDATE ml_questions SET mirror_posting = 1, updated_at = ?"
                     " WHERE ml_question_id = ?", (now, str(ml_question_id)))


# --- answers -----------------------------------------------------------------------------------

def get_answer(conn: sqlite3.Connection, ml_question_id) -> MlAnswer | None:
    """Who answered the question, or None."""
    return _load(MlAnswer, conn.execute("SELECT * FROM ml_answers WHERE ml_question_id = ?",
                                        (str(ml_question_id),)).fetchone())


def record_answer(conn: sqlite3.Connection, ml_question_id, answered_by: str,
                  chatwoot_message_id: int | None, now: float) -> MlAnswer:
    """The question is answered; the first answer recorded stays. Returns the one that did."""
    with transaction(conn):
        conn.execute("INSERT INTO ml_answers (ml_question_id, answered_by, chatwoot_message_id,"
                     " answered_at) VALUES (?, ?, ?, ?) ON CONFLICT(ml_question_id) DO NOTHING",
                     (str(ml_question_id), answered_by,
                      None if chatwoot_message_id is None else int(chatwoot_message_id), now))
        return get_answer(conn, ml_question_id)


# --- contacts ----------------------------------------------------------------------------------

def get_contact(conn: sqlite3.Connection, ml_buyer_id: str) -> CwContact | None:
    """The buyer's Chatwoot contact, or None."""
    return _load(CwContact, conn.execute("SELECT * FROM cw_contacts WHERE ml_buyer_id = ?",
                                         (str(ml_buyer_id),)).fetchone())


def record_contact(conn: sqlite3.Connection, ml_buyer_id: str, chatwoot_contact_id: int,
                   now: float) -> None:
    """Remember the buyer's contact (two runs that raced find the same one: the last wins)."""
    with transaction(conn):
        conn.execute("INSERT INTO cw_contacts (ml_buyer_id, chatwoot_contact_id, updated_at)"
                     " VALUES (?, ?, ?) ON CONFLICT(ml_buyer_id) DO UPDATE SET"
                     " chatwoot_contact_id = excluded.chatwoot_contact_id,"
                     " updated_at = excluded.updated_at",
                     (str(ml_buyer_id), int(chatwoot_contact_id), now))


def has_contact_inbox(conn: sqlite3.Connection, ml_buyer_id: str, chatwoot_inbox_id: int) -> bool:
    """Whether the buyer's contact is attached to the inbox."""
    return conn.execute("SELECT 1 FROM cw_contact_inboxes WHERE ml_buyer_id = ?"
                        " AND chatwoot_inbox_id = ?",
                        (str(ml_buyer_id), int(chatwoot_inbox_id))).fetchone() is not None


def record_contact_inbox(conn: sqlite3.Connection, ml_buyer_id: str, chatwoot_inbox_id: int,
                         source_id: str, now: float) -> None:
    """The buyer's contact is attached to the inbox under `source_id`."""
    with transaction(conn):
        conn.execute("INSERT INTO cw_contact_inboxes (ml_buyer_id, chatwoot_inbox_id, source_id,"
                     " updated_at) VALUES (?, ?, ?, ?) ON CONFLICT(ml_buyer_id, chatwoot_inbox_id)"
                     " DO UPDATE SET source_id = excluded.source_id,"
                     " updated_at = excluded.updated_at",
                     (str(ml_buyer_id), int(chatwoot_inbox_id), source_id, now))


# --- conversations -----------------------------------------------------------------------------

def get_conversation(conn: sqlite3.Connection, chatwoot_conversation_id) -> CwConversation | None:
    """What the conversation is about, or None."""
    return _load(CwConversation, conn.execute(
        "SELECT * FROM cw_conversations WHERE chatwoot_conversation_id = ?",
        (int(chatwoot_conversation_id),)).fetchone())


def _insert_conversation(conn: sqlite3.Connection, chatwoot_conversation_id: int, kind: str,
                         ml_question_id: str | None, ml_pack_id: str | None, ml_item_id: str,
                         ml_buyer_id: str, now: float) -> None:
    # Chatwoot never reuses a display id: what it is about is written once.
    conn.execute("INSERT INTO cw_conversations (chatwoot_conversation_id, kind, ml_question_id,"
                 " ml_pack_id, ml_item_id, ml_buyer_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                 " ON CONFLICT(chatwoot_conversation_id) DO NOTHING",
                 (chatwoot_conversation_id, kind, ml_question_id, ml_pack_id, ml_item_id,
                  ml_buyer_id, now))


# --- sales (packs) -----------------------------------------------------------------------------

def get_pack(conn: sqlite3.Connection, ml_pack_id) -> MlPack | None:
    """A sale ponte has seen, or None."""
    return _load(MlPack, conn.execute("SELECT * FROM ml_packs WHERE ml_pack_id = ?",
                                      (str(ml_pack_id),)).fetchone())


def mark_pack_opening(conn: sqlite3.Connection, ml_pack_id, now: float) -> None:
    """A run is about to create the sale's conversation."""
    with transaction(conn):
        conn.execute("INSERT INTO ml_packs (ml_pack_id, opening, updated_at) VALUES (?, 1, ?)"
                     " ON CONFLICT(ml_pack_id) DO UPDATE SET opening = 1,"
                     " updated_at = excluded.updated_at", (str(ml_pack_id), now))


def record_pack_conversation(conn: sqlite3.Connection, ml_pack_id, chatwoot_conversation_id: int,
                             ml_buyer_id: str, order_summary: str, now: float) -> MlPack:
    """The sale's conversation exists (its summary not posted yet), and is known to be about
    the sale (one transaction). Returns the sale."""
    pack = str(ml_pack_id)
    with transaction(conn):
        conn.execute(
            "INSERT INTO ml_packs (ml_pack_id, chatwoot_conversation_id, ml_buyer_id,"
            " order_summary, summary_posted, updated_at) VALUES (?, ?, ?, ?, 0, ?)"
            " ON CONFLICT(ml_pack_id) DO UPDATE SET"
            " chatwoot_conversation_id = excluded.chatwoot_conversation_id,"
            " ml_buyer_id = excluded.ml_buyer_id, order_summary = excluded.order_summary,"
            " summary_posted = 0, opening = 0, updated_at = excluded.updated_at",
            (pack, int(chatwoot_conversation_id), ml_buyer_id, order_summary, now))
        _insert_conversation(conn, int(chatwoot_conversation_id), KIND_SALE, None, pack, "",
                             ml_buyer_id, now)
        return get_pack(conn, pack)


def mark_summary_posted(conn: sqlite3.Connection, ml_pack_id, now: float) -> None:
    """The order summary is at the top of the sale's conversation."""
    with transaction(conn):
        conn.execute("UPDATE ml_packs SET summary_posted = 1, updated_at = ? WHERE ml_pack_id = ?",
                     (now, str(ml_pack_id)))


# --- Mercado Livre messages ↔ Chatwoot messages -------------------------------------------------

def get_ml_message(conn: sqlite3.Connection, ml_message_id) -> MlMessage | None:
    """What ponte knows of a post-sale message, or None."""
    return _load(MlMessage, conn.execute("SELECT * FROM ml_messages WHERE ml_message_id = ?",
                                         (str(ml_message_id),)).fetchone())


def get_ml_messages(conn: sqlite3.Connection, ml_message_ids: Iterable) -> dict[str, MlMessage]:
    """What ponte knows of these messages, by id (unknown ids are missing)."""
    found: dict[str, MlMessage] = {}
    for chunk in _chunks(ml_message_ids):
        for row in conn.execute(f"SELECT * FROM ml_messages WHERE ml_message_id IN"
                                f" ({','.join('?' * len(chunk))})", chunk):
            found[row["ml_message_id"]] = _load(MlMessage, row)
    return found


def mark_sent_by_ponte(conn: sqlite3.Connection, ml_message_id, ml_pack_id: str,
                       now: float) -> None:
    """A message the seller sent through ponte: already in Chatwoot as the agent's message
    (keeps the Chatwoot id the reply recorded, if it did)."""
    with transaction(conn):
        conn.execute("INSERT INTO ml_messages (ml_message_id, ml_pack_id, sent_by_ponte,"
                     " updated_at) VALUES (?, ?, 1, ?) ON CONFLICT(ml_message_id) DO UPDATE SET"
                     " sent_by_ponte = 1, posting = 0, updated_at = excluded.updated_at",
                     (str(ml_message_id), str(ml_pack_id), now))


def mark_posting(conn: sqlite3.Connection, ml_message_id, ml_pack_id: str, now: float) -> None:
    """A run is about to mirror the message into Chatwoot."""
    with transaction(conn):
        conn.execute("INSERT INTO ml_messages (ml_message_id, ml_pack_id, posting, updated_at)"
                     " VALUES (?, ?, 1, ?) ON CONFLICT(ml_message_id) DO UPDATE SET posting = 1,"
                     " updated_at = excluded.updated_at",
                     (str(ml_message_id), str(ml_pack_id), now))


def record_mirrored(conn: sqlite3.Connection, ml_message_id, ml_pack_id: str,
                    chatwoot_message_id: int, now: float) -> None:
    """The message is in Chatwoot as `chatwoot_message_id`."""
    with transaction(conn):
        conn.execute("INSERT INTO ml_messages (ml_message_id, ml_pack_id, chatwoot_message_id,"
                     " updated_at) VALUES (?, ?, ?, ?) ON CONFLICT(ml_message_id) DO UPDATE SET"
                     " chatwoot_message_id = excluded.chatwoot_message_id, posting = 0,"
                     " updated_at = excluded.updated_at",
                     (str(ml_message_id), str(ml_pack_id), int(chatwoot_message_id), now))


def reply_ml_message_ids(conn: sqlite3.Connection, chatwoot_message_id: int) -> list[str]:
    """The Mercado Livre messages an agent's reply became, part by part."""
    return [row[0] for row in conn.execute(
        "SELECT ml_message_id FROM ml_messages WHERE chatwoot_message_id = ? AND sent_by_ponte = 1"
        " ORDER BY reply_part, rowid", (int(chatwoot_message_id),))]


# --- agents' replies ---------------------------------------------------------------------------
# Written only by the reply's `chatwoot.forward_reply` job (ordering key cw-out:<conversation>).

def deleted_event_key(chatwoot_message_id) -> str:
    """The key of the inbound event the Chatwoot webhook records (db_manager.record_event) when
    an agent deletes a message."""
    return f"chatwoot-deleted:{int(chatwoot_message_id)}"


def reply_deleted(conn: sqlite3.Connection, chatwoot_message_id) -> bool:
    """True when the agent deleted this message in Chatwoot (its deletion event was recorded and
    not yet pruned)."""
    return db_manager.event_recorded(conn, deleted_event_key(chatwoot_message_id))


def get_reply(conn: sqlite3.Connection, chatwoot_message_id) -> CwReply | None:
    """How far the agent's reply went, or None when no send started."""
    row = conn.execute("SELECT * FROM cw_replies WHERE chatwoot_message_id = ?",
                       (int(chatwoot_message_id),)).fetchone()
    if row is None:
        return None
    values = dict(row)
    values["attachment_ids"] = None if values["attachment_ids"] is None \
        else json.loads(values["attachment_ids"])
    values["skipped_attachments"] = json.loads(values["skipped_attachments"] or "[]")
    return CwReply(**values)


def start_reply_part(conn: sqlite3.Connection, chatwoot_message_id: int, part: int,
                     now: float) -> None:
    """Part `part` (0 for a question's answer) is about to be sent: until it is recorded, its
    outcome is unknown."""
    with transaction(conn):
        conn.execute("INSERT INTO cw_replies (chatwoot_message_id, in_flight_part, updated_at)"
                     " VALUES (?, ?, ?) ON CONFLICT(chatwoot_message_id) DO UPDATE SET"
                     " in_flight_part = excluded.in_flight_part,"
                     " updated_at = excluded.updated_at", (int(chatwoot_message_id), part, now))


def clear_in_flight(conn: sqlite3.Connection, chatwoot_message_id: int, now: float) -> None:
    """The last send certainly did not reach Mercado Livre."""
    with transaction(conn):
        conn.execute("UPDATE cw_replies SET in_flight_part = NULL, updated_at = ?"
                     " WHERE chatwoot_message_id = ?", (now, int(chatwoot_message_id)))


def record_part_sent(conn: sqlite3.Connection, chatwoot_message_id: int, part: int,
                     ml_message_id: str, ml_pack_id: str, now: float) -> None:
    """Part `part` reached the sale as `ml_message_id` (may be empty): the next run starts at
    the part after it, and the sale's sync knows the message is ponte's (one transaction)."""
    with transaction(conn):
        conn.execute("UPDATE cw_replies SET parts_sent = ?, in_flight_part = NULL,"
                     " updated_at = ? WHERE chatwoot_message_id = ?",
                     (part + 1, now, int(chatwoot_message_id)))
        if ml_message_id:
            conn.execute(
                "INSERT INTO ml_messages (ml_message_id, ml_pack_id, chatwoot_message_id,"
                " sent_by_ponte, reply_part, updated_at) VALUES (?, ?, ?, 1, ?, ?)"
                " ON CONFLICT(ml_message_id) DO UPDATE SET"
                " chatwoot_message_id = excluded.chatwoot_message_id, sent_by_ponte = 1,"
                " posting = 0, reply_part = excluded.reply_part,"
                " updated_at = excluded.updated_at",
                (str(ml_message_id), str(ml_pack_id), int(chatwoot_message_id), part, now))


def record_attachments(conn: sqlite3.Connection, chatwoot_message_id: int,
                       attachment_ids: list[str], skipped: list[str], now: float) -> None:
    """The reply's attachments were uploaded to Mercado Livre (or skipped, with why)."""
    with transaction(conn):
        conn.execute("INSERT INTO cw_replies (chatwoot_message_id, attachment_ids,"
                     " skipped_attachments, updated_at) VALUES (?, ?, ?, ?)"
                     " ON CONFLICT(chatwoot_message_id) DO UPDATE SET"
                     " attachment_ids = excluded.attachment_ids,"
                     " skipped_attachments = excluded.skipped_attachments,"
                     " updated_at = excluded.updated_at",
                     (int(chatwoot_message_id), db_manager.dumps(attachment_ids),
                      db_manager.dumps(skipped), now))


def record_unknown_post(conn: sqlite3.Connection, chatwoot_message_id: int, posted_at: float,
                        failed_at: float) -> None:
    """A POST of the reply that failed in a way that may have reached Mercado Livre."""
    with transaction(conn):
        conn.execute("INSERT INTO cw_reply_unknown_posts (chatwoot_message_id, posted_at,"
                     " failed_at) VALUES (?, ?, ?)",
                     (int(chatwoot_message_id), posted_at, failed_at))


def unknown_posts(conn: sqlite3.Connection, chatwoot_message_id: int) -> list[tuple[float, float]]:
    """The reply's POSTs that may have reached Mercado Livre, as (posted_at, failed_at)."""
    return [(row[0], row[1]) for row in conn.execute(
        "SELECT posted_at, failed_at FROM cw_reply_unknown_posts WHERE chatwoot_message_id = ?"
        " ORDER BY posted_at", (int(chatwoot_message_id),))]


# --- unread snapshot ---------------------------------------------------------------------------
# Written by the unread poll (poller's main thread) and by replies (forget_unread, in any job
# thread): every statement is one upsert, and the poll reads and writes in one transaction.

def unread_snapshot(conn: sqlite3.Connection) -> dict[str, int]:
    """{pack id: unread count} as the last unread poll saw it."""
    return {row[0]: row[1] for row in conn.execute(
        "SELECT ml_pack_id, unread_count FROM ml_unread WHERE unread_count IS NOT NULL")}


def forgotten_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """{pack id: how many times a reply dropped it from the snapshot} (a poll compares this
    before and after its call to Mercado Livre)."""
    return {row[0]: row[1] for row in conn.execute(
        "SELECT ml_pack_id, forgotten_count FROM ml_unread WHERE forgotten_count > 0")}


def forget_unread(conn: sqlite3.Connection, ml_pack_id, now: float) -> None:
    """Drop a pack from the snapshot (a reply read it with mark_as_read) and count that."""
    with transaction(conn):
        conn.execute("INSERT INTO ml_unread (ml_pack_id, unread_count, forgotten_count,"
                     " updated_at) VALUES (?, NULL, 1, ?) ON CONFLICT(ml_pack_id) DO UPDATE SET"
                     " unread_count = NULL, forgotten_count = forgotten_count + 1,"
                     " updated_at = excluded.updated_at", (str(ml_pack_id), now))


def save_unread_snapshot(conn: sqlite3.Connection, current: dict[str, int],
                         previous: dict[str, int], now: float) -> None:
    """Make the snapshot `current`, given that it was `previous` (call inside the transaction
    that read `previous`)."""
    with transaction(conn):
        for pack, count in current.items():
            if previous.get(pack) != count:
                conn.execute("INSERT INTO ml_unread (ml_pack_id, unread_count, updated_at)"
                             " VALUES (?, ?, ?) ON CONFLICT(ml_pack_id) DO UPDATE SET"
                             " unread_count = excluded.unread_count,"
                             " updated_at = excluded.updated_at", (str(pack), int(count), now))
        for pack in previous:
            if pack not in current:
                conn.execute("UPDATE ml_unread SET unread_count = NULL, updated_at = ?"
                             " WHERE ml_pack_id = ?", (now, str(pack)))


# --- item cache --------------------------------------------------------------------------------

def get_item(conn: sqlite3.Connection, ml_item_id) -> MlItem | None:
    """The cached item, or None."""
    return _load(MlItem, conn.execute("SELECT * FROM ml_items WHERE ml_item_id = ?",
                                      (str(ml_item_id),)).fetchone())


def put_item(conn: sqlite3.Connection, item: dict, fetched_at: float) -> MlItem:
    """Cache an item as Mercado Livre gave it (its `id` and ITEM_COLUMNS)."""
    values = [item.get(c) for c in ITEM_COLUMNS]
    with transaction(conn):
        conn.execute(
            f"INSERT INTO ml_items (ml_item_id, {', '.join(ITEM_COLUMNS)}, fetched_at)"
            f" VALUES (?, {', '.join('?' * len(ITEM_COLUMNS))}, ?) ON CONFLICT(ml_item_id)"
            f" DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in ITEM_COLUMNS)},"
            f" fetched_at = excluded.fetched_at", (str(item.get("id")), *values, fetched_at))
    return MlItem(str(item.get("id")), *values, fetched_at)


# --- the question sweep's watermark ------------------------------------------------------------

def full_sweep_at(conn: sqlite3.Connection) -> float:
    """When the question poll last walked every page (0: never)."""
    return float(db_manager.mapping_get(conn, _POLL_NAMESPACE, _FULL_SWEEP_KEY) or 0)


def set_full_sweep_at(conn: sqlite3.Connection, at: float) -> None:
    """The question poll walked every page at `at` (written only by that poll)."""
    with transaction(conn):
        db_manager.mapping_put(conn, _POLL_NAMESPACE, _FULL_SWEEP_KEY, at, now=at)


# --- retention ---------------------------------------------------------------------------------

_SETTLED_QUESTION = (
    "updated_at < ? AND ((closed_status IS NOT NULL AND closed_status != ?)"
    " OR ml_question_id IN (SELECT ml_question_id FROM ml_answers))")


def prune(conn: sqlite3.Connection, older_than: float) -> None:
    """Delete bridge B's rows past retention (see the module docstring for what stays), a
    batch per transaction (`db_manager.delete_in_batches`)."""
    batches = db_manager.delete_in_batches
    batches(conn, "ml_items", "fetched_at < ?", (older_than,))
    batches(conn, "cw_conversations", f"kind = '{KIND_QUESTION}' AND ml_question_id IN"
            f" (SELECT ml_question_id FROM ml_questions WHERE {_SETTLED_QUESTION})",
            (older_than, CLOSED_UNSETTLED))
    batches(conn, "ml_questions", _SETTLED_QUESTION, (older_than, CLOSED_UNSETTLED))
    batches(conn, "ml_answers", "answered_at < ? AND ml_question_id NOT IN"
            " (SELECT ml_question_id FROM ml_questions)", (older_than,))
    batches(conn, "cw_replies", "updated_at < ? AND NOT EXISTS (SELECT 1 FROM jobs WHERE"
            " jobs.dedupe_key = 'chatwoot-msg:' || cw_replies.chatwoot_message_id"
            " AND jobs.status != 'done')", (older_than,))
    batches(conn, "cw_reply_unknown_posts", "failed_at < ? AND chatwoot_message_id NOT IN"
            " (SELECT chatwoot_message_id FROM cw_replies)", (older_than,))
    batches(conn, "ml_unread", "unread_count IS NULL AND updated_at < ?", (older_than,))
