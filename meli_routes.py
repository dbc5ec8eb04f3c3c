"""Bridge B's HTTP routes: Chatwoot's API-inbox webhook, Mercado Livre notifications and the
Mercado Livre OAuth start/callback.

Owns: the `meli` blueprint (with `POST /mercadolivre/send-response`, the AI's asynchronous
answers to questions). Webhooks only verify → parse → record (event + job in one
transaction) → answer 2xx; the OAuth callback is the one route that calls a peer (the code
exchange happens while the seller's browser waits).
Must not: call a peer from a webhook; hold bridge logic (meli_jobs) or wire formats.
"""
from __future__ import annotations

import hashlib
import html
import logging
import re

from flask import Blueprint, Response, jsonify, redirect, request

import config
import db_manager
import meli_ai
import meli_auth
import outbox
import web_common
from chatwoot_api import DeletedMessage, classify_chatwoot_event, verify_chatwoot_signature
from meli_store import deleted_event_key
from mercado_livre_api import parse_notification
from web_common import json_error, token_matches

log = logging.getLogger("ponte.meli.web")

blueprint = Blueprint("meli", __name__)

NOTIFICATION_JOBS = {"questions": ("ml.fetch_question", "question_id"),
                     "messages": ("ml.fetch_message", "message_id"),
                     "orders_v2": ("ml.fetch_order", "order_id")}


# A delivery id we keep as it is (Chatwoot sends a UUID); anything else is replaced by a hash.
_DELIVERY_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}\Z")


def _inbox_ids(s) -> tuple[int, ...]:
    ids = (web_common.ascii_int(str(i)) for i in (s.chatwoot_questions_inbox_id,
                                                  s.chatwoot_sales_inbox_id))
    return tuple(i for i in ids if i is not None)


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
        body = web_common.parse_json(raw or b"null")
    except web_common.BadBody as exc:  # 2xx: Chatwoot marks a message failed on an error
        return jsonify(ok=True, ignored="invalid_json" if exc.code == "bad_json" else exc.code)
    try:
        event, reason = classify_chatwoot_event(body, _inbox_ids(s))
    except Exception:  # a shape we did not foresee must not become a 500 Chatwoot retries
        log.warning("chatwoot_webhook_malformed", extra={"peer": "chatwoot"}, exc_info=True)
        event, reason = None, "malformed"
    if reason == "malformed":
        return jsonify(ok=True, ignored="malformed")
    delivery = request.headers.get("X-Chatwoot-Delivery") or ""
    if not _DELIVERY_ID.match(delivery):
        delivery = hashlib.sha256(raw).hexdigest()[:32]
    now = web_common.now()
    conn = web_common.get_db()
    with db_manager.transaction(conn):
        if isinstance(event, DeletedMessage):
            deleted = event
            # A reply whose forward job has not run yet finds this and is not sent.
            db_manager.record_event(conn, "chatwoot", deleted_event_key(deleted.message_id),
                                    "message_updated", "deleted",
                                    {"chatwoot_message_id": deleted.message_id,
                                     "chatwoot_conversation_id": deleted.conversation_id},
                                    now=now)
            log.info("chatwoot_message_deleted",
                     extra={"peer": "chatwoot", "chatwoot_message_id": deleted.message_id,
                            "chatwoot_conversation_id": deleted.conversation_id})
            return jsonify(ok=True, deleted=True)
        if event is None:
            db_manager.record_event(conn, "chatwoot", f"chatwoot-delivery:{delivery}",
                                    str(body.get("event") if isinstance(body, dict) else "?"),
                                    "ignored", {"reason": reason}, now=now)
            return jsonify(ok=True, ignored=reason)
        reply = event
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
    # Whatever the Content-Type says: Mercado Livre does not retry an answered notification.
    body = web_common.request_json()
    if not isinstance(body, dict):  # not JSON, or text no store can hold
        return jsonify(ok=True, ignored="invalid_json")
    # Without user_id a notification cannot be shown to be this seller's: ignored, like another
    # seller's, whatever its topic (the poller still finds what it was about).
    user_id = str(body.get("user_id") or "")
    if not user_id or user_id != str(s.ml_seller_id).strip():
        log.warning("ml_notification_other_user", extra={"peer": "mercadolivre",
                                                         "ml_user_id": user_id[:40]})
        return jsonify(ok=True, ignored="other_user" if user_id else "no_user_id")
    note = parse_notification(body)
    if note is None:
        return jsonify(ok=True, ignored="topic")
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


@blueprint.post("/mercadolivre/send-response")
@web_common.require_bearer("ml_ai_api_key")
def ml_ai_send_response():
    """n8n → ponte: the AI's answer to a question, produced after the workflow's webhook call
    ended (the questions' `/send-response`). Queued behind the conversation's replies; an
    agent's reply that came first wins."""
    body, refusal = web_common.json_object_body()
    if refusal:
        return refusal
    conn = web_common.get_db()
    try:
        with db_manager.transaction(conn):
            result = meli_ai.record_async_answer(conn, web_common.settings(), body,
                                                 web_common.now())
    except ValueError as exc:
        return json_error(400, "bad_request", str(exc))
    except PermissionError:
        return json_error(409, "ai_off", "ML_AI_MODE está desligado: respostas da IA não são "
                                         "aceitas.")
    except LookupError:
        return json_error(404, "unknown_question",
                          "Pergunta desconhecida para a ponte (ainda não está no Chatwoot).")
    log.info("ml_ai_async_answer", extra={"peer": "n8n", "ml_question_id": result["question_id"],
                                          "queued": result["queued"]})
    return jsonify(ok=True, **result), 202


@blueprint.get("/oauth/mercadolivre/start")
def oauth_start():
    """Send the seller to Mercado Livre's consent page — only with ADMIN_TOKEN. Every start
    writes an OAuth state row (kept 7 days), so an anonymous request writes nothing: a browser
    (no Authorization header) is sent to the console's Conexões page, whose login (throttled)
    and "Conectar Mercado Livre" button (CSRF) start it; a script sends
    `Authorization: Bearer ADMIN_TOKEN`."""
    s = web_common.settings()
    given = web_common.bearer_token()
    if not given and not request.headers.get("Authorization"):
        return redirect("/admin/conexoes", code=303)
    if not token_matches(given, s.admin_token):
        return json_error(401, "unauthorized", "Token ausente ou inválido.")
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
