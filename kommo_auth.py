"""Kommo credentials: the long-lived token or the OAuth pair, through credentials' one store
and refresh.

Owns: `TokenSource` (what `KommoClient` asks for a token; over `credentials.StoredTokenSource`,
with Kommo's token call, texts and errors: it seeds KOMMO_ACCESS_TOKEN into the store, refreshes
the OAuth pair, and refuses to let any request leave while the account is disconnected; a 401
to the long-lived token disconnects only once 401s have lasted, see LONG_LIVED_401_*),
`KommoDisconnected`, `KommoTokenUnconfirmed`, the OAuth `state` (made, checked and consumed once, pruned) and the code
exchange of `/oauth/callback`.
Must not: hold routes or SQL (credentials owns the tokens table); log tokens. It is used by the
poller's jobs, the setup commands and the OAuth callback.
"""
from __future__ import annotations

import logging
import secrets
import sqlite3
import time
import urllib.parse

import credentials
import db_manager
from credentials import Credential
from kommo_api import KommoClient, KommoError

log = logging.getLogger("ponte.kommo.auth")

PROVIDER = "kommo"
REFRESH_MARGIN_SECONDS = 600  # refresh ahead of expiry so no call runs with a dying token
DEFAULT_EXPIRES_IN_SECONDS = 86400
AUTHORIZE_URL = "https://www.kommo.com/oauth"
STATE_NAMESPACE = "oauth-state"
STATE_MAX_AGE_SECONDS = 1800
DISCONNECTED_RETRY_SECONDS = credentials.DISCONNECTED_RETRY_SECONDS
NOT_CONNECTED_DETAIL = ("Kommo não autorizado: defina KOMMO_ACCESS_TOKEN (token de longa "
                        "duração) ou conecte pelo OAuth em /oauth/status.")
REFUSED_DETAIL = ("O Kommo recusou a renovação do token ({reason}). Conecte de novo pelo OAuth "
                  "em /oauth/status; até lá a ponte não chama o Kommo e as respostas esperam.")
# Kommo has answered 401 during its own incidents, so one 401 to the long-lived token (which
# nothing can refresh) is not taken for a revocation: the account is marked disconnected once
# at least LONG_LIVED_401_STRIKES 401s in a row span LONG_LIVED_401_MIN_SPAN_SECONDS, with no
# call accepted between them. Meanwhile, after each 401 no call goes to Kommo for
# LONG_LIVED_401_RECHECK_SECONDS (the jobs wait without spending attempts), and a 401 that
# comes more than LONG_LIVED_401_FORGET_SECONDS after the previous one starts a new count.
LONG_LIVED_401_STRIKES = 3
LONG_LIVED_401_MIN_SPAN_SECONDS = 600
LONG_LIVED_401_RECHECK_SECONDS = 120
LONG_LIVED_401_FORGET_SECONDS = 1800
# Answers that come before Kommo looks at the token, so they say nothing about it.
_SAYS_NOTHING_ABOUT_THE_TOKEN = (401, 429)
LONG_LIVED_REFUSED_DETAIL = (
    "O Kommo recusou o token de longa duração (401) em todas as chamadas por "
    f"{LONG_LIVED_401_MIN_SPAN_SECONDS // 60} minutos. Gere um novo token no Kommo e troque "
    "KOMMO_ACCESS_TOKEN (ou conecte pelo OAuth em /oauth/status); até lá a ponte não chama o "
    "Kommo e as respostas esperam.")
UNCONFIRMED_DETAIL = (
    "O Kommo recusou o token de longa duração (401). A ponte tenta de novo em "
    f"{LONG_LIVED_401_RECHECK_SECONDS // 60} minutos e só o dá por revogado se as recusas "
    f"durarem {LONG_LIVED_401_MIN_SPAN_SECONDS // 60} minutos; se ele foi revogado, gere outro "
    "no Kommo e troque KOMMO_ACCESS_TOKEN.")
IN_DOUBT_DETAIL = ("A renovação do token do Kommo ficou sem resposta ({reason}) e o refresh token, "
                   "que só vale uma vez, pode ter sido trocado sem que a ponte recebesse o novo. "
                   "Conecte de novo pelo OAuth em /oauth/status; até lá a ponte não chama o Kommo "
                   "e as respostas esperam.")


class KommoDisconnected(KommoError, credentials.WaitsForReconnection):
    """The Kommo account is disconnected (or never connected): nothing was sent. A job that
    meets it waits until `available_at` without spending an attempt."""

    def __init__(self, detail: str, available_at: float):
        super().__init__(401, detail, True, retry_after_seconds=DISCONNECTED_RETRY_SECONDS)
        self.available_at = available_at


class KommoTokenUnconfirmed(KommoError, credentials.WaitsForReconnection):
    """Kommo answered 401 to the long-lived token, not yet for long enough to call it revoked
    (see LONG_LIVED_401_*): nothing was sent. A job that meets it waits until `available_at`
    without spending an attempt."""

    def __init__(self, available_at: float, retry_after_seconds: float):
        super().__init__(401, UNCONFIRMED_DETAIL, True, retry_after_seconds=retry_after_seconds)
        self.available_at = available_at


class TokenSource(credentials.StoredTokenSource):
    """Gives the Kommo access token for the next call. One per client (so per thread); every
    call reads the stored credential, so a disconnection seen by any process stops them all.
    KOMMO_ACCESS_TOKEN is stored on first use (it replaces any other credential)."""

    provider = PROVIDER
    refresh_margin_seconds = REFRESH_MARGIN_SECONDS
    default_expires_in_seconds = DEFAULT_EXPIRES_IN_SECONDS
    not_connected_detail = NOT_CONNECTED_DETAIL
    refused_detail = REFUSED_DETAIL
    no_refresh_detail = LONG_LIVED_REFUSED_DETAIL
    in_doubt_detail = IN_DOUBT_DETAIL
    needs_access_token = True

    def __init__(self, settings, conn, now=time.time, sleep=time.sleep):
        super().__init__(settings, conn, now, sleep)
        self._last_access_token = ""
        self._unconfirmed_token = ""  # given out while 401s are counted against it

    @property
    def uses_long_lived_token(self) -> bool:
        return bool(self.settings.kommo_access_token)

    def access_token(self) -> str:
        """The stored token, refreshed first when the OAuth pair is near expiry. Raises
        KommoTokenUnconfirmed (nothing sent) within LONG_LIVED_401_RECHECK_SECONDS of a 401
        to the long-lived token."""
        current = self.fresh_credential()
        self._unconfirmed_token = ""
        if not current.refresh_token:
            refusals = credentials.token_refusals(self.conn, PROVIDER, current.access_token)
            if refusals is not None:
                self._hold_after_401(refusals["last_at"])
                self._unconfirmed_token = current.access_token
        self._last_access_token = current.access_token
        return current.access_token

    def refresh_after_401(self) -> bool:
        """Kommo answered 401 to the token last given: refresh the OAuth pair once (True: a new
        token is ready); a refused refresh marks the account disconnected and raises
        KommoDisconnected. A long-lived token has nothing to refresh it: the 401 is counted
        (`credentials.record_refusal`) and raises KommoTokenUnconfirmed, or KommoDisconnected
        once the 401s have lasted (see LONG_LIVED_401_*)."""
        current = self.credential()
        refused = self._last_access_token or current.access_token
        if not current.refresh_token and current.access_token == refused:
            now = self.now()
            if credentials.record_refusal(
                    self.conn, PROVIDER, refused, now, detail=LONG_LIVED_REFUSED_DETAIL,
                    strikes=LONG_LIVED_401_STRIKES,
                    min_span_seconds=LONG_LIVED_401_MIN_SPAN_SECONDS,
                    forget_after_seconds=LONG_LIVED_401_FORGET_SECONDS):
                raise self._unavailable(LONG_LIVED_REFUSED_DETAIL)
            raise KommoTokenUnconfirmed(now + LONG_LIVED_401_RECHECK_SECONDS,
                                        LONG_LIVED_401_RECHECK_SECONDS)
        self.refresh(refused)
        return True

    def observe_answer(self, response, *args, **kwargs) -> None:
        """A `requests` response hook on the client's session: Kommo answered a call made with
        a long-lived token it had answered 401 to, and did not refuse it: the 401s were not a
        revocation, forget them."""
        if self._unconfirmed_token and response.status_code < 500 and \
                response.status_code not in _SAYS_NOTHING_ABOUT_THE_TOKEN:
            try:
                credentials.forget_refusals(self.conn, PROVIDER, self._unconfirmed_token,
                                            self.now())
            except sqlite3.Error:  # the call itself succeeded; the next accepted one forgets
                log.warning("credential_refusals_not_forgotten", extra={"provider": PROVIDER})
                return
            self._unconfirmed_token = ""

    def _hold_after_401(self, refused_at: float) -> None:
        until = refused_at + LONG_LIVED_401_RECHECK_SECONDS
        if self.now() < until:
            raise KommoTokenUnconfirmed(until, until - self.now())

    def refresh(self, stale_access_token: str) -> Credential:
        """Replace `stale_access_token` (single flight across threads and processes)."""
        return self.refresh_credential(stale_access_token)

    def _seed(self) -> None:
        if self.uses_long_lived_token:
            credentials.seed(self.conn, PROVIDER, self.settings.kommo_access_token, "",
                             self.now(), authoritative=True, origin=self.settings.kommo_base_url)

    def _exchange(self, refresh_token: str) -> dict:
        return _checked(_token_client(self.settings).exchange_token({
            "client_id": self.settings.kommo_client_id,
            "client_secret": self.settings.kommo_client_secret,
            "grant_type": "refresh_token", "refresh_token": refresh_token,
            "redirect_uri": self.settings.kommo_redirect_uri}))

    def _unavailable(self, detail: str, code: str = "") -> KommoDisconnected:
        return KommoDisconnected(detail, self.now() + DISCONNECTED_RETRY_SECONDS)

    def _retry_later(self, detail: str, retry_after_seconds: float | None) -> KommoError:
        return KommoError(None, detail, retryable=True, retry_after_seconds=retry_after_seconds)


def build_client(settings, conn, now=time.time) -> KommoClient:
    """The Kommo client of a process, with tokens from the settings or the database."""
    source = TokenSource(settings, conn, now)
    client = KommoClient(settings.kommo_base_url, source, max_rps=settings.kommo_max_rps,
                         rate_limit_path=settings.database_path, clock=now,
                         max_block_seconds=settings.retry_after_max_seconds)
    client.session.hooks["response"].append(source.observe_answer)
    return client


def _token_client(settings) -> KommoClient:
    # OAuth calls count against the same limit as every other call to Kommo.
    return KommoClient(settings.kommo_base_url, token_source=None,
                       max_rps=settings.kommo_max_rps, rate_limit_path=settings.database_path,
                       max_block_seconds=settings.retry_after_max_seconds)


def _checked(answer: dict) -> dict:
    return credentials.checked_answer(answer,
                                      lambda detail: KommoError(None, detail, retryable=False))


def store_token_answer(conn, answer: dict, now: float) -> Credential:
    """Persist a token-endpoint answer (status ok: a new authorization reconnects the account)."""
    return credentials.store_answer(conn, PROVIDER, _checked(answer), now,
                                    DEFAULT_EXPIRES_IN_SECONDS)


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


def exchange_code(settings, conn, code: str, now: float) -> Credential:
    """Exchange an authorization code (from /oauth/callback) and store the pair: this is what
    reconnects a disconnected account."""
    answer = _token_client(settings).exchange_token({
        "client_id": settings.kommo_client_id, "client_secret": settings.kommo_client_secret,
        "grant_type": "authorization_code", "code": code,
        "redirect_uri": settings.kommo_redirect_uri})
    return store_token_answer(conn, answer, now)


def refresh_if_due(ctx) -> None:
    """Poller task: refresh the OAuth pair ahead of expiry (nothing to do for a long-lived
    token or a disconnected account)."""
    if ctx.settings.kommo_access_token:
        return
    current = credentials.get(ctx.conn, PROVIDER)
    if current and current.due_for_refresh(REFRESH_MARGIN_SECONDS * 3, ctx.now()):
        try:
            TokenSource(ctx.settings, ctx.conn, ctx.now).refresh(current.access_token)
        except KommoDisconnected:
            pass  # logged as credential_disconnected; /health shows it
