"""Kommo and Mercado Livre credentials: the `tokens` table and the one refresh routine.

Owns: the `tokens` table's SQL (`get`, `store`, `mark_disconnected`, `seed`), the `Credential`
record and its statuses, and `refresh()`: the rotation of a single-use refresh token, once for
every thread and process asking at the same time (a `locks` row, the credential re-read inside
the lock, the rotated pair persisted before anyone uses it; a refused refresh marks the account
disconnected). Also `WaitsForReconnection`, mixed into each peer's "disconnected" error so that
a job waiting for the seller to reconnect goes back to the queue without spending an attempt.
Must not: know a peer's URLs, payloads or error classes (kommo_auth and meli_auth pass an
`exchange` callable and turn `CredentialUnavailable` into their own error); hold OAuth state
(each auth module keeps its own); log or repr a token.
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
    fingerprint = hashlib.sha256(
        f"{provider}\n{origin}\n{access_token}\n{refresh_token}".encode()).hexdigest()[:32]
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
            no_refresh_detail: str, margin_seconds: float = 0.0,
            lock_ttl_seconds: float = LOCK_TTL_SECONDS,
            lock_wait_seconds: float = LOCK_WAIT_SECONDS,
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
    token (`no_refresh_detail`). Raises CredentialUnavailable (disconnected: nothing was sent),
    RefreshBusy, or the exchange's own error for a failure that may pass (a 5xx, a timeout).
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
        try:
            answer = exchange(current.refresh_token)
        except Exception as exc:
            if getattr(exc, "status", None) not in REFUSED_STATUSES:
                raise
            reason = getattr(exc, "code", "") or f"HTTP {exc.status}"
            detail = refused_detail.replace("{reason}", reason)
            if mark_disconnected(conn, provider, detail, now(),
                                 refresh_token=current.refresh_token):
                raise CredentialUnavailable(provider, detail) from exc
            return _usable(conn, provider)  # refused because a new pair replaced it meanwhile
        return store_answer(conn, provider, answer, now(), default_expires_in)
    finally:
        db_manager.release_lock(conn, lock_name, owner)


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
