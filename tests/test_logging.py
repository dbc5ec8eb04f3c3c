"""Logs are JSON lines with stable keys, in a daily file, and never contain a secret."""
from __future__ import annotations

import json
import logging
import time

import ponte_logging


def _lines(settings):
    path = ponte_logging.DailyFileHandler(settings.log_dir, 14).path_for(
        time.strftime("%Y%m%d", time.gmtime()))
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_log_lines_are_json_with_stable_keys_and_scrubbed(make_settings, capsys):
    s = make_settings(KOMMO_ACCESS_TOKEN="very-secret-token-value", ADMIN_TOKEN="adm1n-secret")
    ponte_logging.setup_logging(s, "poller")
    log = logging.getLogger("ponte.test")
    log.info("peer_call", extra={"peer": "kommo", "url": "/webhooks/kommo/abcdefsecret?x=1",
                                 "detail": "Bearer very-secret-token-value"})
    out = capsys.readouterr().out
    assert "very-secret-token-value" not in out and "abcdefsecret" not in out
    entry = _lines(s)[-1]
    assert entry["event"] == "peer_call" and entry["process"] == "poller"
    assert entry["level"] == "info" and entry["ts"].endswith("Z") and entry["peer"] == "kommo"
    assert "very-secret-token-value" not in json.dumps(entry)


def test_each_of_several_comma_separated_secrets_is_scrubbed(make_settings, capsys):
    s = make_settings(CHATWOOT_WEBHOOK_SECRET="inbox-one-secret-1111, inbox-two-secret-2222")
    ponte_logging.setup_logging(s, "web")
    logging.getLogger("ponte.test").warning("bad_signature",
                                            extra={"tried": "inbox-two-secret-2222"})
    out = capsys.readouterr().out
    assert "bad_signature" in out and "inbox-two-secret-2222" not in out


def test_request_and_job_context_are_in_every_line(make_settings):
    s = make_settings()
    ponte_logging.setup_logging(s, "web", to_stdout=False)
    token = ponte_logging.request_id_var.set("req-123456")
    job = ponte_logging.job_context_var.set({"job_id": 7, "kind": "n8n.forward_message"})
    try:
        logging.getLogger("ponte.test").warning("something")
    finally:
        ponte_logging.request_id_var.reset(token)
        ponte_logging.job_context_var.reset(job)
    entry = _lines(s)[-1]
    assert entry["request_id"] == "req-123456" and entry["job_id"] == 7


def test_old_log_files_are_deleted(tmp_path):
    handler = ponte_logging.DailyFileHandler(str(tmp_path), retention_days=3)
    old = tmp_path / "app-20000101.log"
    old.write_text("{}\n")
    handler.prune(time.time())
    assert not old.exists()
