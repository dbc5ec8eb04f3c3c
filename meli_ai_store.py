"""SQL of the seller's AI agent on Mercado Livre questions: what the AI answered for each
question and what became of it (`ml_ai_answers`), and the item details the AI reads
(`ml_ai_items`, a cache). The schema is migration 8 in db_manager.

Owns: every statement on `ml_ai_answers` and `ml_ai_items`, and what they delete past
retention (`prune`: the item cache; the answers of questions meli_store has pruned).
Must not: call a peer or decide anything (meli_ai decides; meli_questions records an agent's
reply and reads the suggestion that `#ok` sends).

Concurrency: each write is one statement (an upsert that sets only the columns it owns).
The rows of one question are written by the jobs of its conversation's `cw-out:<conversation>`
ordering key (the AI's answer being published, an agent's reply), so they never interleave.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, fields

import db_manager
from db_manager import transaction

STATUS_NONE = "none"              # an agent replied before any AI answer
STATUS_SUGGESTED = "suggested"    # a private note holds the AI's answer; `#ok` sends it
STATUS_PUBLISHING = "publishing"  # the automatic answer's Chatwoot message may exist
STATUS_PUBLISHED = "published"    # the automatic answer is on Mercado Livre
STATUS_REFUSED = "refused"        # Mercado Livre refused the automatic answer (a note says why)
STATUS_APPROVED = "approved"      # an agent sent the suggestion with `#ok`


@dataclass(frozen=True)
class AiAnswer:
    """The AI's answer to one question. `held_reason`: why it waits as a suggestion instead
    of going out (pt-BR, for the note); `agent_replied_at`: an agent replied in the
    conversation (a later AI answer is dropped)."""

    ml_question_id: str
    chatwoot_conversation_id: int | None
    answer_text: str | None
    held_reason: str | None
    status: str
    chatwoot_message_id: int | None
    agent_replied_at: float | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class AiItem:
    """What the AI reads of an item (`ml_ai_items`), with the time it was read."""

    ml_item_id: str
    title: str | None
    price: float | None
    currency_id: str | None
    available_quantity: int | None
    permalink: str | None
    status: str | None
    attributes: str
    description: str
    fetched_at: float

    def as_context(self) -> dict:
        """The item as the n8n workflow receives it."""
        return {"id": self.ml_item_id, "title": self.title, "price": self.price,
                "currency_id": self.currency_id, "available_quantity": self.available_quantity,
                "permalink": self.permalink, "status": self.status,
                "attributes": json.loads(self.attributes or "[]"),
                "description": self.description}


def _load(cls, row: sqlite3.Row | None):
    if row is None:
        return None
    names = {f.name for f in fields(cls)}
    return cls(**{k: row[k] for k in row.keys() if k in names})


def get(conn: sqlite3.Connection, ml_question_id) -> AiAnswer | None:
    """The AI's answer to the question, or None."""
    return _load(AiAnswer, conn.execute("SELECT * FROM ml_ai_answers WHERE ml_question_id = ?",
                                        (str(ml_question_id),)).fetchone())


def save_answer(conn: sqlite3.Connection, ml_question_id, conversation_id: int, text: str,
                status: str, held_reason: str | None, now: float) -> None:
    """Record the AI's answer with its fate (suggested or publishing)."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO ml_ai_answers (ml_question_id, chatwoot_conversation_id, answer_text,"
            " held_reason, status, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(ml_question_id) DO UPDATE SET chatwoot_conversation_id ="
            " excluded.chatwoot_conversation_id, answer_text = excluded.answer_text,"
            " held_reason = excluded.held_reason, status = excluded.status,"
            " updated_at = excluded.updated_at",
            (str(ml_question_id), int(conversation_id), text, held_reason, status, now, now))


def set_status(conn: sqlite3.Connection, ml_question_id, status: str, now: float,
               chatwoot_message_id: int | None = None) -> None:
    """Move the answer on (published, refused, approved); records the Chatwoot message of an
    automatic answer when given."""
    with transaction(conn):
        conn.execute("UPDATE ml_ai_answers SET status = ?, updated_at = ?,"
                     " chatwoot_message_id = COALESCE(?, chatwoot_message_id)"
                     " WHERE ml_question_id = ?",
                     (status, now, chatwoot_message_id, str(ml_question_id)))


def mark_agent_replied(conn: sqlite3.Connection, ml_question_id, now: float) -> None:
    """An agent replied in the question's conversation: the AI's later answer is dropped. The
    first time stays."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO ml_ai_answers (ml_question_id, status, agent_replied_at, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(ml_question_id) DO UPDATE SET"
            " agent_replied_at = COALESCE(agent_replied_at, excluded.agent_replied_at),"
            " updated_at = excluded.updated_at",
            (str(ml_question_id), STATUS_NONE, now, now, now))


def get_item(conn: sqlite3.Connection, ml_item_id) -> AiItem | None:
    """The cached item details, or None."""
    return _load(AiItem, conn.execute("SELECT * FROM ml_ai_items WHERE ml_item_id = ?",
                                      (str(ml_item_id),)).fetchone())


def put_item(conn: sqlite3.Connection, item: dict, description: str, fetched_at: float) -> AiItem:
    """Cache what the AI reads of an item (replaced whole: it is a copy of Mercado Livre's)."""
    attributes = [{"id": a.get("id"), "name": a.get("name"), "value": a.get("value_name")}
                  for a in item.get("attributes") or [] if isinstance(a, dict)]
    quantity = item.get("available_quantity")
    price = item.get("price")
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO ml_ai_items (ml_item_id, title, price, currency_id,"
            " available_quantity, permalink, status, attributes, description, fetched_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (str(item["id"]), item.get("title"),
             float(price) if isinstance(price, (int, float)) else None, item.get("currency_id"),
             int(quantity) if isinstance(quantity, int) else None, item.get("permalink"),
             item.get("status"), json.dumps(attributes, ensure_ascii=False), description or "",
             fetched_at))
        return get_item(conn, item["id"])


def prune(conn: sqlite3.Connection, older_than: float) -> None:
    """Delete the item cache past retention, and the AI answers of questions meli_store no
    longer keeps (settled long ago). An open question keeps its row: it still says that an
    agent replied, so an AI answer arriving days later is still dropped."""
    db_manager.delete_in_batches(conn, "ml_ai_items", "fetched_at < ?", (older_than,))
    db_manager.delete_in_batches(conn, "ml_ai_answers", "updated_at < ? AND ml_question_id"
                                 " NOT IN (SELECT ml_question_id FROM ml_questions)",
                                 (older_than,))
