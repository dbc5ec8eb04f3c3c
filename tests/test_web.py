"""The operators' routes and the web process's guarantees: JSON errors, limits, request ids."""
from __future__ import annotations


import pytest

import db_manager
import outbox
from webhook_server import create_app

ADMIN = {"Authorization": "Bearer admin-token-for-tests-123"}


@pytest.fixture
def app(settings, clock):
    return create_app(settings, clock=clock)


@pytest.fixture
def client(app):
    return app.test_client()


def test_index_names_the_service_and_its_bridges(client):
    body = client.get("/").get_json()
    assert body["name"] == "ponte" and body["bridges"] == {"whatsapp": False,
                                                           "mercadolivre": False}


def test_health_is_503_until_the_poller_beats_then_200(client, db, clock):
    response = client.get("/health")
    assert response.status_code == 503
    assert "poller" in " ".join(response.get_json()["problems"])
    db_manager.beat(db, "poller", now=clock())
    response = client.get("/health")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["queue"]["dead"] == 0 and body["queue"]["pending"] == 0
    clock.advance(31)
    response = client.get("/health")
    assert response.status_code == 503 and "atrasado" in response.get_json()["problems"][0]


def test_health_reports_queue_depth_and_dead_jobs(client, db, clock):
    db_manager.beat(db, "poller", now=clock())
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    outbox.enqueue_job(db, "k", "b", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), 30)
    outbox.fail_job(db, job, "x", False, clock(), 5, 100)
    queue = client.get("/health").get_json()["queue"]
    assert queue["pending"] == 1 and queue["dead"] == 1


def test_health_is_503_when_the_database_cannot_open(make_settings, clock, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    s = make_settings(DATABASE_PATH=str(blocker / "sub" / "ponte.db"))
    response = create_app(s, clock=clock).test_client().get("/health")
    assert response.status_code == 503
    assert "banco de dados" in response.get_json()["problems"][0]


def test_health_is_503_on_a_database_of_a_newer_ponte_and_says_why(settings, db, clock):
    db_manager.beat(db, "poller", now=clock())
    newer = len(db_manager.MIGRATIONS) + 1
    db.execute(f"PRAGMA user_version = {newer}")
    response = create_app(settings, clock=clock).test_client().get("/health")
    assert response.status_code == 503
    assert f"versão {newer} do esquema" in " ".join(response.get_json()["problems"])


def test_config_requires_the_admin_token_and_never_shows_secrets(make_settings, clock):
    secrets = {"KOMMO_ACCESS_TOKEN": "kommo-long-lived-secret", "N8N_API_KEY": "n8n-key-secret",
               "KOMMO_WEBHOOK_SECRET": "hook-secret-value-xyz",
               "KOMMO_BASE_URL": "https://minhaloja.kommo.com",
               "N8N_WEBHOOK_URL": "http://127.0.0.1:5678/webhook/ponte"}
    client = create_app(make_settings(**secrets), clock=clock).test_client()
    assert client.get("/config").status_code == 401
    assert client.get("/config", headers={"Authorization": "Bearer wrong"}).status_code == 401
    response = client.get("/config", headers=ADMIN)
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    for value in list(secrets.values())[:3] + ["admin-token-for-tests-123"]:
        assert value not in text
    assert response.get_json()["settings"]["KOMMO_BASE_URL"] == "https://minhaloja.kommo.com"


def test_config_is_refused_when_no_admin_token_is_set(make_settings, clock):
    client = create_app(make_settings(ADMIN_TOKEN=""), clock=clock).test_client()
    response = client.get("/config", headers={"Authorization": "Bearer "})
    assert response.status_code == 401 and response.get_json()["error"] == "auth_not_configured"


@pytest.mark.parametrize("method,path,status", [
    ("get", "/nao-existe", 404), ("post", "/health", 405), ("delete", "/", 405)])
def test_errors_are_json_with_request_id(client, method, path, status):
    response = getattr(client, method)(path)
    assert response.status_code == status
    body = response.get_json()
    assert body["error"] and body["message"] and body["request_id"]
    assert response.headers["X-Request-Id"] == body["request_id"]


def test_oversized_body_gets_413_json(make_settings, clock):
    client = create_app(make_settings(MAX_BODY_BYTES=1000), clock=clock).test_client()
    response = client.post("/admin/jobs/1/retry", data=b"x" * 5000, headers=ADMIN)
    assert response.status_code == 413 and response.get_json()["error"] == "payload_too_large"


def test_request_id_is_echoed_or_generated(client):
    assert client.get("/", headers={"X-Request-Id": "abc-123-def"}).headers["X-Request-Id"] == \
        "abc-123-def"
    generated = client.get("/", headers={"X-Request-Id": "bad id with spaces"})
    assert len(generated.headers["X-Request-Id"]) == 32


def test_unexpected_exception_is_a_json_500(app, client):
    @app.get("/boom")
    def boom():
        raise RuntimeError("bug")

    response = client.get("/boom")
    assert response.status_code == 500 and response.get_json()["error"] == "internal_error"


def test_dead_jobs_are_listed_and_retried_by_the_operator(client, db, clock):
    job_id = outbox.enqueue_job(db, "k", "a", {}, now=clock())
    job = outbox.claim_next_job(db, clock(), 30)
    outbox.fail_job(db, job, "gone", False, clock(), 5, 100)
    assert client.get("/admin/jobs?status=dead").status_code == 401
    listed = client.get("/admin/jobs?status=dead", headers=ADMIN).get_json()["jobs"]
    assert [j["id"] for j in listed] == [job_id] and listed[0]["last_error"] == "gone"
    assert client.post(f"/admin/jobs/{job_id}/retry", headers=ADMIN).status_code == 202
    assert outbox.get_job(db, job_id)["status"] == "pending"
    assert client.post(f"/admin/jobs/{job_id}/retry", headers=ADMIN).status_code == 404
    assert client.get("/admin/jobs?status=weird", headers=ADMIN).status_code == 400


def test_metrics_expose_queue_gauges(client, db, clock):
    outbox.enqueue_job(db, "k", "a", {}, now=clock())
    text = client.get("/metrics").get_data(as_text=True)
    assert 'ponte_jobs{status="pending"} 1' in text


def test_create_app_does_no_work_at_import():
    import importlib
    import webhook_server
    module = importlib.reload(webhook_server)
    assert not hasattr(module, "app")
