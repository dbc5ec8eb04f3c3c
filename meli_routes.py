"""Bridge B's HTTP routes: Chatwoot's API-inbox webhook, Mercado Livre notifications and the
Mercado Livre OAuth start/callback.

Owns: the `meli` blueprint. Webhooks only verify → parse → record (event + job in one
transaction) → answer 2xx; the OAuth callback is the one route that calls a peer (the code
exchange happens while the seller's browser waits).
Must not: call a peer from a webhook; hold bridge logic (meli_jobs) or wire formats.
"""
from __future__ import annotations

import hashlib
import html
import json
import logging

from flask import Blueprint, Response, jsonify, redirect, request

import config
import db_manager
import meli_auth
import outbox
import web_common
from chatwoot_api import classify_chatwoot_event, verify_chatwoot_signature
from mercado_livre_api import parse_notification
from web_common import json_error, token_matches

log = logging.getLogger("ponte.meli.web")

blueprint = Blueprint("meli", __name__)

NOTIFICATION_JOBS = {"questions": ("ml.fetch_question", "question_id"),
                     "messages": ("ml.fetch_message", "message_id"),
                     "orders_v2": ("ml.fetch_order", "order_id")}


def _inbox_ids(s) -> tuple[int, ...]:
    return tuple(int(i) for i in (s.chatwoot_questions_inbox_id, s.chatwoot_sales_inbox_id)
                 if str(i).strip().isdigit())


def _chatwoot_authentic(s, raw: bytes, url_token: str) -> tuple[bool, str]:
    """Signature when Chatwoot signs (v4.13+); the URL token for versions that do not."""
    signature = request.headers.get("X-Chatwoot-Signature")
    # Each API inbox has its own secret: CHATWOOT_WEBHOOK_SECRET may list them, comma-separated.
    secrets = config.split_list(s.chatwoot_webhook_secret)
    if secrets and signature:
        timestamp = request.headers.get("X-Chatwoot-Timestamp")
        ok = any(verify_chatwoot_signature(secret, timestamp, raw, signature, web_common.now())
                 for secret in secrets)
        return ok, "signature"
    if s.chatwoot_webhook_token:
        return token_matches(url_token, s.chatwoot_webhook_token), "url_token"
    if s.chatwoot_webhook_secret:
        return False, "signature_missing"
    return False, "not_configured"


@blueprint.post("/webhooks/chatwoot")
@blueprint.post("/webhooks/chatwoot/<url_token>")
@blueprint.post("/webhook")
def chatwoot_webhook(url_token: str = ""):
    """Chatwoot API-inbox webhook: 401 for a bad/stale signature (nothing recorded); otherwise
    200 at once, with an agent's public reply queued for Mercado Livre."""
    s = web_common.settings()
    raw = request.get_data(cache=True)
    ok, method = _chatwoot_authentic(s, raw, url_token or request.args.get("token", ""))
    if not ok:
        log.warning("chatwoot_webhook_rejected", extra={"peer": "chatwoot", "reason": method})
        if method == "not_configured":
            return json_error(401, "webhook_auth_not_configured",
                              "Defina CHATWOOT_WEBHOOK_SECRET (ou CHATWOOT_WEBHOOK_TOKEN).")
        return json_error(401, "invalid_signature", "Assinatura do Chatwoot inválida ou vencida.")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python parses
        return jsonify(ok=True, ignored="invalid_json")
    try:
        reply, reason = classify_chatwoot_event(body, _inbox_ids(s))
    except Exception:  # a shape we did not foresee must not become a 500 Chatwoot retries
        log.warning("chatwoot_webhook_malformed", extra={"peer": "chatwoot"}, exc_info=True)
        reply, reason = None, "malformed"
    if reason == "malformed":
        return jsonify(ok=True, ignored="malformed")
    delivery = request.headers.get("X-Chatwoot-Delivery") or hashlib.sha256(raw).hexdigest()[:32]
    now = web_common.now()
    conn = web_common.get_db()
    with db_manager.transaction(conn):
        if reply is None:
            db_manager.record_event(conn, "chatwoot", f"chatwoot-delivery:{delivery}",
                                    str(body.get("event") if isinstance(body, dict) else "?"),
                                    "ignored", {"reason": reason}, now=now)
            return jsonify(ok=True, ignored=reason)
        new = db_manager.record_event(conn, "chatwoot", f"chatwoot-msg:{reply.message_id}",
                                      "message_created", "queued",
                                      {"chatwoot_message_id": reply.message_id,
                                       "chatwoot_conversation_id": reply.conversation_id},
                                      now=now)
        if new:
            outbox.enqueue_job(conn, "chatwoot.forward_reply",
                               f"chatwoot-msg:{reply.message_id}", reply.to_payload(),
                               ordering_key=f"cw-out:{reply.conversation_id}", now=now)
    log.info("chatwoot_reply_queued" if new else "chatwoot_reply_duplicate",
             extra={"peer": "chatwoot", "chatwoot_message_id": reply.message_id,
                    "chatwoot_conversation_id": reply.conversation_id})
    return jsonify(ok=True, queued=bool(new), duplicate=not new)


@blueprint.post("/webhooks/mercadolivre")
def mercadolivre_notification():
    """Mercado Livre notification: always 200 fast (topics are switched off after slow or bad
    answers); the resource is fetched later with our own token."""
    s = web_common.settings()
    body = web_common.request_json()
    if not isinstance(body, dict):
        return jsonify(ok=True, ignored="invalid_json")
    note = parse_notification(body)
    if note is None:
        return jsonify(ok=True, ignored="topic")
    if s.ml_seller_id and note.user_id and note.user_id != str(s.ml_seller_id):
        log.warning("ml_notification_other_user", extra={"peer": "mercadolivre",
                                                         "ml_user_id": note.user_id})
        return jsonify(ok=True, ignored="other_user")
    kind, field = NOTIFICATION_JOBS[note.topic]
    now = web_common.now()
    conn = web_common.get_db()
    key = f"ml-notif:{note.notification_id}"
    with db_manager.transaction(conn):
        new = db_manager.record_event(conn, "mercadolivre", key, note.topic, "queued",
                                      {"resource": note.resource}, now=now)
        if new:
            outbox.enqueue_job(conn, kind, key, {field: note.resource_id}, now=now)
    return jsonify(ok=True, queued=new)


@blueprint.get("/oauth/mercadolivre/start")
def oauth_start():
    """Send the seller's browser to Mercado Livre's consent page."""
    s = web_common.settings()
    if not s.ml_client_id or not (s.ml_redirect_uri or s.public_base_url):
        return _page("Configuração incompleta",
                     "Defina ML_CLIENT_ID e ML_REDIRECT_URI (ou PUBLIC_BASE_URL) e tente de novo.",
                     400)
    url = meli_auth.start_authorization(s, web_common.get_db(), web_common.now())
    return redirect(url, code=302)


@blueprint.get("/oauth/mercadolivre/callback")
def oauth_callback():
    """Mercado Livre sends the seller back here with `code` and `state`."""
    s = web_common.settings()
    if request.args.get("error"):
        return _page("Autorização cancelada",
                     f"O Mercado Livre respondeu: {request.args.get('error_description') or request.args['error']}.",
                     400)
    try:
        meli_auth.complete_authorization(s, web_common.get_db(), request.args.get("code", ""),
                                               request.args.get("state", ""), web_common.now())
    except meli_auth.OAuthError as exc:
        return _page("Não foi possível conectar", exc.message, exc.status)
    log.info("ml_oauth_connected", extra={"peer": "mercadolivre"})
    return _page("Mercado Livre conectado",
                 "Pronto! A ponte já pode ler perguntas e mensagens desta conta. "
                 "Você pode fechar esta página.", 200)


def _page(title: str, text: str, status: int) -> Response:
    body = (f"<!doctype html><html lang=\"pt-BR\"><meta charset=\"utf-8\"><title>"
            f"{html.escape(title)}</title><body style=\"font-family:sans-serif;max-width:40em;"
            f"margin:3em auto\"><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
            f"</body></html>")
    return Response(body, status=status, mimetype="text/html")
