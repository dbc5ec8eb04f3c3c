"""What the benchmarks rely on: the busiest one-second window of a series of request times,
the request log of a stand-in, and the n8n stand-in's answer latency."""
from __future__ import annotations

import os
import sys

from flask import Flask

from standins import n8n as n8n_standin
from standins.support import RequestLog

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))

import benchlib  # noqa: E402


def test_max_in_window_counts_the_busiest_half_open_second():
    # 1.0 and 2.0 are one second apart: not in the same window [t, t + 1).
    assert benchlib.max_in_window([2.0, 1.0, 1.5, 1.9]) == 3
    assert benchlib.max_in_window([0.0, 1.0, 2.0, 3.0]) == 1
    assert benchlib.max_in_window([5.0 + i / 10 for i in range(8)] + [6.05]) == 8
    assert benchlib.max_in_window([]) == 0


def test_request_log_records_time_and_status_but_not_the_inspection_routes():
    app = Flask("t")
    app.add_url_rule("/api/x", "x", lambda: ("slow down", 429))
    app.add_url_rule("/_standin/state", "state", lambda: "ok")
    log = RequestLog(app.wsgi_app)
    app.wsgi_app = log
    client = app.test_client()
    client.get("/api/x")
    client.get("/_standin/state")
    [entry] = log.entries
    assert (entry["method"], entry["path"], entry["status"]) == ("GET", "/api/x", 429)
    assert entry["at"] > 0


def test_n8n_standin_takes_latency_seconds_to_answer_and_records_the_call_on_arrival(
        monkeypatch):
    waits = []
    monkeypatch.setattr(n8n_standin.time, "sleep", waits.append)
    app = n8n_standin.create_app(api_key="k", latency_seconds=3.0)
    answer = app.test_client().post("/webhook/ponte", json={"message_text": "oi"},
                                    headers={"Authorization": "Bearer k"})
    assert answer.status_code == 200 and answer.get_json()["output"]
    assert waits == [3.0]
    assert len(app.config["STATE"]["calls"]) == 1
    waits.clear()
    n8n_standin.create_app(api_key="k").test_client().post(
        "/webhook/ponte", json={}, headers={"Authorization": "Bearer k"})
    assert waits == []  # no latency unless asked for


def _burst(first, last, complete=True, **extra):
    return {"customers": 20, "replies": 20 if complete else 0, "complete": complete,
            "first_reply_s": first, "last_reply_s": last, "kommo_max_in_1s": 5,
            "kommo_429": 0, "kommo_requests": 20, "rss_max_sum_kb": 150 * 1024, **extra}


def test_concurrency_report_puts_both_versions_side_by_side_and_says_past_the_budget():
    import bench_concurrency as bc

    sizes = {"burst_small": 20, "burst_large": 100, "spaced": 40, "instant_burst": 20,
             "after": 15, "drain": 600, "intake": 1500}
    results = {
        "sizes": sizes, "budget_s": 120.0,
        "new": {"commit": "abc1234", "settings": {"poller_concurrency": 16, "kommo_max_rps": 7},
                "burst20": _burst(3.5, 6.6, question_s=1.2, loadavg_1min_after=2.0),
                "burst100": {"error": "TimeoutError: gunicorn"}},
        "old": {"commit": "9d9f3ad", "settings": {"kommo_max_rps": 5},
                "burst20": _burst(60.9, 64.5, question_s=59.9, kommo_429=3),
                "burst100": _burst(None, None, complete=False)}}
    text = bc.markdown(results, {"date": "hoje", "nproc": 2, "cpu": "x", "python": "3"}, False)
    [row20] = [line for line in text.splitlines() if line.startswith("| 20 clientes")]
    assert "| 3,5 s / 6,6 s | 60,9 s / 64,5 s | última ≤ 8 s |" in row20
    [row100] = [line for line in text.splitlines() if line.startswith("| 100 clientes")]
    assert "erro: TimeoutError: gunicorn" in row100
    assert "> 120 s / > 120 s (0 de 20 no prazo)" in row100
    assert "| 1,2 s | 59,9 s | ≤ 3 s |" in text
    assert "POLLER_CONCURRENCY=16" in text and "não medido" in text  # instant, drain


def test_a_standin_served_in_its_own_process_keeps_the_connection_alive(tmp_path):
    # The drain's peers run apart from the bench (standins/serve.py), answering on one kept-alive
    # connection as a real peer does: two calls, one TCP connection.
    import socket
    import subprocess
    import time

    import requests

    from standins.support import free_port, wait_for

    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "standins.serve", "n8n", "--port", str(port),
                             "--api-key", "k"], cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/_standin/calls", timeout=1).ok, 15, interval=0.05,
                 what="the stand-in", ignoring=(requests.RequestException,))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            request = (b"POST /webhook/ponte HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            answers = []
            for _ in range(2):
                sock.sendall(request)
                data, deadline = b"", time.monotonic() + 5
                while b"\r\n\r\n" not in data and time.monotonic() < deadline:
                    data += sock.recv(65536)
                answers.append(data.split(b"\r\n", 1)[0])
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(body) < length:
                    body += sock.recv(65536)
        assert answers == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"]
        assert len(requests.get(url + "/_standin/calls", timeout=5).json()["calls"]) == 2
    finally:
        proc.terminate()
        proc.wait(10)
