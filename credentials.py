"""Kommo and Mercado Livre credentials: the `tokens` table and the one refresh routine.

Owns: the `tokens` table's SQL (`get`, `store`, `mark_disconnected`, `seed`), the `Credential`
record and its statuses, and `refresh()`: the rotation of a single-use refresh token, once for
every thread and process asking at the same time (a `locks` row, the credential re-read inside
the lock, the rotated pair persisted before anyone uses it; a refused refresh marks the account
disconnected; a refresh whose answer was lost is sent again once at most, after a wait).
`StoredTokenSource`, the part of each peer's token source that is the same for both (seed,
read, refresh, the peer's errors), and the count of 401s to a token that cannot be refreshed
(`record_refusal`: one 401 does not disconnect a long-lived token). Also `WaitsForReconnection`, mixed into each peer's
"disconnected" error so that a job waiting for the seller to reconnect goes back to the queue
without spending an attempt.
Must not: know a peer's URLs, payloads or error classes (kommo_auth and meli_auth subclass
`StoredTokenSource` with their exchange, texts and errors); hold OAuth state (each auth module
keeps its own); log or repr a token (the mappings it writes hold fingerprints only).
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import db_manager
from job_runner import JobDeferred

log = logging.getLogger("ponte.credentials")

# A disconnected account is looked at again this often by the jobs waiting for it. Each look is
# one local claim and release, no request to the peer; it bounds how long the backlog waits
# after the seller reconnects.
DISCONNECTED_RETRY_SECONDS = 300
LOCK_TTL_SECONDS = 60  # longer than a token call's timeout, so the lock outlives the call
LOCK_WAIT_SECONDS = 30
LOCK_POLL_SECONDS = 0.02
# The token endpoint's answers that mean "this refresh token will never work again".
REFUSED_STATUSES = (400, 401)
SEED_NAMESPACE = "credential-seed"
# A refresh whose answer was lost (5xx, timeout, reset) may have rotated the single-use refresh
# token. It is sent again once, and only this long after: longer than a token call's timeout,
# so the lost request can no longer be in flight at the peer (a refresh token used twice at
# once may revoke the whole grant), and long enough for a short incident to pass.
REFRESH_IN_DOUBT_WAIT_SECONDS = 300
IN_DOUBT_NAMESPACE = "credential-refresh-in-doubt"
REFUSALS_NAMESPACE = "credential-refusals"
NOT_CONNECTED = "not_connected"
DISCONNECTED = "disconnected"


class CredentialStatus:
    """Values of `tokens.status`."""

    OK = "ok"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class Credential:
    """One provider's stored token pair. `expires_at` is None when unknown (a long-lived token,
    or a pair given in the environment)."""

    provider: str
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float | None
    status: str
    detail: str
    updated_at: float

    @property
    def ok(self) -> bool:
        return self.status == CredentialStatus.OK

    def expires_within(self, seconds: float, now: float) -> bool:
        """Whether the access token is missing or expires less than `seconds` from `now`."""
        if not self.access_token:
            return True
        return self.expires_at is not None and self.expires_at - now < seconds

    def due_for_refresh(self, seconds: float, now: float) -> bool:
        """Whether the poller should refresh this pair ahead of time: connected, refreshable,
        with a known expiry less than `seconds` away."""
        return self.ok and bool(self.refresh_token) and self.expires_at is not None \
            and self.expires_within(seconds, now)


class CredentialUnavailable(Exception):
    """No request may reach the peer: the account is disconnected or was never connected.
    `detail` (pt-BR) says what the seller must do."""

    def __init__(self, provider: str, detail: str):
        self.provider = provider
        self.detail = detail
        super().__init__(f"{provider}: {detail}")


class RefreshBusy(Exception):
    """Another thread or process held the refresh lock for longer than we could wait."""


class RefreshInDoubt(Exception):
    """The last refresh's answer was lost: the same refresh token is not sent again before
    `retry_after_seconds` (nothing was sent now)."""

    def __init__(self, provider: str, retry_after_seconds: float):
        self.provider = provider
        self.retry_after_seconds = retry_after_seconds
        super().__init__(f"{provider}: token refresh answer lost, next try in "
                         f"{retry_after_seconds:.0f}s")


class WaitsForReconnection(JobDeferred):
    """Mixed into a peer's error for a disconnected account (`class KommoDisconnected(KommoError,
    WaitsForReconnection)`): code that handles peer errors sees a retryable peer error, and the
    job runner gives the job back to the queue until `available_at` without counting an attempt,
    so replies wait for the seller to reconnect instead of dying (and queueing a failure note
    that would wait for the same reconnection). The peer error's constructor reaches this one
    through `super()`; the subclass sets `available_at` after it."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.available_at = 0.0


# --- the tokens table -------------------------------------------------------------------------

def get(conn, provider: str) -> Credential | None:
    """The stored credential of `provider`, or None."""
    row = conn.execute("SELECT provider, access_token, refresh_token, expires_at, status, detail,"
                       " updated_at FROM tokens WHERE provider = ?", (provider,)).fetchone()
    return Credential(*row) if row else None


def store(conn, provider: str, access_token: str, refresh_token: str,
          expires_at: float | None, now: float) -> Credential:
    """Store a working pair (status ok) in one statement; a single-use refresh token must be
    stored before the access token that came with it is used."""
    with db_manager.transaction(conn):
        conn.execute(
            "INSERT INTO tokens (provider, access_token, refresh_token, expires_at, status, detail,"
            " updated_at) VALUES (?, ?, ?, ?, ?, '', ?) ON CONFLICT(provider) DO UPDATE SET"
            " access_token = excluded.access_token, refresh_token = excluded.refresh_token,"
            " expires_at = excluded.expires_at, status = excluded.status, detail = '',"
            " updated_at = excluded.updated_at",
            (provider, access_token, refresh_token, expires_at, CredentialStatus.OK, now))
    return Credential(provider, access_token, refresh_token, expires_at, CredentialStatus.OK, "",
                      now)


def store_answer(conn, provider: str, answer: dict, now: float,
                 default_expires_in: float) -> Credential:
    """Store a token endpoint's answer (`access_token`, `refresh_token`, `expires_in`)."""
    expires_at = now + float(answer.get("expires_in") or default_expires_in)
    credential = store(conn, provider, answer["access_token"], answer["refresh_token"],
                       expires_at, now)
    log.info("credential_stored", extra={"provider": provider, "expires_at": int(expires_at)})
    return credential


def mark_disconnected(conn, provider: str, detail: str, now: float, *,
                      refresh_token: str | None = None, access_token: str | None = None) -> bool:
    """Mark the account disconnected, only while it still holds the given refresh token and/or
    access token (a pair stored meanwhile, by an OAuth callback say, is left alone). True when
    marked."""
    sql = "UPDATE tokens SET status = ?, detail = ?, updated_at = ? WHERE provider = ?"
    args: list = [CredentialStatus.DISCONNECTED, detail, now, provider]
    if refresh_token is not None:
        sql += " AND refresh_token = ?"
        args.append(refresh_token)
    if access_token is not None:
        sql += " AND access_token = ?"
        args.append(access_token)
    with db_manager.transaction(conn):
        marked = conn.execute(sql, args).rowcount == 1
    if marked:
        log.error("credential_disconnected", extra={"provider": provider, "detail": detail})
    return marked


def seed(conn, provider: str, access_token: str, refresh_token: str, now: float, *,
         authoritative: bool, origin: str = "") -> Credential:
    """Store the pair a process was given in its environment, unless it is the one already
    seeded. `origin` (e.g. the account's base URL) counts as part of the seed.

    `authoritative` (Kommo's long-lived token): the environment's token is the credential; it
    replaces anything else stored, and a token already marked disconnected stays so until the
    environment gives another one. Otherwise (Mercado Livre's initial pair) the seed is only a
    starting point: once rotated, the same seed never overwrites the rotated pair (it was
    used), but a different one does (the operator pasted a new pair).
    """
    fingerprint = _fingerprint(provider, origin, access_token, refresh_token)
    with db_manager.transaction(conn):  # re-read under the write lock: other processes seed too
        current = get(conn, provider)
        seeded = db_manager.mapping_get(conn, SEED_NAMESPACE, provider)
        if current is None:
            replace = True
        elif authoritative:
            replace = seeded != fingerprint or current.access_token != access_token
        else:  # a row from before seeds were recorded is taken to come from this seed
            replace = seeded is not None and seeded != fingerprint
        if replace:
            # Expiry unknown: a 401 (or, without an access token, the first use) refreshes it.
            current = store(conn, provider, access_token, refresh_token,
                            None if access_token else 0.0, now)
        if seeded != fingerprint:
            db_manager.mapping_put(conn, SEED_NAMESPACE, provider, fingerprint, now=now)
    if replace:
        log.info("credential_seeded", extra={"provider": provider})
    return current


# --- the refresh ------------------------------------------------------------------------------

def refresh(conn, provider: str, stale_access_token: str, exchange: Callable[[str], dict],
            now: Callable[[], float], *, default_expires_in: float, refused_detail: str,
            no_refresh_detail: str, in_doubt_detail: str = "", margin_seconds: float = 0.0,
            lock_ttl_seconds: float = LOCK_TTL_SECONDS,
            lock_wait_seconds: float = LOCK_WAIT_SECONDS,
            in_doubt_wait_seconds: float = REFRESH_IN_DOUBT_WAIT_SECONDS,
            sleep: Callable[[float], None] = time.sleep,
            monotonic: Callable[[], float] = time.monotonic) -> Credential:
    """Replace `stale_access_token` with a working one, calling the peer's token endpoint at
    most once however many threads and processes ask at the same time.

    Under the `token-refresh:<provider>` lock the credential is read again: a pair another
    thread or process stored since `stale_access_token` was read is used as it is. Otherwise
    `exchange(refresh_token)` (the peer's token call, returning an answer with both tokens)
    runs, and the new pair is stored before it is returned. A refusal (HTTP 400/401, e.g.
    `invalid_grant`) marks the account disconnected with `refused_detail` ("{reason}" is
    replaced by the peer's error code or status); so does needing a refresh without a refresh
    token (`no_refresh_detail`).

    An exchange whose answer was lost (its error's `may_have_reached`: a 5xx, a timeout, a
    reset) may have rotated the single-use refresh token, so it is remembered: until
    `in_doubt_wait_seconds` later, every refresh with that same refresh token raises
    RefreshInDoubt without sending anything (the waiter that gets the lock next included);
    then it is sent once more. If that answer is lost too, or refused, or its process dies
    before knowing, the account is marked disconnected with `in_doubt_detail` (default
    `refused_detail`): the same refresh token is never sent a third time.

    Raises CredentialUnavailable (disconnected: nothing was sent), RefreshBusy,
    RefreshInDoubt, or the exchange's own error for a failure that may pass.
    """
    lock_name = f"token-refresh:{provider}"
    # Unique per call; pid and thread say who held it when someone reads the locks table.
    owner = f"{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"
    deadline = monotonic() + lock_wait_seconds
    while not db_manager.acquire_lock(conn, lock_name, owner, lock_ttl_seconds, now=now()):
        current = _usable(conn, provider)
        if _rotated(current, stale_access_token, margin_seconds, now()):
            return current
        if monotonic() > deadline:
            raise RefreshBusy(f"{provider} token refresh lock busy")
        sleep(LOCK_POLL_SECONDS)
    try:
        current = _usable(conn, provider)
        if _rotated(current, stale_access_token, margin_seconds, now()):
            return current
        if not current.refresh_token:
            if mark_disconnected(conn, provider, no_refresh_detail, now(),
                                 refresh_token="", access_token=current.access_token):
                raise CredentialUnavailable(provider, no_refresh_detail)
            return _usable(conn, provider)  # a new authorization arrived meanwhile
        doubt = _in_doubt(conn, provider, current.refresh_token)
        if doubt is not None and doubt.get("sending"):
            # A first send whose outcome nobody recorded: its process died during the call.
            doubt = {**doubt, "reason": "processo interrompido durante a renovação"}
        if doubt is None:
            # Recorded before the call: if this process dies during it, the next holder of the
            # lock knows the token may have been spent (and waits before its one resend).
            _record_doubt(conn, provider, current.refresh_token, "", now(), sending=True)
        else:
            if doubt.get("resent"):  # a resend whose outcome nobody recorded: its process died
                return _refused(conn, provider, current, in_doubt_detail or refused_detail,
                                f"{doubt['reason']}; depois processo interrompido", now(), None)
            wait_seconds = doubt["at"] + in_doubt_wait_seconds - now()
            if wait_seconds > 0:
                raise RefreshInDoubt(provider, wait_seconds)
            _record_doubt(conn, provider, current.refresh_token, doubt["reason"], doubt["at"],
                          resent=True)
        try:
            answer = exchange(current.refresh_token)
        except Exception as exc:
            status = getattr(exc, "status", None)
            if status in REFUSED_STATUSES:
                reason, detail = getattr(exc, "code", "") or f"HTTP {status}", refused_detail
            elif getattr(exc, "may_have_reached", False):
                reason = f"HTTP {status}" if status else "conexão interrompida ou tempo esgotado"
                detail = ""
                if doubt is None:  # the first lost answer: wait, then send it once more
                    _record_doubt(conn, provider, current.refresh_token, reason, now())
                    raise
            else:  # never reached the peer (a refused connection): the token is unspent
                if doubt is not None:
                    _record_doubt(conn, provider, current.refresh_token, doubt["reason"],
                                  doubt["at"])
                else:
                    with db_manager.transaction(conn):
                        db_manager.mapping_delete(conn, IN_DOUBT_NAMESPACE, provider)
                raise
            if doubt is not None:
                reason = f"{doubt['reason']}; depois {reason}"
                detail = in_doubt_detail or refused_detail
            return _refused(conn, provider, current, detail, reason, now(), exc)
        return store_answer(conn, provider, answer, now(), default_expires_in)
    finally:
        db_manager.release_lock(conn, lock_name, owner)


def _refused(conn, provider: str, current: Credential, detail: str, reason: str, now: float,
             cause: Exception | None) -> Credential:
    """`current`'s refresh token will not be sent again: mark the account disconnected with
    `detail` ("{reason}" replaced) and raise CredentialUnavailable, unless a new pair was
    stored meanwhile (returned)."""
    detail = detail.replace("{reason}", reason)
    if mark_disconnected(conn, provider, detail, now, refresh_token=current.refresh_token):
        raise CredentialUnavailable(provider, detail) from cause
    return _usable(conn, provider)  # a new authorization replaced it meanwhile


def _in_doubt(conn, provider: str, refresh_token: str) -> dict | None:
    """The lost refresh recorded for this very refresh token, if any."""
    doubt = db_manager.mapping_get(conn, IN_DOUBT_NAMESPACE, provider)
    if doubt and doubt.get("refresh") == _fingerprint(provider, refresh_token):
        return doubt
    return None


def _record_doubt(conn, provider: str, refresh_token: str, reason: str, lost_at: float, *,
                  resent: bool = False, sending: bool = False) -> None:
    """Remember that the answer to `refresh_token`'s exchange was lost at `lost_at`; `resent`:
    it is being sent once more, `sending`: it is being sent the first time (either way a
    process that dies meanwhile leaves it known)."""
    # Written under the refresh lock, before it is released: the next holder reads it.
    with db_manager.transaction(conn):
        db_manager.mapping_put(conn, IN_DOUBT_NAMESPACE, provider, {
            "refresh": _fingerprint(provider, refresh_token), "at": lost_at, "reason": reason,
            "resent": resent, "sending": sending}, now=lost_at)
    if not sending:
        log.warning("credential_refresh_resent" if resent else "credential_refresh_in_doubt",
                    extra={"provider": provider, "reason": reason})


def _fingerprint(*parts: str) -> str:
    """A stable digest that names a token without holding it."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _usable(conn, provider: str) -> Credential:
    current = get(conn, provider)
    if current is None or not (current.access_token or current.refresh_token):
        raise CredentialUnavailable(provider, "conta não conectada")
    if not current.ok:
        raise CredentialUnavailable(provider, current.detail or "conta desconectada")
    return current


def _rotated(current: Credential, stale_access_token: str, margin_seconds: float,
             now: float) -> bool:
    """Someone else already replaced the stale token with one that is good for a while."""
    return current.access_token != stale_access_token and \
        not current.expires_within(margin_seconds, now)


# --- a token that cannot be refreshed: 401s counted before calling it revoked ------------------

def token_refusals(conn, provider: str, access_token: str) -> dict | None:
    """The 401s counted against `access_token` since a call last accepted it: `{"count",
    "first_at", "last_at"}`, or None."""
    seen = db_manager.mapping_get(conn, REFUSALS_NAMESPACE, provider)
    if seen and seen.get("token") == _fingerprint(provider, access_token):
        return seen
    return None


def record_refusal(conn, provider: str, access_token: str, now: float, *, detail: str,
                   strikes: int, min_span_seconds: float, forget_after_seconds: float) -> bool:
    """Count one 401 to `access_token`, a token with nothing to refresh it (one 401 may be the
    peer's own incident). Once `strikes` 401s in a row span `min_span_seconds` or more, the
    account is marked disconnected with `detail` (True is returned); a 401 more than
    `forget_after_seconds` after the previous one starts a new count, and so does a call that
    was accepted (`forget_refusals`)."""
    with db_manager.transaction(conn):  # counted under the write lock: every process counts
        seen = token_refusals(conn, provider, access_token)
        if seen is None or now - seen["last_at"] > forget_after_seconds:
            seen = {"token": _fingerprint(provider, access_token), "count": 0, "first_at": now}
        seen["count"] += 1
        seen["last_at"] = now
        db_manager.mapping_put(conn, REFUSALS_NAMESPACE, provider, seen, now=now)
    log.warning("credential_refused", extra={"provider": provider, "refusals": seen["count"],
                                             "refused_since": int(seen["first_at"])})
    if seen["count"] >= strikes and now - seen["first_at"] >= min_span_seconds:
        return mark_disconnected(conn, provider, detail, now, refresh_token="",
                                 access_token=access_token)
    return False


def forget_refusals(conn, provider: str, access_token: str, now: float) -> None:
    """A call with `access_token` was accepted: the 401s counted against it were not a
    revocation."""
    with db_manager.transaction(conn):
        if token_refusals(conn, provider, access_token) is not None:
            db_manager.mapping_delete(conn, REFUSALS_NAMESPACE, provider)
            log.info("credential_refusals_forgotten", extra={"provider": provider})


# --- what each peer's token source shares -------------------------------------------------------

def checked_answer(answer, error: Callable[[str], Exception]) -> dict:
    """A token endpoint's `answer` when it holds both tokens; otherwise raises `error(detail)`,
    marked as possibly having reached the peer (it answered 2xx: it may have rotated the
    refresh token it was given)."""
    if isinstance(answer, dict) and answer.get("access_token") and answer.get("refresh_token"):
        return answer
    exc = error("token answer without both tokens")
    exc.may_have_reached = True
    raise exc


class StoredTokenSource:
    """What a peer client asks for its access token, over the tokens table. Every call reads
    the stored credential, so a disconnection seen by any process stops them all; the
    environment's credential is seeded on first use; refreshes go through `refresh()`.

    A peer's subclass sets `provider`, `refresh_margin_seconds`, `default_expires_in_seconds`
    and the pt-BR details, and implements `_seed`, `_exchange`, `_unavailable` (its
    "disconnected" error, a `WaitsForReconnection`) and `_retry_later` (its retryable error,
    nothing sent)."""

    provider = ""
    refresh_margin_seconds = 300.0
    default_expires_in_seconds = 3600.0
    not_connected_detail = ""
    refused_detail = ""
    no_refresh_detail = ""
    in_doubt_detail = ""

    def __init__(self, settings, conn, now: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.conn = conn
        self.now = now
        self.sleep = sleep
        self._seeded = False

    def credential(self) -> Credential:
        """The stored credential (seeded from the environment on first use). Raises the peer's
        disconnected error when no request may be made."""
        if not self._seeded:
            self._seed()
        self._seeded = True
        current = get(self.conn, self.provider)
        if current is None or not (current.access_token or
                                   (current.refresh_token and not self.needs_access_token)):
            raise self._unavailable(self.not_connected_detail, NOT_CONNECTED)
        if not current.ok:
            raise self._unavailable(current.detail or self.not_connected_detail, DISCONNECTED)
        return current

    def fresh_credential(self) -> Credential:
        """The stored credential, refreshed first when it expires within the margin. While a
        lost refresh is waited for (RefreshInDoubt), an access token that has not expired yet
        is still used."""
        current = self.credential()
        if not current.expires_within(self.refresh_margin_seconds, self.now()):
            return current
        try:
            return self._refresh(current.access_token)
        except RefreshInDoubt as exc:
            if current.access_token and not current.expires_within(0, self.now()):
                return current
            raise self._retry_later(str(exc), exc.retry_after_seconds) from None

    def refresh_credential(self, stale_access_token: str) -> Credential:
        """Replace `stale_access_token` (single flight across threads and processes; see
        `refresh`). A disconnected account is not refreshed: only a new authorization brings
        it back."""
        try:
            return self._refresh(stale_access_token)
        except RefreshInDoubt as exc:
            raise self._retry_later(str(exc), exc.retry_after_seconds) from None

    def _refresh(self, stale_access_token: str) -> Credential:
        self.credential()
        try:
            return refresh(self.conn, self.provider, stale_access_token, self._exchange,
                           self.now, default_expires_in=self.default_expires_in_seconds,
                           refused_detail=self.refused_detail,
                           no_refresh_detail=self.no_refresh_detail,
                           in_doubt_detail=self.in_doubt_detail,
                           margin_seconds=self.refresh_margin_seconds, sleep=self.sleep)
        except CredentialUnavailable as exc:
            raise self._unavailable(exc.detail, DISCONNECTED) from None
        except RefreshBusy:
            raise self._retry_later("token refresh lock busy", None) from None

    # Kommo: a stored refresh token without an access token is not a connection.
    needs_access_token = False

    def _seed(self) -> None:
        """Store the environment's credential (see `seed`), if the settings hold one."""

    def _exchange(self, refresh_token: str) -> dict:
        """The peer's token call for `refresh_token`; returns a `checked_answer`."""
        raise NotImplementedError

    def _unavailable(self, detail: str, code: str) -> Exception:
        """The peer's "disconnected" error (`code`: NOT_CONNECTED or DISCONNECTED)."""
        raise NotImplementedError

    def _retry_later(self, detail: str, retry_after_seconds: float | None) -> Exception:
        """The peer's retryable error for a call that was not sent."""
        raise NotImplementedError
