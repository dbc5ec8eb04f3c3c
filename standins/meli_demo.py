"""Demo of bridge B with no accounts: a Mercado Livre question becomes a Chatwoot conversation,
the agent's answer goes back, and a sale's message with a photo goes both ways — all against
the local stand-ins, narrated in Portuguese.

Run: `python -m standins.meli_demo` (add `--keep` to leave the servers up and explore
`/_standin/state` of each). `run_demo(print)` is what `./ponte demo` can call.
Must not: be imported by ponte's production modules.
"""
from __future__ import annotations

import base64
import os
import sys
import tempfile
import threading
import time

import requests
from werkzeug.serving import make_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from standins import chatwoot as standin_chatwoot  # noqa: E402
from standins import mercadolivre as standin_ml  # noqa: E402

SELLER = standin_ml.DEFAULT_SELLER
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


def _serve(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def run_demo(say=print, keep: bool = False) -> dict:
    """Run the narrated flow; returns the URLs of the three servers."""
    import logging

    import config
    import db_manager
    import meli_jobs
    import webhook_server
    from poller import Poller

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    workdir = tempfile.mkdtemp(prefix="ponte-meli-demo-")
    _, ml_url = _serve(standin_ml.create_app(SELLER))
    _, cw_url = _serve(standin_chatwoot.create_app())
    settings = config.load_settings({
        "DATABASE_PATH": os.path.join(workdir, "ponte.db"), "LOG_DIR": os.path.join(workdir, "logs"),
        "LOG_LEVEL": "WARNING", "ENVIRONMENT": "demo",
        "ML_CLIENT_ID": standin_ml.DEFAULT_CLIENT_ID,
        "ML_CLIENT_SECRET": standin_ml.DEFAULT_CLIENT_SECRET, "ML_SELLER_ID": str(SELLER),
        "ML_API_BASE_URL": ml_url, "ML_AUTH_BASE_URL": ml_url,
        "ML_ACCESS_TOKEN": "APP_USR-standin-initial", "ML_REFRESH_TOKEN": "TG-standin-initial",
        "CHATWOOT_BASE_URL": cw_url, "CHATWOOT_API_TOKEN": standin_chatwoot.DEFAULT_TOKEN,
        "CHATWOOT_ACCOUNT_ID": "1", "CHATWOOT_QUESTIONS_INBOX_ID": "7",
        "CHATWOOT_SALES_INBOX_ID": "8", "CHATWOOT_WEBHOOK_SECRET": "standin-webhook-secret"})
    _, web_url = _serve(webhook_server.create_app(settings))
    requests.post(f"{cw_url}/_standin/inboxes", json=[
        {"id": 7, "webhook_url": f"{web_url}/webhooks/chatwoot"},
        {"id": 8, "webhook_url": f"{web_url}/webhooks/chatwoot"}])
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    poller = Poller(settings, conn)

    def conversations(inbox):
        state = requests.get(f"{cw_url}/_standin/state").json()
        return [c for c in state["conversations"] if c["inbox_id"] == inbox]

    say(f"Simuladores: Mercado Livre {ml_url} · Chatwoot {cw_url} · ponte {web_url}\n")
    # 1. question
    requests.post(f"{ml_url}/_standin/items", json=[
        {"id": "MLB3737188005", "title": "Furadeira de Impacto 650W", "price": 289.9}])
    qid = requests.post(f"{ml_url}/_standin/questions", json=[
        {"text": "Boa tarde! Ela é bivolt? Vem com maleta?", "item_id": "MLB3737188005",
         "buyer_id": 1944693439, "nickname": "COMPRADOR_DEMO"}]).json()["ids"][0]
    say("1) No Mercado Livre, o comprador COMPRADOR_DEMO pergunta: "
        "“Boa tarde! Ela é bivolt? Vem com maleta?”")
    meli_jobs.poll_questions(poller.ctx)
    poller.drain()
    conv = conversations(7)[0]
    say(f"2) O ponte criou a conversa #{conv['id']} na caixa Perguntas do Chatwoot:")
    for line in conv["all_messages"][0]["content"].splitlines():
        say(f"     │ {line}")
    reply = "Olá! É **bivolt** (127/220 V) e vem com maleta. Enviamos hoje!"
    hook = requests.post(f"{cw_url}/_standin/agent_reply", json={
        "conversation_id": conv["id"], "content": reply, "deliver": True}).json()
    say(f"3) A atendente responde no Chatwoot: “{reply}” "
        f"(webhook assinado → ponte respondeu {hook['delivered_status']})")
    poller.drain()
    answer = requests.get(f"{ml_url}/_standin/state").json()["questions"][str(qid)]["answer"]
    conv = conversations(7)[0]
    say(f"4) Resposta publicada no Mercado Livre: “{answer['text']}” · etiquetas no Chatwoot: "
        f"{conv['labels']}\n")
    # 2. sale
    sale = requests.post(f"{ml_url}/_standin/sales", json={
        "buyer_id": 6427433, "nickname": "COMPRADOR_XYZ", "mediated": True,
        "items": [{"id": "MLB3737188005", "title": "Furadeira de Impacto 650W", "quantity": 1,
                   "unit_price": 289.9}]}).json()
    pack = sale["conversation_id"]
    requests.post(f"{ml_url}/_standin/packs/{pack}/messages", json={
        "text": "Chegou com a caixa amassada, segue foto.",
        "attachments": [{"filename": "caixa.jpg", "type": "image/jpeg",
                         "data_b64": base64.b64encode(standin_ml.TINY_JPEG).decode()}]})
    say("5) Numa venda (intermediada pelo agente de IA do ML), o comprador manda uma foto.")
    meli_jobs.poll_messages(poller.ctx)
    poller.drain()
    conv = conversations(8)[0]
    say(f"6) Conversa #{conv['id']} na caixa Vendas:")
    for message in conv["all_messages"]:
        kind = "nota privada" if message["private"] else message["message_type_name"]
        files = f" [+{len(message.get('attachments', []))} anexo(s)]" \
            if message.get("attachments") else ""
        say(f"     │ ({kind}) {message['content'].splitlines()[0]}{files}")
    requests.post(f"{cw_url}/_standin/agent_reply", json={
        "conversation_id": conv["id"], "content": "Sentimos muito! Segue a etiqueta de troca.",
        "deliver": True, "attachments": [{"filename": "etiqueta.pdf",
                                          "content_type": "application/pdf",
                                          "data_b64": base64.b64encode(PDF).decode()}]})
    poller.drain()
    sent = requests.get(f"{ml_url}/_standin/state").json()["sent_messages"][-1]
    say(f"7) A resposta foi ao Mercado Livre para o usuário {sent['to']} (agente de IA) com "
        f"{len(sent['attachments'])} anexo: “{sent['text']}”")
    private = requests.post(f"{cw_url}/_standin/agent_reply", json={
        "conversation_id": conv["id"], "content": "Nota interna: cliente recorrente.",
        "private": True, "deliver": True}).json()
    poller.drain()
    total = len(requests.get(f"{ml_url}/_standin/state").json()["sent_messages"])
    say(f"8) Uma nota privada (webhook {private['delivered_status']}) não sai do Chatwoot: "
        f"mensagens enviadas ao ML continuam {total}.")
    urls = {"mercadolivre": ml_url, "chatwoot": cw_url, "ponte": web_url}
    if keep:
        say("\nServidores no ar (Ctrl+C para sair). Veja /_standin/state de cada simulador.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return urls


if __name__ == "__main__":  # pragma: no cover
    run_demo(keep="--keep" in sys.argv)
