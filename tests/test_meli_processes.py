"""Bridge B with real processes: Gunicorn (2 workers) for the web and `python poller.py`, both
configured only by environment variables, against the stand-ins. Proves the wiring (settings
names, blueprint, HANDLERS/SCHEDULES registration, clients) and a restart of the poller."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import requests

from standins import chatwoot as standin_chatwoot
from standins import mercadolivre as standin_ml
from standins.support import free_port, wait_for
from tests.conftest import ROOT, venv_bin
from tests.meli_support import SELLER, bridge_env


def _wait_for(condition, timeout: float = 30.0, what: str = ""):
    # waiting for other processes, not for time to pass in the code
    return wait_for(condition, timeout, what=what)


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_question_and_answer_through_gunicorn_and_the_poller_process(serve, tmp_path):
    ml = serve(standin_ml.create_app(SELLER))
    cw = serve(standin_chatwoot.create_app())
    port = free_port()
    env = {**os.environ, **{k: str(v) for k, v in bridge_env(ml.url, cw.url).items()},
           "DATABASE_PATH": str(tmp_path / "ponte.db"), "LOG_DIR": str(tmp_path / "logs"),
           "ENVIRONMENT": "test", "PONTE_ENV_FILE": str(tmp_path / "none.env"),
           "ML_POLL_QUESTIONS_SECONDS": "1", "ML_POLL_MESSAGES_SECONDS": "1",
           "HOST": "127.0.0.1", "PORT": str(port), "WEB_WORKERS": "2"}
    web = subprocess.Popen([str(venv_bin() / "gunicorn"), "-c", "gunicorn_conf.py",
                            "webhook_server:create_app()"], cwd=str(ROOT), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    poller = subprocess.Popen([sys.executable, "poller.py"], cwd=str(ROOT), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        web_url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _get_ok(f"{web_url}/"), what="gunicorn")
        requests.post(f"{cw.url}/_standin/inboxes", json=[
            {"id": 7, "webhook_url": f"{web_url}/webhooks/chatwoot"}], timeout=5)
        requests.post(f"{ml.url}/_standin/items", json=[{"id": "MLB1", "title": "Serra"}])
        qid = requests.post(f"{ml.url}/_standin/questions", json=[
            {"text": "Corta madeira de 5 cm?", "item_id": "MLB1", "buyer_id": 42}]).json()["ids"][0]
        # the poller process picks the question up on its own schedule
        conv = _wait_for(lambda: _conversation(cw.url), what="the conversation")
        assert conv["custom_attributes"]["meli_question_id"] == str(qid)
        # the poller restarts; the answer typed by the agent is delivered once
        _stop(poller)
        poller = subprocess.Popen([sys.executable, "poller.py"], cwd=str(ROOT), env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        hook = requests.post(f"{cw.url}/_standin/agent_reply", json={
            "conversation_id": conv["id"], "content": "Corta sim, até 6 cm.", "deliver": True},
            timeout=10).json()
        assert hook["delivered_status"] == 200
        requests.post(f"{web_url}/webhooks/chatwoot", data=hook["raw_body"].encode(),
                      headers=hook["headers"], timeout=5)  # Chatwoot sent it twice
        answers = _wait_for(lambda: _state(ml.url)["answers"], what="the answer")
        assert [a["text"] for a in answers] == ["Corta sim, até 6 cm."]
        _wait_for(lambda: "respondida" in (_conversation(cw.url) or {}).get("labels", []),
                  what="the label")
        assert len(_state(ml.url)["answers"]) == 1
        assert _state(cw.url)["spec_violations"] == []
    finally:
        _stop(poller)
        _stop(web)


def _get_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _state(url: str) -> dict:
    return requests.get(f"{url}/_standin/state", timeout=5).json()


def _conversation(cw_url: str) -> dict | None:
    conversations = _state(cw_url)["conversations"]
    return conversations[0] if conversations and conversations[0]["all_messages"] else None
