"""Alerts: the conditions an operator must hear about, their state, and their delivery to
`ALERT_WEBHOOK_URL` (a JSON POST: `alert`, `status` firing|resolved, `message` in pt-BR, `since`,
`details`).

Conditions (`evaluate`): n8n failing, Kommo refusing (401/402/403/429), an account whose token
was refused (one alert per provider), dead jobs, jobs overdue, Mercado Livre polls failing — all
checked by the poller every ALERT_CHECK_SECONDS (`check`, a scheduled task) — and the poller
stale, which the poller cannot see about itself: the web process checks it with `check_poller`
on every /health (Docker's HEALTHCHECK calls it every 30 s) and every 30 s in each Gunicorn
worker (`start_poller_watch`).

State: one row per alert in the `alerts` table. A condition that starts writes `firing` (since
now) and queues one notice; while it lasts nothing more is sent; when it clears the row turns
`resolved` and one more notice goes. Notices are `alert.deliver` jobs in the outbox (their own
lane `alert`, one ordering key per alert so `resolved` never overtakes `firing`, retries with
backoff): a receiver that is down only holds its own lane. The poller-stale notices are sent by
the web process itself, in a background thread (the outbox is run by the poller that stopped).

Owns: the `alerts` table's SQL, the conditions and their pt-BR messages, the notice payload,
`HANDLERS` (`alert.deliver`).
Must not: call a receiver inside a web request's thread, or fire twice for one condition.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import admin_data
import db_manager
import outbox
import task_runs
from peer_http import PeerClient, PeerError

log = logging.getLogger("ponte.alerts")

DELIVER_KIND = "alert.deliver"
LANE = "alert"
DELIVER_MAX_ATTEMPTS = 8
RECEIVER_TIMEOUT_SECONDS = 10.0
# A peer's failures count when they are this recent (n8n, Kommo).
PEER_WINDOW_SECONDS = 900
# A poll whose latest failure is older than this is a task no longer scheduled (bridge off).
TASK_STALE_SECONDS = 3600
# The web process tries a poller-stale notice again after this long when the receiver failed.
WEB_RETRY_SECONDS = 60
# How often each web worker looks at the poller's heartbeat on its own (start_poller_watch).
POLLER_WATCH_SECONDS = 30


class AlertName:
    """Names of the alerts (`token_refused:<provider>` carries its provider)."""

    N8N_FAILING = "n8n_failing"
    KOMMO_REFUSING = "kommo_refusing"
    TOKEN_REFUSED = "token_refused"
    DEAD_JOBS = "dead_jobs"
    JOBS_OVERDUE = "jobs_overdue"
    POLLS_FAILING = "polls_failing"
    POLLER_STALE = "poller_stale"


class AlertStatus:
    """Values of `alerts.status` and of a notice's `status`."""

    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Condition:
    """A condition that holds now: its alert name, a pt-BR message and details (JSON-able)."""

    name: str
    message: str
    details: dict = field(default_factory=dict)


_KOMMO_REFUSAL = re.compile(r"^kommo (401|402|403|429):")
_KOMMO_REFUSAL_TEXT = {"401": "token recusado (401)", "402": "conta sem pagamento (402)",
                       "403": "acesso negado (403)", "429": "limite de requisições (429)"}


# --- conditions -------------------------------------------------------------------------------

def evaluate(conn: sqlite3.Connection, settings, now: float) -> dict[str, Condition]:
    """Every condition the poller checks that holds now, by alert name (never POLLER_STALE)."""
    lanes = {entry["lane"]: entry for entry in
             admin_data.peer_health(conn, settings, now, PEER_WINDOW_SECONDS)}
    found: list[Condition | None] = [_n8n_failing(lanes.get("n8n")),
                                     _kommo_refusing(conn, now, lanes.get("kommo")),
                                     _dead_jobs(conn), _jobs_overdue(conn, settings, now),
                                     _polls_failing(conn, now)]
    found += _tokens_refused(conn, settings, now)
    return {c.name: c for c in found if c is not None}


def _n8n_failing(lane: dict | None) -> Condition | None:
    """n8n's latest outcome in the window is a failure (no success after it); `lane` is its
    entry of admin_data.peer_health."""
    if not lane or not lane["failed"] or (lane["last_ok_at"] or 0) > lane["last_error_at"]:
        return None
    return Condition(AlertName.N8N_FAILING,
                     f"n8n (agente de IA) falhando: {lane['failed']} job(s) sem resposta nos "
                     f"últimos {PEER_WINDOW_SECONDS // 60} min. Último erro: "
                     f"{(lane['last_error'] or '')[:200]}",
                     {"failed_jobs": lane["failed"], "last_error": (lane["last_error"] or "")[:300],
                      "last_error_at": lane["last_error_at"], "last_ok_at": lane["last_ok_at"]})


def _kommo_refusing(conn, now: float, lane: dict | None) -> Condition | None:
    """Kommo's latest answers refuse us: 401, 402, 403 or 429, with no success after them
    (`lane`: Kommo's entry of admin_data.peer_health)."""
    refusals = [(row[1], row[2]) for row in conn.execute(
        "SELECT kind, last_error, updated_at FROM jobs WHERE status IN ('pending', 'dead')"
        " AND last_error LIKE 'kommo 4%' AND updated_at >= ? ORDER BY updated_at",
        (now - PEER_WINDOW_SECONDS,))
        if _KOMMO_REFUSAL.match(row[1] or "") and admin_data.lane_of_kind(row[0]) == "kommo"]
    if not refusals:
        return None
    last_error, last_at = refusals[-1]
    if lane and (lane["last_ok_at"] or 0) > last_at:
        return None
    statuses = sorted({_KOMMO_REFUSAL.match(e).group(1) for e, _ in refusals})
    what = ", ".join(_KOMMO_REFUSAL_TEXT[s] for s in statuses)
    return Condition(AlertName.KOMMO_REFUSING,
                     f"Kommo recusando pedidos da ponte: {what}. Confira a integração e o "
                     "plano da conta no Kommo.",
                     {"statuses": [int(s) for s in statuses], "jobs": len(refusals),
                      "last_error": last_error[:300], "last_error_at": last_at})


def _tokens_refused(conn, settings, now: float) -> list[Condition]:
    """One condition per account of an enabled bridge that was disconnected (its token or
    refresh token refused)."""
    out = []
    for account in admin_data.accounts(conn, settings, now):
        if account["bridge_enabled"] and account["status"] == "disconnected":
            out.append(Condition(
                f"{AlertName.TOKEN_REFUSED}:{account['provider']}",
                f"Conta {account['label']} desconectada: {account['detail'] or 'token recusado'}."
                " Reconecte em /admin/conexoes.",
                {"provider": account["provider"], "detail": account["detail"]}))
    return out


def _dead_jobs(conn) -> Condition | None:
    """Jobs that gave up (not the alert notices themselves: a dead receiver must not alert
    about itself forever)."""
    by_kind = outbox.dead_jobs_by_kind(conn, except_kind=DELIVER_KIND)
    if not by_kind:
        return None
    total = sum(by_kind.values())
    return Condition(AlertName.DEAD_JOBS,
                     f"{total} job(s) desistiram depois de todas as tentativas. Veja, repita ou "
                     "descarte em /admin/fila?status=dead.",
                     {"dead": total, "by_kind": by_kind})


def _jobs_overdue(conn, settings, now: float) -> Condition | None:
    """The oldest due job waits longer than ALERT_JOBS_OVERDUE_SECONDS to run."""
    stats = outbox.queue_stats(conn, now)
    if stats["oldest_due_seconds"] <= settings.alert_jobs_overdue_seconds:
        return None
    minutes = round(stats["oldest_due_seconds"] / 60)
    return Condition(AlertName.JOBS_OVERDUE,
                     f"Fila atrasada: {stats['due']} job(s) prontos esperando, o mais antigo há "
                     f"{minutes} min.",
                     {"due": stats["due"], "oldest_due_seconds": stats["oldest_due_seconds"]})


def _polls_failing(conn, now: float) -> Condition | None:
    """A periodic task (Mercado Livre polls, token refresh) failed FAILING_AFTER times in a
    row, recently."""
    failing = task_runs.failing(conn, since=now - TASK_STALE_SECONDS)
    if not failing:
        return None
    return Condition(AlertName.POLLS_FAILING,
                     "Tarefas periódicas falhando: " + "; ".join(
                         f"{t['label']} ({t['failures']}× seguidas: {t['last_error'][:120]})"
                         for t in failing),
                     {"tasks": [{"task": t["task"], "failures": t["failures"],
                                 "last_error": t["last_error"]} for t in failing]})


def poller_condition(conn, settings, now: float) -> Condition | None:
    """The poller's heartbeat is missing or older than POLLER_HEARTBEAT_MAX_AGE_SECONDS."""
    beat = db_manager.last_beat(conn, "poller")
    age = None if beat is None else round(now - beat["beat_at"], 1)
    if age is not None and age <= settings.poller_heartbeat_max_age_seconds:
        return None
    message = ("Poller parado: nenhum sinal de vida" if age is None else
               f"Poller parado: último sinal há {round(age)} s") + \
        " — nada é enviado aos parceiros. Veja os logs do programa poller."
    return Condition(AlertName.POLLER_STALE, message, {"heartbeat_age_seconds": age})


# --- state -------------------------------------------------------------------------------------

def active(conn: sqlite3.Connection) -> list[dict]:
    """The alerts firing now, oldest first: name, message, since_at, details, delivered_at."""
    return [_row(r) for r in conn.execute(
        "SELECT * FROM alerts WHERE status = 'firing' ORDER BY since_at, name")]


def _row(r) -> dict:
    d = dict(r)
    d["details"] = json.loads(d["details"] or "{}")
    return d


def sync(conn: sqlite3.Connection, settings, now: float, found: dict[str, Condition],
         owns: Callable[[str], bool], enqueue: bool = True) -> list[dict]:
    """Bring the `alerts` rows that `owns(name)` in line with `found` (the conditions that hold
    now): a new condition fires, a firing one that no longer holds resolves. Each change queues
    one `alert.deliver` job when ALERT_WEBHOOK_URL is set and `enqueue`. Returns the notices of
    the changes. Writes nothing when nothing changed."""
    firing = {a["name"]: a for a in active(conn)}
    if not any(name not in firing for name in found) and \
            not any(owns(name) and name not in found for name in firing):
        return []
    notices = []
    with db_manager.transaction(conn):  # re-read under the write lock: web and poller both sync
        firing = {a["name"]: a for a in active(conn)}
        for name, condition in found.items():
            if name in firing:
                continue
            conn.execute(
                "INSERT INTO alerts (name, status, since_at, message, details, last_sent_at,"
                " delivered_at, updated_at) VALUES (?, 'firing', ?, ?, ?, NULL, NULL, ?)"
                " ON CONFLICT(name) DO UPDATE SET status = 'firing', since_at = excluded.since_at,"
                " message = excluded.message, details = excluded.details, last_sent_at = NULL,"
                " delivered_at = NULL, updated_at = excluded.updated_at",
                (name, now, condition.message, db_manager.dumps(condition.details), now))
            notices.append(notice(name, AlertStatus.FIRING, condition.message, now,
                                  condition.details))
        for name, alert in firing.items():
            if not owns(name) or name in found:
                continue
            conn.execute("UPDATE alerts SET status = 'resolved', since_at = ?, last_sent_at = NULL,"
                         " delivered_at = NULL, updated_at = ? WHERE name = ?", (now, now, name))
            notices.append(notice(name, AlertStatus.RESOLVED,
                                  _resolved_message(alert["message"]), now,
                                  alert["details"] | {"fired_at": alert["since_at"]}))
        if enqueue and settings.alert_webhook_url:
            for n in notices:
                outbox.enqueue_job(conn, DELIVER_KIND,
                                   f"alert:{n['alert']}:{n['status']}:{n['since_at']}", n,
                                   ordering_key=f"alert:{n['alert']}",
                                   max_attempts=DELIVER_MAX_ATTEMPTS, now=now)
                conn.execute("UPDATE alerts SET last_sent_at = ? WHERE name = ?",
                             (now, n["alert"]))
    for n in notices:
        level = logging.WARNING if n["status"] == AlertStatus.FIRING else logging.INFO
        log.log(level, f"alert_{n['status']}", extra={"alert": n["alert"],
                                                      "detail": n["message"][:300]})
    return notices


def _resolved_message(message: str) -> str:
    return f"Resolvido: {message}"


def notice(name: str, status: str, message: str, since_at: float, details: dict) -> dict:
    """The JSON a receiver gets. `since` is ISO 8601 UTC (when the alert fired, or resolved);
    `since_at` the same in epoch seconds."""
    since = datetime.datetime.fromtimestamp(since_at, datetime.timezone.utc)
    return {"alert": name, "status": status, "message": message,
            "since": since.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "since_at": since_at, "details": details, "service": "ponte"}


def _poller_owns(name: str) -> bool:
    return name != AlertName.POLLER_STALE


def check(ctx) -> list[dict]:
    """Poller task (every ALERT_CHECK_SECONDS): every condition but the poller's own."""
    now = ctx.now()
    return sync(ctx.conn, ctx.settings, now, evaluate(ctx.conn, ctx.settings, now), _poller_owns)


def check_poller(conn: sqlite3.Connection, settings, now: float,
                 deliver: Callable[[dict], None] | None = None) -> Condition | None:
    """Web side (each /health): fire or resolve POLLER_STALE, and hand its notice not yet
    delivered to `deliver` (default: a background thread POSTs it) — at most one web worker
    takes it, and again after WEB_RETRY_SECONDS if the receiver failed. Returns the condition
    when the poller is stale."""
    condition = poller_condition(conn, settings, now)
    found = {condition.name: condition} if condition else {}
    sync(conn, settings, now, found, lambda name: name == AlertName.POLLER_STALE, enqueue=False)
    if settings.alert_webhook_url:
        _claim_and_deliver(conn, settings, now, deliver)
    return condition


def start_poller_watch(settings, every_seconds: float = POLLER_WATCH_SECONDS,
                       stop: threading.Event | None = None,
                       clock: Callable[[], float] = time.time) -> threading.Thread:
    """Web side, when nobody asks /health (`./ponte run` without a monitor): `check_poller`
    every `every_seconds` in a thread of each Gunicorn worker (gunicorn_conf.post_worker_init).
    Workers that see the same change fire one alert and send one notice (`sync` re-reads under
    the write lock; one worker claims the notice)."""
    return db_manager.start_periodic(settings.database_path, every_seconds,
                                     lambda conn: check_poller(conn, settings, clock()),
                                     "poller-watch", "poller_watch_failed", stop)


def _claim_and_deliver(conn, settings, now: float, deliver) -> None:
    row = conn.execute("SELECT * FROM alerts WHERE name = ? AND delivered_at IS NULL AND"
                       " (last_sent_at IS NULL OR last_sent_at < ?)",
                       (AlertName.POLLER_STALE, now - WEB_RETRY_SECONDS)).fetchone()
    if row is None:
        return
    with db_manager.transaction(conn):
        claimed = conn.execute(
            "UPDATE alerts SET last_sent_at = ? WHERE name = ? AND status = ? AND since_at = ?"
            " AND delivered_at IS NULL AND (last_sent_at IS NULL OR last_sent_at < ?)",
            (now, row["name"], row["status"], row["since_at"], now - WEB_RETRY_SECONDS)).rowcount
    if not claimed:
        return  # another web worker took it
    alert = _row(row)
    message = alert["message"] if alert["status"] == AlertStatus.FIRING else \
        _resolved_message(alert["message"])
    payload = notice(alert["name"], alert["status"], message, alert["since_at"], alert["details"])
    if deliver is not None:
        deliver(payload)
        return
    threading.Thread(target=_deliver_from_web, args=(settings, payload), daemon=True,
                     name="alert-delivery").start()


def _deliver_from_web(settings, payload: dict) -> None:
    try:
        send(settings.alert_webhook_url, payload)
    except PeerError as exc:
        log.warning("alert_delivery_failed", extra={"alert": payload["alert"],
                                                    "status": exc.status, "error": str(exc)[:200]})
        return
    conn = db_manager.connect(settings.database_path)
    try:
        mark_delivered(conn, payload, time.time())
    finally:
        conn.close()


def mark_delivered(conn, payload: dict, now: float) -> None:
    """The receiver took `payload`: recorded on its alert unless the alert changed since."""
    with db_manager.transaction(conn):
        conn.execute("UPDATE alerts SET delivered_at = ? WHERE name = ? AND status = ?"
                     " AND since_at = ?", (now, payload["alert"], payload["status"],
                                           payload["since_at"]))


# --- delivery ---------------------------------------------------------------------------------

class AlertReceiverError(PeerError):
    """The alert receiver failed or refused a notice."""

    peer = LANE


class AlertReceiver(PeerClient):
    """The receiver at ALERT_WEBHOOK_URL (a plain JSON POST, no auth of ours: a secret, if any,
    travels in the URL)."""

    peer = LANE
    error_class = AlertReceiverError


def send(url: str, payload: dict, timeout_seconds: float = RECEIVER_TIMEOUT_SECONDS) -> None:
    """POST one notice; raises AlertReceiverError."""
    AlertReceiver(url, timeout_seconds=timeout_seconds)._request(
        "POST", url, json=payload, expect_json=False, auth=False)


def handle_deliver(ctx, job):
    """`alert.deliver`: POST the notice to ALERT_WEBHOOK_URL (retried with backoff by the
    outbox; a 4xx other than 408/429 is not retried)."""
    url = ctx.settings.alert_webhook_url
    if not url:
        return {"status": "skipped", "reason": "ALERT_WEBHOOK_URL vazio"}
    send(url, job.payload)
    mark_delivered(ctx.conn, job.payload, ctx.now())
    log.info("alert_delivered", extra={"alert": job.payload.get("alert"),
                                       "status": job.payload.get("status")})
    return {"status": "delivered"}


handle_deliver.lane = LANE

HANDLERS = {DELIVER_KIND: handle_deliver}
