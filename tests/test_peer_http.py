"""The behaviour every peer client shares: timeouts, error mapping, Retry-After, rate limit
(the shared limiter itself: test_rate_limit.py)."""
from __future__ import annotations

import time

import pytest
from flask import Flask

from peer_http import PeerClient, PeerError, SharedRateLimiter
from standins.support import free_port


def _peer_app():
    app = Flask("peer")

    @app.get("/ok")
    def ok():
        return {"ok": True}

    @app.get("/status/<int:code>")
    def status(code):
        headers = {"Retry-After": "7"} if code == 429 else {}
        return {"error": "x"}, code, headers

    @app.get("/slow")
    def slow():
        time.sleep(1)
        return {"late": True}

    @app.get("/text")
    def text():
        return "plain", 200, {"Content-Type": "text/plain"}

    return app


@pytest.fixture
def client(serve):
    return PeerClient(serve(_peer_app()).url, timeout_seconds=0.3)


def test_json_answer_is_decoded(client):
    assert client._request("GET", "/ok") == {"ok": True}
    assert client._request("GET", "/text") == "plain"


@pytest.mark.parametrize("code,retryable", [(500, True), (502, True), (503, True), (429, True),
                                            (400, False), (401, False), (404, False),
                                            (422, False)])
def test_http_errors_are_mapped(client, code, retryable):
    with pytest.raises(PeerError) as err:
        client._request("GET", f"/status/{code}")
    assert err.value.status == code and err.value.retryable is retryable
    assert err.value.may_have_reached is (code >= 500)  # a 4xx answer says it was refused
    if code == 429:
        assert err.value.retry_after_seconds == 7


def test_timeout_is_a_retryable_error(client):
    with pytest.raises(PeerError) as err:
        client._request("GET", "/slow")
    assert err.value.status is None and err.value.retryable and "timeout" in err.value.detail
    assert err.value.may_have_reached  # the request was sent; its outcome is unknown


def test_connection_refused_is_a_retryable_error():
    client = PeerClient(f"http://127.0.0.1:{free_port()}", timeout_seconds=1)
    with pytest.raises(PeerError) as err:
        client._request("GET", "/ok")
    assert err.value.retryable and "connection" in err.value.detail
    assert not err.value.may_have_reached


def test_a_failed_token_call_before_sending_did_not_reach_the_peer(serve):
    class RefreshTimesOut(PeerClient):
        def _auth_headers(self):
            err = PeerError(None, "token refresh timed out", True)
            err.may_have_reached = True  # true of the refresh call, not of the request
            raise err

    calls = []
    app = _peer_app()
    app.before_request(lambda: calls.append(1))
    client = RefreshTimesOut(serve(app).url, timeout_seconds=1)
    with pytest.raises(PeerError) as err:
        client._request("GET", "/ok")
    assert calls == [] and not err.value.may_have_reached


def test_rate_limiter_allows_max_calls_in_any_window():
    now = [0.0]
    slept, started = [], []
    limiter = SharedRateLimiter(None, 5, 1.0, clock=lambda: now[0],
                                sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    for _ in range(15):
        limiter.acquire()
        started.append(now[0])
    # 5 at once, then 5 more a window (+ its 2 % margin) later, then 5 more: never 6 in a second
    assert max(sum(1 for t in started if s <= t <= s + 1.0) for s in started) == 5
    assert round(sum(slept), 3) == 2.04 and len(slept) == 2


def test_a_429_holds_the_clients_next_call_until_retry_after(client):
    with pytest.raises(PeerError):
        client._request("GET", "/status/429")  # Retry-After: 7
    client.limiter.max_wait_seconds = 1
    with pytest.raises(PeerError) as err:
        client._request("GET", "/ok")
    assert err.value.status is None and err.value.retryable and not err.value.may_have_reached
    assert 6 <= err.value.retry_after_seconds <= 7 and "rate limit" in err.value.detail
