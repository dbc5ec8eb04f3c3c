"""The web process: inbound webhooks and the operators' API, served by Gunicorn.

Owns: `create_app()`, the operator routes (`/`, `/health`, `/config`, `/metrics`, `/admin/jobs`),
request ids, body limits and JSON error answers (`RequestIds`), and the dispatch of the few URLs a
bridge serves as plain WSGI, before Flask (`PlainRoutes`). Bridge routes come from
`bridges.blueprints()` and `bridges.plain_routes()`.
Must not: call a peer inside a webhook request, or do work at import time (no module-level app).
"""
from __future__ import annotations

import io
import logging
import re
import time
import uuid

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

import admin_console
import admin_data
import alerts
import bridges
import config
import db_manager
import outbox
import ponte_logging
import ponte_metrics
import task_runs
import web_common
from web_common import bearer_token, json_error, require_bearer, token_matches

log = logging.getLogger("ponte.web")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{6,128}$")

_ERROR_TEXT = {
    400: ("bad_request", "Requisição inválida."),
    401: ("unauthorized", "Não autorizado."),
    404: ("not_found", "Rota não encontrada."),
    405: ("method_not_allowed", "Método não permitido nesta rota."),
    413: ("payload_too_large", "Corpo da requisição grande demais."),
    415: ("unsupported_media_type", "Tipo de conteúdo não suportado."),
    500: ("internal_error", "Erro interno; o evento não foi perdido se já tinha sido aceito."),
}


def create_app(settings=None, clock=None) -> Flask:
    """Build the Flask app. `settings` defaults to `config.load_settings()`; `clock` (a
    function returning epoch seconds) lets tests move time."""
    settings = settings or config.load_settings()
    ponte_logging.setup_logging(settings, "web")
    app = Flask("ponte")
    app.config.update(PONTE_SETTINGS=settings, PONTE_CLOCK=clock or time.time,
                      MAX_CONTENT_LENGTH=settings.max_body_bytes, JSON_SORT_KEYS=False)
    app.json.ensure_ascii = False
    ponte_metrics.setup(settings)
    try:
        db_manager.migrate(db_manager.connect(settings.database_path))
    except Exception as exc:  # /health will say why; the web must still answer
        log.error("db_migrate_failed", extra={"error": str(exc)})

    app.wsgi_app = RequestIds(PlainRoutes(app.wsgi_app, bridges.plain_routes(settings), app.config),
                              settings.max_body_bytes)
    _install_error_handlers(app)
    _install_operator_routes(app)
    for blueprint in bridges.blueprints(settings):
        app.register_blueprint(blueprint)
    app.register_blueprint(admin_console.blueprint)  # the console's pages under /admin
    log.info("web_started", extra={"bridges": list(settings.enabled_bridges),
                                   "version": config.VERSION})
    return app


class RequestIds:
    """WSGI middleware in front of Flask, run on every request (so plain WSGI, cheap):

    - every request gets an id — the caller's `X-Request-Id` when it is a sane one, else a new
      one — that log lines written during the request carry and the answer echoes;
    - a body over `max_body_bytes` gets 413 before any route runs, declared or chunked (Flask's
      own limit only applies when a route reads the body, and cuts a chunked one silently).
    """

    def __init__(self, wsgi_app, max_body_bytes: int):
        self.wsgi_app = wsgi_app
        self.max_body_bytes = max_body_bytes

    def __call__(self, environ, start_response):
        given = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        webhook = ponte_metrics.webhook_started(environ.get("PATH_INFO", ""))
        answered = [500]  # the status of the answer, for ponte_webhooks_total

        def start_with_id(status, headers, exc_info=None):
            headers.append(("X-Request-Id", request_id))
            answered[0] = int(status[:3]) if status[:3].isdigit() else 500
            return start_response(status, headers, exc_info)

        token = ponte_logging.request_id_var.set(request_id)
        try:
            declared = environ.get("CONTENT_LENGTH", "")
            too_large = declared.isascii() and declared.isdigit() and \
                int(declared) > self.max_body_bytes
            if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
                # A chunked body has no declared length, and werkzeug would silently cut it at
                # the limit: read it here (up to one byte past the limit), pass on a sized body.
                body = environ["wsgi.input"].read(self.max_body_bytes + 1)
                too_large = len(body) > self.max_body_bytes
                environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
            if too_large:
                return web_common.wsgi_json(start_with_id, 413,
                                            web_common.error_body(*_ERROR_TEXT[413]))
            return self.wsgi_app(environ, start_with_id)
        finally:
            ponte_metrics.webhook_finished(webhook, answered[0])
            ponte_logging.request_id_var.reset(token)


class PlainRoutes:
    """WSGI middleware: the URLs a bridge serves without Flask (its `PLAIN_ROUTES`, pairs of a
    path pattern and a `handler(environ, start_response, app_config, *path_groups)`); every
    other request goes on to Flask. Only for a webhook so hot that Flask's own per-request cost
    matters (see kommo_webhook)."""

    def __init__(self, wsgi_app, routes, app_config):
        self.wsgi_app = wsgi_app
        self.routes = routes
        self.app_config = app_config

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        for pattern, handler in self.routes:
            match = pattern.match(path)
            if match:
                return handler(environ, start_response, self.app_config, *match.groups())
        return self.wsgi_app(environ, start_response)


def _install_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code, message = _ERROR_TEXT.get(exc.code, ("http_error", exc.description or ""))
        if exc.code == 400 and exc.description and "browser" not in exc.description:
            message = exc.description
        return json_error(exc.code or 500, code, message)

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception):
        log.exception("unhandled_error", extra={"path": request.path})
        code, message = _ERROR_TEXT[500]
        return json_error(500, code, message)


def _install_operator_routes(app: Flask) -> None:
    @app.get("/")
    def index():
        s = web_common.settings()
        return jsonify(name=config.APP_NAME, version=config.VERSION,
                       environment=s.environment,
                       bridges={name: s.bridge_enabled(name) for name in config.BRIDGE_REQUIRED})

    @app.get("/health")
    def health():
        report, healthy = health_report(web_common.settings(), web_common.now())
        return jsonify(report), 200 if healthy else 503

    @app.get("/config")
    @require_bearer("admin_token")
    def show_config():
        s = web_common.settings()
        return jsonify(settings=config.redacted_settings(s), enabled_bridges=list(s.enabled_bridges))

    @app.get("/metrics")
    def metrics():
        s = web_common.settings()
        if s.metrics_token and not token_matches(bearer_token(), s.metrics_token):
            return json_error(401, "unauthorized", "Token ausente ou inválido (METRICS_TOKEN).")
        conn = web_common.get_db()
        body = ponte_metrics.render(conn, s, web_common.now())
        return body, 200, {"Content-Type": ponte_metrics.CONTENT_TYPE}

    @app.get("/admin/jobs")
    @require_bearer("admin_token")
    def list_jobs():
        status = request.args.get("status") or None
        if status not in (None, "pending", "running", "done", "dead"):
            return json_error(400, "bad_status", "status deve ser pending, running, done ou dead.")
        conn = web_common.get_db()
        jobs = outbox.list_jobs(conn, status=status, kind=request.args.get("kind") or None,
                                now=web_common.now())
        # Staged jobs are not in `jobs` yet (the poller moves them as it claims): count them, so
        # an operator whose poller is down sees where the pending ones are.
        return jsonify(jobs=jobs, staged=outbox.count_staged_jobs(conn))

    @app.post("/admin/jobs/<int:job_id>/retry")
    @require_bearer("admin_token")
    def retry_job(job_id: int):
        if not outbox.retry_dead_job(web_common.get_db(), job_id, web_common.now()):
            return json_error(404, "not_dead", "Job inexistente ou não está em 'dead'.")
        return jsonify(ok=True, job_id=job_id, status="pending"), 202


# A job that failed and has waited this long for another attempt makes /health "degraded":
# the backoff cap, so a job past it waits for a peer that is down or asked to wait.
HELD_BACK_WARNING_SECONDS = 15 * 60


def health_report(settings, now: float) -> tuple[dict, bool]:
    """The /health body and whether ponte is healthy: the database opens, answers and has this
    version's schema, and the poller's heartbeat is fresh (else `unhealthy`: what a restart
    fixes). `degraded` (still healthy) when an enabled bridge's account was never connected or is
    disconnected, a peer's recent jobs only failed, a Mercado Livre poll keeps failing, or failed
    jobs wait too long. Also reports queue depth, dead jobs, accounts and the active alerts, and
    fires or resolves the poller-stale alert (the poller cannot raise it about itself)."""
    problems: list[str] = []
    warnings: list[str] = []
    report: dict = {"status": "ok", "version": config.VERSION}
    try:
        conn = web_common.get_db()
        schema, known = db_manager.schema_version(conn), len(db_manager.MIGRATIONS)
        if schema != known:  # the migration at start failed (logged as db_migrate_failed)
            problems.append(f"banco de dados na versão {schema} do esquema; esta ponte usa a "
                            f"{known} (veja o log: db_migrate_failed)")
        stats = outbox.queue_stats(conn, now)
        report["queue"] = {"pending": stats["pending"], "running": stats["running"],
                           "due": stats["due"], "dead": stats["dead"], "staged": stats["staged"],
                           "oldest_due_seconds": stats["oldest_due_seconds"],
                           "held_back": stats["held_back"],
                           "oldest_held_back_seconds": stats["oldest_held_back_seconds"]}
        if stats["oldest_held_back_seconds"] > HELD_BACK_WARNING_SECONDS:
            # A peer down or asking to wait: not fixed by a restart, so a warning.
            warnings.append(f"{stats['held_back']} job(s) com falha aguardando nova tentativa, o "
                            f"mais antigo há {round(stats['oldest_held_back_seconds'] / 60)} min "
                            "(veja /admin/jobs?status=pending)")
        beat = db_manager.last_beat(conn, "poller")
        if beat is None:
            problems.append("poller sem heartbeat (não iniciou?)")
        else:
            age = round(now - beat["beat_at"], 1)
            info = beat["info"]
            report["poller"] = {"heartbeat_age_seconds": age, "pid": beat["pid"],
                                "jobs_running": info.get("in_flight", 0),
                                "concurrency": info.get("concurrency"),
                                "db_connections": info.get("db_connections")}
            if age > settings.poller_heartbeat_max_age_seconds:
                problems.append(f"heartbeat do poller atrasado ({age}s)")
            busy_since = info.get("busy_since")  # when the oldest running job started
            if busy_since and now - busy_since > settings.job_lease_seconds + 30:
                oldest = info.get("oldest_job") or {}
                problems.append(f"poller preso no mesmo job há {round(now - busy_since)}s"
                                + (f" (job {oldest['job_id']}, {oldest['kind']})"
                                   if oldest.get("job_id") else ""))
        # Accounts, peers and polls: reported, not fatal — restarting the container cannot
        # reconnect an account or bring a peer back.
        accounts, unreachable = _account_health(conn, settings, now, warnings)
        if accounts:
            report["accounts"] = accounts
        warnings.extend(_peer_warnings(conn, settings, now, skip_bridges=unreachable))
        alerts.check_poller(conn, settings, now)  # the one alert the poller cannot raise itself
        report["alerts"] = [{"alert": a["name"], "message": a["message"], "since_at": a["since_at"]}
                            for a in alerts.active(conn)]
    except Exception as exc:
        problems.append(f"banco de dados indisponível: {type(exc).__name__}")
    if not settings.enabled_bridges:
        warnings.append("nenhuma ponte configurada (veja env.example)")
    if warnings:
        report["status"] = "degraded"
        report["warnings"] = warnings
    if problems:
        report["status"] = "unhealthy"
        report["problems"] = problems
    return report, not problems


_NOT_CONNECTED_TEXT = {"never_connected": "nunca foi conectada",
                       "disconnected": "está desconectada"}


def _account_health(conn, settings, now: float, warnings: list[str]) -> tuple[dict, set]:
    """Each account of an enabled bridge (and any account with a stored token): its status for
    /health's `accounts`; a warning for each enabled bridge's account that is not connected.
    Returns the statuses and the bridges whose account is not connected."""
    accounts, unreachable = {}, set()
    for account in admin_data.accounts(conn, settings, now):
        provider = account["provider"]
        if not (account["bridge_enabled"] or account["stored"]):
            continue
        accounts[provider] = account["status"]
        seeded = provider == "mercadolivre" and (settings.ml_access_token or
                                                 settings.ml_refresh_token)
        if account["status"] == "disconnected" or \
                (account["bridge_enabled"] and account["status"] == "never_connected"
                 and not seeded):
            unreachable.add(account["bridge"])
            detail = f" ({account['detail']})" if account["detail"] else ""
            warnings.append(f"conta {account['label']} {_NOT_CONNECTED_TEXT[account['status']]}"
                            f"{detail}: nada flui por ela; conecte em /admin/conexoes")
    return accounts, unreachable


def _peer_warnings(conn, settings, now: float, skip_bridges: set) -> list[str]:
    """A warning per peer whose recent jobs only failed, and per periodic task (Mercado Livre
    polls) that keeps failing — unless its bridge's account is already reported."""
    found = []
    skip_lanes = {lane for b in skip_bridges for lane in admin_data.BRIDGE_LANES.get(b, ())}
    for peer in admin_data.peer_health(conn, settings, now, alerts.PEER_WINDOW_SECONDS):
        if peer["status"] == admin_data.PeerStatus.FAILING and peer["lane"] not in skip_lanes:
            found.append(f"{peer['label']}: {peer['failed']} job(s) com falha e nenhum sucesso "
                         f"nos últimos {alerts.PEER_WINDOW_SECONDS // 60} min (último erro: "
                         f"{(peer['last_error'] or '')[:160]})")
    if "mercadolivre" not in skip_bridges:  # every recorded task is Mercado Livre's
        for task in task_runs.failing(conn, since=now - alerts.TASK_STALE_SECONDS):
            found.append(f"{task['label']} falhou {task['failures']} vezes seguidas "
                         f"(último erro: {task['last_error'][:160]})")
    return found
