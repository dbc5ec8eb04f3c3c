"""The HTTP behaviour every peer client shares: one session, a timeout on every call, rate
limits that hold for the whole service, and every failure mapped to one
`PeerError(status, detail, retryable)`.

Owns: `PeerClient`, `PeerError`, `SharedRateLimiter` (a sliding window kept in a small file
beside the database, under `fcntl.flock`, so every thread and process calling a peer shares it;
a 429 blocks the peer's pool until its Retry-After), `parse_retry_after`, `rate_limit_stats`.
Must not: know any peer's URLs or payloads (those live in the peer modules), import flask or
db_manager, or use the SQLite write lock (webhook acks wait on it). Business retries belong to
the job outbox; here we only retry a refused connection once, because that never reached the peer.
"""
from __future__ import annotations

import contextlib
import datetime
import email.utils
import fcntl
import glob
import itertools
import json
import logging
import math
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import ponte_metrics

if TYPE_CHECKING:
    import requests

log = logging.getLogger("ponte.peer")

RETRYABLE_STATUSES = {408, 409, 423, 425, 429, 500, 502, 503, 504}
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def _requests():
    """`requests`, imported on first use: with urllib3 and charset_normalizer it is 4 MB per
    process, and the web workers import this module (the peers' webhook parsers and error
    types) without calling a peer on the paths they serve all day."""
    import requests
    return requests


def new_session() -> requests.Session:
    """A session for one peer client. With `trust_env`, requests reads the proxy settings,
    ~/.netrc and the CA bundle from the environment on every call: 0.7 of the 2.2 ms of CPU a
    call to a local peer cost (measured), the largest single cost of an outbox job. A running
    ponte's environment does not change, so it is read once, here: the CA bundle requests would
    use (REQUESTS_CA_BUNDLE, then CURL_CA_BUNDLE) is set on the session, and only a proxy
    setting keeps requests reading the environment per call (its no_proxy rules with it).
    ~/.netrc is never wanted: every peer call carries its own credentials."""
    requests = _requests()
    session = requests.Session()
    session.trust_env = any(os.environ.get(name) or os.environ.get(name.upper())
                            for name in _PROXY_VARIABLES)
    ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if ca_bundle:
        session.verify = ca_bundle
    return session


class PeerError(Exception):
    """A failed call to a peer. `retryable` tells the outbox whether trying later can help;
    `may_have_reached` is True when the request left ponte and its outcome is unknown (a read
    timeout, a reset connection, a 5xx): the peer may have acted on it."""

    peer = "peer"

    def __init__(self, status: int | None, detail: str, retryable: bool,
                 retry_after_seconds: float | None = None, body: Any = None):
        self.status = status
        self.detail = detail
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds
        self.body = body
        self.may_have_reached = False
        super().__init__(f"{self.peer} {status or 'no-status'}: {detail}")


class PeerClient:
    """Base of the four peer clients. Subclasses set `peer`, `error_class` and call `_request`."""

    peer = "peer"
    error_class: type[PeerError] = PeerError

    def __init__(self, base_url: str, timeout_seconds: float = 15.0, max_rps: float = 0.0,
                 session: requests.Session | None = None, *, rate_limit_path: str = "",
                 clock: Callable[[], float] = time.time,
                 max_block_seconds: float | None = None):
        """`max_rps` calls per second at most (0: no limit), shared by every client built with
        the same `rate_limit_path` (the database path) in any thread or process; without it,
        the limit is this client's only. `clock` is the jobs' clock: a 429's Retry-After is
        measured on it (the outbox retries on it too); the window always counts real time.
        `max_block_seconds` (default `MAX_BLOCK_SECONDS`; RETRY_AFTER_MAX_SECONDS where a client
        is built from the settings; a public attribute) caps how long a 429 blocks its pools."""
        self.base_url = (base_url or "").rstrip("/")
        self.timeout_seconds = timeout_seconds
        self.session = session or new_session()
        self.session.headers.setdefault("User-Agent", "ponte/0.1 (+https://github.com/ponte)")
        self.limiter = shared_limiter(rate_limit_path, self.peer, *calls_per_window(max_rps),
                                      block_clock=clock)
        self.max_block_seconds = MAX_BLOCK_SECONDS if max_block_seconds is None \
            else max_block_seconds

    def _limiter_for(self, method: str, path: str) -> "SharedRateLimiter":
        """The rate-limit pool a call counts against; subclasses split a peer into pools."""
        return self.limiter

    def _auth_headers(self) -> dict[str, str]:
        """Headers that authenticate a call; subclasses override."""
        return {}

    def _url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else self.base_url + path

    def _request(self, method: str, path: str, *, expect_json: bool = True,
                 timeout_seconds: float | None = None, auth: bool = True, **kwargs) -> Any:
        """One call to the peer. Returns the decoded JSON (or the `Response` when
        `expect_json=False`); raises `error_class` for any failure, never `requests` errors."""
        headers = dict(kwargs.pop("headers", None) or {})
        if auth:
            try:
                headers.update(self._auth_headers())
            except PeerError as exc:  # a token call (a refresh, say) failed: nothing left yet
                exc.may_have_reached = False
                raise
        url = self._url(path)
        timeout = timeout_seconds or self.timeout_seconds
        limiter = self._limiter_for(method, path)
        requests = _requests()
        for attempt in (1, 2):
            try:
                # The slot is held until the answer is back: the peer counts the call somewhere
                # in between.
                with limiter.slot(hold_seconds=timeout + 1) as waited_seconds:
                    started = time.monotonic()
                    response = self.session.request(method, url, headers=headers,
                                                    timeout=timeout, **kwargs)
                break
            except RateLimitWait as exc:
                err = self.error_class(None, f"rate limit of {exc.pool}: next slot in "
                                       f"{exc.wait_seconds:.1f}s", True,
                                       retry_after_seconds=math.ceil(exc.wait_seconds))
                raise err from None  # nothing was sent
            except requests.exceptions.ConnectionError as exc:
                # A refused connection never reached the peer: one immediate retry is safe.
                refused = "refused" in str(exc).lower()
                if attempt == 1 and refused:
                    continue
                err = self.error_class(None, f"connection error: {type(exc).__name__}", True)
                ponte_metrics.observe_peer_failure(self.peer, "connection")
                err.may_have_reached = not (refused or
                                            isinstance(exc, requests.exceptions.ConnectTimeout))
                raise err
            except requests.exceptions.Timeout:
                err = self.error_class(None, f"timeout after {timeout}s", True)
                ponte_metrics.observe_peer_failure(self.peer, "timeout")
                err.may_have_reached = True
                raise err
            except requests.exceptions.RequestException as exc:
                err = self.error_class(None, f"request error: {type(exc).__name__}", True)
                ponte_metrics.observe_peer_failure(self.peer, "request")
                err.may_have_reached = True
                raise err
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        ponte_metrics.observe_peer_call(self.peer, elapsed_ms / 1000, response.status_code)
        log.debug("peer_call", extra={"peer": self.peer, "method": method, "path": _path_only(path),
                                      "status": response.status_code, "elapsed_ms": elapsed_ms,
                                      "waited_seconds": round(waited_seconds, 3)})
        if response.status_code >= 400:
            err = self._error_from_response(response)
            err.may_have_reached = response.status_code >= 500
            if response.status_code == 429:
                self._rate_limited(limiter, err, method, path)
            raise err
        if not expect_json:
            return response
        if not response.content or not response.content.strip():
            return None
        try:
            return response.json()
        except ValueError:
            return response.text

    def _error_from_response(self, response: requests.Response) -> PeerError:
        """Map an HTTP error answer to `error_class`; subclasses refine `retryable`."""
        try:
            body = response.json()
        except ValueError:
            body = response.text[:500]
        detail = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)[:500]
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return self.error_class(response.status_code, detail,
                                response.status_code in RETRYABLE_STATUSES,
                                retry_after_seconds=retry_after, body=body)

    def _rate_limited(self, limiter: "SharedRateLimiter", err: PeerError, method: str,
                      path: str) -> None:
        """A 429: every caller of the pool waits until its Retry-After; counted and logged."""
        if err.retry_after_seconds is not None:
            err.retry_after_seconds = min(err.retry_after_seconds, self.max_block_seconds)
        blocked_until = limiter.block(err.retry_after_seconds, self.max_block_seconds)
        log.warning("peer_rate_limited", extra={
            "peer": self.peer, "pool": limiter.pool, "method": method, "path": _path_only(path),
            "retry_after_seconds": err.retry_after_seconds, "blocked_until": round(blocked_until, 3)})


# --- rate limits shared by every thread and process -------------------------------------------

# The peer may time the window on a clock that runs a little faster than ours (NTP slews by up to
# 0.05 %) and floats round; 2 % of the window covers both. Network latency needs no margin: a
# slot is held until the answer arrives (see SharedRateLimiter).
WINDOW_MARGIN_FRACTION = 0.02
# A job waits this long at most for a slot, then goes back to the outbox with retry_after: a
# thread sleeping for minutes would hold a pool slot and outlive its job's lease.
MAX_WAIT_SECONDS = 10.0
# A peer asking for more (or a junk Retry-After) is not trusted beyond this.
MAX_BLOCK_SECONDS = 900.0
# A 429 without a usable Retry-After still pauses the peer this long (Kommo: "wait >= 1 s").
DEFAULT_BLOCK_SECONDS = 1.0
# How often a waiter looks again when the slot it waits for is still in flight.
IN_FLIGHT_POLL_SECONDS = 0.05
RATE_FILE_SUFFIX = ".rate-"
_POOL_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,40}\Z")
_DELAY_SECONDS = re.compile(r"[0-9]{1,10}\Z")  # ASCII only: str.isdigit() accepts "²"


class RateLimitWait(Exception):
    """The next free slot is more than `max_wait_seconds` away; nothing was sent."""

    def __init__(self, pool: str, wait_seconds: float):
        self.pool = pool
        self.wait_seconds = wait_seconds
        super().__init__(f"rate limit {pool}: next slot in {wait_seconds:.1f}s")


def calls_per_window(rate_per_second: float) -> tuple[int, float]:
    """A rate as (max_calls, window_seconds): 7 → (7, 1.0); 5.5 → (5, 1.0); 0.5 → (1, 2.0);
    0 or less → (0, 1.0), no limit."""
    if not rate_per_second or rate_per_second <= 0:
        return 0, 1.0
    if rate_per_second < 1:
        return 1, 1.0 / rate_per_second
    return int(rate_per_second), 1.0


def parse_retry_after(value: Any, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (ASCII digits or an HTTP date) or a JSON
    `retry_after` number; None for anything else (junk never raises)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) and value >= 0 else None
    text = str(value).strip()
    if _DELAY_SECONDS.match(text):
        return float(int(text))
    if not text or not text.isascii():
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def rate_limit_path(database_path: str, pool: str) -> str:
    """The shared state file of one pool: beside the database, named after it
    (`/data/ponte.db` → `/data/ponte.db.rate-kommo.json`)."""
    return f"{database_path}{RATE_FILE_SUFFIX}{pool}.json"


def rate_limit_stats(database_path: str) -> dict[str, dict]:
    """{pool: {"429": answers, "waited_seconds": total, "calls": n, "blocked_until": epoch}}
    for every pool of this database, read from the shared files (any process may call it)."""
    out = {}
    prefix = f"{database_path}{RATE_FILE_SUFFIX}"
    for path in sorted(glob.glob(glob.escape(prefix) + "*.json")):
        pool = path[len(prefix):-len(".json")]
        try:
            with _FileState(path).locked(exclusive=False) as state:
                out[pool] = _stats(state)
        except OSError:
            continue
    return out


def _stats(state: dict) -> dict:
    return {"429": int(state.get("rate_limited", 0)),
            "waited_seconds": round(float(state.get("waited_seconds", 0.0)), 3),
            "calls": int(state.get("calls", 0)),
            "blocked_until": float(state.get("blocked_until", 0.0))}


def _empty_state() -> dict:
    return {"slots": [], "blocked_until": 0.0, "rate_limited": 0, "waited_seconds": 0.0,
            "calls": 0}


class _FileState:
    """The state of one pool in a small JSON file, changed under `fcntl.flock` (each use opens
    its own descriptor, so the lock also separates threads of one process)."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def locked(self, exclusive: bool = True):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            raw = b""
            while chunk := os.pread(fd, 65536, len(raw)):
                raw += chunk
            try:
                state = {**_empty_state(), **json.loads(raw)} if raw.strip() else _empty_state()
            except ValueError:  # a write cut short by a crash: forget one window, go on
                state = _empty_state()
            yield state
            if exclusive:
                data = json.dumps(state, separators=(",", ":")).encode()
                # Padded to the old length first, so the file is valid JSON at every moment.
                os.pwrite(fd, data.ljust(len(raw)), 0)
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)  # releases the lock


class _MemoryState:
    """The same state for one process only (no usable path): a dict under a thread lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state = _empty_state()

    @contextlib.contextmanager
    def locked(self, exclusive: bool = True):
        with self.lock:
            yield self.state


_FALLBACK_STATES: dict[str, _MemoryState] = {}
_FALLBACK_LOCK = threading.Lock()


def _fallback_state(key: str) -> _MemoryState:
    with _FALLBACK_LOCK:
        return _FALLBACK_STATES.setdefault(key, _MemoryState())


class SharedRateLimiter:
    """At most `max_calls` calls to a peer in any `window_seconds`, counted across every thread
    and process that uses the same `path` (`max_calls <= 0`: no limit, but a 429's block still
    holds). `path=None` keeps the state in this object only. `clock` times the window;
    `block_clock` (default: `clock`) times a 429's block, so that a test moving the jobs' clock
    past a Retry-After also ends the block.

    Each call holds a slot from before it is sent until its answer is back (`slot()`); a new call
    waits until fewer than `max_calls` slots ended within the last window (+ margin). The peer
    counts a call when it arrives, which is between those two moments, so no window the peer
    looks at can hold more than `max_calls` calls, whatever the latency. A slot whose process
    died ends on its own `hold_seconds` after it started.
    """

    def __init__(self, path: str | None, max_calls: int, window_seconds: float, *,
                 pool: str = "peer", margin_seconds: float | None = None,
                 max_wait_seconds: float = MAX_WAIT_SECONDS,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 block_clock: Callable[[], float] | None = None):
        self.path = path
        self.pool = pool
        self.max_calls = int(max_calls)
        self.window_seconds = float(window_seconds)
        self.margin_seconds = (self.window_seconds * WINDOW_MARGIN_FRACTION
                               if margin_seconds is None else margin_seconds)
        self.max_wait_seconds = max_wait_seconds
        self.clock, self.sleep = clock, sleep
        self.block_clock = block_clock or clock
        self.state: _FileState | _MemoryState = _MemoryState()
        if path:
            self.state = _FileState(path)
            try:
                os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            except OSError as exc:
                self._fall_back(exc)

    def _fall_back(self, exc: OSError) -> None:
        log.warning("rate_limit_state_unusable", extra={"pool": self.pool, "path": self.path,
                                                        "error": type(exc).__name__})
        self.state = _fallback_state(self.path or self.pool)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool = True):
        stack = contextlib.ExitStack()
        try:
            state = stack.enter_context(self.state.locked(exclusive))
        except OSError as exc:  # the folder went away or became read-only since
            self._fall_back(exc)
            state = stack.enter_context(self.state.locked(exclusive))
        with stack:
            yield state

    def acquire(self) -> float:
        """Wait for a free slot and take it for an instant (a call with no answer to wait for).
        Returns the seconds waited; raises `RateLimitWait` past `max_wait_seconds`."""
        with self.slot() as waited_seconds:
            return waited_seconds

    @contextlib.contextmanager
    def slot(self, hold_seconds: float = 60.0):
        """Wait for a free slot, hold it while the block runs (yields the seconds waited) and
        end it when the block ends. Raises `RateLimitWait` (nothing taken) when the wait would
        pass `max_wait_seconds`."""
        slot_id = f"{os.getpid()}.{next(_SLOT_IDS)}"
        waited = 0.0
        while True:
            with self._locked() as state:
                now = self.clock()
                wait, in_flight = self._wait_seconds(state, now, self.block_clock())
                if wait <= 0:
                    if self.max_calls > 0:
                        state["slots"].append([slot_id, round(now, 6),
                                               round(now + hold_seconds, 6), 0])
                    state["calls"] = state.get("calls", 0) + 1
                    state["waited_seconds"] = state.get("waited_seconds", 0.0) + waited
                    break
            # A slot still in flight may end any moment: its hold time is only an upper bound.
            if (waited if in_flight else waited + wait) > self.max_wait_seconds:
                raise RateLimitWait(self.pool, wait)
            pause = min(wait, IN_FLIGHT_POLL_SECONDS) if in_flight else wait
            self.sleep(pause)
            waited += pause
        try:
            yield waited
        finally:
            if self.max_calls > 0:
                self._end(slot_id)

    def _wait_seconds(self, state: dict, now: float, block_now: float) -> tuple[float, bool]:
        """Seconds until a call may start, and whether that depends on a call still in flight.
        Drops slots that no longer matter (and any from a clock that went back)."""
        span = self.window_seconds + self.margin_seconds
        slots = [s for s in state["slots"] if s[2] > now - span and s[1] <= now + span]
        state["slots"] = slots
        blocked_until = float(state.get("blocked_until", 0.0))
        # A block longer than any cap it was set with came from a clock far ahead of ours.
        if blocked_until > block_now + max(MAX_BLOCK_SECONDS,
                                           float(state.get("block_cap_seconds", 0.0))):
            blocked_until = state["blocked_until"] = 0.0
        if blocked_until > block_now:
            return blocked_until - block_now, False
        if self.max_calls <= 0 or len(slots) < self.max_calls:
            return 0.0, False
        # The call may start once enough slots ended a whole window (+ margin) ago.
        ends = sorted(slots, key=lambda s: s[2])
        deciding = ends[len(slots) - self.max_calls]
        return deciding[2] + span - now, not deciding[3]

    def _end(self, slot_id: str) -> None:
        with self._locked() as state:
            now = self.clock()
            for s in state["slots"]:
                if s[0] == slot_id:
                    s[2], s[3] = round(max(now, s[1]), 6), 1
                    break

    def block(self, retry_after_seconds: float | None,
              max_seconds: float = MAX_BLOCK_SECONDS) -> float:
        """The peer answered 429: hold every caller of this pool until `retry_after_seconds`
        from now (`DEFAULT_BLOCK_SECONDS` when unknown, at most `max_seconds`) and count it.
        Returns the epoch second the pool is blocked until."""
        seconds = DEFAULT_BLOCK_SECONDS if retry_after_seconds is None else retry_after_seconds
        seconds = min(max(seconds, 0.0), max_seconds)
        with self._locked() as state:
            until = max(float(state.get("blocked_until", 0.0)), self.block_clock() + seconds)
            state["blocked_until"] = until
            state["block_cap_seconds"] = max_seconds
            state["rate_limited"] = state.get("rate_limited", 0) + 1
        return until

    def stats(self) -> dict:
        """This pool's counters (see `rate_limit_stats`)."""
        with self._locked(exclusive=False) as state:
            return _stats(state)


_SLOT_IDS = itertools.count(1)


def shared_limiter(database_path: str, pool: str, max_calls: int, window_seconds: float,
                   **options) -> SharedRateLimiter:
    """The limiter of `pool` shared by every process using this database (the state lives
    beside it); with no `database_path`, a limiter of this object only."""
    if not _POOL_NAME.match(pool):
        raise ValueError(f"bad rate-limit pool name: {pool!r}")
    path = rate_limit_path(database_path, pool) if database_path and \
        database_path != ":memory:" else None
    return SharedRateLimiter(path, max_calls, window_seconds, pool=pool, **options)


def _path_only(path: str) -> str:
    """The path without its query string (queries may carry tokens)."""
    return path.split("?", 1)[0]
