"""The state database: connections, schema and the spine's SQL (bridge A's tables are queried
by whatsapp_store; their schema is here so migrations stay in one ordered list).

Owns: connections (WAL, busy timeout, foreign keys, the checkpointer thread), numbered
migrations (`PRAGMA user_version`), `transaction()` (BEGIN IMMEDIATE), batched clean-up
deletes, the inbound event log, heartbeats, cross-process locks and key-value mappings.
The job outbox's SQL is in outbox; the tokens table's in credentials.
Must not: call a peer, import flask or a peer module. Times are UTC epoch seconds (REAL, because
debounce windows and wake-up latency are sub-second).
"""
from __future__ import annotations

import contextlib
import json
import os
import logging
import sqlite3
import threading
import time
from typing import Any, Iterator

_log = logging.getLogger("ponte.db")

BUSY_TIMEOUT_MS = 10_000
# SQLite checkpoints the WAL inside each commit made while the WAL is over the threshold: it
# copies pages into the database file, with two fsyncs — ~10 ms at SQLite's default of 1,000
# pages, and ~40 ms at 10,000. Every web commit is a webhook's ack, so the web checkpoints in a
# background thread instead (`start_checkpointer`, run by each Gunicorn worker), and its commits
# only at 10,000 pages; the poller keeps the default and commits after every job and on every
# heartbeat. Under a sustained burst a checkpoint that runs beside the writers never finds the
# WAL fully copied, so the WAL is not restarted and keeps growing; past 10,000 pages the acks
# checkpoint again too, but then only copy the little the thread has not.
WAL_AUTOCHECKPOINT_PAGES = 1000
WEB_WAL_AUTOCHECKPOINT_PAGES = 10_000
CHECKPOINT_EVERY_SECONDS = 1.0
# After a checkpoint, SQLite reuses the WAL file but keeps its size; a burst must not leave a
# big file behind.
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024


def _catch_up_first_release(conn: sqlite3.Connection) -> None:
    # Migration 2 was changed after the first release had applied it, so a database from then
    # is at version >= 2 without those changes; a newer one has them. Bring the first up to
    # date and leave the second as it is. kommo_conversations_lead is an index nothing queries.
    columns = {row[1] for row in conn.execute("PRAGMA table_info(bot_states)")}
    if "paused_by" in columns:
        conn.execute("ALTER TABLE bot_states RENAME COLUMN paused_by TO changed_by")
    conn.execute("CREATE TABLE IF NOT EXISTS kommo_leads (kommo_lead_id TEXT PRIMARY KEY,"
                 " kommo_contact_id TEXT NOT NULL, updated_at REAL NOT NULL)")
    conn.execute("INSERT OR IGNORE INTO kommo_leads (kommo_lead_id, kommo_contact_id, updated_at)"
                 " SELECT kommo_lead_id, kommo_contact_id, updated_at FROM kommo_conversations"
                 " WHERE kommo_lead_id != ''")
    conn.execute("CREATE INDEX IF NOT EXISTS kommo_messages_received"
                 " ON kommo_messages(received_at)")
    conn.execute("DROP INDEX IF EXISTS kommo_conversations_lead")


# Migration 7: the tables of bridge B (meli_store), then every row of its mappings namespaces
# carried into them (json_extract: true → 1; JSON lists stay JSON text), then those rows go.
_MELI_TABLES_7 = """
    CREATE TABLE ml_questions (
        ml_question_id TEXT PRIMARY KEY,
        ml_item_id TEXT NOT NULL DEFAULT '',
        ml_buyer_id TEXT NOT NULL DEFAULT '',
        question_text TEXT NOT NULL DEFAULT '',
        chatwoot_conversation_id INTEGER,
        chatwoot_message_id INTEGER,
        opening INTEGER NOT NULL DEFAULT 0,
        mirror_posting INTEGER NOT NULL DEFAULT 0,
        sweep_checks INTEGER NOT NULL DEFAULT 0,
        sweep_check_key TEXT,
        closed_status TEXT,
        imported_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX ml_questions_thread ON ml_questions(ml_buyer_id, ml_item_id)
        WHERE chatwoot_conversation_id IS NOT NULL;
    CREATE INDEX ml_questions_open ON ml_questions(updated_at)
        WHERE chatwoot_message_id IS NOT NULL AND closed_status IS NULL;
    CREATE TABLE ml_answers (
        ml_question_id TEXT PRIMARY KEY,
        answered_by TEXT NOT NULL CHECK (answered_by IN ('ponte', 'mercadolivre')),
        chatwoot_message_id INTEGER,
        answered_at REAL NOT NULL
    );
    CREATE TABLE cw_contacts (
        ml_buyer_id TEXT PRIMARY KEY,
        chatwoot_contact_id INTEGER NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE cw_contact_inboxes (
        ml_buyer_id TEXT NOT NULL,
        chatwoot_inbox_id INTEGER NOT NULL,
        source_id TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (ml_buyer_id, chatwoot_inbox_id)
    );
    CREATE TABLE cw_conversations (
        chatwoot_conversation_id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('question', 'sale')),
        ml_question_id TEXT,
        ml_pack_id TEXT,
        ml_item_id TEXT NOT NULL DEFAULT '',
        ml_buyer_id TEXT NOT NULL DEFAULT '',
        created_at REAL
    );
    CREATE INDEX cw_conversations_question ON cw_conversations(ml_question_id)
        WHERE ml_question_id IS NOT NULL;
    CREATE TABLE ml_packs (
        ml_pack_id TEXT PRIMARY KEY,
        chatwoot_conversation_id INTEGER,
        ml_buyer_id TEXT NOT NULL DEFAULT '',
        opening INTEGER NOT NULL DEFAULT 0,
        order_summary TEXT NOT NULL DEFAULT '',
        summary_posted INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE TABLE ml_messages (
        ml_message_id TEXT PRIMARY KEY,
        ml_pack_id TEXT NOT NULL DEFAULT '',
        chatwoot_message_id INTEGER,
        sent_by_ponte INTEGER NOT NULL DEFAULT 0,
        posting INTEGER NOT NULL DEFAULT 0,
        reply_part INTEGER,
        updated_at REAL NOT NULL
    );
    CREATE INDEX ml_messages_reply ON ml_messages(chatwoot_message_id) WHERE sent_by_ponte = 1;
    CREATE TABLE ml_unread (
        ml_pack_id TEXT PRIMARY KEY,
        unread_count INTEGER,
        forgotten_count INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE TABLE ml_items (
        ml_item_id TEXT PRIMARY KEY,
        title TEXT,
        price REAL,
        currency_id TEXT,
        permalink TEXT,
        thumbnail TEXT,
        secure_thumbnail TEXT,
        status TEXT,
        fetched_at REAL NOT NULL
    );
    CREATE INDEX ml_items_fetched ON ml_items(fetched_at);
    CREATE TABLE cw_replies (
        chatwoot_message_id INTEGER PRIMARY KEY,
        parts_sent INTEGER NOT NULL DEFAULT 0,
        in_flight_part INTEGER,
        attachment_ids TEXT,
        skipped_attachments TEXT NOT NULL DEFAULT '[]',
        updated_at REAL NOT NULL
    );
    CREATE TABLE cw_reply_unknown_posts (
        chatwoot_message_id INTEGER NOT NULL,
        posted_at REAL NOT NULL,
        failed_at REAL NOT NULL
    );
    CREATE INDEX cw_reply_unknown_posts_message ON cw_reply_unknown_posts(chatwoot_message_id);
    INSERT INTO ml_questions (ml_question_id, ml_item_id, ml_buyer_id, chatwoot_conversation_id,
                              chatwoot_message_id, opening, mirror_posting, sweep_checks,
                              sweep_check_key, closed_status, imported_at, updated_at)
        SELECT key, COALESCE(CAST(json_extract(value, '$.item_id') AS TEXT), ''),
               COALESCE(CAST(json_extract(value, '$.buyer_id') AS TEXT), ''),
               CAST(json_extract(value, '$.conversation_id') AS INTEGER),
               CAST(json_extract(value, '$.message_id') AS INTEGER),
               COALESCE(json_extract(value, '$.opening'), 0),
               COALESCE(json_extract(value, '$.mirror_posting'), 0),
               COALESCE(json_extract(value, '$.checks'), 0), json_extract(value, '$.check_key'),
               json_extract(value, '$.closed'),
               CASE WHEN json_extract(value, '$.message_id') IS NOT NULL THEN updated_at END,
               updated_at
        FROM mappings WHERE namespace = 'ml_question';
    INSERT INTO ml_questions (ml_question_id, ml_buyer_id, ml_item_id, question_text,
                              chatwoot_conversation_id, updated_at)
        SELECT CAST(json_extract(e.value, '$.question_id') AS TEXT),
               substr(m.key, 1, instr(m.key, ':') - 1), substr(m.key, instr(m.key, ':') + 1),
               COALESCE(json_extract(e.value, '$.text'), ''),
               CAST(json_extract(e.value, '$.conversation_id') AS INTEGER), m.updated_at
        FROM mappings AS m, json_each(m.value) AS e
        WHERE m.namespace = 'ml_question_thread' AND json_type(m.value) = 'array'
        ON CONFLICT(ml_question_id) DO UPDATE SET question_text = excluded.question_text;
    INSERT INTO ml_answers (ml_question_id, answered_by, chatwoot_message_id, answered_at)
        SELECT key, CASE WHEN json_extract(value, '$.mirrored') THEN 'mercadolivre'
                         ELSE 'ponte' END,
               CAST(json_extract(value, '$.chatwoot_message_id') AS INTEGER), updated_at
        FROM mappings WHERE namespace = 'ml_answered';
    INSERT INTO cw_contacts (ml_buyer_id, chatwoot_contact_id, updated_at)
        SELECT key, CAST(json_extract(value, '$.contact_id') AS INTEGER), updated_at
        FROM mappings WHERE namespace = 'cw_contact'
          AND json_extract(value, '$.contact_id') IS NOT NULL;
    INSERT INTO cw_contact_inboxes (ml_buyer_id, chatwoot_inbox_id, source_id, updated_at)
        SELECT substr(key, 1, instr(key, ':') - 1),
               CAST(substr(key, instr(key, ':') + 1) AS INTEGER),
               COALESCE(json_extract(value, '$.source_id'), 'meli:' || substr(key, 1, instr(key, ':') - 1)),
               updated_at
        FROM mappings WHERE namespace = 'cw_contact_inbox' AND instr(key, ':') > 0;
    INSERT INTO cw_conversations (chatwoot_conversation_id, kind, ml_question_id, ml_pack_id,
                                  ml_item_id, ml_buyer_id, created_at)
        SELECT CAST(key AS INTEGER), json_extract(value, '$.kind'),
               CAST(json_extract(value, '$.question_id') AS TEXT),
               CAST(json_extract(value, '$.pack_id') AS TEXT),
               COALESCE(CAST(json_extract(value, '$.item_id') AS TEXT), ''),
               COALESCE(CAST(json_extract(value, '$.buyer_id') AS TEXT), ''), updated_at
        FROM mappings WHERE namespace = 'cw_conversation'
          AND json_extract(value, '$.kind') IN ('question', 'sale');
    INSERT INTO ml_packs (ml_pack_id, chatwoot_conversation_id, ml_buyer_id, opening,
                          order_summary, summary_posted, updated_at)
        SELECT key, CAST(json_extract(value, '$.conversation_id') AS INTEGER),
               COALESCE(CAST(json_extract(value, '$.buyer_id') AS TEXT), ''),
               COALESCE(json_extract(value, '$.opening'), 0),
               COALESCE(json_extract(value, '$.summary'), ''),
               COALESCE(json_extract(value, '$.summary_posted'), 0), updated_at
        FROM mappings WHERE namespace = 'ml_pack';
    INSERT INTO ml_messages (ml_message_id, chatwoot_message_id, sent_by_ponte, posting,
                             updated_at)
        SELECT key, CAST(json_extract(value, '$.chatwoot_message_id') AS INTEGER),
               COALESCE(json_extract(value, '$.sent_by_ponte'), 0),
               COALESCE(json_extract(value, '$.posting'), 0), updated_at
        FROM mappings WHERE namespace = 'ml_message';
    UPDATE ml_messages SET reply_part = part.number
        FROM (SELECT CAST(e.value AS TEXT) AS ml_message_id, e.key AS number
              FROM mappings AS m, json_each(m.value, '$.ml_message_ids') AS e
              WHERE m.namespace = 'cw_outgoing') AS part
        WHERE part.ml_message_id = ml_messages.ml_message_id;
    INSERT INTO ml_unread (ml_pack_id, unread_count, updated_at)
        SELECT e.key, e.value, m.updated_at FROM mappings AS m, json_each(m.value) AS e
        WHERE m.namespace = 'ml_unread' AND m.key = 'last';
    INSERT INTO ml_unread (ml_pack_id, forgotten_count, updated_at)
        SELECT e.key, e.value, m.updated_at FROM mappings AS m, json_each(m.value) AS e
        WHERE m.namespace = 'ml_unread' AND m.key = 'forgotten'
        ON CONFLICT(ml_pack_id) DO UPDATE SET forgotten_count = excluded.forgotten_count;
    INSERT INTO ml_items (ml_item_id, title, price, currency_id, permalink, thumbnail,
                          secure_thumbnail, status, fetched_at)
        SELECT key, json_extract(value, '$.title'), json_extract(value, '$.price'),
               json_extract(value, '$.currency_id'), json_extract(value, '$.permalink'),
               json_extract(value, '$.thumbnail'), json_extract(value, '$.secure_thumbnail'),
               json_extract(value, '$.status'),
               COALESCE(json_extract(value, '$.fetched_at'), updated_at)
        FROM mappings WHERE namespace = 'ml_item';
    INSERT INTO cw_replies (chatwoot_message_id, parts_sent, in_flight_part, attachment_ids,
                            skipped_attachments, updated_at)
        SELECT CAST(key AS INTEGER), COALESCE(json_extract(value, '$.parts_sent'), 0),
               CASE json_type(value, '$.in_flight')
                    WHEN 'integer' THEN json_extract(value, '$.in_flight')
                    WHEN 'true' THEN 0 END,
               CASE WHEN json_type(value, '$.attachment_ids') = 'array'
                    THEN json_extract(value, '$.attachment_ids') END,
               CASE WHEN json_type(value, '$.skipped') = 'array'
                    THEN json_extract(value, '$.skipped') ELSE '[]' END,
               updated_at
        FROM mappings WHERE namespace = 'cw_outgoing';
    INSERT INTO cw_reply_unknown_posts (chatwoot_message_id, posted_at, failed_at)
        SELECT CAST(m.key AS INTEGER), json_extract(e.value, '$[0]'),
               json_extract(e.value, '$[1]')
        FROM mappings AS m, json_each(m.value, '$.reached') AS e
        WHERE m.namespace = 'cw_outgoing';
    DELETE FROM mappings WHERE namespace IN ('ml_question', 'ml_question_thread', 'cw_contact',
        'cw_contact_inbox', 'cw_conversation', 'ml_pack', 'ml_message', 'ml_unread', 'ml_item',
        'cw_outgoing', 'ml_answered')
"""


MIGRATIONS: list = [
    # 1: the spine — events, jobs, heartbeats, locks, mappings, tokens
    """
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,
        event_type TEXT NOT NULL,
        status TEXT NOT NULL,
        received_at REAL NOT NULL,
        request_id TEXT,
        summary TEXT NOT NULL DEFAULT '{}'
    );
    CREATE INDEX events_received ON events(received_at);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,
        ordering_key TEXT,
        payload TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER,
        available_at REAL NOT NULL,
        locked_until REAL,
        locked_by TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        last_error TEXT,
        result TEXT
    );
    CREATE INDEX jobs_ready ON jobs(status, available_at);
    CREATE INDEX jobs_open_by_order ON jobs(ordering_key, id)
        WHERE ordering_key IS NOT NULL AND status IN ('pending', 'running');
    CREATE TABLE heartbeats (
        process TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        beat_at REAL NOT NULL,
        info TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE locks (
        name TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        locked_until REAL NOT NULL
    );
    CREATE TABLE mappings (
        namespace TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE TABLE tokens (
        provider TEXT PRIMARY KEY,
        access_token TEXT NOT NULL DEFAULT '',
        refresh_token TEXT NOT NULL DEFAULT '',
        expires_at REAL,
        status TEXT NOT NULL DEFAULT 'ok',
        detail TEXT NOT NULL DEFAULT '',
        updated_at REAL NOT NULL
    );
    """,
    # 2: bridge A (WhatsApp via Kommo ⇄ n8n) — conversations, customer messages, bot states
    """
    CREATE TABLE kommo_conversations (
        kommo_contact_id TEXT PRIMARY KEY,
        kommo_lead_id TEXT NOT NULL DEFAULT '',
        kommo_talk_id TEXT NOT NULL DEFAULT '',
        kommo_chat_id TEXT NOT NULL DEFAULT '',
        contact_name TEXT NOT NULL DEFAULT '',
        origin TEXT NOT NULL DEFAULT '',
        open_batch_key TEXT,
        batch_started_at REAL,
        last_message_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX kommo_conversations_lead ON kommo_conversations(kommo_lead_id);
    CREATE TABLE kommo_leads (
        kommo_lead_id TEXT PRIMARY KEY,
        kommo_contact_id TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX kommo_conversations_talk ON kommo_conversations(kommo_talk_id);
    CREATE TABLE kommo_messages (
        kommo_message_id TEXT PRIMARY KEY,
        kommo_contact_id TEXT NOT NULL,
        text TEXT NOT NULL,
        message_type TEXT NOT NULL DEFAULT 'text',
        attachments TEXT NOT NULL DEFAULT '[]',
        sent_at REAL NOT NULL,
        received_at REAL NOT NULL,
        status TEXT NOT NULL,
        batch_key TEXT
    );
    CREATE INDEX kommo_messages_batch ON kommo_messages(batch_key);
    CREATE INDEX kommo_messages_received ON kommo_messages(received_at);
    CREATE TABLE bot_states (
        kommo_contact_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('active', 'paused')),
        changed_by TEXT NOT NULL DEFAULT '',
        paused_by_kind TEXT NOT NULL DEFAULT '',
        reason TEXT NOT NULL DEFAULT '',
        since_at REAL,
        until_at REAL,
        pause_count INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE INDEX bot_states_until ON bot_states(until_at) WHERE status = 'paused';
    """,
    # 3: urgent kinds are claimed first (see outbox.claim_next_job)
    """
    CREATE INDEX jobs_ready_by_kind ON jobs(kind, available_at) WHERE status = 'pending';
    """,
    # 4: jobs staged by a webhook's ack (see outbox.stage_job)
    """
    CREATE TABLE staged_jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        dedupe_key TEXT NOT NULL UNIQUE,
        ordering_key TEXT,
        payload TEXT NOT NULL,
        max_attempts INTEGER,
        created_at REAL NOT NULL
    );
    """,
    # 5: catch up databases made by the first release, whose migration 2 had no kommo_leads,
    # no kommo_messages_received and bot_states.paused_by (see _catch_up_first_release)
    _catch_up_first_release,
    # 6: staged_jobs without the unique index: the move into jobs dedupes (see outbox.stage_job).
    # Versions before it stage with ON CONFLICT(dedupe_key) and fail on a migrated database.
    """
    CREATE TABLE staged_jobs_6 (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        dedupe_key TEXT NOT NULL,
        ordering_key TEXT,
        payload TEXT NOT NULL,
        max_attempts INTEGER,
        created_at REAL NOT NULL
    );
    INSERT INTO staged_jobs_6 (id, kind, dedupe_key, ordering_key, payload, max_attempts,
                               created_at)
        SELECT id, kind, dedupe_key, ordering_key, payload, max_attempts, created_at
        FROM staged_jobs;
    DROP TABLE staged_jobs;
    ALTER TABLE staged_jobs_6 RENAME TO staged_jobs;
    """,
    # 7: bridge B's state in its own tables (queried by meli_store), moved out of the JSON
    # values of `mappings` that jobs read, changed and wrote back
    _MELI_TABLES_7,
    # 8: the seller's AI agent on Mercado Livre questions (queried by meli_ai_store)
    """
    CREATE TABLE ml_ai_answers (
        ml_question_id TEXT PRIMARY KEY,
        chatwoot_conversation_id INTEGER,
        answer_text TEXT,
        held_reason TEXT,
        status TEXT NOT NULL DEFAULT 'none',
        chatwoot_message_id INTEGER,
        agent_replied_at REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX ml_ai_answers_updated ON ml_ai_answers(updated_at);
    CREATE TABLE ml_ai_items (
        ml_item_id TEXT PRIMARY KEY,
        title TEXT,
        price REAL,
        currency_id TEXT,
        available_quantity INTEGER,
        permalink TEXT,
        status TEXT,
        attributes TEXT NOT NULL DEFAULT '[]',
        description TEXT NOT NULL DEFAULT '',
        fetched_at REAL NOT NULL
    );
    """,
    # 9: operations — alert states (alerts.py) and the outcome of the poller's periodic tasks
    # (task_runs: /health tells "polls keep failing" from them)
    """
    CREATE TABLE alerts (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('firing', 'resolved')),
        since_at REAL NOT NULL,
        message TEXT NOT NULL,
        details TEXT NOT NULL DEFAULT '{}',
        last_sent_at REAL,
        delivered_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE task_runs (
        task TEXT PRIMARY KEY,
        last_ok_at REAL,
        last_failed_at REAL,
        last_error TEXT NOT NULL DEFAULT '',
        failures INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    """,
]


class DatabaseError(Exception):
    """The state database cannot be opened or used."""


def connect(path: str, wal_autocheckpoint_pages: int = WAL_AUTOCHECKPOINT_PAGES,
            cache_kib: int | None = None, cached_statements: int = 128) -> sqlite3.Connection:
    """Open the database (creating its folder), in WAL mode with a busy timeout and foreign keys.
    The web passes `WEB_WAL_AUTOCHECKPOINT_PAGES` (see there). `cache_kib` bounds the page
    cache (SQLite's default is 2 MiB per connection) and `cached_statements` how many prepared
    statements the connection keeps: the poller's many worker connections each touch a few
    rows with a few statements.

    The connection is in autocommit mode: writes go through `transaction()`.
    """
    try:
        if path != ":memory:" and not path.startswith("file:"):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False, uri=path.startswith("file:"),
                               cached_statements=cached_statements)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _set_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint = {int(wal_autocheckpoint_pages)}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        conn.execute("PRAGMA foreign_keys = ON")
        if cache_kib is not None:
            conn.execute(f"PRAGMA cache_size = -{int(cache_kib)}")
        return conn
    except (sqlite3.Error, OSError) as exc:
        raise DatabaseError(f"cannot open database {path}: {exc}") from exc


def start_periodic(path: str, every_seconds: float, work, name: str, failure_event: str,
                   stop: threading.Event | None = None) -> threading.Thread:
    """Run `work(conn)` every `every_seconds` in a daemon thread named `name`, with its own
    connection to the database at `path` (a connection must not be shared by two threads'
    work), until `stop` is set. A failure (the volume not mounted yet, a disk error) is logged
    once as `failure_event` and retried on every turn. Returns the started thread."""
    stop = stop or threading.Event()

    def run() -> None:
        conn, failing = None, False
        while not stop.wait(every_seconds):
            try:
                conn = conn or connect(path)
                work(conn)
                failing = False
            except (sqlite3.Error, DatabaseError) as exc:
                if not failing:
                    _log.warning(failure_event, extra={"error": str(exc)})
                failing = True
        if conn is not None:
            conn.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def start_checkpointer(path: str, every_seconds: float = CHECKPOINT_EVERY_SECONDS,
                       stop: threading.Event | None = None) -> threading.Thread:
    """Checkpoint the WAL of the database at `path` every `every_seconds` in a thread
    (`start_periodic`; PASSIVE: it never blocks a writer, and Python's sqlite3 releases the GIL
    while SQLite copies and syncs); the commits' own threshold still holds if it fails."""
    return start_periodic(path, every_seconds,
                          lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone(),
                          "wal-checkpointer", "wal_checkpoint_failed", stop)


def _set_wal(conn: sqlite3.Connection) -> None:
    # Switching a fresh file to WAL needs an exclusive lock and SQLite does not call the busy
    # handler for it: when web and poller start together, one of them must wait and try again.
    _execute_when_unlocked(conn, "PRAGMA journal_mode = WAL", pause=0.02, max_pause=0.02)


def _execute_when_unlocked(conn: sqlite3.Connection, sql: str, pause: float,
                           max_pause: float) -> None:
    """Run `sql`, trying again while the database is locked (sleeping `pause`, doubling up to
    `max_pause`), for at most BUSY_TIMEOUT_MS."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute(sql)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, max_pause)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction taken with BEGIN IMMEDIATE (the write lock up front, so two writers
    never deadlock on an upgrade); commits on success, rolls back on any exception."""
    # The threads of one process (the poller's workers) queue here for the write lock, woken in
    # turn, instead of each polling SQLite for it: 32 threads polling starved each other and
    # the loop that hands out jobs (draining 1,200 jobs took 15 s instead of 5). They queue
    # before touching `conn`: a worker's connection is taken from the pool on first use, and
    # queued workers should not each hold one.
    if not _PROCESS_WRITE_LOCK.acquire(timeout=BUSY_TIMEOUT_MS / 1000):
        raise sqlite3.OperationalError("database is locked (another thread of this process "
                                       "held the write lock for too long)")
    try:
        if conn.in_transaction:  # nested use joins the outer transaction
            yield conn
            return
        _begin_immediate(conn)
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
    finally:
        _PROCESS_WRITE_LOCK.release()


# Reentrant: a thread inside a transaction may open one on another connection (it waits for
# SQLite's lock there, as it always did).
_PROCESS_WRITE_LOCK = threading.RLock()


def _begin_immediate(conn: sqlite3.Connection) -> None:
    # SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries. Two web workers each
    # holding the write lock for a fraction of a millisecond would leave the CPU idle in those
    # sleeps, so the wait for the write lock polls faster (50 µs doubling to 2 ms), within the
    # same overall timeout.
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        _execute_when_unlocked(conn, "BEGIN IMMEDIATE", pause=0.00005, max_pause=0.002)
    finally:
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except BaseException:
            if conn.in_transaction:  # never leave a transaction that nobody will commit
                conn.execute("ROLLBACK")
            raise


def schema_version(conn: sqlite3.Connection) -> int:
    """The number of migrations applied."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply pending migrations; safe when web and poller call it at the same moment (each step
    runs under the write lock and re-reads the version inside it). Returns the final version.
    Raises DatabaseError, changing nothing, for a database migrated by a newer ponte: this code
    does not know its tables (going back to an older version is not supported)."""
    while True:
        with transaction(conn):
            version = schema_version(conn)
            if version > len(MIGRATIONS):
                raise DatabaseError(  # read by whoever deploys: in Portuguese
                    f"banco de dados na versão {version} do esquema, de uma ponte mais nova; "
                    f"esta conhece até a {len(MIGRATIONS)}. Rode a versão mais nova (ou use "
                    f"uma cópia do banco feita antes de atualizar).")
            if version == len(MIGRATIONS):
                return version
            step = MIGRATIONS[version]
            if callable(step):  # a step SQL alone cannot express
                step(conn)
            else:
                for statement in _split_sql(step):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")


def _split_sql(script: str) -> list[str]:
    # executescript() would COMMIT our transaction; run statement by statement instead.
    return [s.strip() for s in script.split(";") if s.strip()]


def dumps(value: Any) -> str:
    """Compact, stable JSON for the database."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


# --- inbound events -----------------------------------------------------------------------------

# Callables `observe(source, event_type, new)` told of every `record_event` (never raising).
EVENT_OBSERVERS: list = []


def record_event(conn: sqlite3.Connection, source: str, dedupe_key: str, event_type: str,
                 status: str, summary: dict | None = None, request_id: str | None = None,
                 now: float | None = None) -> bool:
    """Record one inbound event; False when the same `dedupe_key` was recorded before."""
    cur = conn.execute(
        "INSERT INTO events (source, dedupe_key, event_type, status, received_at, request_id,"
        " summary) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(dedupe_key) DO NOTHING",
        (source, dedupe_key, event_type, status, now or time.time(), request_id,
         dumps(summary or {})))
    for observe in EVENT_OBSERVERS:  # ponte_metrics counts webhooks by peer, event and outcome
        observe(source, event_type, cur.rowcount == 1)
    return cur.rowcount == 1


def event_recorded(conn: sqlite3.Connection, dedupe_key: str) -> bool:
    """Whether an inbound event with `dedupe_key` is recorded (and not pruned yet)."""
    return conn.execute("SELECT 1 FROM events WHERE dedupe_key = ?",
                        (dedupe_key,)).fetchone() is not None


def count_events(conn: sqlite3.Connection, source: str | None = None,
                 status: str | None = None) -> int:
    """How many inbound events were recorded (optionally of one source and status)."""
    sql, args = "SELECT COUNT(*) FROM events WHERE 1=1", []
    if source:
        sql, args = sql + " AND source = ?", args + [source]
    if status:
        sql, args = sql + " AND status = ?", args + [status]
    return conn.execute(sql, args).fetchone()[0]


# Rows deleted per write transaction by a clean-up: the write lock it holds is the one webhook
# acks wait for, and the first clean-up after a long outage may have days of rows to delete.
PRUNE_BATCH_ROWS = 2000


def delete_in_batches(conn: sqlite3.Connection, table: str, where: str,
                      params: tuple = ()) -> int:
    """Delete the rows of `table` that match `where`, PRUNE_BATCH_ROWS per write transaction.
    Returns how many rows went. Must not be called inside a transaction, which would hold the
    write lock through every batch."""
    if conn.in_transaction:
        raise RuntimeError("delete_in_batches inside a transaction")
    removed = 0
    while True:
        with transaction(conn):
            count = conn.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"
                                 f" WHERE {where} LIMIT ?)", (*params, PRUNE_BATCH_ROWS)).rowcount
        removed += count
        if count < PRUNE_BATCH_ROWS:
            return removed


def prune_events(conn: sqlite3.Connection, older_than: float) -> int:
    """Delete inbound events received before `older_than`, a batch per transaction."""
    return delete_in_batches(conn, "events", "received_at < ?", (older_than,))


def prune_mappings(conn: sqlite3.Connection, namespaces: tuple[str, ...],
                   older_than: float) -> None:
    """Delete the mappings of `namespaces` last written before `older_than`: for mappings that
    only matter for a while (answers to match, OAuth states, throttles), not for those that
    live as long as what they point to (conversation ids, watermarks)."""
    delete_in_batches(conn, "mappings", f"updated_at < ? AND namespace IN"
                      f" ({','.join('?' * len(namespaces))})", (older_than, *namespaces))


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection commits: a cheap way to notice new jobs."""
    return conn.execute("PRAGMA data_version").fetchone()[0]


# --- heartbeats and locks -----------------------------------------------------------------------

def beat(conn: sqlite3.Connection, process: str, now: float | None = None,
         info: dict | None = None) -> None:
    """Record that `process` is alive."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO heartbeats (process, pid, beat_at, info) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(process) DO UPDATE SET pid = excluded.pid, beat_at = excluded.beat_at,"
            " info = excluded.info", (process, os.getpid(), now or time.time(), dumps(info or {})))


def last_beat(conn: sqlite3.Connection, process: str) -> dict | None:
    """The last heartbeat of `process` (`pid`, `beat_at`, `info`), if any."""
    row = conn.execute("SELECT * FROM heartbeats WHERE process = ?", (process,)).fetchone()
    if not row:
        return None
    d = dict(row)
    d["info"] = json.loads(d["info"])
    return d


def process_alive(pid: int) -> bool:
    """Whether a process with `pid` runs on this machine (one we may not signal counts as
    running): for rows and files named after the process that wrote them."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(conn: sqlite3.Connection, name: str, owner: str, ttl_seconds: float,
                 now: float | None = None) -> bool:
    """Take the named cross-process lock if it is free or expired. Held for at most
    `ttl_seconds`, so a crashed holder cannot block the others forever."""
    now = now or time.time()
    # A read first: while someone holds it, waiters polling the lock take no write lock (the
    # one webhook acks wait for).
    held = conn.execute("SELECT owner FROM locks WHERE name = ? AND locked_until > ?",
                        (name, now)).fetchone()
    if held is not None and held["owner"] != owner:
        return False
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO locks (name, owner, locked_until) VALUES (?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET owner = excluded.owner,"
            " locked_until = excluded.locked_until WHERE locks.locked_until <= ?"
            " OR locks.owner = excluded.owner", (name, owner, now + ttl_seconds, now))
    return cur.rowcount == 1


def release_lock(conn: sqlite3.Connection, name: str, owner: str) -> None:
    """Free the lock if `owner` still holds it."""
    with transaction(conn):
        conn.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))


# --- mappings (external id ↔ our ids, watermarks) -----------------------------------------------

def mapping_get(conn: sqlite3.Connection, namespace: str, key: str) -> Any:
    """The JSON value stored under (namespace, key), or None."""
    row = conn.execute("SELECT value FROM mappings WHERE namespace = ? AND key = ?",
                       (namespace, str(key))).fetchone()
    return json.loads(row[0]) if row else None


def mapping_delete(conn: sqlite3.Connection, namespace: str, key: str) -> None:
    """Forget the value stored under (namespace, key), if any."""
    conn.execute("DELETE FROM mappings WHERE namespace = ? AND key = ?", (namespace, str(key)))


def mapping_put(conn: sqlite3.Connection, namespace: str, key: str, value: Any,
                now: float | None = None) -> None:
    """Store (replace) a JSON value under (namespace, key)."""
    conn.execute(
        "INSERT INTO mappings (namespace, key, value, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(namespace, key) DO UPDATE SET value = excluded.value,"
        " updated_at = excluded.updated_at", (namespace, str(key), dumps(value), now or time.time()))
