"""gunicorn_conf.py as Gunicorn loads it: the error log's scrubbing and the worker hook."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time

import pytest
from gunicorn.config import Config

import db_manager
import outbox
from standins.support import wait_for

SECRET = "error-log-secret-0123456789"


@pytest.fixture
def gunicorn_conf(tmp_path, monkeypatch):
    env = {"PONTE_ENV_FILE": str(tmp_path / "none.env"), "DATABASE_PATH": str(tmp_path / "p.db"),
           "LOG_DIR": str(tmp_path / "logs"), "KOMMO_WEBHOOK_SECRET": SECRET,
           "KOMMO_BASE_URL": "http://127.0.0.1:9", "KOMMO_ACCESS_TOKEN": "kommo-token-0123456789",
           "N8N_WEBHOOK_URL": "http://127.0.0.1:9/wh", "N8N_API_KEY": "n8n-key-0123456789abcdef"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "gunicorn_conf", raising=False)
    error_log = logging.getLogger("gunicorn.error")
    handlers = list(error_log.handlers)
    yield importlib.import_module("gunicorn_conf")
    sys.modules.pop("gunicorn_conf", None)
    for handler in set(error_log.handlers) - set(handlers):  # what the logger under test added
        error_log.removeHandler(handler)
        handler.close()
    for log_filter in list(error_log.filters):
        error_log.removeFilter(log_filter)


def test_error_log_never_shows_the_webhook_secret(gunicorn_conf, tmp_path):
    cfg = Config()
    cfg.set("errorlog", str(tmp_path / "error.log"))
    logger = gunicorn_conf.logger_class(cfg)
    try:  # what Gunicorn writes when a request escapes the app
        raise ValueError(f"bad url /webhooks/kommo/{SECRET}")
    except ValueError:
        logger.exception("Error handling request %s", f"/webhooks/kommo/{SECRET}?x=1")
    text = (tmp_path / "error.log").read_text()
    assert "Error handling request /webhooks/kommo/***" in text and "ValueError" in text
    assert SECRET not in text


def test_each_worker_checkpoints_the_wal_in_the_background(gunicorn_conf, monkeypatch):
    path = os.environ["DATABASE_PATH"]
    web = db_manager.connect(path, db_manager.WEB_WAL_AUTOCHECKPOINT_PAGES)
    db_manager.migrate(web)
    for i in range(400):  # ~1,500 WAL pages, under the web's own threshold
        with db_manager.transaction(web):
            outbox.stage_job(web, "intake", f"k{i}", {"body": "x" * 12000}, now=time.time())
    size = os.path.getsize(path)
    started, stop = [], threading.Event()
    real_start = db_manager.start_checkpointer
    monkeypatch.setattr(db_manager, "start_checkpointer", lambda p: started.append(
        real_start(p, every_seconds=0.02, stop=stop)))
    try:
        gunicorn_conf.post_worker_init(worker=None)
        wait_for(lambda: os.path.getsize(path) > size + 400 * 12000, 5, interval=0.02)
        assert os.path.getsize(path) > size + 400 * 12000  # the pages reached the database file
        assert started and started[0].name == "wal-checkpointer" and started[0].daemon
    finally:
        stop.set()
        for thread in started:
            thread.join(5)
        web.close()


def test_the_checkpointer_outlives_a_database_it_cannot_open_yet(tmp_path):
    # Its own handler and level on the logger: an earlier test's logging setup (the fuzz runs
    # with LOG_LEVEL=ERROR on the root logger) would drop the warning before any handler.
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    db_log = logging.getLogger("ponte.db")
    old_level = db_log.level
    db_log.setLevel(logging.WARNING)
    db_log.addHandler(handler)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    stop = threading.Event()
    thread = db_manager.start_checkpointer(str(blocker / "p.db"), every_seconds=0.01, stop=stop)
    try:
        # ~20 failed turns
        assert wait_for(lambda: thread.is_alive() and records, timeout=5, interval=0.2)
        warnings = [r for r in records if r.getMessage() == "wal_checkpoint_failed"]
        assert len(warnings) == 1  # once per failing streak, not once per turn
    finally:
        stop.set()
        thread.join(5)
        db_log.removeHandler(handler)
        db_log.setLevel(old_level)


def test_workers_read_each_request_whole_before_running_the_app(gunicorn_conf, monkeypatch):
    """A client that trickles its request must not hold a worker (issue 14): the worker class is
    web_worker's buffering sync worker, with ponte's body limit."""
    import web_worker

    assert issubclass(gunicorn_conf.worker_class, web_worker.BufferingWorker)
    assert gunicorn_conf.worker_class.max_body_bytes == 1_048_576  # MAX_BODY_BYTES's default
    monkeypatch.setenv("MAX_BODY_BYTES", "2048")
    sys.modules.pop("gunicorn_conf", None)
    assert importlib.import_module("gunicorn_conf").worker_class.max_body_bytes == 2048
    cfg = Config()
    cfg.set("worker_class", gunicorn_conf.worker_class)
    assert cfg.worker_class is gunicorn_conf.worker_class  # Gunicorn takes the class as it is
