"""The outcome of the poller's periodic tasks (Mercado Livre polls, token refreshes): the
`task_runs` table, one row per task with its last success, last failure and how many times in a
row it failed.

Owns: the `task_runs` table's SQL (`record`, `failing`, `all_runs`) and `FAILING_AFTER`.
Must not: run or schedule a task (the poller and the bridges' SCHEDULES do), or decide what a
failure means for /health or alerts (webhook_server and alerts read `failing`).
"""
from __future__ import annotations

import sqlite3

import db_manager

# A task that failed this many times in a row "keeps failing" (/health degraded, an alert):
# one failure is a blip the next poll usually fixes.
FAILING_AFTER = 3

# What /health and the console call each task (the function's name in the bridges' SCHEDULES).
TASK_LABELS = {"poll_questions": "busca de perguntas do Mercado Livre",
               "poll_messages": "busca de mensagens pós-venda do Mercado Livre",
               "refresh_if_due": "renovação do token"}


def record(conn: sqlite3.Connection, task: str, ok: bool, now: float, error: str = "") -> None:
    """Record one run of `task`: a success resets the failure count, a failure adds one and
    keeps the error (first 300 characters). One statement, so a task run by two processes at
    once still counts both."""
    if ok:
        sql = ("INSERT INTO task_runs (task, last_ok_at, failures, updated_at) VALUES (?, ?, 0, ?)"
               " ON CONFLICT(task) DO UPDATE SET last_ok_at = excluded.last_ok_at, failures = 0,"
               " updated_at = excluded.updated_at")
        args: tuple = (task, now, now)
    else:
        sql = ("INSERT INTO task_runs (task, last_failed_at, last_error, failures, updated_at)"
               " VALUES (?, ?, ?, 1, ?) ON CONFLICT(task) DO UPDATE SET"
               " last_failed_at = excluded.last_failed_at, last_error = excluded.last_error,"
               " failures = task_runs.failures + 1, updated_at = excluded.updated_at")
        args = (task, now, error[:300], now)
    with db_manager.transaction(conn):
        conn.execute(sql, args)


def all_runs(conn: sqlite3.Connection) -> list[dict]:
    """Every task's row: task, label, last_ok_at, last_failed_at, last_error, failures."""
    return [dict(r) | {"label": TASK_LABELS.get(r["task"], r["task"])} for r in conn.execute(
        "SELECT task, last_ok_at, last_failed_at, last_error, failures FROM task_runs"
        " ORDER BY task")]


def failing(conn: sqlite3.Connection, at_least: int = FAILING_AFTER,
            since: float | None = None) -> list[dict]:
    """The tasks whose last `at_least` runs (or more) all failed (the last of them at `since`
    or later, when given)."""
    return [run for run in all_runs(conn) if run["failures"] >= at_least
            and (since is None or (run["last_failed_at"] or 0) >= since)]
