"""A stand-in for the seller's n8n workflow (Webhook node + "Respond to Webhook").

`POST /webhook/<path>` checks `Authorization: Bearer <api key>`, records the request and answers
by mode: `sync` (`{"output": "..."}`, like the example workflow), `list` (several messages),
`empty` (200 `{}` — the workflow will answer later), `async` (empty now, then it posts the
answer to ponte's `/send-response` — `/mercadolivre/send-response` for a Mercado Livre question —
from a thread), `down` (503). `fail_next` injects failures; `script` (a list of JSON bodies) is
answered one per call, before the mode. Mercado Livre questions (`chat_type`
`mercadolivre_question`) are answered from the item ponte sends.
Inspection: `GET /_standin/calls` (each call's body and `Idempotency-Key` header),
`POST /_standin/mode`.
"""
from __future__ import annotations

import threading
import time

import requests
from flask import Flask, jsonify, request

DEFAULT_KEY = "n8n-standin-key"


def question_answer_for(body: dict) -> str:
    """The rule-based 'AI' of Mercado Livre questions: it answers from the item ponte sent."""
    text = (body.get("message_text") or "").lower()
    item = body.get("item") or {}
    if "estoque" in text or "disponível" in text or "disponivel" in text or "tem " in text:
        quantity = item.get("available_quantity")
        if quantity:
            return f"Olá! Sim, temos {quantity} unidades a pronta entrega. Pode comprar!"
    for attribute in item.get("attributes") or []:
        name = str(attribute.get("name") or "").lower()
        if name and name in text:
            return f"Olá! {attribute['name']}: {attribute.get('value')}. Qualquer dúvida, estamos à disposição."
    if item.get("description"):
        return f"Olá! {item['description'].splitlines()[0]} Qualquer dúvida, estamos à disposição."
    return f"Olá! Obrigado pela pergunta sobre {item.get('title') or 'o anúncio'}. Estamos à disposição."


def answer_for(body: dict) -> str:
    """A small rule-based 'AI' in Portuguese, enough for the demo to read naturally."""
    if body.get("chat_type") == "mercadolivre_question":
        return question_answer_for(body)
    text = (body.get("message_text") or "").lower()
    name = (body.get("contact_name") or "").split(" ")[0]
    if "entreg" in text or "frete" in text:
        return f"Olá{', ' + name if name else ''}! Entregamos em todo o Brasil; para sua região o prazo é de 2 a 4 dias úteis."
    if "preço" in text or "preco" in text or "valor" in text:
        return "O valor está na página do produto e parcelamos em até 10x sem juros. 😊"
    return f"Olá{', ' + name if name else ''}! Recebi sua mensagem: “{body.get('message_text', '')}”. Como posso ajudar?"


def create_app(api_key: str = DEFAULT_KEY, mode: str = "sync",
               ponte_url: str | None = None, async_delay_seconds: float = 0.2,
               latency_seconds: float = 0.0) -> Flask:
    """A fresh n8n stand-in. `latency_seconds`: how long every call takes before its answer
    (a real AI agent answers in seconds); the call is recorded on arrival, before that wait.
    `POST /_standin/mode {"delay": s}` changes it later."""
    app = Flask("n8n-standin")
    state = {"mode": mode, "calls": [], "fail_next": 0, "fail_status": 503,
             "delay": latency_seconds,
             "ponte_url": ponte_url, "async_results": [], "script": []}
    lock = threading.Lock()
    app.config["STATE"] = state

    def post_later(body: dict):
        time.sleep(async_delay_seconds)
        if body.get("chat_type") == "mercadolivre_question":
            path, answer = "/mercadolivre/send-response", {
                "question_id": body["question"]["id"], "response_text": answer_for(body)}
        else:
            path, answer = "/send-response", {"conversation_id": body["conversation_id"],
                                              "response_text": answer_for(body),
                                              "correlation_id": body.get("correlation_id")}
        try:
            r = requests.post(state["ponte_url"] + path, timeout=5,
                              headers={"Authorization": f"Bearer {api_key}"}, json=answer)
            state["async_results"].append(r.status_code)
        except requests.RequestException as exc:
            state["async_results"].append(repr(exc))

    @app.post("/webhook/<path:path>")
    def webhook(path):
        if request.headers.get("Authorization") != f"Bearer {api_key}":
            return jsonify(code=403, message="Authorization data is wrong!"), 403
        body = request.get_json(silent=True) or {}
        with lock:
            state["calls"].append({"path": path, "body": body, "at": time.time(),
                                   "idempotency_key": request.headers.get("Idempotency-Key")})
            if state["fail_next"] > 0:
                state["fail_next"] -= 1
                return jsonify(message="Error in workflow"), state["fail_status"]
            current = state["mode"]
            scripted = state["script"].pop(0) if state["script"] else None
        if state["delay"]:
            time.sleep(state["delay"])
        if scripted is not None:  # what the test scripted for this call, as it is
            return jsonify(scripted)
        if current == "down":
            return jsonify(message="Service Unavailable"), 503
        if current == "empty":
            return "", 200
        if current == "async":
            threading.Thread(target=post_later, args=(body,), daemon=True).start()
            return jsonify({})
        if current == "list":
            return jsonify({"output": [answer_for(body), "Posso ajudar em mais alguma coisa?"]})
        return jsonify({"output": answer_for(body)})

    @app.get("/_standin/calls")
    def calls():
        with lock:
            return jsonify(calls=state["calls"], async_results=state["async_results"])

    @app.post("/_standin/mode")
    def set_mode():
        body = request.get_json(force=True)
        with lock:
            for key in ("mode", "fail_next", "fail_status", "delay", "ponte_url", "script"):
                if key in body:
                    state[key] = body[key]
        return jsonify(ok=True)

    return app
