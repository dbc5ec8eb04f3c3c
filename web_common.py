"""Request-time helpers shared by every blueprint: the database connection of this worker, the
settings, the clock, JSON errors and bearer-token checks.

Owns: `get_db()`, `connection()`, `settings()`, `now()`, `error_body()`, `wsgi_json()`,
`request_json()`, `json_object_body()`, `json_error()`, `require_bearer()`, `bearer_token()`.
Must not: hold routes or bridge logic.
"""
from __future__ import annotations

import functools
import hmac
import http
import json
import threading

from flask import current_app, jsonify, request

import db_manager
from ponte_logging import request_id_var

_local = threading.local()


def settings():
    """The `Settings` of the running app."""
    return current_app.config["PONTE_SETTINGS"]


def now() -> float:
    """The app's clock (injectable in tests)."""
    return current_app.config["PONTE_CLOCK"]()


def get_db():
    """This worker thread's SQLite connection (opened once, reused across requests)."""
    return connection(settings().database_path)


def connection(path: str):
    """This worker thread's connection to the database at `path` (opened once, reused)."""
    conns = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    conn = conns.get(path)
    if conn is None:
        conn = conns[path] = db_manager.connect(
            path, wal_autocheckpoint_pages=db_manager.WEB_WAL_AUTOCHECKPOINT_PAGES)
    return conn


def error_body(code: str, message: str) -> dict:
    """The body of every JSON error answer: `{"error": code, "message": message,
    "request_id": ...}`."""
    return {"error": code, "message": message, "request_id": request_id_var.get()}


def wsgi_json(start_response, status: int, body: bytes | dict, headers=(), head=False):
    """Answer a plain WSGI request (no Flask) with JSON: `body` as bytes already encoded, or a
    dict to encode. `head` leaves the body out (a HEAD request)."""
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False).encode()
    status_line = f"{status} {http.HTTPStatus(status).phrase}"
    start_response(status_line, [("Content-Type", "application/json"),
                                 ("Content-Length", str(len(body))), *headers])
    return [b""] if head else [body]


def request_json():
    """The request's JSON body, or None when it is not valid JSON — nesting deeper than Python
    parses included, which Flask's silent mode lets through as a RecursionError (a 500)."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        return None


def json_object_body(optional: bool = False):
    """(the request's JSON object, None), or (None, a 415/400 answer) when the body is not
    application/json or not a JSON object. `optional`: a request with no body at all gives
    ({}, None) — but a body that is there must be right (a typo must not act without it)."""
    if optional and not request.get_data(cache=True):
        return {}, None
    if not request.is_json:
        return None, json_error(415, "unsupported_media_type", "Envie application/json.")
    body = request_json()
    if not isinstance(body, dict):
        return None, json_error(400, "bad_json", "O corpo deve ser um objeto JSON válido.")
    return body, None


def json_error(status: int, code: str, message: str):
    """A JSON error answer of a Flask route (body: `error_body`)."""
    response = jsonify(error_body(code, message))
    response.status_code = status
    return response


def bearer_token() -> str:
    """The token of an `Authorization: Bearer ...` header, or ''."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def token_matches(given: str, *accepted: str) -> bool:
    """Constant-time comparison against every non-empty accepted token."""
    return bool(given) and any(a and hmac.compare_digest(given.encode(), a.encode())
                               for a in accepted)


def require_bearer(*setting_names: str):
    """Decorator: the request needs `Authorization: Bearer <one of these settings>`."""

    def decorator(view):
        @functools.wraps(view)
        def wrapper(*args, **kwargs):
            s = settings()
            accepted = [getattr(s, name) for name in setting_names]
            if not any(accepted):
                return json_error(401, "auth_not_configured",
                                  "Defina " + " ou ".join(n.upper() for n in setting_names)
                                  + " para usar esta rota.")
            if not token_matches(bearer_token(), *accepted):
                return json_error(401, "unauthorized", "Token ausente ou inválido.")
            return view(*args, **kwargs)

        return wrapper

    return decorator
