"""Logging of ponte: one JSON object per line, to stdout and to `LOG_DIR/app-YYYYMMDD.log`.

Owns: `setup_logging()`, the JSON formatter, the daily file handler with retention, the scrubbing
of secrets from every line, and the per-request / per-job context (`request_id`, `job_id`).
Must not: import any other module of ponte but config.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import glob
import json
import logging
import os
import re
import sys
import time

import config

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                              default=None)
job_context_var: contextvars.ContextVar[dict | None] = contextvars.ContextVar("job_context",
                                                                               default=None)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# Secrets that travel in URLs (path segment after /webhooks/kommo/, ?secret=, ?token=, code=).
_URL_SECRET = re.compile(r"(/webhooks/kommo/)[^/\s?\"']+|((?:secret|token|code|access_token|"
                         r"refresh_token|client_secret)=)[^&\s\"']+", re.I)


def scrub(text: str, secrets: list[str]) -> str:
    """Remove secret values and URL-borne credentials from `text`."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return _URL_SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with stable keys; scrubs secrets."""

    def __init__(self, process_name: str, secrets: list[str]):
        super().__init__()
        self.process_name = process_name
        self.secrets = secrets  # longest first (config.secret_values)

    def format(self, record: logging.LogRecord) -> str:
        # stdout and the daily file share this formatter: build the line once per record.
        cached = record.__dict__.get("_ponte_line")
        if cached is not None:
            return cached
        line = self._format(record)
        record._ponte_line = line
        return line

    def _format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "process": self.process_name,
            "pid": record.process,
            "logger": record.name,
        }
        rid = request_id_var.get()
        if rid:
            entry["request_id"] = rid
        job = job_context_var.get()
        if job:
            entry.update(job)
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return scrub(json.dumps(entry, ensure_ascii=False, default=str), self.secrets)


class DailyFileHandler(logging.Handler):
    """Appends to `LOG_DIR/app-YYYYMMDD.log` (UTC day), switching files at midnight and deleting
    files older than `retention_days`. Safe for several processes: each line is one append."""

    def __init__(self, directory: str, retention_days: int):
        super().__init__()
        self.directory = directory
        self.retention_days = retention_days
        self.day = None
        self.stream = None
        os.makedirs(directory, exist_ok=True)

    def path_for(self, day: str) -> str:
        return os.path.join(self.directory, f"app-{day}.log")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            day = time.strftime("%Y%m%d", time.gmtime(record.created))
            if day != self.day:
                if self.stream:
                    self.stream.close()
                self.stream = open(self.path_for(day), "a", encoding="utf-8")
                self.day = day
                self.prune(record.created)
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:  # pragma: no cover - logging must never crash the caller
            self.handleError(record)

    def prune(self, now: float) -> None:
        cutoff = time.strftime("%Y%m%d", time.gmtime(now - self.retention_days * 86400))
        for path in glob.glob(os.path.join(self.directory, "app-*.log")):
            day = os.path.basename(path)[4:12]
            if day.isdigit() and day < cutoff:
                try:
                    os.remove(path)
                except OSError:
                    pass

    def close(self) -> None:
        if self.stream:
            self.stream.close()
        super().close()


def setup_logging(settings, process_name: str, to_stdout: bool = True) -> logging.Logger:
    """Configure the root logger for `process_name` ('web' or 'poller'); returns ponte's logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_ponte", False):
            root.removeHandler(handler)
            handler.close()
    formatter = JsonFormatter(process_name, config.secret_values(settings))
    handlers: list[logging.Handler] = []
    if to_stdout:
        handlers.append(logging.StreamHandler(sys.stdout))
    try:
        handlers.append(DailyFileHandler(settings.log_dir, settings.log_retention_days))
    except OSError as exc:  # a read-only log dir must not stop the service
        sys.stderr.write(f"log dir unavailable: {exc}\n")
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._ponte = True
        root.addHandler(handler)
    level = "DEBUG" if settings.debug else settings.log_level
    root.setLevel(level)
    for noisy in ("urllib3", "werkzeug", "schedule"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger("ponte")
