"""The behaviour every peer client shares: timeouts, error mapping, Retry-After, rate limit
(the shared limiter itself: test_rate_limit.py)."""
from __future__ import annotations

import os
import time

import pytest
from flask import Flask

import peer_http
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


def _recording_proxy():
    """A bare HTTP proxy on a free port: answers every request with a JSON body naming the
    request line it got (a proxied request names the whole URL)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    seen: list[str] = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                seen.append(data.split(b"\r\n", 1)[0].decode())
                body = b'{"via": "proxy"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))

    threading.Thread(target=serve, daemon=True).start()
    return server, seen


def test_a_proxy_set_in_the_environment_carries_the_calls(monkeypatch):
    # The session reads the environment once (per call it cost a third of a call's CPU); a
    # seller behind a proxy must still reach the peers through it.
    server, seen = _recording_proxy()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        client = PeerClient("http://peer.example.invalid", timeout_seconds=5)
        assert client._request("GET", "/api/ok") == {"via": "proxy"}
        assert seen == ["GET http://peer.example.invalid/api/ok HTTP/1.1"]
    finally:
        server.close()


def test_without_a_proxy_the_environment_is_read_once(monkeypatch, tmp_path):
    # No proxy: nothing is looked up per call (a ~/.netrc never adds credentials), and a CA
    # bundle named in the environment is the session's.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    session = peer_http.new_session()
    assert session.trust_env is False and session.verify == str(bundle)


def test_the_web_app_does_not_load_requests_until_a_peer_is_called(tmp_path):
    # 4 MB per web worker (requests, urllib3, charset_normalizer) that the webhook routes never
    # use: peer_http imports it on the first call.
    import subprocess
    import sys

    code = ("import sys, webhook_server; webhook_server.create_app(); "
            "print(sorted(m for m in ('requests', 'urllib3') if m in sys.modules))")
    env = {"PATH": "/usr/bin:/bin", "PONTE_ENV_FILE": str(tmp_path / "none.env"),
           "DATABASE_PATH": str(tmp_path / "p.db"), "LOG_DIR": str(tmp_path / "logs"),
           "LOG_LEVEL": "ERROR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
