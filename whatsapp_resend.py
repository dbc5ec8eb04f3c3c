"""Bridge A's answer to "did the earlier attempt already reach Kommo?" for writes that would
show twice if repeated: a message in the customer's chat, a Salesbot run, a note on the lead.

The crash window: between the moment a Kommo call leaves ponte and the moment its job is
marked done, a dead poller (or a timeout, or a 5xx) leaves the job to run again, and Kommo
may already have acted. Before each such write a marker row is committed ("an attempt of this
job started a Kommo call at T"); a later attempt that finds the marker still "started" reads
Kommo back (the talk's messages, the lead's notes) and completes without writing when the same
text is there since T. A first attempt never reads back (Kommo allows 7 requests a second for
the whole service).

Owns: the marker (mappings namespace `SEND_MARKERS`, pruned with bridge A's short-lived
mappings), `unsure_since`, `kommo_write`, `check_talk`, `check_notes`, `find_written`.
Must not: send anything (whatsapp_jobs does) or hold SQL beyond db_manager's mappings.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import db_manager
from outbox import Job
from peer_http import PeerError

if TYPE_CHECKING:
    from kommo_api import KommoWritten

log = logging.getLogger("ponte.whatsapp")

SEND_MARKERS = "kommo-send-started"
STARTED = "started"          # a Kommo call left (or was about to leave); outcome unknown
NOT_REACHED = "not_reached"  # the call failed before reaching Kommo (refused, 429, 4xx...)
# Kommo's clock and ours may differ; a message stamped a little before our start is still ours.
CLOCK_SKEW_SECONDS = 120
# Who writes what ponte sends into a talk: Kommo lists API and Salesbot sends as "bot".
OUR_AUTHOR_TYPES = frozenset({"bot", "integration"})


def unsure_since(conn, job: Job) -> float | None:
    """When an earlier attempt of `job` started a Kommo write whose outcome is unknown (its
    worker died during the call, or the call failed in a way that may have reached Kommo): the
    start of the first such attempt. None on a first attempt, without reading anything."""
    if job.attempt <= 1:
        return None
    marker = db_manager.mapping_get(conn, SEND_MARKERS, job.dedupe_key)
    if not marker or marker.get("state") != STARTED:
        return None
    return float(marker["first_started_at"])


@contextmanager
def kommo_write(conn, job: Job, now: float):
    """Around one Kommo write that must not happen twice: the marker is committed before the
    call; a failure that surely did not reach Kommo is recorded as such, so the retry writes
    again without a read-back."""
    # A first attempt has no marker yet (unsure_since assumes the same).
    previous = (db_manager.mapping_get(conn, SEND_MARKERS, job.dedupe_key) or {}) \
        if job.attempt > 1 else {}
    first = previous["first_started_at"] if previous.get("state") == STARTED else now
    with db_manager.transaction(conn):
        db_manager.mapping_put(conn, SEND_MARKERS, job.dedupe_key,
                               {"state": STARTED, "first_started_at": first,
                                "attempt": job.attempt}, now=now)
    try:
        yield
    except PeerError as exc:
        if not exc.may_have_reached and previous.get("state") != STARTED:
            with db_manager.transaction(conn):
                db_manager.mapping_put(conn, SEND_MARKERS, job.dedupe_key,
                                       {"state": NOT_REACHED, "attempt": job.attempt}, now=now)
        raise


@dataclass(frozen=True)
class ReadBack:
    """What a read-back found: `found` the matching item, or None; `available` False when
    Kommo would not tell (403 without the chat-history scope, 404, an error), with `reason`."""

    found: KommoWritten | None
    available: bool
    reason: str = ""


def _normal(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.replace("\r\n", "\n").strip().split("\n"))


def find_written(items: list[KommoWritten], text: str, since_at: float,
                 author_types: frozenset[str] | None = None,
                 accounted_for=lambda item_id: False) -> KommoWritten | None:
    """The first item with the same text (ignoring trailing blanks), written by one of
    `author_types` (None: anyone), not incoming, not stamped before `since_at` (minus the
    clock skew; an item without a stamp passes), and not `accounted_for(item_id)` — an item
    another job already recorded as its own send (a short "Certo!" of an earlier answer)."""
    want = _normal(text)
    for item in items:
        if item.direction == "incoming" or (item.item_id and accounted_for(item.item_id)):
            continue
        if author_types is not None and item.author_type not in author_types:
            continue
        if item.created_at and item.created_at < since_at - CLOCK_SKEW_SECONDS:
            continue
        if _normal(item.text) == want:
            return item
    return None


def _read(fetch, text: str, since_at: float, author_types,
          accounted_for=lambda item_id: False) -> ReadBack:
    try:
        items = fetch(since_at - CLOCK_SKEW_SECONDS)
    except PeerError as exc:
        if exc.retryable:
            # Kommo busy, down or our rate limit full (a restart re-runs many replies at once):
            # it may tell us later, so the job waits and asks again rather than resend blind.
            raise
        return ReadBack(None, False, f"{exc.status or 'no-status'}: {exc.detail[:120]}")
    return ReadBack(find_written(items, text, since_at, author_types, accounted_for), True)


def check_talk(kommo, talk_id: str | None, text: str, since_at: float,
               accounted_for=lambda item_id: False) -> ReadBack:
    """Is `text` already in the talk, sent by ponte (author "bot") since `since_at`, and not a
    message `accounted_for` by another reply? A retryable failure to read is raised (the job
    retries); a refusal (403 without the chat-history scope, 404) is "not available"."""
    if not talk_id:
        return ReadBack(None, False, "no talk_id to read")
    return _read(lambda since: kommo.talk_messages(talk_id, since), text, since_at,
                 OUR_AUTHOR_TYPES, accounted_for)


def check_notes(kommo, lead_id: str, text: str, since_at: float) -> ReadBack:
    """Is `text` already a note of the lead since `since_at`?"""
    return _read(lambda since: kommo.lead_notes(lead_id, since), text, since_at, None)


def already_written(conn, job: Job, what: str, check, **ids) -> KommoWritten | None:
    """On a retry whose earlier attempt may have reached Kommo: what `check(since_at)` (a
    `check_talk` or `check_notes`) found already written, or None (then write; the outcome is
    logged as `<what>_...` with `ids`). Reads nothing on a first attempt."""
    since = unsure_since(conn, job)
    if since is None:
        return None
    readback = check(since)
    log_outcome(what, job, since, readback, **ids)
    return readback.found


def log_outcome(what: str, job: Job, since_at: float, readback: ReadBack, **ids) -> None:
    """One log line per read-back: skipped (found), verified absent, or unverified."""
    extra = {"dedupe_key": job.dedupe_key, "attempt": job.attempt,
             "first_started_at": since_at, **ids}
    if readback.found is not None:
        log.info(f"{what}_already_delivered", extra={**extra,
                                                      "kommo_item_id": readback.found.item_id})
    elif not readback.available:
        log.warning(f"{what}_resend_unverified", extra={**extra, "reason": readback.reason})
    else:
        log.info(f"{what}_resend_verified_absent", extra=extra)
