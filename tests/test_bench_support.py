"""What the benchmarks rely on: the busiest one-second window of a series of request times,
the request log of a stand-in, and the n8n stand-in's answer latency."""
from __future__ import annotations

import os
import sys

from flask import Flask

from standins import n8n as n8n_standin
from standins.support import RequestLog

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

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
