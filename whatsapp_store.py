"""SQL of bridge A (WhatsApp via Kommo ⇄ n8n): conversations, customer messages and their
bursts, bot states. The schema is migration 2 in db_manager.

Owns: every statement on `kommo_conversations`, `kommo_messages` and `bot_states`, and what
bridge A deletes past retention (`prune`).
Must not: call a peer or decide anything (bot_control and whatsapp_jobs decide).
Callers wrap writes in `db_manager.transaction()`, except for `prune`, which takes its own.
"""
from __future__ import annotations

import json
import sqlite3

import db_manager
from db_manager import dumps


# --- conversations -------------------------------------------------------------------------

def upsert_conversation(conn: sqlite3.Connection, contact_id: str, lead_id: str, talk_id: str,
                        chat_id: str, contact_name: str, origin: str, now: float) -> None:
    """Remember where a contact's chat lives (latest talk, lead and chat win; blanks don't
    erase what we knew)."""
    conn.execute(
        """INSERT INTO kommo_conversations (kommo_contact_id, kommo_lead_id, kommo_talk_id,
               kommo_chat_id, contact_name, origin, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(kommo_contact_id) DO UPDATE SET
               kommo_lead_id = COALESCE(NULLIF(excluded.kommo_lead_id, ''), kommo_lead_id),
               kommo_talk_id = COALESCE(NULLIF(excluded.kommo_talk_id, ''), kommo_talk_id),
               kommo_chat_id = COALESCE(NULLIF(excluded.kommo_chat_id, ''), kommo_chat_id),
               contact_name = COALESCE(NULLIF(excluded.contact_name, ''), contact_name),
               origin = COALESCE(NULLIF(excluded.origin, ''), origin),
               updated_at = excluded.updated_at""",
        (contact_id, lead_id, talk_id, chat_id, contact_name, origin, now))


def remember_lead(conn: sqlite3.Connection, lead_id: str, contact_id: str, now: float) -> None:
    """Remember which contact a lead belongs to (a contact may have several leads)."""
    if lead_id and contact_id:
        conn.execute("INSERT INTO kommo_leads (kommo_lead_id, kommo_contact_id, updated_at)"
                     " VALUES (?, ?, ?) ON CONFLICT(kommo_lead_id) DO UPDATE SET"
                     " kommo_contact_id = excluded.kommo_contact_id,"
                     " updated_at = excluded.updated_at"
                     # an unchanged lead (every message of a conversation) writes nothing
                     " WHERE kommo_leads.kommo_contact_id != excluded.kommo_contact_id",
                     (lead_id, contact_id, now))


def contact_of_lead(conn: sqlite3.Connection, lead_id: str) -> str | None:
    """The contact of a lead we have seen in a message, if any."""
    row = conn.execute("SELECT kommo_contact_id FROM kommo_leads WHERE kommo_lead_id = ?",
                       (str(lead_id),)).fetchone()
    return row[0] if row else None


def get_conversation(conn: sqlite3.Connection, contact_id: str | None = None,
                     talk_id: str | None = None) -> dict | None:
    """A conversation by contact or talk id."""
    if contact_id:
        sql, arg = "kommo_contact_id = ?", contact_id
    elif talk_id:
        sql, arg = "kommo_talk_id = ?", talk_id
    else:
        return None
    row = conn.execute(f"SELECT * FROM kommo_conversations WHERE {sql}"
                       " ORDER BY updated_at DESC LIMIT 1", (str(arg),)).fetchone()
    return dict(row) if row else None


def set_open_batch(conn: sqlite3.Connection, contact_id: str, batch_key: str | None,
                   started_at: float | None) -> None:
    conn.execute("UPDATE kommo_conversations SET open_batch_key = ?, batch_started_at = ?"
                 " WHERE kommo_contact_id = ?", (batch_key, started_at, contact_id))


# --- customer messages ------------------------------------------------------------------------

def message_exists(conn: sqlite3.Connection, message_id: str) -> bool:
    """Whether Kommo delivered this message before."""
    return conn.execute("SELECT 1 FROM kommo_messages WHERE kommo_message_id = ?",
                        (message_id,)).fetchone() is not None


def insert_message(conn: sqlite3.Connection, message_id: str, contact_id: str, text: str,
                   message_type: str, attachments: list, sent_at: float, received_at: float,
                   status: str, batch_key: str | None) -> None:
    """Store a customer message (once: a message Kommo delivered before stays as it was)."""
    conn.execute(
        "INSERT INTO kommo_messages (kommo_message_id, kommo_contact_id, text, message_type,"
        " attachments, sent_at, received_at, status, batch_key) VALUES (?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(kommo_message_id) DO NOTHING",
        (message_id, contact_id, text, message_type, dumps(attachments), sent_at, received_at,
         status, batch_key))


def batch_messages(conn: sqlite3.Connection, batch_key: str) -> list[dict]:
    """The messages of one burst, in the order the customer sent them."""
    rows = conn.execute("SELECT * FROM kommo_messages WHERE batch_key = ?"
                        " ORDER BY sent_at, received_at, rowid", (batch_key,)).fetchall()
    out = []
    for row in rows:
        d = dict(row)
        d["attachments"] = json.loads(d["attachments"])
        out.append(d)
    return out


def set_batch_status(conn: sqlite3.Connection, batch_key: str, status: str) -> None:
    conn.execute("UPDATE kommo_messages SET status = ? WHERE batch_key = ?", (status, batch_key))


# --- bot states -------------------------------------------------------------------------------

def get_bot_state(conn: sqlite3.Connection, contact_id: str) -> dict:
    """The bot state of a contact; contacts never seen are active."""
    row = conn.execute("SELECT * FROM bot_states WHERE kommo_contact_id = ?",
                       (contact_id,)).fetchone()
    if row:
        return dict(row)
    return {"kommo_contact_id": contact_id, "status": "active", "changed_by": "",
            "paused_by_kind": "", "reason": "", "since_at": None, "until_at": None,
            "pause_count": 0, "updated_at": None}


def set_paused(conn: sqlite3.Connection, contact_id: str, by: str, by_kind: str, reason: str,
               now: float, until_at: float | None) -> None:
    """Pause (or re-pause) the bot for a contact; every pause bumps `pause_count` so answers
    produced before it can be recognised and dropped."""
    conn.execute(
        """INSERT INTO bot_states (kommo_contact_id, status, changed_by, paused_by_kind, reason,
               since_at, until_at, pause_count, updated_at)
           VALUES (?, 'paused', ?, ?, ?, ?, ?, 1, ?)
           ON CONFLICT(kommo_contact_id) DO UPDATE SET status = 'paused',
               changed_by = excluded.changed_by, paused_by_kind = excluded.paused_by_kind,
               reason = excluded.reason, since_at = excluded.since_at,
               until_at = excluded.until_at, pause_count = pause_count + 1,
               updated_at = excluded.updated_at""",
        (contact_id, by, by_kind, reason, now, until_at, now))


def set_active(conn: sqlite3.Connection, contact_id: str, by: str, now: float,
               only_if_pause_count: int | None = None) -> bool:
    """Give the conversation back to the bot, if it is paused: resuming an active bot changes
    nothing (its `since_at` would make messages that arrived before look like they came during
    a pause). With `only_if_pause_count`, only if it is still that very pause (a seller may
    have paused again meanwhile). True when the state changed."""
    cur = conn.execute(
        "UPDATE bot_states SET status = 'active', changed_by = ?, paused_by_kind = '',"
        " reason = '', since_at = ?, until_at = NULL, updated_at = ?"
        " WHERE kommo_contact_id = ? AND status = 'paused'"
        " AND (? IS NULL OR pause_count = ?)",
        (by, now, now, contact_id, only_if_pause_count, only_if_pause_count))
    return cur.rowcount == 1


def paused_states(conn: sqlite3.Connection) -> list[dict]:
    """Every contact whose bot is paused, most recent first."""
    return [dict(r) for r in conn.execute(
        "SELECT * FROM bot_states WHERE status = 'paused' ORDER BY since_at DESC")]


def due_auto_resumes(conn: sqlite3.Connection, now: float) -> list[dict]:
    """Paused contacts whose auto-resume time has come."""
    return [dict(r) for r in conn.execute(
        "SELECT * FROM bot_states WHERE status = 'paused' AND until_at IS NOT NULL"
        " AND until_at <= ?", (now,))]


# Bridge A's mappings that only matter for a while: n8n answers to match, the last Salesbot run
# per lead (to space runs), the ids of messages ponte sent (to skip their echo), and the
# markers of Kommo writes whose job may run again (whatsapp_resend). Kommo's OAuth states are
# kommo_auth's.
SHORT_LIVED_MAPPINGS = ("n8n-correlation", "n8n-answer", "kommo", "kommo-sent",
                        "kommo-send-started")


def prune(conn: sqlite3.Connection, older_than: float) -> None:
    """Delete bridge A's rows past retention: short-lived mappings, and customer messages
    received before `older_than` unless a pending or running job still carries their burst."""
    db_manager.prune_mappings(conn, SHORT_LIVED_MAPPINGS, older_than)
    db_manager.delete_in_batches(
        conn, "kommo_messages", "received_at < ? AND (batch_key IS NULL OR batch_key NOT IN"
        " (SELECT dedupe_key FROM jobs WHERE status IN ('pending', 'running')))", (older_than,))
