"""The console's session cookie and login throttle (used by admin_console).

Owns: signing and reading the session cookie (`make_session`, `read_session`), its name, path
and lifetime, and `LoginThrottle` (wrong tokens per client address).
Must not: touch Flask's request or the database, or keep a secret anywhere but in memory.

The cookie holds `{iat, exp, csrf}` and an HMAC-SHA256 of it, keyed by a key derived from
ADMIN_TOKEN (HMAC(ADMIN_TOKEN, "ponte-admin-session-v1")). Derived rather than a random key kept
in the database: every Gunicorn worker and every restart agrees on it without a write, and
changing ADMIN_TOKEN ends every open session at once (what an operator expects after a leak).
The expiry is inside the signed value, so a copied cookie stops working when it ends; the
trade-off is that one session cannot be revoked alone (logging out deletes it from the browser).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading

COOKIE_NAME = "ponte_admin"
COOKIE_PATH = "/admin"
SESSION_MAX_AGE_SECONDS = 8 * 3600
SESSION_KEY_LABEL = b"ponte-admin-session-v1"
# A wrong token waits this long before its answer, and an address that keeps guessing is
# refused for a while, so the token cannot be guessed at the speed of the network.
LOGIN_FAILURE_DELAY_SECONDS = 1.0
LOGIN_FAILURE_LIMIT = 10
LOGIN_FAILURE_WINDOW_SECONDS = 600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _session_key(admin_token: str) -> bytes:
    return hmac.new(admin_token.encode(), SESSION_KEY_LABEL, hashlib.sha256).digest()


def make_session(admin_token: str, now: float) -> tuple[str, dict]:
    """A new session: (the cookie value, its content `{iat, exp, csrf}`)."""
    content = {"iat": now, "exp": now + SESSION_MAX_AGE_SECONDS,
               "csrf": secrets.token_urlsafe(24)}
    body = _b64(json.dumps(content, separators=(",", ":")).encode())
    signature = _b64(hmac.new(_session_key(admin_token), body.encode(), hashlib.sha256).digest())
    return f"{body}.{signature}", content


def read_session(admin_token: str, value: str, now: float) -> dict | None:
    """The content of a session cookie signed with this ADMIN_TOKEN and not expired, or None."""
    if not admin_token or not value or value.count(".") != 1:
        return None
    body, signature = value.split(".")
    expected = _b64(hmac.new(_session_key(admin_token), body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        return None
    try:
        content = json.loads(_unb64(body))
    except ValueError:
        return None
    if not isinstance(content, dict) or not isinstance(content.get("exp"), (int, float)) \
            or not isinstance(content.get("csrf"), str) or now >= content["exp"]:
        return None
    return content


class LoginThrottle:
    """Wrong tokens per client address in a sliding window, shared by this process's threads.
    Per process: Gunicorn's workers each count, which still bounds guessing to a few per
    second."""

    def __init__(self):
        self._lock = threading.Lock()
        self._failures: dict[str, list[float]] = {}

    def blocked_for(self, address: str, now: float) -> float:
        """Seconds until `address` may try again (0 when it may)."""
        with self._lock:
            recent = [t for t in self._failures.get(address, [])
                      if now - t < LOGIN_FAILURE_WINDOW_SECONDS]
            self._failures[address] = recent
            if len(recent) < LOGIN_FAILURE_LIMIT:
                return 0.0
            return recent[0] + LOGIN_FAILURE_WINDOW_SECONDS - now

    def failed(self, address: str, now: float) -> None:
        with self._lock:
            self._failures.setdefault(address, []).append(now)
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures.pop(next(iter(self._failures)))

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)
