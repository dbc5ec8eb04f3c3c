"""`./ponte kommo ...`: one-time Kommo setup through its API, against the Kommo stand-in."""
from __future__ import annotations

import kommo_setup
from standins import kommo as kommo_standin


def _env(monkeypatch, tmp_path, url):
    for key, value in {"KOMMO_BASE_URL": url, "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN,
                       "DATABASE_PATH": str(tmp_path / "p.db"), "LOG_DIR": str(tmp_path),
                       "PONTE_ENV_FILE": str(tmp_path / "none.env"),
                       "PUBLIC_BASE_URL": "https://ponte.loja.com.br",
                       "KOMMO_WEBHOOK_SECRET": "segredo-longo-0123456789"}.items():
        monkeypatch.setenv(key, value)


def test_create_field_prints_the_env_line(monkeypatch, tmp_path, serve, capsys):
    app = kommo_standin.create_app(max_rps=0)
    _env(monkeypatch, tmp_path, serve(app).url)
    assert kommo_setup.main(["create-field"]) == 0
    field = app.config["STATE"].custom_fields[0]
    assert field["type"] == "textarea" and field["name"] == "Resposta IA"
    assert f"KOMMO_REPLY_FIELD_ID={field['id']}" in capsys.readouterr().out


def test_register_webhook_subscribes_the_events(monkeypatch, tmp_path, serve, capsys):
    app = kommo_standin.create_app(max_rps=0)
    _env(monkeypatch, tmp_path, serve(app).url)
    assert kommo_setup.main(["register-webhook"]) == 0
    hooks = app.config["STATE"].webhooks
    assert hooks == {"https://ponte.loja.com.br/webhooks/kommo/segredo-longo-0123456789":
                     ["add_message", "note_lead"]}
    out = capsys.readouterr().out
    assert "https://ponte.loja.com.br/webhooks/kommo/<KOMMO_WEBHOOK_SECRET>" in out
    assert "segredo-longo" not in out


def test_register_webhook_without_a_secret_registers_nothing(monkeypatch, tmp_path, serve,
                                                             capsys):
    app = kommo_standin.create_app(max_rps=0)
    _env(monkeypatch, tmp_path, serve(app).url)
    monkeypatch.setenv("KOMMO_WEBHOOK_SECRET", "")
    assert kommo_setup.main(["register-webhook"]) == 2
    assert app.config["STATE"].webhooks == {}
    assert "KOMMO_WEBHOOK_SECRET" in capsys.readouterr().err


def test_refused_token_is_reported(monkeypatch, tmp_path, serve, capsys):
    app = kommo_standin.create_app(access_token="other", max_rps=0)
    _env(monkeypatch, tmp_path, serve(app).url)
    assert kommo_setup.main(["create-field"]) == 1
    assert "O Kommo recusou" in capsys.readouterr().err


def test_setup_without_a_kommo_credential_says_which_setting_is_missing(monkeypatch, tmp_path,
                                                                        serve, capsys):
    app = kommo_standin.create_app(max_rps=0)
    _env(monkeypatch, tmp_path, serve(app).url)
    monkeypatch.setenv("KOMMO_ACCESS_TOKEN", "")
    assert kommo_setup.main(["create-field"]) == 2
    assert "KOMMO_ACCESS_TOKEN" in capsys.readouterr().err
    assert app.config["STATE"].custom_fields == []


def test_a_refused_registration_does_not_print_the_secret(monkeypatch, tmp_path, serve, capsys):
    app = kommo_standin.create_app(max_rps=0)
    _env(monkeypatch, tmp_path, serve(app).url)
    monkeypatch.setenv("PUBLIC_BASE_URL", "http://ponte.loja.com.br")  # Kommo wants https
    assert kommo_setup.main(["register-webhook"]) == 1
    err = capsys.readouterr().err
    assert "O Kommo recusou" in err and "http://ponte.loja.com.br/webhooks/kommo/***" in err
    assert "segredo-longo" not in err


def test_a_refused_token_is_not_sent_again_until_kommo_access_token_changes(monkeypatch,
                                                                             tmp_path, serve,
                                                                             capsys):
    app = kommo_standin.create_app(access_token="other", max_rps=0)
    _env(monkeypatch, tmp_path, serve(app).url)
    assert kommo_setup.main(["create-field"]) == 1
    requests_after_first = len(app.config["STATE"].requests)
    capsys.readouterr()
    # the same token again: refused at once, without a request, saying what to change
    assert kommo_setup.main(["create-field"]) == 1
    assert len(app.config["STATE"].requests) == requests_after_first
    assert "KOMMO_ACCESS_TOKEN" in capsys.readouterr().err
    # a new token: Kommo is called again
    monkeypatch.setenv("KOMMO_ACCESS_TOKEN", "other")
    assert kommo_setup.main(["create-field"]) == 0
    assert app.config["STATE"].custom_fields
