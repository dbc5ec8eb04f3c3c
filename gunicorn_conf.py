"""Gunicorn settings for the web process, read from ponte's own settings (and `.env`).

Owns: bind address, workers (web_worker's buffering sync worker: a slow client never holds a
worker), timeouts, access and error logs that never show a credential (the Kommo webhook secret
travels in the URL path), and each worker's WAL checkpointer thread.
"""
# Gunicorn reads every public module-level name as one of its settings (and it has a setting
# called `config`), so our imports are private names.
import sys as _sys
from logging import Formatter as _Formatter

import config as _ponte_config
import db_manager as _db_manager
import ponte_logging as _ponte_logging
import web_worker as _web_worker
from gunicorn.glogging import Logger as _Logger

try:
    _settings = _ponte_config.load_settings()
except _ponte_config.ConfigError as _exc:
    # One line listing every problem, instead of a traceback per worker.
    _sys.stderr.write(f"ponte: {_exc}\n")
    _sys.exit(2)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.web_workers
# The sync worker's way of running the app (one request at a time per process: the fastest here,
# docs/benchmarks.md), with each request read whole on a non-blocking loop first, so clients that
# trickle headers or bodies cannot hold the workers (issue 14).
worker_class = _web_worker.buffering_worker_class(max_body_bytes=_settings.max_body_bytes)
timeout = 30
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}o)s'
forwarded_allow_ips = "*"


_secrets = _ponte_config.secret_values(_settings)


class _ScrubbingLogger(_Logger):
    """Gunicorn's logger with URL-borne secrets removed from every access-log line and from its
    error log (e.g. "Error handling request /webhooks/kommo/<secret>")."""

    def setup(self, cfg):
        super().setup(cfg)
        self.error_log.addFilter(_scrub_record)

    def atoms(self, resp, req, environ, request_time):
        atoms = super().atoms(resp, req, environ, request_time)
        for key in ("r", "U", "q", "f", "{raw_uri}e"):
            if isinstance(atoms.get(key), str):
                atoms[key] = _ponte_logging.scrub(atoms[key], _secrets)
        return atoms


def _scrub_record(record) -> bool:
    try:
        text = record.getMessage()
    except Exception:  # a malformed call must still be logged, not raise at the caller
        text = f"{record.msg} {record.args!r}"
    record.msg, record.args = _ponte_logging.scrub(text, _secrets), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = _ponte_logging.scrub(_Formatter().formatException(record.exc_info),
                                               _secrets)
    return True


logger_class = _ScrubbingLogger


def post_worker_init(worker):
    """Gunicorn hook, in each worker once the app is loaded: checkpoint the WAL in a background
    thread, so that no webhook ack waits for a checkpoint (see db_manager); and look at the
    poller's heartbeat every 30 s (the alert the poller cannot raise about itself, see alerts)."""
    import alerts  # here, not at import: the master process needs none of it
    _db_manager.start_checkpointer(_settings.database_path)
    alerts.start_poller_watch(_settings)
