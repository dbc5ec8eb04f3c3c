"""The HTTP behaviour every peer client shares: one session, a timeout on every call, a
client-side rate limit, and every failure mapped to one `PeerError(status, detail, retryable)`.

Owns: `PeerClient`, `PeerError`, `RateLimiter`.
Must not: know any peer's URLs or payloads (those live in the peer modules), import flask or
db_manager. Business retries belong to the job outbox; here we only retry a refused connection
once, because that never reached the peer.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import requests

log = logging.getLogger("ponte.peer")

RETRYABLE_STATUSES = {408, 409, 423, 425, 429, 500, 502, 503, 504}


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


class RateLimiter:
    """Token bucket: at most `rate` calls per second in this process (`rate <= 0`: no limit)."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self.tokens = self.capacity
        self.clock, self.sleep = clock, sleep
        self.updated = clock()
        self.lock = threading.Lock()

    def acquire(self) -> float:
        """Wait for a token; returns the seconds waited."""
        if self.rate <= 0:
            return 0.0
        with self.lock:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            wait = 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate
            self.tokens -= 1
        if wait:
            self.sleep(wait)
        return wait


class PeerClient:
    """Base of the four peer clients. Subclasses set `peer`, `error_class` and call `_request`."""

    peer = "peer"
    error_class: type[PeerError] = PeerError

    def __init__(self, base_url: str, timeout_seconds: float = 15.0, max_rps: float = 0.0,
                 session: requests.Session | None = None):
        self.base_url = (base_url or "").rstrip("/")
        self.timeout_seconds = timeout_seconds
        self.session = session or requests.Session()
        self.session.headers.setdefault("User-Agent", "ponte/0.1 (+https://github.com/ponte)")
        self.limiter = RateLimiter(max_rps)

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
        for attempt in (1, 2):
            self.limiter.acquire()
            started = time.monotonic()
            try:
                response = self.session.request(method, url, headers=headers, timeout=timeout,
                                                **kwargs)
                break
            except requests.exceptions.ConnectionError as exc:
                # A refused connection never reached the peer: one immediate retry is safe.
                refused = "refused" in str(exc).lower()
                if attempt == 1 and refused:
                    continue
                err = self.error_class(None, f"connection error: {type(exc).__name__}", True)
                err.may_have_reached = not (refused or
                                            isinstance(exc, requests.exceptions.ConnectTimeout))
                raise err
            except requests.exceptions.Timeout:
                err = self.error_class(None, f"timeout after {timeout}s", True)
                err.may_have_reached = True
                raise err
            except requests.exceptions.RequestException as exc:
                err = self.error_class(None, f"request error: {type(exc).__name__}", True)
                err.may_have_reached = True
                raise err
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        log.debug("peer_call", extra={"peer": self.peer, "method": method, "path": _path_only(path),
                                      "status": response.status_code, "elapsed_ms": elapsed_ms})
        if response.status_code >= 400:
            err = self._error_from_response(response)
            err.may_have_reached = response.status_code >= 500
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
        retry_after = None
        if response.headers.get("Retry-After", "").strip().isdigit():
            retry_after = float(response.headers["Retry-After"].strip())
        return self.error_class(response.status_code, detail,
                                response.status_code in RETRYABLE_STATUSES,
                                retry_after_seconds=retry_after, body=body)


def _path_only(path: str) -> str:
    """The path without its query string (queries may carry tokens)."""
    return path.split("?", 1)[0]
