"""The Mercado Livre ⇄ Chatwoot part of `./ponte demo`: stand-ins of both peers, the settings
that point ponte at them, and a narrated scenario in Portuguese that runs against ponte's real
processes (web + poller under Supervisor).

Interface used by standins/demo.py: `start(ponte_url) -> Parts` (`.env`, `.urls`),
`scenario(parts, ponte_url, say) -> bool`, `stop(parts)`.
Must not: be imported by ponte's production modules.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

import requests

from standins import chatwoot as chatwoot_standin
from standins import mercadolivre as ml_standin
from standins import n8n as n8n_standin
from standins.support import ServedApp, wait_for

SELLER = ml_standin.DEFAULT_SELLER
QUESTIONS_INBOX, SALES_INBOX = 7, 8
AI_KEY = "demo-ml-ai-key"
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


@dataclass
class Parts:
    """The running stand-ins and what ponte needs to reach them."""

    ml_url: str
    cw_url: str
    env: dict
    ai_url: str = ""  # the questions workflow (an n8n stand-in of its own)
    urls: list = field(default_factory=list)
    servers: list = field(default_factory=list)


def start(ponte_url: str) -> Parts:
    """Start the Mercado Livre and Chatwoot stand-ins; Chatwoot's inboxes send their webhooks
    to ponte."""
    ml = ServedApp(ml_standin.create_app(SELLER))
    cw = ServedApp(chatwoot_standin.create_app())
    ai = ServedApp(n8n_standin.create_app(api_key=AI_KEY, ponte_url=ponte_url))
    ml_url, cw_url = ml.url, cw.url
    requests.post(f"{cw_url}/_standin/inboxes", timeout=5, json=[
        {"id": QUESTIONS_INBOX, "webhook_url": f"{ponte_url}/webhooks/chatwoot"},
        {"id": SALES_INBOX, "webhook_url": f"{ponte_url}/webhooks/chatwoot"}])
    env = {"ML_CLIENT_ID": ml_standin.DEFAULT_CLIENT_ID,
           "ML_CLIENT_SECRET": ml_standin.DEFAULT_CLIENT_SECRET, "ML_SELLER_ID": str(SELLER),
           "ML_SITE_ID": "MLB", "ML_API_BASE_URL": ml_url, "ML_AUTH_BASE_URL": ml_url,
           "ML_REDIRECT_URI": f"{ponte_url}/oauth/mercadolivre/callback",
           "ML_ACCESS_TOKEN": "APP_USR-standin-initial", "ML_REFRESH_TOKEN": "TG-standin-initial",
           "ML_POLL_QUESTIONS_SECONDS": "5", "ML_POLL_MESSAGES_SECONDS": "5",
           "CHATWOOT_BASE_URL": cw_url, "CHATWOOT_API_TOKEN": chatwoot_standin.DEFAULT_TOKEN,
           "CHATWOOT_ACCOUNT_ID": "1", "CHATWOOT_QUESTIONS_INBOX_ID": str(QUESTIONS_INBOX),
           "CHATWOOT_SALES_INBOX_ID": str(SALES_INBOX),
           "CHATWOOT_WEBHOOK_SECRET": "standin-webhook-secret",
           "ML_AI_MODE": "automatico", "ML_AI_WEBHOOK_URL": f"{ai.url}/webhook/ml-perguntas",
           "ML_AI_API_KEY": AI_KEY}
    urls = [f"Mercado Livre simulado: {ml_url}/_standin/state",
            f"Chatwoot simulado:      {cw_url}/_standin/state",
            f"conectar o ML (OAuth):  {ponte_url}/admin/conexoes, botão “Reconectar Mercado "
            "Livre” (o simulador autoriza na hora)",
            f"conversas no painel:    {ponte_url}/admin/conversas",
            f"IA das perguntas (n8n): {ai.url}/_standin/calls"]
    return Parts(ml_url, cw_url, env, ai.url, urls, [ml, cw, ai])


def stop(parts: Parts) -> None:
    """Stop the stand-ins."""
    for served in parts.servers:
        served.stop()


def _wait_for(predicate, timeout: float = 20.0):
    return wait_for(predicate, timeout, interval=0.2)


def scenario(parts: Parts, ponte_url: str, say) -> bool:
    """A question becomes a conversation and its answer goes back; a sale's photo and the
    agent's PDF go both ways; a private note stays in Chatwoot. True when all of it happened."""
    ml, cw = parts.ml_url, parts.cw_url

    def ml_state():
        return requests.get(f"{ml}/_standin/state", timeout=5).json()

    def conversations(inbox):
        state = requests.get(f"{cw}/_standin/state", timeout=5).json()
        return [c for c in state["conversations"] if c["inbox_id"] == inbox and c["all_messages"]]

    def notify(topic, resource):
        requests.post(f"{ml}/_standin/notify", timeout=10, json={
            "url": f"{ponte_url}/webhooks/mercadolivre", "topic": topic, "resource": resource})

    say("━━ Ponte B: Mercado Livre ⇄ Chatwoot ━━")
    # The questions' AI (ML_AI_MODE=automatico) does not know this one: the agent answers it.
    _script_ai(parts, {"output": "", "should_send": False})
    requests.post(f"{ml}/_standin/items", timeout=5, json=[
        {"id": "MLB3737188005", "title": "Furadeira de Impacto 650W", "price": 289.9,
         "available_quantity": 12,
         "description_text": "Furadeira de impacto 650 W, bivolt, com maleta e 5 brocas."}])
    qid = requests.post(f"{ml}/_standin/questions", timeout=5, json=[
        {"text": "Boa tarde! Ela é bivolt? Vem com maleta?", "item_id": "MLB3737188005",
         "buyer_id": 1944693439, "nickname": "COMPRADOR_DEMO"}]).json()["ids"][0]
    say("1) No Mercado Livre, COMPRADOR_DEMO pergunta: “Boa tarde! Ela é bivolt? Vem com "
        "maleta?”")
    notify("questions", f"/questions/{qid}")
    found = _wait_for(lambda: conversations(QUESTIONS_INBOX))
    if not found:
        say("   ✗ a pergunta não virou conversa no Chatwoot")
        return False
    conv = found[0]
    say(f"   → conversa #{conv['id']} na caixa Perguntas do Chatwoot:")
    for line in conv["all_messages"][0]["content"].splitlines():
        say(f"     │ {line}")
    reply = "Olá! É **bivolt** (127/220 V) e vem com maleta. Enviamos hoje!"
    say(f"2) A atendente responde no Chatwoot: “{reply}”")
    requests.post(f"{cw}/_standin/agent_reply", timeout=10, json={
        "conversation_id": conv["id"], "content": reply, "deliver": True})
    answered = _wait_for(lambda: ml_state()["answers"])
    if not answered:
        say("   ✗ a resposta não chegou ao Mercado Livre")
        return False
    say(f"   → resposta publicada no anúncio: “{answered[0]['text']}”")
    say("   (a IA das perguntas não sabia esta — should_send=false — e deixou para a equipe)")
    say()
    if not ai_scenario(parts, say):
        return False
    sale = requests.post(f"{ml}/_standin/sales", timeout=5, json={
        "buyer_id": 6427433, "nickname": "COMPRADOR_XYZ", "mediated": True,
        "items": [{"id": "MLB3737188005", "title": "Furadeira de Impacto 650W", "quantity": 1,
                   "unit_price": 289.9}]}).json()
    message_id = requests.post(
        f"{ml}/_standin/packs/{sale['conversation_id']}/messages", timeout=5, json={
            "text": "Chegou com a caixa amassada, segue foto.",
            "attachments": [{"filename": "caixa.jpg", "type": "image/jpeg",
                             "data_b64": base64.b64encode(ml_standin.TINY_JPEG).decode()}]}
    ).json()["id"]
    say("3) Numa venda (intermediada pelo agente de IA do ML), o comprador manda uma foto.")
    notify("messages", message_id)
    found = _wait_for(lambda: [c for c in conversations(SALES_INBOX)
                               if len(c["all_messages"]) >= 2])
    if not found:
        say("   ✗ a mensagem da venda não chegou ao Chatwoot")
        return False
    conv = found[0]
    say(f"   → conversa #{conv['id']} na caixa Vendas:")
    for message in conv["all_messages"]:
        kind = "nota privada" if message["private"] else "comprador"
        files = f" [+{len(message['attachments'])} anexo]" if message.get("attachments") else ""
        say(f"     │ ({kind}) {message['content'].splitlines()[0]}{files}")
    say("4) A atendente responde com a etiqueta de troca em PDF.")
    requests.post(f"{cw}/_standin/agent_reply", timeout=10, json={
        "conversation_id": conv["id"], "content": "Sentimos muito! Segue a etiqueta de troca.",
        "deliver": True, "attachments": [{"filename": "etiqueta.pdf",
                                          "content_type": "application/pdf",
                                          "data_b64": base64.b64encode(PDF).decode()}]})
    sent = _wait_for(lambda: ml_state()["sent_messages"])
    if not sent:
        say("   ✗ a resposta não chegou ao Mercado Livre")
        return False
    say(f"   → enviada ao usuário {sent[0]['to']} (agente de IA do MLB) com "
        f"{len(sent[0]['attachments'])} anexo: “{sent[0]['text']}”")
    say("5) Uma nota privada (“cliente recorrente”) fica só no Chatwoot.")
    requests.post(f"{cw}/_standin/agent_reply", timeout=10, json={
        "conversation_id": conv["id"], "content": "Nota interna: cliente recorrente.",
        "private": True, "deliver": True})
    # Replies of a conversation go out in order: once the next public reply has arrived, the
    # note has been dealt with too (sent, if ponte got it wrong).
    closing = "Qualquer dúvida, estamos à disposição."
    requests.post(f"{cw}/_standin/agent_reply", timeout=10, json={
        "conversation_id": conv["id"], "content": closing, "deliver": True})
    sent = _wait_for(lambda: [m for m in ml_state()["sent_messages"] if m["text"] == closing]
                     and ml_state()["sent_messages"])
    private_ok = bool(sent) and [m["text"] for m in sent[1:]] == [closing]
    say("   → nada foi enviado ao Mercado Livre (só a resposta pública seguinte)." if private_ok
        else "   ✗ a nota privada foi enviada ao Mercado Livre!")
    say()
    return private_ok


def _script_ai(parts: Parts, *answers: dict) -> None:
    """What the questions workflow answers next, one per call."""
    requests.post(f"{parts.ai_url}/_standin/mode", json={"script": list(answers)}, timeout=5)


def ai_scenario(parts: Parts, say) -> bool:
    """The seller's AI agent on questions (ML_AI_MODE=automatico): one question answered by
    itself, one held as a suggestion (contact data), one held and sent by the agent with #ok.
    True when all of it happened."""
    ml, cw = parts.ml_url, parts.cw_url

    def answers():
        return [a["text"] for a in requests.get(f"{ml}/_standin/state", timeout=5).json()[
            "answers"]]

    def conversation(qid):
        state = requests.get(f"{cw}/_standin/state", timeout=5).json()
        return next((c for c in state["conversations"]
                     if str((c.get("custom_attributes") or {}).get("meli_question_id"))
                     == str(qid)), None)

    def notes(qid):
        conv = conversation(qid) or {"all_messages": []}
        return [m["content"] for m in conv["all_messages"] if m["private"]]

    def ask(text, buyer):
        return requests.post(f"{ml}/_standin/questions", timeout=5, json=[
            {"text": text, "item_id": "MLB3737188005", "buyer_id": buyer}]).json()["ids"][0]

    say("━━ Agente de IA nas perguntas (ML_AI_MODE=automatico) ━━")
    say("A) “Tem em estoque?” — a IA (n8n) lê o anúncio que a ponte mandou e responde sozinha.")
    first = ask("Tem em estoque?", 31001)
    done = _wait_for(lambda: [a for a in answers() if "12 unidades" in a])
    conv = _wait_for(lambda: (c := conversation(first)) and "ia-respondeu" in c["labels"] and c)
    if not done or not conv:
        say("   ✗ a IA não respondeu sozinha no Mercado Livre")
        return False
    say(f"   → publicada no anúncio: “{done[0]}”; no Chatwoot, mensagem da IA com a etiqueta "
        "ia-respondeu")
    say("B) Outra pergunta: a IA responde com um WhatsApp — dado de contato, que o ML proíbe.")
    _script_ai(parts, {"output": "Temos sim! Me chama no WhatsApp (11) 98765-4321."})
    second = ask("Vocês fazem desconto para 3 unidades?", 31002)
    held = _wait_for(lambda: notes(second))
    if not held or "contém um telefone" not in held[0]:
        say("   ✗ a resposta com telefone não ficou retida")
        return False
    say("   → nada foi ao Mercado Livre; nota privada no Chatwoot:")
    for line in held[0].splitlines():
        if line:
            say(f"     │ {line}")
    say("C) A IA cita um código que parece telefone; a atendente confere e responde só “#ok”.")
    code_answer = "Sim, é o modelo 2024; código de peça 11 9876 5432 no manual."
    _script_ai(parts, {"output": code_answer})
    third = ask("É o modelo novo?", 31003)
    if not _wait_for(lambda: notes(third)):
        say("   ✗ a sugestão não apareceu no Chatwoot")
        return False
    requests.post(f"{cw}/_standin/agent_reply", timeout=10, json={
        "conversation_id": conversation(third)["id"], "content": "#ok", "deliver": True})
    sent = _wait_for(lambda: code_answer in answers())
    if not sent or "#ok" in answers():
        say("   ✗ o #ok não enviou a sugestão")
        return False
    say(f"   → publicada no anúncio, como a IA escreveu: “{code_answer}” (o “#ok” não sai)")
    say()
    return True
