"""Mercado Livre credentials: OAuth start/callback helpers and the single-flight refresh.

Owns: `MeliTokenSource` (what `MercadoLivreClient` asks for a token), `build_client()`,
`start_authorization()` / `complete_authorization()` for the two OAuth routes, and
`refresh_if_due()` for the poller. Mercado Livre refresh tokens are single-use ("only the last one generated works"),
so a refresh runs under a cross-process lock: lock, re-read, refresh, persist the rotated pair
atomically, then use it; `invalid_grant` re-reads once, then marks the account disconnected.
Must not: hold routes or job logic; log tokens.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
import uuid

import db_manager
from mercado_livre_api import (MercadoLivreClient, MercadoLivreError, auth_base_url,
                               authorization_url, pkce_pair)

log = logging.getLogger("ponte.meli.auth")

PROVIDER = "mercadolivre"
LOCK_NAME = "token-refresh:mercadolivre"
STATE_NAMESPACE = "ml_oauth_state"
REFRESH_MARGIN_SECONDS = 300  # refresh ahead of expiry so no call runs with a dying token
LOCK_TTL_SECONDS = 60
LOCK_WAIT_SECONDS = 30
STATE_MAX_AGE_SECONDS = 900
DISCONNECTED_RETRY_SECONDS = 600


class OAuthError(Exception):
    """The OAuth callback cannot complete; `message` is shown to the seller (pt-BR)."""

    def __init__(self, message: str, status: int = 400):
        self.message = message
        self.status = status
        super().__init__(message)


class MeliTokenSource:
    """Gives the Mercado Livre access token for the next call, refreshing it when due."""

    def __init__(self, settings, conn, now=time.time, sleep=time.sleep,
                 token_client: MercadoLivreClient | None = None):
        self.settings = settings
        self.conn = conn
        self.now = now
        self.sleep = sleep
        self.token_client = token_client or _token_client(settings)

    def _row(self) -> dict | None:
        row = db_manager.token_get(self.conn, PROVIDER)
        if row is None and (self.settings.ml_access_token or self.settings.ml_refresh_token):
            # Initial pair from the environment; expiry unknown, so a 401 triggers the refresh.
            # Checked again under the write lock: another process may have seeded and already
            # rotated the pair, and writing the environment's pair over it would break the chain.
            with db_manager.transaction(self.conn):
                if db_manager.token_get(self.conn, PROVIDER) is None:
                    db_manager.token_put(self.conn, PROVIDER, self.settings.ml_access_token or "",
                                         self.settings.ml_refresh_token or "",
                                         None if self.settings.ml_access_token else 0.0,
                                         now=self.now())
            row = db_manager.token_get(self.conn, PROVIDER)
        return row

    def access_token(self) -> str:
        """The stored access token (refreshed first when it expires within 5 minutes)."""
        row = self._row()
        if row is None or (not row["access_token"] and not row["refresh_token"]):
            raise MercadoLivreError(401, "Mercado Livre não conectado: abra "
                                    "/oauth/mercadolivre/start", True,
                                    retry_after_seconds=DISCONNECTED_RETRY_SECONDS,
                                    code="not_connected")
        if row["status"] == "disconnected":
            raise _disconnected()
        if not row["access_token"] or (row["expires_at"] is not None and
                                       row["expires_at"] - self.now() < REFRESH_MARGIN_SECONDS):
            return self.refresh(row["access_token"])
        return row["access_token"]

    def refresh(self, stale_access_token: str) -> str:
        """Refresh unless another process already did (single flight across processes);
        returns the access token to use. A disconnected account is not refreshed: only a new
        authorization (/oauth/mercadolivre/start) brings it back."""
        row = db_manager.token_get(self.conn, PROVIDER)
        if row is not None and row["status"] == "disconnected":
            raise _disconnected()
        owner = f"{os.getpid()}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not db_manager.acquire_lock(self.conn, LOCK_NAME, owner, LOCK_TTL_SECONDS,
                                          now=self.now()):
            fresh = self._fresh_other_than(stale_access_token)
            if fresh:
                return fresh
            if time.monotonic() > deadline:
                raise MercadoLivreError(None, "token refresh lock busy", True)
            self.sleep(0.02)
        try:
            fresh = self._fresh_other_than(stale_access_token)
            if fresh:
                return fresh
            row = db_manager.token_get(self.conn, PROVIDER)
            if row is not None and row["status"] == "disconnected":
                # another process gave up (invalid_grant) while this one waited for the lock
                raise _disconnected()
            if row is None or not row["refresh_token"]:
                raise MercadoLivreError(401, "sem refresh token do Mercado Livre", True,
                                        retry_after_seconds=DISCONNECTED_RETRY_SECONDS,
                                        code="not_connected")
            try:
                answer = self.token_client.refresh_token(row["refresh_token"])
            except MercadoLivreError as exc:
                if exc.code != "invalid_grant":
                    raise
                again = db_manager.token_get(self.conn, PROVIDER)
                if again and again["refresh_token"] != row["refresh_token"] \
                        and again["access_token"]:
                    return again["access_token"]  # a new pair arrived meanwhile (callback)
                db_manager.token_set_status(
                    self.conn, PROVIDER, "disconnected",
                    "refresh token recusado (invalid_grant): autorize de novo em "
                    "/oauth/mercadolivre/start", now=self.now())
                log.error("ml_token_disconnected", extra={"peer": "mercadolivre",
                                                          "reason": "invalid_grant"})
                raise MercadoLivreError(400, "Mercado Livre desconectado (invalid_grant)", True,
                                        retry_after_seconds=DISCONNECTED_RETRY_SECONDS,
                                        code="disconnected")
            return store_token_answer(self.conn, answer, self.now())["access_token"]
        finally:
            db_manager.release_lock(self.conn, LOCK_NAME, owner)

    def _fresh_other_than(self, stale: str) -> str | None:
        row = db_manager.token_get(self.conn, PROVIDER)
        if row and row["status"] == "ok" and row["access_token"] and \
                row["access_token"] != stale and (row["expires_at"] is None or
                                                  row["expires_at"] - self.now()
                                                  >= REFRESH_MARGIN_SECONDS):
            return row["access_token"]
        return None


def _disconnected() -> MercadoLivreError:
    return MercadoLivreError(401, "Mercado Livre desconectado: autorize de novo em "
                             "/oauth/mercadolivre/start", True,
                             retry_after_seconds=DISCONNECTED_RETRY_SECONDS, code="disconnected")


def refresh_if_due(ctx) -> None:
    """Poller task: refresh the pair ahead of expiry, off the request path."""
    row = db_manager.token_get(ctx.conn, PROVIDER)
    if row and row["status"] == "ok" and row["refresh_token"] and row["expires_at"] is not None \
            and row["expires_at"] - ctx.now() < REFRESH_MARGIN_SECONDS * 3:
        ctx.clients.meli.token_source.refresh(row["access_token"])


def _token_client(settings) -> MercadoLivreClient:
    return MercadoLivreClient(settings.ml_api_base_url, client_id=settings.ml_client_id,
                              client_secret=settings.ml_client_secret,
                              seller_id=settings.ml_seller_id, site_id=settings.ml_site_id)


def build_client(settings, conn, now=time.time) -> MercadoLivreClient:
    """The Mercado Livre client of a process, with tokens from the database."""
    return MercadoLivreClient(settings.ml_api_base_url, client_id=settings.ml_client_id,
                              client_secret=settings.ml_client_secret,
                              seller_id=settings.ml_seller_id, site_id=settings.ml_site_id,
                              token_source=MeliTokenSource(settings, conn, now))


def store_token_answer(conn, answer: dict, now: float) -> dict:
    """Persist a token answer atomically (before anyone uses it); returns the stored row."""
    if not answer.get("access_token") or not answer.get("refresh_token"):
        raise MercadoLivreError(None, "token answer without both tokens", True)
    expires_at = now + float(answer.get("expires_in") or 21600)
    db_manager.token_put(conn, PROVIDER, answer["access_token"], answer["refresh_token"],
                         expires_at, status="ok", now=now)
    log.info("ml_token_stored", extra={"peer": "mercadolivre", "expires_at": int(expires_at),
                                       "ml_user_id": answer.get("user_id")})
    return db_manager.token_get(conn, PROVIDER)


def redirect_uri(settings) -> str:
    """ML_REDIRECT_URI, or PUBLIC_BASE_URL + the callback path."""
    return settings.ml_redirect_uri or \
        f"{settings.public_base_url}/oauth/mercadolivre/callback"


def prune_states(conn, older_than: float) -> None:
    """Delete the OAuth states written before `older_than` (each is good for 15 minutes);
    takes its own transactions."""
    db_manager.prune_mappings(conn, (STATE_NAMESPACE,), older_than)


def start_authorization(settings, conn, now: float) -> str:
    """Remember a fresh `state` (and PKCE verifier) and return the consent page URL."""
    state = secrets.token_urlsafe(24)
    verifier, challenge = pkce_pair() if settings.ml_use_pkce else ("", "")
    with db_manager.transaction(conn):
        db_manager.mapping_put(conn, STATE_NAMESPACE, state,
                               {"verifier": verifier, "created_at": now, "used": False}, now=now)
    return authorization_url(auth_base_url(settings.ml_site_id, settings.ml_auth_base_url),
                             settings.ml_client_id, redirect_uri(settings), state, challenge)


def complete_authorization(settings, conn, code: str, state: str, now: float,
                           client: MercadoLivreClient | None = None) -> dict:
    """Check `state`, exchange `code` and store the pair. Raises OAuthError (pt-BR message)."""
    if not code or not state:
        raise OAuthError("Faltam os parâmetros code e state na volta do Mercado Livre.")
    with db_manager.transaction(conn):
        saved = db_manager.mapping_get(conn, STATE_NAMESPACE, state)
        if not saved or saved.get("used") or now - saved["created_at"] > STATE_MAX_AGE_SECONDS:
            raise OAuthError("Link de autorização inválido ou expirado. Abra "
                             "/oauth/mercadolivre/start de novo.")
        db_manager.mapping_put(conn, STATE_NAMESPACE, state, {**saved, "used": True}, now=now)
    client = client or _token_client(settings)
    try:
        answer = client.exchange_code(code, redirect_uri(settings), saved.get("verifier", ""))
    except MercadoLivreError as exc:
        log.warning("ml_oauth_exchange_failed", extra={"peer": "mercadolivre",
                                                       "status": exc.status, "code": exc.code})
        raise OAuthError("O Mercado Livre recusou o código de autorização "
                         f"({exc.code or exc.status}). Tente de novo.", 502)
    seller = str(settings.ml_seller_id or "")
    if seller and str(answer.get("user_id") or "") not in ("", seller):
        raise OAuthError(f"Você autorizou a conta {answer.get('user_id')}, mas ML_SELLER_ID é "
                         f"{seller}. Entre no Mercado Livre com a conta do vendedor.", 409)
    return store_token_answer(conn, answer, now)
