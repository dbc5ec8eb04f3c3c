"""Prometheus metrics, the same across Gunicorn's web workers and the poller's worker threads
(prometheus_client's multiprocess mode: each process writes its counters to small files in one
folder, /metrics adds them up).

Counters and histograms, recorded where things happen:
- `ponte_webhooks_total{peer, event, outcome}` — every request to a webhook URL (RequestIds in
  webhook_server tells the outcome; db_manager.record_event tells the event);
- `ponte_job_runs_total{kind, outcome}` and `ponte_job_duration_seconds{kind}` (job_runner);
- `ponte_peer_call_duration_seconds{peer}` and `ponte_peer_errors_total{peer, status}`
  (peer_http).
Gauges read from the database at each scrape (`DatabaseCollector`): jobs by status (the names
of 0.2.0: `ponte_jobs{status}`, `ponte_oldest_due_job_seconds`,
`ponte_poller_heartbeat_age_seconds`), dead jobs by kind, paused bots, seconds to each token's
expiry, accounts connected, alerts firing, and the shared rate limiters' 429 answers and waits.

The folder is PROMETHEUS_MULTIPROC_DIR when given, else `metrics/` beside the database (web and
poller find the same one). A process that starts removes the files of processes no longer alive
(a restart is a counter reset, which Prometheus' rate() expects); files of live processes stay.

Owns: `setup()`, the metric objects, the `observe_*` hooks, `render()` (and reading the
multiprocess folder while other processes add and remove files in it).
Must not: import our modules at import time (peer_http and job_runner import this one), or
raise from a hook (a metric never breaks a job or a webhook).
"""
from __future__ import annotations

import contextvars
import glob
import logging
import os
import re
import threading

log = logging.getLogger("ponte.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

_lock = threading.Lock()
_metrics: "_Metrics | None" = None
_FILE_PID = re.compile(r"_(\d+)\.db\Z")

# The webhook request being answered in this thread: RequestIds sets a dict, record_event fills
# in the event.
_webhook = contextvars.ContextVar("ponte_webhook", default=None)

# Path prefix of a webhook URL → the peer that calls it, and the event when the route records
# none of its own (n8n's answers are jobs, not events).
WEBHOOK_PEERS = (("/webhooks/kommo", "kommo", ""), ("/webhooks/chatwoot", "chatwoot", ""),
                 ("/webhook", "chatwoot", ""), ("/webhooks/mercadolivre", "mercadolivre", ""),
                 ("/mercadolivre/send-response", "n8n", "question_answer"),
                 ("/send-response", "n8n", "send_response"))


class Outcome:
    """Values of the `outcome` label of ponte_webhooks_total."""

    RECORDED = "recorded"     # a new event was written
    DUPLICATE = "duplicate"   # the same event again (answered 2xx, nothing new)
    ACCEPTED = "accepted"     # answered 2xx, no event recorded by the route (n8n's answers)
    REFUSED = "refused"       # 4xx (auth, bad payload)
    ERROR = "error"           # 5xx


class _Metrics:
    def __init__(self):
        from prometheus_client import Counter, Histogram
        self.webhooks = Counter("ponte_webhooks", "Webhooks recebidos, por parceiro, evento e "
                                "resultado.", ["peer", "event", "outcome"], registry=None)
        self.job_runs = Counter("ponte_job_runs", "Execuções de jobs, por tipo e resultado "
                                "(done, retry, dead, deferred, lease_lost, error).",
                                ["kind", "outcome"], registry=None)
        self.job_duration = Histogram("ponte_job_duration_seconds", "Duração de cada execução "
                                      "de job.", ["kind"], buckets=DURATION_BUCKETS, registry=None)
        self.peer_duration = Histogram("ponte_peer_call_duration_seconds", "Duração das chamadas "
                                       "a cada parceiro (com resposta).", ["peer"],
                                       buckets=DURATION_BUCKETS, registry=None)
        self.peer_errors = Counter("ponte_peer_errors", "Chamadas a parceiros que falharam, por "
                                   "status HTTP (ou timeout, connection).", ["peer", "status"],
                                   registry=None)


def metrics_dir(database_path: str) -> str:
    """PROMETHEUS_MULTIPROC_DIR, or `metrics/` beside the database."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(
        os.path.dirname(os.path.abspath(database_path)), "metrics")


def setup(settings) -> bool:
    """Turn the metrics on in this process (once; later calls keep the first folder): the
    multiprocess folder is created, files of dead processes removed. False (metrics stay off,
    /metrics still shows the database's gauges) when the folder cannot be written."""
    global _metrics
    with _lock:
        if _metrics is not None:
            return True
        path = metrics_dir(settings.database_path)
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(path)
        except OSError as exc:
            log.warning("metrics_disabled", extra={"path": path, "error": str(exc)})
            return False
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        from prometheus_client import values
        # prometheus_client picks its value class at import: make sure it is the multiprocess
        # one even when something imported it before the folder was known.
        values.ValueClass = values.MultiProcessValue()
        remove_dead_files(path)
        _metrics = _Metrics()
        _hook_record_event()
        return True


def remove_dead_files(path: str) -> int:
    """Remove the files of processes that are not running any more; returns how many."""
    import db_manager  # not at import time: peer_http imports this module
    removed = 0
    for name in glob.glob(os.path.join(glob.escape(path), "*.db")):
        match = _FILE_PID.search(name)
        if match and not db_manager.process_alive(int(match.group(1))):
            try:
                os.remove(name)
                removed += 1
            except FileNotFoundError:
                pass  # another process starting at the same time removed it
    return removed


def _hook_record_event() -> None:
    import db_manager
    if _observe_event not in db_manager.EVENT_OBSERVERS:  # db_manager must not import us
        db_manager.EVENT_OBSERVERS.append(_observe_event)


# --- hooks --------------------------------------------------------------------------------------

def webhook_peer(path: str) -> str | None:
    """The peer that calls `path`, or None when it is not a webhook URL."""
    found = _webhook_route(path)
    return found[0] if found else None


def _webhook_route(path: str) -> tuple[str, str] | None:
    for prefix, peer, event in WEBHOOK_PEERS:
        if path == prefix or path.startswith(prefix + "/"):
            return peer, event
    return None


def webhook_started(path: str):
    """RequestIds: a request began; returns a token for `webhook_finished` (None when `path` is
    no webhook or metrics are off)."""
    found = _webhook_route(path)
    if found is None or _metrics is None:
        return None
    state = {"peer": found[0], "event": "", "new": None, "default_event": found[1]}
    return state, _webhook.set(state)


def _observe_event(source: str, event_type: str, new: bool) -> None:
    note_webhook_event(event_type, new)


def note_webhook_event(event_type: str, new: bool) -> None:
    """A webhook route recorded `event_type` (`new`: not seen before); db_manager.record_event
    calls it, and routes that stage a job instead of recording an event call it themselves."""
    state = _webhook.get()
    if state is not None:
        # A webhook may record several events (a Kommo batch): the first new one names it.
        if not state["event"] or (new and not state["new"]):
            state["event"], state["new"] = event_type or "", bool(new) or bool(state["new"])


def webhook_finished(token, http_status: int) -> None:
    """RequestIds: the answer's status is known; count the webhook."""
    if token is None:
        return
    state, reset = token
    _webhook.reset(reset)
    if http_status >= 500:
        outcome = Outcome.ERROR
    elif http_status >= 400:
        outcome = Outcome.REFUSED
    elif state["new"]:
        outcome = Outcome.RECORDED
    elif state["event"]:
        outcome = Outcome.DUPLICATE
    else:
        outcome = Outcome.ACCEPTED
    event = state["event"] or state["default_event"] or "none"
    _safely(lambda m: m.webhooks.labels(state["peer"], event, outcome).inc())


def observe_job(kind: str, outcome: str, seconds: float) -> None:
    """job_runner: one job run ended."""
    def record(m):
        m.job_runs.labels(kind, outcome).inc()
        m.job_duration.labels(kind).observe(seconds)
    _safely(record)


def observe_peer_call(peer: str, seconds: float, http_status: int) -> None:
    """peer_http: a peer answered (any status); 4xx/5xx also count as errors."""
    def record(m):
        m.peer_duration.labels(peer).observe(seconds)
        if http_status >= 400:
            m.peer_errors.labels(peer, str(http_status)).inc()
    _safely(record)


def observe_peer_failure(peer: str, reason: str) -> None:
    """peer_http: a call got no answer (`reason`: timeout, connection, request)."""
    _safely(lambda m: m.peer_errors.labels(peer, reason).inc())


def _safely(record) -> None:
    if _metrics is None:
        return
    try:
        record(_metrics)
    except Exception:  # a metric must never break a job or a webhook
        log.exception("metrics_record_failed")


# --- /metrics -------------------------------------------------------------------------------

class DatabaseCollector:
    """Gauges read from the database (and the rate limiters' files) at each scrape."""

    def __init__(self, conn, settings, now: float):
        self.conn, self.settings, self.now = conn, settings, now

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        import admin_data
        import alerts
        import db_manager
        import outbox
        import peer_http
        conn, now = self.conn, self.now
        stats = outbox.queue_stats(conn, now)
        jobs = GaugeMetricFamily("ponte_jobs", "Jobs por estado (due: prontos para rodar; staged: "
                                 "gravados pelo webhook, ainda não movidos).", labels=["status"])
        for status in ("pending", "running", "done", "dead", "due", "staged"):
            jobs.add_metric([status], stats[status])
        yield jobs
        yield GaugeMetricFamily("ponte_queue_depth", "Jobs esperando (pending, inclui staged).",
                                value=stats["pending"])
        yield GaugeMetricFamily("ponte_oldest_due_job_seconds", "Espera do job pronto mais "
                                "antigo.", value=stats["oldest_due_seconds"])
        dead = GaugeMetricFamily("ponte_dead_jobs", "Jobs mortos, por tipo.", labels=["kind"])
        for kind, count in outbox.dead_jobs_by_kind(conn).items():
            dead.add_metric([kind], count)
        yield dead
        beat = db_manager.last_beat(conn, "poller")
        yield GaugeMetricFamily("ponte_poller_heartbeat_age_seconds", "Idade do último sinal do "
                                "poller (-1: nunca).",
                                value=round(now - beat["beat_at"], 3) if beat else -1)
        yield GaugeMetricFamily("ponte_paused_bots", "Contatos com o bot pausado.",
                                value=admin_data.paused_count(conn))
        connected = GaugeMetricFamily("ponte_account_connected", "Conta conectada (1) ou não (0), "
                                      "das pontes ligadas.", labels=["provider"])
        expiry = GaugeMetricFamily("ponte_token_expiry_seconds", "Segundos até o access token "
                                   "vencer (só contas conectadas com validade conhecida).",
                                   labels=["provider"])
        for account in admin_data.accounts(conn, self.settings, now):
            if account["bridge_enabled"]:
                connected.add_metric([account["provider"]], 1 if account["connected"] else 0)
            if account["expires_at"]:
                expiry.add_metric([account["provider"]], round(account["expires_at"] - now, 1))
        yield connected
        yield expiry
        firing = GaugeMetricFamily("ponte_alerts_firing", "Alertas ativos (1 por alerta).",
                                   labels=["alert"])
        for alert in alerts.active(conn):
            firing.add_metric([alert["name"]], 1)
        yield firing
        limited = CounterMetricFamily("ponte_rate_limited", "Respostas 429 por grupo de limite "
                                      "de um parceiro.", labels=["pool"])
        waited = CounterMetricFamily("ponte_rate_limit_waited_seconds", "Tempo total de espera "
                                     "pelo limite de requisições, por grupo.", labels=["pool"])
        calls = CounterMetricFamily("ponte_rate_limit_calls", "Chamadas contadas pelo limite de "
                                    "requisições, por grupo.", labels=["pool"])
        for pool, s in peer_http.rate_limit_stats(self.settings.database_path).items():
            limited.add_metric([pool], s["429"])
            waited.add_metric([pool], s["waited_seconds"])
            calls.add_metric([pool], s["calls"])
        yield limited
        yield waited
        yield calls


class ProcessFilesCollector:
    """Every process's counters and histograms, added up from the multiprocess folder."""

    def __init__(self, path: str):
        from prometheus_client import multiprocess
        self._files = multiprocess.MultiProcessCollector(None, path=path)

    def collect(self):
        try:
            return self._files.collect()
        except FileNotFoundError:
            # A starting process removed a dead one's file (remove_dead_files) between the
            # folder's listing and its reading: list it again, without that file.
            return self._files.collect()


def render(conn, settings, now: float) -> bytes:
    """The text of /metrics: every process's counters and histograms plus the database's
    gauges."""
    from prometheus_client import CollectorRegistry, generate_latest
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(conn, settings, now))
    if _metrics is not None:
        registry.register(ProcessFilesCollector(metrics_dir(settings.database_path)))
    return generate_latest(registry)
