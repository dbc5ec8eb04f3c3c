"""What the operators' console shows, read from the database: bridges, accounts, peer health,
traffic per hour, last errors, contacts and their bot state, Mercado Livre ⇄ Chatwoot
conversations, webhook URLs and missing settings. Plain dicts and lists, so the console, alerts
and /metrics can reuse them.

Owns: read-only queries over the tables of outbox (`jobs`, `events`), credentials (`tokens`),
whatsapp_store and meli_store, and their pt-BR labels.
Must not: write anything, call a peer, render HTML, or return a secret (no token, no webhook
secret; a URL that carries one shows a placeholder instead).
"""
from __future__ import annotations

import functools
import sqlite3

import config
import credentials
import outbox

# What the console calls each lane (`job_runner.lane_of`): the peer its jobs talk to.
LANE_LABELS = {"kommo": "Kommo", "n8n": "n8n (agente de IA)", "ml": "Mercado Livre",
               "chatwoot": "Chatwoot", "database": "Banco local",
               "alert": "Receptor de alertas (ALERT_WEBHOOK_URL)"}
# The lanes each bridge's jobs use, shown even when they had no traffic.
BRIDGE_LANES = {"whatsapp": ("kommo", "n8n"), "mercadolivre": ("ml", "chatwoot")}
BRIDGE_LABELS = {"whatsapp": "A · WhatsApp (Kommo) ⇄ agente de IA (n8n)",
                 "mercadolivre": "B · Mercado Livre ⇄ Chatwoot"}
EVENT_SOURCE_LABELS = {"kommo": "Kommo", "chatwoot": "Chatwoot", "mercadolivre": "Mercado Livre"}

PEER_HEALTH_WINDOW_SECONDS = 3600
TRAFFIC_HOURS = 24


class PeerStatus:
    """Values of a peer's `status` in `peer_health`."""

    OK = "ok"
    FAILING = "failing"      # only failures in the window
    UNSTABLE = "unstable"    # successes and failures
    IDLE = "idle"            # no call in the window


PEER_STATUS_LABELS = {PeerStatus.OK: "ok", PeerStatus.FAILING: "falhando",
                      PeerStatus.UNSTABLE: "instável", PeerStatus.IDLE: "sem chamadas"}

# A done job an operator discarded (outbox.discard_dead_job) is no success of its peer.
_NOT_DISCARDED = "(result IS NULL OR json_extract(result, '$.discarded') IS NULL)"


@functools.lru_cache(maxsize=1)
def kind_lanes() -> dict[str, str]:
    """Job kind → lane (the peer it talks to), from every bridge's handlers."""
    import bridges
    import job_runner
    handlers, _ = bridges.handlers()
    return {kind: job_runner.lane_of(kind, handler) for kind, handler in handlers.items()}


def lane_of_kind(kind: str) -> str:
    """The lane of a job kind, also for a kind no handler knows (its prefix)."""
    return kind_lanes().get(kind) or kind.split(".", 1)[0]


# --- bridges, accounts, settings ------------------------------------------------------------

def bridges(settings) -> list[dict]:
    """Each bridge: name, pt-BR label, whether it is on."""
    return [{"name": name, "label": BRIDGE_LABELS.get(name, name),
             "enabled": settings.bridge_enabled(name)} for name in config.BRIDGE_REQUIRED]


_ACCOUNT_STATUS_LABELS = {"ok": "conectada", "disconnected": "desconectada",
                          "never_connected": "nunca conectada", "not_configured": "não configurada"}


def accounts(conn: sqlite3.Connection, settings, now: float) -> list[dict]:
    """Kommo's and Mercado Livre's account: connected or not, why, whether a token is stored,
    and when the access token expires (`expires_at`, `expires_in_seconds`; None when unknown
    or long-lived)."""
    out = []
    for provider, label, bridge in (("kommo", "Kommo", "whatsapp"),
                                    ("mercadolivre", "Mercado Livre", "mercadolivre")):
        token = credentials.get(conn, provider)
        mode = "oauth"
        if provider == "kommo":
            configured = config.kommo_credential_given(settings)
            if settings.kommo_access_token:
                mode = "long_lived_token"
        else:
            configured = bool(settings.ml_client_id)
        if token is not None:
            status, detail = token.status, token.detail
            if provider == "kommo" and settings.kommo_access_token and token.ok is False and \
                    token.access_token != settings.kommo_access_token:
                status, detail = "ok", ""  # a new KOMMO_ACCESS_TOKEN replaces a refused one
        elif provider == "kommo" and settings.kommo_access_token:
            status, detail = "ok", ""
        elif configured:
            status, detail = "never_connected", ""
        else:
            status, detail = "not_configured", ""
        expires_at = token.expires_at if token is not None and status == "ok" else None
        out.append({"provider": provider, "label": label, "bridge": bridge,
                    "bridge_enabled": settings.bridge_enabled(bridge), "configured": configured,
                    "mode": mode, "connected": status == "ok", "status": status,
                    "stored": token is not None,
                    "status_label": _ACCOUNT_STATUS_LABELS.get(status, status), "detail": detail,
                    "expires_at": expires_at,
                    "expires_in_seconds": round(expires_at - now) if expires_at else None})
    return out


def setting_checks(settings) -> list[dict]:
    """Per bridge, each setting it needs and whether it is given (never its value), plus the
    settings every deployment wants: groups of `bridge`, `label`, `enabled`, `settings` (each
    `key`, `ok`, `note`) and `missing` (the keys not given)."""
    def given(key: str) -> bool:
        return getattr(settings, key.lower(), "") not in ("", None)

    groups = []
    for bridge, keys in config.BRIDGE_REQUIRED.items():
        items = [{"key": k, "ok": given(k), "note": ""} for k in keys]
        if bridge == "whatsapp":
            items.append({"key": "KOMMO_ACCESS_TOKEN ou KOMMO_CLIENT_ID + KOMMO_CLIENT_SECRET",
                          "ok": config.kommo_credential_given(settings),
                          "note": "credencial do Kommo"})
        else:
            items.append({"key": "CHATWOOT_WEBHOOK_SECRET ou CHATWOOT_WEBHOOK_TOKEN",
                          "ok": given("CHATWOOT_WEBHOOK_SECRET") or given("CHATWOOT_WEBHOOK_TOKEN"),
                          "note": "autenticação do webhook do Chatwoot"})
        groups.append({"bridge": bridge, "label": BRIDGE_LABELS.get(bridge, bridge),
                       "enabled": settings.bridge_enabled(bridge), "settings": items,
                       "missing": [i["key"] for i in items if not i["ok"]]})
    general = [{"key": "PUBLIC_BASE_URL", "ok": given("PUBLIC_BASE_URL"),
                "note": "endereço público: URLs de webhook e volta do OAuth"},
               {"key": "ADMIN_TOKEN", "ok": given("ADMIN_TOKEN"), "note": "entrada no painel"}]
    groups.insert(0, {"bridge": "", "label": "Geral", "enabled": True, "settings": general,
                      "missing": [i["key"] for i in general if not i["ok"]]})
    return groups


def webhook_urls(settings) -> list[dict]:
    """The URLs to paste into each peer (and the OAuth return addresses). Secrets in a path are
    shown as a placeholder naming the setting."""
    base = settings.public_base_url or "https://SEU-DOMINIO"
    urls = [{"label": "Webhook do Kommo (conta → Configurações → Integrações → Webhooks)",
             "url": f"{base}/webhooks/kommo/<KOMMO_WEBHOOK_SECRET>",
             "note": "troque <KOMMO_WEBHOOK_SECRET> pelo valor da variável, ou rode "
                     "./ponte kommo register-webhook", "bridge": "whatsapp"},
            {"label": "Resposta assíncrona do n8n (POST com Bearer N8N_API_KEY)",
             "url": f"{base}/send-response", "note": "", "bridge": "whatsapp"},
            {"label": "Volta do OAuth do Kommo (Redirect URI da integração)",
             "url": settings.kommo_redirect_uri or f"{base}/oauth/callback", "note": "",
             "bridge": "whatsapp"},
            {"label": "Notificações do Mercado Livre (Notifications callback URL)",
             "url": f"{base}/webhooks/mercadolivre",
             "note": "tópicos: questions, messages, orders_v2", "bridge": "mercadolivre"},
            {"label": "Volta do OAuth do Mercado Livre (Redirect URI do app)",
             "url": settings.ml_redirect_uri or f"{base}/oauth/mercadolivre/callback",
             "note": "", "bridge": "mercadolivre"}]
    if settings.chatwoot_webhook_secret or not settings.chatwoot_webhook_token:
        urls.append({"label": "Webhook das caixas API do Chatwoot", "bridge": "mercadolivre",
                     "url": f"{base}/webhooks/chatwoot",
                     "note": "o segredo do webhook vai em CHATWOOT_WEBHOOK_SECRET"})
    else:
        urls.append({"label": "Webhook das caixas API do Chatwoot", "bridge": "mercadolivre",
                     "url": f"{base}/webhooks/chatwoot/<CHATWOOT_WEBHOOK_TOKEN>",
                     "note": "troque <CHATWOOT_WEBHOOK_TOKEN> pelo valor da variável"})
    return urls


# --- queue, peers, traffic ------------------------------------------------------------------

def queue(conn: sqlite3.Connection, now: float) -> dict:
    """outbox.queue_stats: counts per status, due, staged, held back."""
    return outbox.queue_stats(conn, now)


def jobs_by_state_and_kind(conn: sqlite3.Connection) -> list[dict]:
    """How many jobs of each kind are in each state: rows of kind, lane, pending, running,
    done, dead."""
    table: dict[str, dict] = {}
    for row in conn.execute("SELECT kind, status, COUNT(*) FROM jobs GROUP BY kind, status"):
        entry = table.setdefault(row[0], {"kind": row[0], "lane": lane_of_kind(row[0]),
                                          "pending": 0, "running": 0, "done": 0, "dead": 0})
        entry[row[1]] = row[2]
    return sorted(table.values(), key=lambda e: (-e["dead"], e["kind"]))


def peer_health(conn: sqlite3.Connection, settings, now: float,
                window_seconds: float = PEER_HEALTH_WINDOW_SECONDS) -> list[dict]:
    """Each peer's health from its jobs of the last `window_seconds`: how many finished well
    (`ok`), how many failed (a job whose latest attempt failed: waiting for a retry, or dead),
    the latest error, and a status (ok / falhando / instável / sem chamadas). The peers of the
    enabled bridges are always listed; the local database lane is not a peer."""
    since = now - window_seconds
    lanes: dict[str, dict] = {}

    def lane(name: str) -> dict:
        return lanes.setdefault(name, {"lane": name, "label": LANE_LABELS.get(name, name),
                                       "ok": 0, "failed": 0, "last_error": "",
                                       "last_error_at": None, "last_ok_at": None})

    for name in sum((BRIDGE_LANES.get(b, ()) for b in settings.enabled_bridges), ()):
        lane(name)
    for kind, count, last in conn.execute(
            f"SELECT kind, COUNT(*), MAX(finished_at) FROM jobs WHERE status = 'done'"
            f" AND finished_at >= ? AND {_NOT_DISCARDED} GROUP BY kind", (since,)):
        entry = lane(lane_of_kind(kind))
        entry["ok"] += count
        entry["last_ok_at"] = max(entry["last_ok_at"] or 0, last)
    for kind, error, updated_at in conn.execute(
            "SELECT kind, last_error, updated_at FROM jobs WHERE status IN ('pending', 'dead')"
            " AND last_error IS NOT NULL AND updated_at >= ? ORDER BY updated_at", (since,)):
        entry = lane(lane_of_kind(kind))
        entry["failed"] += 1
        entry["last_error"], entry["last_error_at"] = error, updated_at
    lanes.pop("database", None)
    for entry in lanes.values():
        if entry["failed"] and not entry["ok"]:
            entry["status"] = PeerStatus.FAILING
        elif entry["failed"]:
            entry["status"] = PeerStatus.UNSTABLE
        elif entry["ok"]:
            entry["status"] = PeerStatus.OK
        else:
            entry["status"] = PeerStatus.IDLE
        entry["status_label"] = PEER_STATUS_LABELS[entry["status"]]
    return sorted(lanes.values(), key=lambda e: e["label"])


def traffic_by_hour(conn: sqlite3.Connection, now: float, hours: int = TRAFFIC_HOURS) -> list[dict]:
    """The last `hours` whole hours (the current one last): webhooks received (`inbound`,
    from `events`), jobs finished well (`done`) and jobs whose latest attempt failed that hour
    (`failed`). Each item: `start_at` (epoch seconds), `inbound`, `done`, `failed`."""
    first = (int(now) // 3600 - (hours - 1)) * 3600
    buckets = [{"start_at": float(first + i * 3600), "inbound": 0, "done": 0, "failed": 0}
               for i in range(hours)]

    def add(field: str, sql: str) -> None:
        for hour, count in conn.execute(sql, (first, first, now)):
            if 0 <= hour < hours:
                buckets[hour][field] += count

    add("inbound", "SELECT CAST((received_at - ?) / 3600 AS INTEGER) AS h, COUNT(*) FROM events"
                   " WHERE received_at >= ? AND received_at <= ? GROUP BY h")
    add("done", "SELECT CAST((finished_at - ?) / 3600 AS INTEGER) AS h, COUNT(*) FROM jobs"
                f" WHERE status = 'done' AND finished_at >= ? AND finished_at <= ?"
                f" AND {_NOT_DISCARDED} GROUP BY h")
    add("failed", "SELECT CAST((updated_at - ?) / 3600 AS INTEGER) AS h, COUNT(*) FROM jobs"
                  " WHERE status IN ('pending', 'dead') AND last_error IS NOT NULL"
                  " AND updated_at >= ? AND updated_at <= ? GROUP BY h")
    return buckets


def inbound_by_source(conn: sqlite3.Connection, since: float) -> list[dict]:
    """Webhooks received since `since`, per source: source, label, count, last_at."""
    return [{"source": r[0], "label": EVENT_SOURCE_LABELS.get(r[0], r[0]), "count": r[1],
             "last_at": r[2]} for r in conn.execute(
        "SELECT source, COUNT(*), MAX(received_at) FROM events WHERE received_at >= ?"
        " GROUP BY source ORDER BY source", (since,))]


def last_errors(conn: sqlite3.Connection, limit: int = 8) -> list[dict]:
    """The latest failed jobs (waiting for a retry or dead), newest first: id, kind, lane,
    status, attempts, last_error, updated_at."""
    return [dict(r) | {"lane": lane_of_kind(r["kind"])} for r in conn.execute(
        "SELECT id, kind, status, attempts, last_error, updated_at FROM jobs"
        " WHERE status IN ('pending', 'dead') AND last_error IS NOT NULL"
        " ORDER BY updated_at DESC LIMIT ?", (limit,))]


def jobs(conn: sqlite3.Connection, now: float, status: str | None = None,
         kind: str | None = None, limit: int = 100) -> list[dict]:
    """outbox.list_jobs with each job's lane."""
    found = outbox.list_jobs(conn, status=status, kind=kind, limit=limit, now=now)
    for job in found:
        job["lane"] = lane_of_kind(job["kind"])
        job["discarded"] = bool(isinstance(job.get("result"), dict)
                                and job["result"].get("discarded"))
    return found


def job_kinds(conn: sqlite3.Connection) -> list[str]:
    """Every job kind in the table, for a filter."""
    return [r[0] for r in conn.execute("SELECT DISTINCT kind FROM jobs ORDER BY kind")]


# --- bridge A: contacts ---------------------------------------------------------------------

def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def contacts(conn: sqlite3.Connection, search: str = "", limit: int = 200) -> list[dict]:
    """Every Kommo contact that wrote (or whose bot was set through the API), paused ones
    first, then the latest: ids, name, bot status, paused by / kind / reason / since /
    auto-resume (`until_at`), last message time. `search` matches name, contact or lead id."""
    search = search.strip()
    rows = conn.execute(
        """WITH ids AS (SELECT kommo_contact_id FROM kommo_conversations
                        UNION SELECT kommo_contact_id FROM bot_states)
           SELECT ids.kommo_contact_id AS contact_id, c.contact_name, c.kommo_lead_id,
                  c.kommo_talk_id, c.origin, COALESCE(b.status, 'active') AS status,
                  b.changed_by, b.paused_by_kind, b.reason, b.since_at, b.until_at,
                  m.last_message_at, COALESCE(c.updated_at, b.updated_at) AS updated_at
           FROM ids LEFT JOIN kommo_conversations AS c USING (kommo_contact_id)
                    LEFT JOIN bot_states AS b USING (kommo_contact_id)
                    -- one pass over the messages (no index by contact), not one per row
                    LEFT JOIN (SELECT kommo_contact_id, MAX(received_at) AS last_message_at
                               FROM kommo_messages GROUP BY kommo_contact_id) AS m
                         USING (kommo_contact_id)
           WHERE ? = '' OR c.contact_name LIKE ? ESCAPE '\\'
                 OR ids.kommo_contact_id LIKE ? ESCAPE '\\' OR c.kommo_lead_id LIKE ? ESCAPE '\\'
           ORDER BY status = 'paused' DESC, COALESCE(c.updated_at, b.updated_at) DESC
           LIMIT ?""", (search, _like(search), _like(search), _like(search), limit)).fetchall()
    return [dict(r) for r in rows]


def paused_count(conn: sqlite3.Connection) -> int:
    """How many contacts have their bot paused."""
    return conn.execute("SELECT COUNT(*) FROM bot_states WHERE status = 'paused'").fetchone()[0]


def kommo_lead_url(settings, lead_id: str) -> str:
    """The lead's page in Kommo, or '' without KOMMO_BASE_URL or a lead."""
    if not (settings.kommo_base_url and lead_id):
        return ""
    return f"{settings.kommo_base_url}/leads/detail/{lead_id}"


# --- bridge B: Mercado Livre ⇄ Chatwoot -----------------------------------------------------

def chatwoot_conversation_url(settings, conversation_id) -> str:
    """The conversation's page in Chatwoot's app, or '' when Chatwoot is not set."""
    if not (settings.chatwoot_base_url and settings.chatwoot_account_id and conversation_id):
        return ""
    return (f"{settings.chatwoot_base_url}/app/accounts/{settings.chatwoot_account_id}"
            f"/conversations/{conversation_id}")


def meli_sale_url(settings, ml_pack_id: str) -> str:
    """The sale's page in Mercado Livre's seller area (Brazil's site only), or ''."""
    if (settings.ml_site_id or "MLB").upper() != "MLB" or not ml_pack_id:
        return ""
    return f"https://www.mercadolivre.com.br/vendas/{ml_pack_id}/detalhe"


def meli_questions(conn: sqlite3.Connection, settings, limit: int = 100) -> list[dict]:
    """Pre-sale questions imported from Mercado Livre, newest first: question, item (title and
    link), buyer, Chatwoot conversation (id and link), answered by whom and when, closed."""
    rows = conn.execute(
        """SELECT q.ml_question_id, q.ml_item_id, q.ml_buyer_id, q.question_text,
                  q.chatwoot_conversation_id, q.closed_status, q.imported_at, q.updated_at,
                  a.answered_by, a.answered_at, i.title AS item_title,
                  i.permalink AS item_url
           FROM ml_questions AS q LEFT JOIN ml_answers AS a USING (ml_question_id)
                LEFT JOIN ml_items AS i USING (ml_item_id)
           ORDER BY COALESCE(q.imported_at, q.updated_at) DESC LIMIT ?""", (limit,)).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["chatwoot_url"] = chatwoot_conversation_url(settings, d["chatwoot_conversation_id"])
        out.append(d)
    return out


def meli_sales(conn: sqlite3.Connection, settings, limit: int = 100) -> list[dict]:
    """Post-sale conversations (one per pack or order), newest first: pack, buyer, order
    summary, Chatwoot conversation (id and link), link to the sale."""
    rows = conn.execute(
        """SELECT p.ml_pack_id, p.ml_buyer_id, p.order_summary, p.chatwoot_conversation_id,
                  p.updated_at, c.created_at
           FROM ml_packs AS p LEFT JOIN cw_conversations AS c USING (chatwoot_conversation_id)
           ORDER BY COALESCE(c.created_at, p.updated_at) DESC LIMIT ?""", (limit,)).fetchall()
    out = []
    for r in rows:
        d = dict(r)
        d["chatwoot_url"] = chatwoot_conversation_url(settings, d["chatwoot_conversation_id"])
        d["sale_url"] = meli_sale_url(settings, d["ml_pack_id"])
        out.append(d)
    return out
