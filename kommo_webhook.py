"""The Kommo account webhook, `/webhooks/kommo/<secret>`, as a plain WSGI handler.

Owns: that one URL — secret check, form parsing, account check, recording the delivery, and
the JSON answer.
Must not: call Kommo or n8n, or answer 2xx before the delivery is committed.

Why plain WSGI instead of a Flask view: this is the URL that Kommo's retries and bursts hit.
Measured (docs/benchmarks.md, part 4), the same work in a Flask view costs about twice the CPU:
Flask's request and response objects cost more than the parse and the durable write together.
So this handler runs in front of Flask (`webhook_server.PlainRoutes`), inside the middleware
that gives every request its id and body limit, and answers with the JSON error shape of the
Flask routes (`web_common.error_body`).
"""
from __future__ import annotations

import json
import logging
import re
import urllib.parse

import db_manager
import web_common
import whatsapp_intake
from kommo_api import KommoParseError, parse_kommo_webhook
from ponte_logging import request_id_var

log = logging.getLogger("ponte.kommo.web")

# `/webhooks/kommo`, `/webhooks/kommo/<secret>`, each with or without a trailing slash.
PATH = re.compile(r"^/webhooks/kommo(?:/([^/]+))?/?$")

_RECORDED = {outcome: json.dumps({"ok": True, "recorded": outcome}).encode()
             for outcome in ("queued", "duplicate", "ignored")}
_URL_CHECK = json.dumps({"ok": True, "service": "ponte", "webhook": "kommo"}).encode()


def handle(environ, start_response, app_config, secret: str | None):
    """Answer one request to the Kommo webhook URL. `secret` is the path segment after
    `/webhooks/kommo/` (None when absent: then `?secret=` is used); `app_config` is the Flask
    app's config (settings and clock)."""
    try:
        return _handle(environ, start_response, app_config, secret)
    except Exception:  # nothing was recorded: Kommo sends the delivery again
        # No path in the line: it carries the secret.
        log.exception("unhandled_error", extra={"path": "/webhooks/kommo/***"})
        return _error(start_response, 500, "internal_error",
                      "Erro interno; o webhook não foi gravado e o Kommo vai reenviá-lo.")


def _handle(environ, start_response, app_config, secret: str | None):
    settings = app_config["PONTE_SETTINGS"]
    if secret is None:
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        secret = query.get("secret", [""])[0]
    else:  # WSGI gives the decoded path as latin-1 characters
        secret = secret.encode("latin-1").decode("utf-8", "replace")
    if not web_common.token_matches(secret, settings.kommo_webhook_secret):
        log.warning("kommo_webhook_bad_secret")
        return _error(start_response, 401, "bad_secret", "Segredo do webhook inválido.")
    method = environ["REQUEST_METHOD"]
    if method in ("GET", "HEAD"):  # Kommo checks the URL when the webhook is saved
        return web_common.wsgi_json(start_response, 200, _URL_CHECK, head=method == "HEAD")
    if method != "POST":
        return _error(start_response, 405, "method_not_allowed",
                      "Método não permitido nesta rota.", [("Allow", "GET, HEAD, POST")])
    mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
    if mimetype != "application/x-www-form-urlencoded":
        return _error(start_response, 415, "unsupported_media_type",
                      "O Kommo envia application/x-www-form-urlencoded.")
    # webhook_server.RequestIds has already refused bodies over the limit, chunked ones too.
    length = environ.get("CONTENT_LENGTH") or "0"
    if not (length.isascii() and length.isdigit()):  # "²" passes isdigit() but not int()
        return _error(start_response, 400, "bad_content_length", "Content-Length inválido.")
    raw = environ["wsgi.input"].read(int(length))
    if not web_common.form_bytes_storable(raw):
        return _error(start_response, 400, "unstorable_text", "O formulário tem texto inválido.")
    try:
        hook = parse_kommo_webhook(raw)
    except KommoParseError as exc:
        return _error(start_response, 400, "bad_kommo_payload",
                      f"Corpo não é um webhook do Kommo: {exc}")
    if settings.kommo_account_id and hook.account_id != settings.kommo_account_id:
        log.warning("kommo_webhook_wrong_account", extra={"account_id": hook.account_id})
        return _error(start_response, 401, "wrong_account", "Webhook de outra conta do Kommo.")
    conn = web_common.connection(settings.database_path)
    with db_manager.transaction(conn):
        outcome = whatsapp_intake.record_delivery(conn, hook, raw, app_config["PONTE_CLOCK"](),
                                                  request_id_var.get())
    return web_common.wsgi_json(start_response, 200, _RECORDED[outcome])


def _error(start_response, status: int, code: str, message: str, headers=()):
    return web_common.wsgi_json(start_response, status, web_common.error_body(code, message),
                                headers=headers)
