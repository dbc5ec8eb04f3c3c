"""HTTP routes of bridge A: n8n's asynchronous answers, the bot API and the Kommo OAuth
callback, plus the Kommo webhook (served before Flask by `kommo_webhook`).

Owns: the `kommo` blueprint — authentication, parsing and recording (one transaction) before
the 2xx answer.
Must not: call Kommo or n8n inside a webhook request (only the OAuth code exchange does).
"""
from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request

import bot_control
import credentials
import db_manager
import kommo_auth
import kommo_webhook
import whatsapp_intake
import whatsapp_store
from kommo_api import KommoError
from n8n_api import parse_send_response
from web_common import (ascii_id, get_db, json_error, json_object_body, now, require_bearer,
                        settings)

log = logging.getLogger("ponte.kommo.web")

blueprint = Blueprint("kommo", __name__)


# --- Kommo account webhook: a plain WSGI handler, see kommo_webhook ---------------------------

PLAIN_ROUTES = [(kommo_webhook.PATH, kommo_webhook.handle)]


# --- n8n asynchronous answer --------------------------------------------------------------------

@blueprint.post("/send-response")
@require_bearer("n8n_api_key")
def send_response():
    """n8n → ponte: an answer produced after the workflow's webhook call ended."""
    body, refusal = json_object_body()
    if refusal:
        return refusal
    try:
        answer = parse_send_response(body)
    except ValueError as exc:
        return json_error(400, "bad_request", str(exc))
    conn = get_db()
    try:
        with db_manager.transaction(conn):
            result = whatsapp_intake.record_async_answer(conn, settings(), answer, now())
    except LookupError:
        return json_error(404, "unknown_conversation", "Conversa desconhecida para a ponte.")
    return jsonify(ok=True, **result), 202


# --- bot API ------------------------------------------------------------------------------------

def _bot_auth(view):
    return require_bearer("admin_token", "n8n_api_key")(view)


@blueprint.get("/bot/status/<contact_id>")
@_bot_auth
def bot_status(contact_id: str):
    if ascii_id(contact_id) is None:
        return _bad_contact_id()
    state = whatsapp_store.get_bot_state(get_db(), contact_id)
    return jsonify(**bot_control.state_json(state), message=bot_control.status_text(state))


@blueprint.get("/bot/paused")
@_bot_auth
def bot_paused():
    states = whatsapp_store.paused_states(get_db())
    return jsonify(paused=[bot_control.state_json(s) for s in states], count=len(states))


@blueprint.post("/bot/pause/<contact_id>")
@_bot_auth
def bot_pause(contact_id: str):
    body, refusal = json_object_body(optional=True)
    if refusal:
        return refusal
    return _run_command(contact_id, "pausar", body.get("reason", ""), body.get("by"))


@blueprint.post("/bot/resume/<contact_id>")
@_bot_auth
def bot_resume(contact_id: str):
    body, refusal = json_object_body(optional=True)
    if refusal:
        return refusal
    return _run_command(contact_id, "voltar", "", body.get("by"))


@blueprint.post("/bot/command")
@_bot_auth
def bot_command():
    body, refusal = json_object_body(optional=True)
    if refusal:
        return refusal
    contact_id = body.get("contact_id")
    if isinstance(contact_id, int) and not isinstance(contact_id, bool):
        contact_id = str(contact_id)
    if not isinstance(contact_id, str) or not isinstance(body.get("command"), str):
        return json_error(400, "bad_request", "Informe contact_id e command (texto).")
    return _run_command(contact_id.strip(), body["command"], body.get("reason", ""),
                        body.get("by"))


def _run_command(contact_id: str, name: str, reason, by):
    if not isinstance(reason, str) or not isinstance(by, (str, type(None))):
        return json_error(400, "bad_request", "reason e by devem ser texto.")
    contact_id = ascii_id(contact_id)
    if contact_id is None:
        return _bad_contact_id()
    command = bot_control.command_from_name(name, reason)
    if command is None:
        return json_error(400, "unknown_command",
                          "Comando desconhecido. Use pausar, voltar, status ou help.")
    conn = get_db()
    with db_manager.transaction(conn):
        result = whatsapp_intake.api_command(conn, settings(), contact_id, command,
                                             str(by or "api"), now())
    return jsonify(ok=True, command=command.name, **result)


def _bad_contact_id():
    return json_error(400, "bad_contact_id", "contact_id deve ser o id numérico do contato.")


# --- Kommo OAuth --------------------------------------------------------------------------------

@blueprint.get("/oauth/status")
@require_bearer("admin_token")
def oauth_status():
    """Whether Kommo is connected, and the link that (re)connects it."""
    s = settings()
    conn = get_db()
    token = credentials.get(conn, kommo_auth.PROVIDER)
    if s.kommo_access_token:
        # Refused by Kommo: disconnected until KOMMO_ACCESS_TOKEN changes.
        refused = token is not None and token.access_token == s.kommo_access_token and \
            not token.ok
        return jsonify(mode="long_lived_token", connected=not refused,
                       status=token.status if refused else "ok",
                       detail=token.detail if refused else "")
    link = kommo_auth.start_authorization(s, conn, now()) if s.kommo_client_id else None
    return jsonify(mode="oauth", connected=bool(token and token.ok),
                   status=token.status if token else "never_connected",
                   detail=token.detail if token else "",
                   expires_at=token.expires_at if token else None,
                   authorize_url=link)


@blueprint.get("/oauth/callback")
def oauth_callback():
    """Kommo redirects the seller here with `code` and our `state`; we exchange and store."""
    if request.args.get("error"):
        return json_error(400, "access_denied", "Autorização recusada no Kommo.")
    code, state = request.args.get("code", ""), request.args.get("state", "")
    conn = get_db()
    if not kommo_auth.check_state(conn, state, now(), consume=bool(code)):
        return json_error(400, "bad_state", "Link de autorização inválido ou vencido; gere outro "
                                            "em /oauth/status.")
    if not code:
        return json_error(400, "missing_code", "Parâmetro code ausente.")
    try:
        kommo_auth.exchange_code(settings(), conn, code, now())
    except KommoError as exc:
        log.error("kommo_oauth_exchange_failed", extra={"status": exc.status})
        return json_error(502, "exchange_failed", "O Kommo recusou o código de autorização.")
    return jsonify(ok=True, message="Kommo conectado à ponte.")
