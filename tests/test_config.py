"""Settings: one declaration per setting, every problem reported at once, secrets masked."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_need_no_configuration():
    s = config.load_settings({})
    assert s.port == 8000 and s.database_path == "data/ponte.db" and s.log_dir == "logs"
    assert s.enabled_bridges == ()


def test_config_error_lists_every_problem_at_once():
    env = {"PORT": "abc", "DEBUG": "talvez", "KOMMO_BASE_URL": "minhaloja.kommo.com",
           "N8N_WEBHOOK_URL": "http://127.0.0.1:5678/webhook/ponte", "ML_CLIENT_ID": "123"}
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(env)
    text = "\n".join(err.value.problems)
    assert "PORT inválido" in text and "DEBUG inválido" in text
    assert "KOMMO_BASE_URL inválido" in text
    incomplete = next(p for p in err.value.problems if p.startswith("ponte 'whatsapp'"))
    assert "KOMMO_BASE_URL" not in incomplete  # reported once, as invalid, not also as missing
    assert "ponte 'mercadolivre' incompleta" in text and "ML_CLIENT_SECRET" in text
    assert "CHATWOOT_SALES_INBOX_ID" in text
    # what a half-configured bridge will also need comes in the same message, not the next run
    assert "CHATWOOT_WEBHOOK_SECRET" in text and "PUBLIC_BASE_URL" in text
    assert "PORT inválido (precisa ser um número inteiro)" in text
    assert len(err.value.problems) >= 6


def test_a_half_configured_whatsapp_bridge_lists_its_kommo_checks_too_but_setup_may_run():
    half = {"KOMMO_BASE_URL": "https://minhaloja.kommo.com", "KOMMO_REPLY_MODE": "salesbot"}
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(half)
    text = "\n".join(err.value.problems)
    assert "ponte 'whatsapp' incompleta" in text and "sem credencial do Kommo" in text
    assert "KOMMO_REPLY_MODE=salesbot exige" in text and "KOMMO_REPLY_FIELD_ID" in text
    # the Kommo setup commands run while the bridge is being configured: create-field is how
    # the seller gets KOMMO_REPLY_FIELD_ID
    complete = {**half, "KOMMO_WEBHOOK_SECRET": "s" * 20, "KOMMO_ACCESS_TOKEN": "t" * 40,
                "N8N_WEBHOOK_URL": "https://n8n.example.org/webhook/x", "N8N_API_KEY": "k" * 20}
    for env in (half, complete):
        assert config.load_settings(env, partial_bridges_ok=True).kommo_reply_mode == "salesbot"
    # ...but a complete bridge without any Kommo credential is still refused
    no_credential = {k: v for k, v in complete.items() if k != "KOMMO_ACCESS_TOKEN"}
    with pytest.raises(config.ConfigError, match="sem credencial do Kommo"):
        config.load_settings(no_credential, partial_bridges_ok=True)


def test_placeholders_from_the_seed_readme_count_as_missing():
    env = {"KOMMO_BASE_URL": "https://minhaloja.kommo.com", "KOMMO_WEBHOOK_SECRET": "s" * 20,
           "N8N_WEBHOOK_URL": "https://n8n.exemplo.com.br/webhook/x", "N8N_API_KEY": "seu_token",
           "KOMMO_CLIENT_ID": "seu_client_id"}
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(env)
    assert "N8N_API_KEY" in str(err.value)


def test_bridge_enabled_only_when_complete():
    env = {"KOMMO_BASE_URL": "https://minhaloja.kommo.com", "KOMMO_WEBHOOK_SECRET": "s" * 20,
           "N8N_WEBHOOK_URL": "https://n8n.example.org/webhook/x", "N8N_API_KEY": "k" * 20,
           "KOMMO_ACCESS_TOKEN": "t" * 40}
    s = config.load_settings(env)
    assert s.bridge_enabled("whatsapp") and not s.bridge_enabled("mercadolivre")


def test_mercado_livre_bridge_needs_chatwoot_webhook_auth_and_an_oauth_return_address():
    env = {"ML_CLIENT_ID": "123", "ML_CLIENT_SECRET": "c" * 20, "ML_SELLER_ID": "99",
           "CHATWOOT_BASE_URL": "https://chat.loja.com.br", "CHATWOOT_API_TOKEN": "t" * 20,
           "CHATWOOT_ACCOUNT_ID": "1", "CHATWOOT_QUESTIONS_INBOX_ID": "2",
           "CHATWOOT_SALES_INBOX_ID": "3"}
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(env)
    assert "CHATWOOT_WEBHOOK_SECRET ou CHATWOOT_WEBHOOK_TOKEN" in str(err.value)
    assert "PUBLIC_BASE_URL" in str(err.value)
    for return_address in ({"PUBLIC_BASE_URL": "https://ponte.loja.com.br"},
                           {"ML_REDIRECT_URI": "https://ponte.loja.com.br/oauth/mercadolivre/callback"},
                           {"ML_REFRESH_TOKEN": "TG-initial-refresh-token"}):
        s = config.load_settings({**env, "CHATWOOT_WEBHOOK_TOKEN": "u" * 20, **return_address})
        assert s.bridge_enabled("mercadolivre")


def test_secrets_are_masked_in_repr_and_redacted_view():
    env = {"ADMIN_TOKEN": "admin-super-secret-1", "KOMMO_ACCESS_TOKEN": "kommo-secret-token-2",
           "CHATWOOT_WEBHOOK_SECRET": "hmac-secret-3"}
    s = config.load_settings(env)
    for text in (repr(s), str(s), str(config.redacted_settings(s))):
        for secret in env.values():
            assert secret not in text
    assert config.redacted_settings(s)["ADMIN_TOKEN"] == "***"


def test_env_example_is_generated_from_the_declarations():
    text = (ROOT / "env.example").read_text(encoding="utf-8")
    assert text == config.env_example(), "run: python config.py --env-example > env.example"
    names = set(re.findall(r"^(?:# )?([A-Z0-9_]+)=", text, re.M))
    assert names == {s.name for s in config.SETTINGS}


def test_readme_configuration_table_matches_the_declarations():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config.settings_table_markdown() in readme, "run: python config.py --table"


def test_every_setting_has_help_and_a_unique_name():
    names = [s.name for s in config.SETTINGS]
    assert len(names) == len(set(names))
    assert all(s.help for s in config.SETTINGS)


def test_pasting_env_example_changes_no_default():
    text = (ROOT / "env.example").read_text(encoding="utf-8")
    pasted = dict(line.split("=", 1) for line in text.splitlines()
                  if line and not line.startswith("#"))
    assert config.load_settings(pasted) == config.load_settings({})


def _check(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if k not in {s.name for s in config.SETTINGS}}
    base.update(PONTE_ENV_FILE=str(tmp_path / "none.env"), **env)
    return subprocess.run([sys.executable, "config.py", "--check"], cwd=ROOT, env=base,
                          capture_output=True, text=True, timeout=60)


def test_check_stops_a_half_configured_bridge_and_only_warns_about_risky_settings(tmp_path):
    empty = _check(tmp_path)
    assert empty.returncode == 0
    assert "nenhuma ponte configurada" in empty.stderr and "ADMIN_TOKEN vazio" in empty.stderr
    risky = _check(tmp_path, ADMIN_TOKEN="a" * 24, KOMMO_BASE_URL="https://loja.kommo.com",
                   KOMMO_WEBHOOK_SECRET="abc", KOMMO_ACCESS_TOKEN="t" * 40, KOMMO_MAX_RPS="10",
                   N8N_WEBHOOK_URL="https://n8n.loja.com.br/webhook/x", N8N_API_KEY="k" * 20)
    assert risky.returncode == 0
    assert "KOMMO_WEBHOOK_SECRET tem menos de 16" in risky.stderr
    assert "KOMMO_MAX_RPS=10" in risky.stderr and "ADMIN_TOKEN" not in risky.stderr
    assert "limite" not in risky.stderr  # 10 is not "no limit"
    no_limit = _check(tmp_path, ADMIN_TOKEN="a" * 24, KOMMO_BASE_URL="https://loja.kommo.com",
                      KOMMO_WEBHOOK_SECRET="s" * 20, KOMMO_ACCESS_TOKEN="t" * 40,
                      KOMMO_MAX_RPS="0", N8N_WEBHOOK_URL="https://n8n.loja.com.br/webhook/x",
                      N8N_API_KEY="k" * 20)
    assert "KOMMO_MAX_RPS=0 desliga o limite" in no_limit.stderr
    half = _check(tmp_path, ADMIN_TOKEN="a" * 24, KOMMO_BASE_URL="https://loja.kommo.com")
    assert half.returncode == 2
    assert "ponte 'whatsapp' incompleta" in half.stderr and "ADMIN_TOKEN" not in half.stderr


@pytest.mark.parametrize("name, raw, expected", [
    ("PORT", "70000", "PORT inválido (use de 1 a 65535)"),
    ("PORT", "0", "PORT inválido (use de 1 a 65535)"),
    ("PORT", "oito mil", "PORT inválido (precisa ser um número inteiro)"),
    ("CHATWOOT_ACCOUNT_ID", "um", "CHATWOOT_ACCOUNT_ID inválido ('um' não é um id"),
    ("CHATWOOT_QUESTIONS_INBOX_ID", "sete", "CHATWOOT_QUESTIONS_INBOX_ID inválido ('sete'"),
    ("CHATWOOT_SALES_INBOX_ID", "8a", "CHATWOOT_SALES_INBOX_ID inválido"),
    ("ML_SELLER_ID", "-5", "ML_SELLER_ID inválido"),
    ("KOMMO_ACCOUNT_ID", "12 34", "KOMMO_ACCOUNT_ID inválido"),
    ("ML_POLL_QUESTIONS_SECONDS", "0", "ML_POLL_QUESTIONS_SECONDS inválido (o mínimo é 1)"),
    ("ML_POLL_MESSAGES_SECONDS", "-30", "ML_POLL_MESSAGES_SECONDS inválido (o mínimo é 1)"),
    ("WEB_WORKERS", "0", "WEB_WORKERS inválido (o mínimo é 1)"),
    ("POLLER_CONCURRENCY", "0", "POLLER_CONCURRENCY inválido (o mínimo é 1)"),
    ("BOT_DEBOUNCE_SECONDS", "-1", "BOT_DEBOUNCE_SECONDS inválido (o mínimo é 0)"),
    ("N8N_TIMEOUT_SECONDS", "0", "N8N_TIMEOUT_SECONDS inválido (o mínimo é 1)"),
])
def test_each_type_and_range_is_checked(name, raw, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load_settings({name: raw})
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("name, raw", [("PORT", "1"), ("PORT", "65535"),
                                       ("KOMMO_ACCOUNT_ID", " 12 "),
                                       ("ML_POLL_QUESTIONS_SECONDS", "1"),
                                       ("BOT_DEBOUNCE_SECONDS", "0")])
def test_the_edges_of_each_range_are_accepted(name, raw):
    value = getattr(config.load_settings({name: raw}), name.lower())
    assert str(value) == raw.strip() or value == float(raw)


def test_ids_stay_text_and_a_half_configured_bridge_does_not_also_call_a_bad_id_missing():
    with pytest.raises(config.ConfigError) as err:
        config.load_settings({"CHATWOOT_ACCOUNT_ID": "um"})
    incomplete = next(p for p in err.value.problems if "incompleta" in p)
    assert "CHATWOOT_ACCOUNT_ID" not in incomplete
    assert config.load_settings({"KOMMO_ACCOUNT_ID": "31257294"}).kommo_account_id == "31257294"


def test_the_range_of_each_setting_is_in_the_documentation():
    table = config.settings_table_markdown()
    assert "| `PORT` | `8000` | porta | Porta HTTP do servidor web. De 1 a 65535. |" in table
    assert "Intervalo de busca de perguntas. Mínimo: 1." in table
    assert "ID da conta no Chatwoot. Só dígitos." in table


def test_check_warns_about_a_short_admin_token_and_fast_polls_in_production(tmp_path):
    short = _check(tmp_path, ADMIN_TOKEN="abc")
    assert short.returncode == 0 and "ADMIN_TOKEN tem menos de 16 caracteres" in short.stderr
    assert "abc" not in short.stderr  # the token itself is never printed
    ml = {"ML_CLIENT_ID": "123", "ML_CLIENT_SECRET": "c" * 20, "ML_SELLER_ID": "99",
          "CHATWOOT_BASE_URL": "https://chat.loja.com.br", "CHATWOOT_API_TOKEN": "t" * 20,
          "CHATWOOT_ACCOUNT_ID": "1", "CHATWOOT_QUESTIONS_INBOX_ID": "2",
          "CHATWOOT_SALES_INBOX_ID": "3", "CHATWOOT_WEBHOOK_TOKEN": "u" * 20,
          "PUBLIC_BASE_URL": "https://ponte.loja.com.br", "ADMIN_TOKEN": "a" * 24}
    fast = _check(tmp_path, **ml, ML_POLL_QUESTIONS_SECONDS="2")
    assert fast.returncode == 0
    assert "ML_POLL_QUESTIONS_SECONDS=2" in fast.stderr and "ML_POLL_MESSAGES" not in fast.stderr
    assert "ADMIN_TOKEN" not in fast.stderr
    # the demo and the tests poll fast on purpose
    assert "ML_POLL" not in _check(tmp_path, **ml, ML_POLL_QUESTIONS_SECONDS="2",
                                   ENVIRONMENT="demo").stderr
    broken = _check(tmp_path, PORT="70000", ML_POLL_QUESTIONS_SECONDS="0")
    assert broken.returncode == 2
    assert "PORT inválido (use de 1 a 65535)" in broken.stderr
    assert "ML_POLL_QUESTIONS_SECONDS inválido (o mínimo é 1)" in broken.stderr
