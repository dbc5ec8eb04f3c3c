"""Request-time helpers shared by every blueprint: the database connection of this worker, the
settings, the clock, JSON errors and bearer-token checks.

Owns: `get_db()`, `connection()`, `settings()`, `now()`, `error_body()`, `wsgi_json()`,
`request_json()`, `json_object_body()`, `json_error()`, `require_bearer()`, `bearer_token()`,
and the one place that decides what inbound text and numbers ponte accepts: `parse_json()`,
`storable()`, `form_bytes_storable()`, and — re-exported from the Flask-free `ids`, which the
CLI and the jobs share — `ascii_id()`, `ascii_int()` (every route reads bodies, ids and numeric
headers through them, so a hostile byte is a 4xx — or a peer's 200 `ignored` — and never a
500 or a row).
Must not: hold routes or bridge logic.
"""
from __future__ import annotations

import functools
import hmac
import http
import json
import re
import threading

from flask import current_app, jsonify, request

import db_manager
from ids import ascii_id, ascii_int  # noqa: F401  (routes read ids through web_common)
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


# Text no store of ours can hold: a lone surrogate (JSON's "\ud800" parses into a str that
# SQLite's UTF-8 cannot encode: UnicodeEncodeError) and NUL (SQLite's text functions stop at it,
# Chatwoot's PostgreSQL refuses it).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class BadBody(ValueError):
    """A body ponte refuses: `code` is the JSON error code, `message` says why (pt-BR)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def storable(value) -> bool:
    """True when every string in `value` (a parsed JSON value or form fields: dict keys and
    values, list items, nested at any depth) can be stored: no lone surrogate, no NUL. Walks
    with its own stack, so a body nested as deep as the JSON parser allows cannot overflow."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return True


def parse_json(raw: bytes):
    """The JSON value in `raw` (UTF-8/16/32, whatever the Content-Type said). Raises BadBody:
    `bad_json` for bytes that are not JSON (nesting deeper than Python parses included),
    `unstorable_text` for text no store can hold (see `storable`)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise BadBody("bad_json", "O corpo deve ser JSON válido.") from None
    if not storable(value):
        raise BadBody("unstorable_text", "O corpo tem texto inválido (caractere nulo ou "
                                         "surrogate UTF-16 isolado).")
    return value


def request_json():
    """The request's body parsed as JSON whatever its Content-Type (a peer that labels its JSON
    text/plain is still heard), or None when it is not valid JSON or holds text no store can
    hold (`parse_json`)."""
    try:
        return parse_json(request.get_data(cache=True))
    except BadBody:
        return None


def json_object_body(optional: bool = False):
    """(the request's JSON object, None), or (None, a 415/400 answer) when the body is not
    application/json, not a JSON object, or holds text no store can hold. `optional`: a request
    with no body at all gives ({}, None) — but a body that is there must be right (a typo must
    not act without it)."""
    raw = request.get_data(cache=True)
    if optional and not raw:
        return {}, None
    if not request.is_json:
        return None, json_error(415, "unsupported_media_type", "Envie application/json.")
    try:
        body = parse_json(raw)
    except BadBody as exc:
        return None, json_error(400, exc.code, exc.message)
    if not isinstance(body, dict):
        return None, json_error(400, "bad_json", "O corpo deve ser um objeto JSON válido.")
    return body, None


def form_bytes_storable(raw: bytes) -> bool:
    """`storable` for an urlencoded body before it is parsed (the Kommo webhook parses its own
    form, on the hottest path): NUL is the one unstorable character decoding can produce
    (bad UTF-8 becomes U+FFFD, never a lone surrogate), and it comes as "%00" or a raw byte."""
    return b"%00" not in raw and b"\x00" not in raw


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
