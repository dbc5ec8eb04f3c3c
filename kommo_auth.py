"""Kommo credentials: the long-lived token, or the OAuth pair with single-flight refresh.

Owns: `TokenSource` (what `KommoClient` asks for a token), the OAuth `state` (made, checked and
consumed once, pruned), the code exchange of `/oauth/callback` and the refresh under a
cross-process lock (Kommo refresh tokens are single-use: lock, re-read,
refresh, persist the new pair atomically, then use it).
Must not: hold routes; it is used by the poller's jobs and by the OAuth callback.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
import urllib.parse
import uuid

import db_manager
from kommo_api import KommoClient, KommoError

log = logging.getLogger("ponte.kommo.auth")

PROVIDER = "kommo"
LOCK_NAME = "token-refresh:kommo"
REFRESH_MARGIN_SECONDS = 600  # refresh ahead of expiry so no call runs with a dying token
LOCK_TTL_SECONDS = 60
LOCK_WAIT_SECONDS = 20
AUTHORIZE_URL = "https://www.kommo.com/oauth"
STATE_NAMESPACE = "oauth-state"
STATE_MAX_AGE_SECONDS = 1800


class TokenSource:
    """Gives the Kommo access token for the next call."""

    def __init__(self, settings, conn, now=time.time, sleep=time.sleep):
        self.settings = settings
        self.conn = conn
        self.now = now
        self.sleep = sleep

    @property
    def uses_long_lived_token(self) -> bool:
        return bool(self.settings.kommo_access_token)

    def access_token(self) -> str:
        """The long-lived token, or the stored OAuth token (refreshed first when near expiry)."""
        if self.uses_long_lived_token:
            return self.settings.kommo_access_token
        row = db_manager.token_get(self.conn, PROVIDER)
        if row is None or not row["access_token"]:
            raise KommoError(401, "Kommo não autorizado: defina KOMMO_ACCESS_TOKEN (token de longa "
                             "duração) ou conecte pelo OAuth em /oauth/status", retryable=False)
        if row["expires_at"] and row["expires_at"] - self.now() < REFRESH_MARGIN_SECONDS:
            row = self.refresh(stale_access_token=row["access_token"])
        return row["access_token"]

    def refresh_after_401(self) -> bool:
        """Kommo answered 401: refresh once (OAuth only). True when a new token is ready."""
        if self.uses_long_lived_token:
            return False
        row = db_manager.token_get(self.conn, PROVIDER)
        if not row or not row["refresh_token"]:
            return False
        self.refresh(stale_access_token=row["access_token"])
        return True

    def refresh(self, stale_access_token: str) -> dict:
        """Refresh the pair unless another process already did (single flight)."""
        owner = f"{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not db_manager.acquire_lock(self.conn, LOCK_NAME, owner, LOCK_TTL_SECONDS,
                                          now=self.now()):
            if time.monotonic() > deadline:
                raise KommoError(None, "token refresh lock busy", retryable=True)
            self.sleep(0.05)
        try:
            row = db_manager.token_get(self.conn, PROVIDER)
            if row and row["access_token"] != stale_access_token:
                return row  # another process refreshed while we waited
            client = _token_client(self.settings)
            try:
                answer = client.exchange_token({
                    "client_id": self.settings.kommo_client_id,
                    "client_secret": self.settings.kommo_client_secret,
                    "grant_type": "refresh_token", "refresh_token": row["refresh_token"],
                    "redirect_uri": self.settings.kommo_redirect_uri})
            except KommoError as exc:
                if exc.status in (400, 401):
                    db_manager.token_set_status(self.conn, PROVIDER, "disconnected",
                                                "refresh recusado; autorize de novo", self.now())
                    log.error("kommo_refresh_rejected", extra={"peer": "kommo",
                                                               "status": exc.status})
                raise
            return store_token_answer(self.conn, answer, self.now())
        finally:
            db_manager.release_lock(self.conn, LOCK_NAME, owner)


def build_client(settings, conn, now=time.time) -> KommoClient:
    """The Kommo client of a process, with tokens from the settings or the database."""
    return KommoClient(settings.kommo_base_url, TokenSource(settings, conn, now),
                       max_rps=settings.kommo_max_rps)


def _token_client(settings) -> KommoClient:
    return KommoClient(settings.kommo_base_url, token_source=None, max_rps=0)


def store_token_answer(conn, answer: dict, now: float) -> dict:
    """Persist a token-endpoint answer; returns the stored row."""
    if not answer.get("access_token") or not answer.get("refresh_token"):
        raise KommoError(None, "token answer without tokens", retryable=False)
    expires_at = now + float(answer.get("expires_in") or 86400)
    db_manager.token_put(conn, PROVIDER, answer["access_token"], answer["refresh_token"],
                         expires_at, status="ok", now=now)
    log.info("kommo_token_stored", extra={"peer": "kommo", "expires_at": int(expires_at)})
    return db_manager.token_get(conn, PROVIDER)


def start_authorization(settings, conn, now: float) -> str:
    """Remember a fresh `state` and return the link to Kommo's consent page."""
    state = secrets.token_urlsafe(24)
    with db_manager.transaction(conn):
        db_manager.mapping_put(conn, STATE_NAMESPACE, state, {"provider": PROVIDER, "at": now},
                               now=now)
    return AUTHORIZE_URL + "?" + urllib.parse.urlencode(
        {"client_id": settings.kommo_client_id, "state": state, "mode": "post_message"})


def check_state(conn, state: str, now: float, consume: bool) -> bool:
    """Whether `state` is one we made, unused and fresh; with `consume`, it is also marked used
    in the same transaction, so one state allows one code exchange."""
    with db_manager.transaction(conn):
        saved = db_manager.mapping_get(conn, STATE_NAMESPACE, state) if state else None
        valid = bool(saved) and saved.get("provider") == PROVIDER and \
            now - saved["at"] <= STATE_MAX_AGE_SECONDS
        if valid and consume:
            db_manager.mapping_put(conn, STATE_NAMESPACE, state, {"provider": "used", "at": now},
                                   now=now)
    return valid


def prune_states(conn, older_than: float) -> None:
    """Delete the OAuth states written before `older_than`; takes its own transactions."""
    db_manager.prune_mappings(conn, (STATE_NAMESPACE,), older_than)


def exchange_code(settings, conn, code: str, now: float) -> dict:
    """Exchange an authorization code (from /oauth/callback) and store the pair."""
    answer = _token_client(settings).exchange_token({
        "client_id": settings.kommo_client_id, "client_secret": settings.kommo_client_secret,
        "grant_type": "authorization_code", "code": code,
        "redirect_uri": settings.kommo_redirect_uri})
    return store_token_answer(conn, answer, now)


def refresh_if_due(ctx) -> None:
    """Poller task: refresh the OAuth pair ahead of expiry (no-op with a long-lived token)."""
    source = TokenSource(ctx.settings, ctx.conn, ctx.now)
    if source.uses_long_lived_token:
        return
    row = db_manager.token_get(ctx.conn, PROVIDER)
    if row and row["status"] == "ok" and row["expires_at"] and \
            row["expires_at"] - ctx.now() < REFRESH_MARGIN_SECONDS * 3:
        source.refresh(stale_access_token=row["access_token"])
