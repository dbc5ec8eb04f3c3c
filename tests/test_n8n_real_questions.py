"""The Mercado Livre questions template (n8n/ponte-perguntas-mercadolivre.json) on a real n8n
(installed by tools/n8n-peer, as `./ponte test` and CI do), with ponte's bridge B against the
Mercado Livre and Chatwoot stand-ins."""
from __future__ import annotations

import os
import subprocess

import pytest
import requests

from standins.support import free_port
from tests.meli_support import QUESTIONS_INBOX, Bridge, messages_of
from tests.test_n8n_real import INSTALLED, PEER, ROOT

TEMPLATE = ROOT / "n8n" / "ponte-perguntas-mercadolivre.json"
KEY = "ml-ai-real-key-123456"
ITEM = "MLB3737188005"

pytestmark = pytest.mark.skipif(not INSTALLED.exists(),
                                reason="n8n real não instalado (./ponte test o instala quando "
                                       "há npm; ou rode tools/n8n-peer/install.sh)")


@pytest.fixture(scope="module")
def n8n_url():
    """A real n8n running the questions template; its webhook URL."""
    port = free_port()
    started = subprocess.run(["bash", str(PEER / "start.sh"), str(TEMPLATE)],
                             env={**os.environ, "N8N_PORT": str(port)},
                             capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, started.stderr
    pid = int(started.stdout.strip().splitlines()[-1])
    try:
        yield f"http://127.0.0.1:{port}/webhook/ponte-perguntas"
    finally:
        os.kill(pid, 15)


def _bridge(make_settings, serve, clock, url: str, mode: str) -> Bridge:
    b = Bridge(make_settings, serve, clock, ML_AI_MODE=mode, ML_AI_WEBHOOK_URL=url,
               ML_AI_API_KEY=KEY, ML_AI_TIMEOUT_SECONDS="20")
    b.ml_post("/_standin/items", [{
        "id": ITEM, "title": "Espaçador E Nivelador Para Piso 1,5 Mm 500pçs", "price": 62.96,
        "available_quantity": 37,
        "attributes": [{"id": "MATERIAL", "name": "Material", "value_name": "Plástico"}],
        "description_text": "Kit com 500 espaçadores de 1,5 mm, ideal para porcelanato."}])
    return b


def _ask(b: Bridge, text: str, buyer_id: int = 1944693439) -> int:
    return b.ml_post("/_standin/questions", [{"text": text, "item_id": ITEM,
                                              "buyer_id": buyer_id}])["ids"][0]


def test_real_n8n_template_answers_a_question_from_the_item_automatically(
        n8n_url, make_settings, serve, clock):
    b = _bridge(make_settings, serve, clock, n8n_url, "automatico")
    # GIVEN a buyer asks whether the item is in stock
    _ask(b, "Tem em estoque?")
    # WHEN ponte imports it and the real workflow answers
    b.poll()
    # THEN the answer, read from the item ponte sent, is on Mercado Livre and in Chatwoot
    answers = [a["text"] for a in b.ml_state()["answers"]]
    assert answers == ["Olá! Sim, temos 37 unidades a pronta entrega."]
    (conv,) = b.conversations(QUESTIONS_INBOX)
    assert "ia-respondeu" in conv["labels"]
    b.poller.conn.close()
    b.conn.close()


def test_real_n8n_template_suggests_from_attributes_and_declines_what_it_cannot_answer(
        n8n_url, make_settings, serve, clock):
    b = _bridge(make_settings, serve, clock, n8n_url, "sugerir")
    _ask(b, "Qual o material?")
    b.poll()
    (conv,) = b.conversations(QUESTIONS_INBOX)
    notes = [m["content"] for m in messages_of(conv) if m["private"]]
    assert notes and notes[0].startswith("💡 Sugestão da IA: Olá! Material: Plástico.")
    assert b.ml_state()["answers"] == []
    # AND an item the agent knows nothing about: should_send false, no suggestion, no answer
    b.ml_post("/_standin/items", [{"id": "MLB1", "title": "Outro", "description_text": ""}])
    b.ml_post("/_standin/questions", [{"text": "Serve no meu carro?", "item_id": "MLB1",
                                       "buyer_id": 77}])
    b.poll()
    other = [c for c in b.conversations(QUESTIONS_INBOX) if c["id"] != conv["id"]][0]
    assert not [m for m in messages_of(other) if m["private"]]
    assert b.ml_state()["answers"] == []
    calls = requests.get(f"{b.ml.url}/_standin/state", timeout=5).json()["calls"]
    assert any(c["path"] == "/items/MLB1/description" for c in calls)
    b.poller.conn.close()
    b.conn.close()
