"""Mercado Livre credentials: OAuth start/callback helpers, and the token source over
credentials' one store and refresh.

Owns: `MeliTokenSource` (what `MercadoLivreClient` asks for a token; over
`credentials.StoredTokenSource`, with Mercado Livre's token call, texts and errors: it seeds the
environment's pair into the store, refreshes it, and lets no request leave while the account is
disconnected), `MeliDisconnected`, `build_client()`, `start_authorization()` /
`complete_authorization()` for the two OAuth routes (state in `ml_oauth_state`, PKCE), and
`refresh_if_due()` for the poller. Mercado Livre refresh tokens are single-use ("only the last
one generated works"); `credentials.refresh` rotates them once for all threads and processes.
Must not: hold routes, job logic or SQL (credentials owns the tokens table); log tokens.
"""
from __future__ import annotations

import logging
import secrets
import time

import credentials
import db_manager
from credentials import Credential
from mercado_livre_api import (MercadoLivreClient, MercadoLivreError, auth_base_url,
                               authorization_url, pkce_pair)

log = logging.getLogger("ponte.meli.auth")

PROVIDER = "mercadolivre"
STATE_NAMESPACE = "ml_oauth_state"
REFRESH_MARGIN_SECONDS = 300  # refresh ahead of expiry so no call runs with a dying token
DEFAULT_EXPIRES_IN_SECONDS = 21600
STATE_MAX_AGE_SECONDS = 900
DISCONNECTED_RETRY_SECONDS = credentials.DISCONNECTED_RETRY_SECONDS
NOT_CONNECTED_DETAIL = "Mercado Livre não conectado: abra /oauth/mercadolivre/start"
REFUSED_DETAIL = ("O Mercado Livre recusou o refresh token ({reason}): autorize de novo em "
                  "/oauth/mercadolivre/start; até lá a ponte não chama o Mercado Livre.")
NO_REFRESH_DETAIL = ("O Mercado Livre recusou o token (401) e não há refresh token: autorize "
                     "de novo em /oauth/mercadolivre/start; até lá a ponte não chama o Mercado "
                     "Livre.")
IN_DOUBT_DETAIL = ("A renovação do token do Mercado Livre ficou sem resposta ({reason}) e o "
                   "refresh token, que só vale uma vez, pode ter sido trocado sem que a ponte "
                   "recebesse o novo: autorize de novo em /oauth/mercadolivre/start; até lá a "
                   "ponte não chama o Mercado Livre.")


class OAuthError(Exception):
    """The OAuth callback cannot complete; `message` is shown to the seller (pt-BR)."""

    def __init__(self, message: str, status: int = 400):
        self.message = message
        self.status = status
        super().__init__(message)


class MeliDisconnected(MercadoLivreError, credentials.WaitsForReconnection):
    """The Mercado Livre account is disconnected (`code` "disconnected") or was never connected
    ("not_connected"): nothing was sent. A job that meets it waits until `available_at` without
    spending an attempt."""

    def __init__(self, detail: str, available_at: float, code: str = "disconnected"):
        super().__init__(401, detail, True, retry_after_seconds=DISCONNECTED_RETRY_SECONDS,
                         code=code)
        self.available_at = available_at


class MeliTokenSource(credentials.StoredTokenSource):
    """Gives the Mercado Livre access token for the next call, refreshing it when due. Every
    call reads the stored credential, so a disconnection seen by any process stops them all;
    the environment's pair is stored on first use (see `credentials.seed`)."""

    provider = PROVIDER
    refresh_margin_seconds = REFRESH_MARGIN_SECONDS
    default_expires_in_seconds = DEFAULT_EXPIRES_IN_SECONDS
    not_connected_detail = NOT_CONNECTED_DETAIL
    refused_detail = REFUSED_DETAIL
    no_refresh_detail = NO_REFRESH_DETAIL
    in_doubt_detail = IN_DOUBT_DETAIL

    def __init__(self, settings, conn, now=time.time, sleep=time.sleep,
                 token_client: MercadoLivreClient | None = None):
        super().__init__(settings, conn, now, sleep)
        self.token_client = token_client or _token_client(settings)

    def access_token(self) -> str:
        """The stored access token (refreshed first when it expires within 5 minutes)."""
        return self.fresh_credential().access_token

    def refresh(self, stale_access_token: str) -> str:
        """Replace `stale_access_token` (single flight across threads and processes); returns
        the access token to use. A disconnected account is not refreshed: only a new
        authorization (/oauth/mercadolivre/start) brings it back."""
        return self.refresh_credential(stale_access_token).access_token

    def _seed(self) -> None:
        s = self.settings
        if s.ml_access_token or s.ml_refresh_token:
            credentials.seed(self.conn, PROVIDER, s.ml_access_token or "",
                             s.ml_refresh_token or "", self.now(), authoritative=False)

    def _exchange(self, refresh_token: str) -> dict:
        return _checked(self.token_client.refresh_token(refresh_token))

    def _unavailable(self, detail: str, code: str = credentials.DISCONNECTED) -> MeliDisconnected:
        return MeliDisconnected(detail, self.now() + DISCONNECTED_RETRY_SECONDS, code)

    def _retry_later(self, detail: str, retry_after_seconds: float | None) -> MercadoLivreError:
        return MercadoLivreError(None, detail, True, retry_after_seconds=retry_after_seconds)


def refresh_if_due(ctx) -> None:
    """Poller task: refresh the pair ahead of expiry, off the request path."""
    current = credentials.get(ctx.conn, PROVIDER)
    if current and current.due_for_refresh(REFRESH_MARGIN_SECONDS * 3, ctx.now()):
        ctx.clients.meli.token_source.refresh(current.access_token)


def _token_client(settings) -> MercadoLivreClient:
    client = MercadoLivreClient(settings.ml_api_base_url, client_id=settings.ml_client_id,
                                client_secret=settings.ml_client_secret,
                                seller_id=settings.ml_seller_id, site_id=settings.ml_site_id,
                                rate_limit_path=settings.database_path,
                                max_block_seconds=settings.retry_after_max_seconds)
    return client


def build_client(settings, conn, now=time.time) -> MercadoLivreClient:
    """The Mercado Livre client of a process, with tokens from the database; a 429 blocks its
    pools for RETRY_AFTER_MAX_SECONDS at most."""
    client = MercadoLivreClient(settings.ml_api_base_url, client_id=settings.ml_client_id,
                                client_secret=settings.ml_client_secret,
                                seller_id=settings.ml_seller_id, site_id=settings.ml_site_id,
                                token_source=MeliTokenSource(settings, conn, now),
                                rate_limit_path=settings.database_path, clock=now,
                                max_block_seconds=settings.retry_after_max_seconds)
    return client


def _checked(answer: dict) -> dict:
    return credentials.checked_answer(answer, lambda detail: MercadoLivreError(None, detail, True))


def store_token_answer(conn, answer: dict, now: float) -> Credential:
    """Persist a token answer atomically (before anyone uses it; status ok, so a new
    authorization reconnects the account)."""
    stored = credentials.store_answer(conn, PROVIDER, _checked(answer), now,
                                      DEFAULT_EXPIRES_IN_SECONDS)
    log.info("ml_token_stored", extra={"peer": "mercadolivre", "ml_user_id": answer.get("user_id")})
    return stored


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
                           client: MercadoLivreClient | None = None) -> Credential:
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
