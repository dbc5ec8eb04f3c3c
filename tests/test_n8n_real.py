"""Bridge A against a real n8n (installed by tools/n8n-peer, as `./ponte test` and CI do)
running the workflow templates shipped in n8n/."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

import db_manager
from n8n_api import N8nClient
from poller import Poller
from standins import kommo as kommo_standin
from standins.support import free_port
from webhook_server import create_app

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "tools" / "n8n-peer"
INSTALLED = Path(os.environ.get("N8N_PEER_DIR", Path.home() / ".cache/ponte-n8n-peer")) / \
    ".installed"
SECRET, KEY = "hook-secret-real-n8n-0123456789", "n8n-real-key-123456"

pytestmark = pytest.mark.skipif(not INSTALLED.exists(),
                                reason="n8n real não instalado (./ponte test o instala quando "
                                       "há npm; ou rode tools/n8n-peer/install.sh)")


def _sync_template_answering_per_execution() -> dict:
    """The synchronous template on path `ponte-repeticao`, its stand-in agent answering with
    n8n's execution id: an answer that differs each time the agent really runs."""
    wf = json.loads((ROOT / "n8n/ponte-resposta-sincrona.json").read_text())
    wf.update(id="ponteRepeatWf001", name="ponte: repetição (teste)",
              versionId="1c2d3e4f-0000-4000-8000-00000000a0ff")
    webhook = next(n for n in wf["nodes"] if n["type"].endswith(".webhook"))
    webhook["parameters"]["path"] = "ponte-repeticao"
    webhook["webhookId"] = "7b9f3c1e-2a4d-4c8b-9e6f-0a1b2c3d00ff"
    agent = next(n for n in wf["nodes"] if n["name"] == "Agente IA (substitua)")
    agent["parameters"]["assignments"]["assignments"][0]["value"] = \
        "={{ 'execução ' + $execution.id }}"
    return wf


@pytest.fixture(scope="module")
def ponte_and_n8n(tmp_path_factory):
    """ponte (web served on loopback) + Kommo stand-in + a real n8n with both templates."""
    from tests.conftest import ServedApp
    import config
    tmp = tmp_path_factory.mktemp("real-n8n")
    kommo = ServedApp(kommo_standin.create_app(max_rps=0))
    n8n_port = free_port()
    env = {"DATABASE_PATH": str(tmp / "ponte.db"), "LOG_DIR": str(tmp / "logs"),
           "KOMMO_BASE_URL": kommo.url, "KOMMO_WEBHOOK_SECRET": SECRET,
           "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN, "KOMMO_MAX_RPS": "0",
           "N8N_WEBHOOK_URL": f"http://127.0.0.1:{n8n_port}/webhook/ponte", "N8N_API_KEY": KEY,
           "BOT_DEBOUNCE_SECONDS": "0", "N8N_TIMEOUT_SECONDS": "20"}
    settings = config.load_settings(env)
    web = ServedApp(create_app(settings))
    async_wf = json.loads((ROOT / "n8n/ponte-resposta-assincrona.json").read_text())
    http_node = next(n for n in async_wf["nodes"] if n["type"].endswith("httpRequest"))
    http_node["parameters"]["url"] = web.url + "/send-response"
    http_node["parameters"]["headerParameters"]["parameters"][0]["value"] = f"Bearer {KEY}"
    async_path = tmp / "async.json"
    async_path.write_text(json.dumps(async_wf))
    repeat_path = tmp / "repeat.json"
    repeat_path.write_text(json.dumps(_sync_template_answering_per_execution()))
    started = subprocess.run(["bash", str(PEER / "start.sh"),
                              str(ROOT / "n8n/ponte-resposta-sincrona.json"), str(async_path),
                              str(repeat_path)],
                             env={**os.environ, "N8N_PORT": str(n8n_port)},
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.strip().splitlines()[-1])
    try:
        yield settings, web, kommo, n8n_port
    finally:
        os.kill(pid, 15)
        web.stop()
        kommo.stop()


def _sent(kommo) -> list[str]:
    return [m["text"] for m in requests.get(kommo.url + "/_standin/state").json()["sent"]]


def _post(web, text, message_id, contact_id="93589657", talk_id="1874"):
    body = kommo_standin.message_form(text, message_id=message_id, contact_id=contact_id,
                                      talk_id=talk_id)
    r = requests.post(f"{web.url}/webhooks/kommo/{SECRET}", data=body,
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200


def test_real_n8n_synchronous_template_answers_into_the_chat(ponte_and_n8n):
    settings, web, kommo, _ = ponte_and_n8n
    _post(web, "Vocês entregam em Campinas?", "real-sync-1")
    poller = Poller(settings, db_manager.connect(settings.database_path))
    poller.drain()
    assert _sent(kommo) == ["Olá, Maria! Recebi sua mensagem: Vocês entregam em Campinas?"]


def test_real_n8n_asynchronous_template_answers_through_send_response(ponte_and_n8n):
    settings, web, kommo, port = ponte_and_n8n
    async_settings = settings.replace(
        n8n_webhook_url=f"http://127.0.0.1:{port}/webhook/ponte-async")
    _post(web, "Qual o prazo?", "real-async-1", contact_id="555", talk_id="2222")
    poller = Poller(async_settings, db_manager.connect(settings.database_path))
    before = len(_sent(kommo))
    poller.drain()  # n8n answered "Workflow was started": nothing to send yet
    assert len(_sent(kommo)) == before
    deadline = time.monotonic() + 30
    while len(_sent(kommo)) == before and time.monotonic() < deadline:
        poller.drain()
        time.sleep(0.2)
    assert _sent(kommo)[-1] == "Olá! Recebi sua mensagem: Qual o prazo?"


def test_real_n8n_template_answers_a_repeated_burst_without_running_the_agent_again(
        ponte_and_n8n):
    # GIVEN the synchronous template, whose agent answers differently on every run
    _, _, _, port = ponte_and_n8n
    n8n = N8nClient(f"http://127.0.0.1:{port}/webhook/ponte-repeticao", KEY,
                    timeout_seconds=20)

    def ask(key):
        return n8n.send({"message_text": "Tem em azul?", "idempotency_key": key},
                        idempotency_key=key)["output"]

    first = ask("ponte-burst-1")
    # WHEN ponte sends the same burst again (n8n saves what a run remembered when the run
    # ends, a moment after it answered; a repeat that early runs the agent again)
    deadline = time.monotonic() + 20
    again = ask("ponte-burst-1")
    while again != first and time.monotonic() < deadline:
        time.sleep(0.2)
        first, again = again, ask("ponte-burst-1")
    # THEN the workflow answers what it answered before, and a new burst runs the agent
    assert again == first and first.startswith("execução ")
    assert ask("ponte-burst-2") not in (first, "")
