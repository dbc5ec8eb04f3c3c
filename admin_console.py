"""The operators' console at /admin: server-rendered pages in Portuguese (Jinja templates in
templates/admin/, a stylesheet and a few lines of JavaScript in static/), readable on a phone.

Owns: the `admin_console` blueprint — login with ADMIN_TOKEN and the signed session cookie,
CSRF tokens, the login throttle, the pages (Visão geral, Contatos, Fila, Conversas, Conexões)
and their forms (pause/resume a bot, retry/discard a dead job, start an OAuth connection).
Must not: hold SQL (admin_data reads, whatsapp_intake/outbox write), call a peer, or show a
secret (tokens, webhook secrets) on any page. The JSON routes for scripts and n8n
(`/admin/jobs`, `/bot/*`, `/oauth/status`) stay where they are, with Bearer auth.

Session cookie and login throttle: admin_session.
"""
from __future__ import annotations

import functools
import hmac
import json
import logging
import re
import time
import urllib.parse

from flask import Blueprint, g, redirect, render_template, request

import admin_data
import admin_session
import alerts
import bot_control
import config
import db_manager
import ids
import kommo_auth
import meli_auth
import outbox
import whatsapp_intake
import web_common
from admin_session import (COOKIE_NAME, COOKIE_PATH, LOGIN_FAILURE_DELAY_SECONDS,
                           SESSION_MAX_AGE_SECONDS)

log = logging.getLogger("ponte.admin")

blueprint = Blueprint("admin_console", __name__, url_prefix="/admin",
                      template_folder="templates", static_folder="static",
                      static_url_path="/static")

CONSOLE_ACTOR = "painel"  # who paused a bot from the console, in its state and its note

_sleep = time.sleep  # tests replace it: the slowdown is asserted, not waited for

# Short codes a POST redirects with (?aviso=...), so a reload never repeats the action.
NOTICES = {
    "pausado": "Bot pausado para o contato. O vendedor assume a conversa.",
    "reativado": "Bot reativado para o contato.",
    "reenfileirado": "Job devolvido à fila: roda de novo em instantes.",
    "descartado": "Job descartado (fica no histórico com o motivo).",
    "nao-morto": "Esse job não está mais em 'dead' (alguém já agiu?). Nada mudou.",
    "motivo": "Escreva o motivo para descartar o job.",
    "contato-invalido": "Id de contato inválido.",
    "ml-incompleto": "Defina ML_CLIENT_ID e ML_REDIRECT_URI (ou PUBLIC_BASE_URL) para conectar "
                     "o Mercado Livre.",
    "kommo-token": "O Kommo usa um token de longa duração (KOMMO_ACCESS_TOKEN): para trocar, "
                   "gere outro no Kommo e atualize a variável.",
    "kommo-incompleto": "Defina KOMMO_CLIENT_ID e KOMMO_CLIENT_SECRET (e KOMMO_REDIRECT_URI) "
                        "para conectar o Kommo pelo OAuth.",
    "saiu": "Você saiu do painel.",
    "expirou": "Sua sessão expirou. Entre de novo.",
}

_SAFE_NEXT = re.compile(r"^/admin(/[A-Za-z0-9/_-]*)?(\?[^\s]*)?$")


# --- session -------------------------------------------------------------------------------

throttle = admin_session.LoginThrottle()


def _current_session() -> dict | None:
    return admin_session.read_session(web_common.settings().admin_token,
                                      request.cookies.get(COOKIE_NAME, ""), web_common.now())


def _login_redirect(notice: str | None = None):
    target = request.full_path.rstrip("?") if request.method == "GET" else "/admin"
    query = {"next": target}
    if notice:
        query["aviso"] = notice
    return redirect("/admin/login?" + urllib.parse.urlencode(query), code=303)


def login_required(view):
    """The page needs a valid session; without one, the login page (nothing runs)."""
    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        session = _current_session()
        if session is None:
            had_cookie = bool(request.cookies.get(COOKIE_NAME))
            return _login_redirect("expirou" if had_cookie else None)
        g.admin_session = session
        return view(*args, **kwargs)
    return wrapper


def csrf_required(view):
    """A state-changing form: a valid session and its `csrf_token`, else 403 and nothing
    changes."""
    @functools.wraps(view)
    @login_required
    def wrapper(*args, **kwargs):
        given = request.form.get("csrf_token", "")
        if not given or not hmac.compare_digest(given.encode(),
                                                g.admin_session["csrf"].encode()):
            log.warning("admin_csrf_refused", extra={"path": request.path})
            return _render("message.html", 403, title="Formulário recusado",
                           text="O formulário veio sem o código de segurança (csrf_token) ou "
                                "com um código de outra sessão. Nada foi alterado. Recarregue "
                                "a página e tente de novo.")
        return view(*args, **kwargs)
    return wrapper


def _render(template: str, http_status: int = 200, **context):
    session = getattr(g, "admin_session", None)
    return render_template(f"admin/{template}", csrf_token=session["csrf"] if session else "",
                           logged_in=session is not None,
                           notice=NOTICES.get(request.args.get("aviso", ""), ""),
                           **context), http_status


@blueprint.context_processor
def _helpers():
    now = web_common.now()

    def ago(epoch):
        if not epoch:
            return "—"
        seconds = max(0, now - epoch)
        return "há " + _duration(seconds)

    def within(epoch):
        if not epoch:
            return "—"
        seconds = epoch - now
        return ("em " + _duration(seconds)) if seconds >= 0 else ("há " + _duration(-seconds))

    return {"fmt_time": bot_control.format_time, "ago": ago, "within": within,
            "pretty_json": lambda v: json.dumps(v, ensure_ascii=False, indent=2),
            "nav": request.endpoint}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    if seconds < 48 * 3600:
        return f"{round(seconds / 3600)} h"
    return f"{round(seconds / 86400)} dias"


@blueprint.after_request
def _headers(response):
    # Pages with customer data and a CSRF token: never cached, never framed.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'")
    return response


# --- login / logout ---------------------------------------------------------------------------

@blueprint.get("/login")
def login_form():
    if _current_session() is not None:
        return redirect(_safe_next(request.args.get("next")), code=303)
    return _render("login.html", next=_safe_next(request.args.get("next")),
                   configured=bool(web_common.settings().admin_token), error="")


@blueprint.post("/login")
def login():
    s = web_common.settings()
    now = web_common.now()
    address = request.remote_addr or "?"
    next_url = _safe_next(request.form.get("next"))
    if not s.admin_token:
        return _render("login.html", 401, next=next_url, configured=False, error="")
    wait = throttle.blocked_for(address, now)
    if wait > 0:
        return _render("login.html", 429, next=next_url, configured=True,
                       error=f"Muitas tentativas erradas. Espere {_duration(wait)} e tente de "
                             "novo.")
    if not web_common.token_matches(request.form.get("token", ""), s.admin_token):
        throttle.failed(address, now)
        log.warning("admin_login_failed", extra={"remote_addr": address})
        _sleep(LOGIN_FAILURE_DELAY_SECONDS)
        return _render("login.html", 401, next=next_url, configured=True,
                       error="Token incorreto.")
    throttle.succeeded(address)
    value, _ = admin_session.make_session(s.admin_token, now)
    response = redirect(next_url, code=303)
    response.set_cookie(COOKIE_NAME, value, max_age=SESSION_MAX_AGE_SECONDS, path=COOKIE_PATH,
                        httponly=True, samesite="Strict",
                        secure=request.is_secure or s.public_base_url.startswith("https://"))
    log.info("admin_login", extra={"remote_addr": address})
    return response


@blueprint.post("/sair")
@csrf_required
def logout():
    response = redirect("/admin/login?aviso=saiu", code=303)
    response.delete_cookie(COOKIE_NAME, path=COOKIE_PATH, httponly=True, samesite="Strict")
    return response


def _safe_next(target: str | None) -> str:
    return target if target and _SAFE_NEXT.match(target) and "/login" not in target \
        else "/admin"


# --- pages ------------------------------------------------------------------------------------

@blueprint.get("")
@blueprint.get("/")
@login_required
def overview():
    s, conn, now = web_common.settings(), web_common.get_db(), web_common.now()
    traffic = admin_data.traffic_by_hour(conn, now)
    peak = max([max(b["inbound"], b["done"] + b["failed"]) for b in traffic] + [1])
    beat = db_manager.last_beat(conn, "poller")
    return _render("overview.html", bridges=admin_data.bridges(s), alerts=alerts.active(conn),
                   alert_receiver=bool(s.alert_webhook_url),
                   accounts=admin_data.accounts(conn, s, now),
                   peers=admin_data.peer_health(conn, s, now),
                   queue=admin_data.queue(conn, now), errors=admin_data.last_errors(conn),
                   traffic=traffic, peak=peak, paused=admin_data.paused_count(conn),
                   inbound=admin_data.inbound_by_source(conn, now - 86400),
                   poller_age=(now - beat["beat_at"]) if beat else None,
                   poller_max_age=s.poller_heartbeat_max_age_seconds)


@blueprint.get("/contatos")
@login_required
def contacts():
    s, conn = web_common.settings(), web_common.get_db()
    search = request.args.get("q", "")[:100]
    rows = admin_data.contacts(conn, search)
    for row in rows:
        row["lead_url"] = admin_data.kommo_lead_url(s, row["kommo_lead_id"])
        row["kind_label"] = bot_control.KIND_LABEL.get(row["paused_by_kind"] or "",
                                                       row["paused_by_kind"] or "")
    return _render("contacts.html", contacts=rows, search=search,
                   auto_resume_hours=s.bot_auto_resume_hours)


def _bot_command(contact_id: str, name: str, reason: str):
    if ids.ascii_id(contact_id) is None:
        return redirect("/admin/contatos?aviso=contato-invalido", code=303)
    # NUL is no text SQLite's functions or Kommo's notes keep.
    command = bot_control.command_from_name(name, reason.replace("\x00", "").strip()[:500])
    conn = web_common.get_db()
    with db_manager.transaction(conn):
        whatsapp_intake.api_command(conn, web_common.settings(), contact_id, command,
                                    CONSOLE_ACTOR, web_common.now())
    log.info("admin_bot_command", extra={"contact_id": contact_id, "command": command.name})
    notice = "pausado" if command.name == "pause" else "reativado"
    back = request.form.get("q", "")
    return redirect("/admin/contatos?" + urllib.parse.urlencode(
        {"aviso": notice, **({"q": back} if back else {})}), code=303)


@blueprint.post("/contatos/<contact_id>/pausar")
@csrf_required
def pause_contact(contact_id: str):
    return _bot_command(contact_id, "pausar", request.form.get("reason", ""))


@blueprint.post("/contatos/<contact_id>/voltar")
@csrf_required
def resume_contact(contact_id: str):
    return _bot_command(contact_id, "voltar", "")


JOB_STATUSES = ("pending", "running", "dead", "done")
JOB_STATUS_LABELS = {"pending": "na fila", "running": "rodando", "dead": "mortos (dead)",
                     "done": "concluídos"}


@blueprint.get("/fila")
@login_required
def queue():
    conn, now = web_common.get_db(), web_common.now()
    status = request.args.get("status", "dead")
    status = status if status in JOB_STATUSES or status == "todos" else "dead"
    kind = request.args.get("kind", "")
    kinds = admin_data.job_kinds(conn)
    kind = kind if kind in kinds else ""
    jobs = admin_data.jobs(conn, now, status=None if status == "todos" else status,
                           kind=kind or None, limit=100)
    return _render("queue.html", jobs=jobs, status=status, kind=kind, kinds=kinds,
                   statuses=JOB_STATUSES, status_labels=JOB_STATUS_LABELS,
                   stats=admin_data.queue(conn, now),
                   table=admin_data.jobs_by_state_and_kind(conn))


@blueprint.post("/fila/<int:job_id>/tentar-de-novo")
@csrf_required
def retry_job(job_id: int):
    done = outbox.retry_dead_job(web_common.get_db(), job_id, web_common.now())
    log.info("admin_job_retry", extra={"job_id": job_id, "ok": done})
    return redirect(f"/admin/fila?aviso={'reenfileirado' if done else 'nao-morto'}", code=303)


@blueprint.post("/fila/<int:job_id>/descartar")
@csrf_required
def discard_job(job_id: int):
    reason = request.form.get("reason", "").strip()
    if not reason:
        return redirect("/admin/fila?aviso=motivo", code=303)
    done = outbox.discard_dead_job(web_common.get_db(), job_id, reason.replace("\x00", ""),
                                   web_common.now())
    log.info("admin_job_discarded", extra={"job_id": job_id, "ok": done})
    return redirect(f"/admin/fila?aviso={'descartado' if done else 'nao-morto'}", code=303)


@blueprint.get("/conversas")
@login_required
def conversations():
    s, conn = web_common.settings(), web_common.get_db()
    return _render("conversations.html", questions=admin_data.meli_questions(conn, s),
                   sales=admin_data.meli_sales(conn, s),
                   enabled=s.bridge_enabled("mercadolivre"))


@blueprint.get("/conexoes")
@login_required
def connections():
    s, conn, now = web_common.settings(), web_common.get_db(), web_common.now()
    return _render("connections.html", accounts=admin_data.accounts(conn, s, now),
                   urls=admin_data.webhook_urls(s), checks=admin_data.setting_checks(s),
                   warnings=_config_warnings(s))


def _config_warnings(s) -> list[str]:
    return config.warnings(s)


@blueprint.post("/conexoes/mercadolivre")
@csrf_required
def connect_mercadolivre():
    s = web_common.settings()
    if not s.ml_client_id or not (s.ml_redirect_uri or s.public_base_url):
        return redirect("/admin/conexoes?aviso=ml-incompleto", code=303)
    url = meli_auth.start_authorization(s, web_common.get_db(), web_common.now())
    log.info("admin_oauth_start", extra={"peer": "mercadolivre"})
    return redirect(url, code=303)


@blueprint.post("/conexoes/kommo")
@csrf_required
def connect_kommo():
    s = web_common.settings()
    if s.kommo_access_token:
        return redirect("/admin/conexoes?aviso=kommo-token", code=303)
    if not (s.kommo_client_id and s.kommo_client_secret):
        return redirect("/admin/conexoes?aviso=kommo-incompleto", code=303)
    url = kommo_auth.start_authorization(s, web_common.get_db(), web_common.now())
    log.info("admin_oauth_start", extra={"peer": "kommo"})
    return redirect(url, code=303)
