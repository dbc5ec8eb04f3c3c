"""What bridge B writes for people to read in Chatwoot (Brazilian Portuguese): the question
message, the order summary, and the private notes that explain a refused or failed reply.

Owns: every user-facing string of the Mercado Livre ⇄ Chatwoot bridge and the money/date format.
Must not: call peers or the database.
"""
from __future__ import annotations

from datetime import timedelta, timezone

from mercado_livre_api import BLOCKED_SUBSTATUS_PT, message_text, parse_date

PREFIX = "⚠️ ponte:"

NOT_LINKED = (f"{PREFIX} esta conversa não está ligada a uma pergunta ou venda do Mercado Livre; "
              "a mensagem não foi enviada.")
EMPTY_REPLY = f"{PREFIX} a mensagem está vazia; nada foi enviado ao Mercado Livre."
ANSWER_TOO_LONG = (f"{PREFIX} a resposta tem {{length}} caracteres e o Mercado Livre aceita no "
                   "máximo 2.000 em respostas de perguntas. Nada foi enviado: encurte o texto e "
                   "responda de novo.")
ANSWER_NO_ATTACHMENTS = (f"{PREFIX} respostas de perguntas no Mercado Livre não aceitam anexos; "
                         "o texto foi enviado, mas estes arquivos não: {names}.")
ALREADY_ANSWERED_BY_US = (f"{PREFIX} esta pergunta já foi respondida por esta conversa "
                          "(mensagem #{message_id}). O Mercado Livre aceita uma só resposta por "
                          "pergunta e ela não pode ser editada; esta mensagem não foi enviada.")
QUESTION_DELETED = (f"{PREFIX} a pergunta foi excluída no Mercado Livre (pelo comprador ou por "
                    "moderação); a resposta não foi enviada.")
QUESTION_ALREADY_ANSWERED = (f"{PREFIX} o Mercado Livre diz que esta pergunta já foi respondida "
                             "(talvez direto no site) ou que o comprador está bloqueado; a "
                             "resposta não foi enviada.")
QUESTION_NOT_ANSWERABLE = f"{PREFIX} a pergunta não pode mais ser respondida: {{reason}}."
ITEM_CLOSED = (f"{PREFIX} o anúncio está pausado ou encerrado e o Mercado Livre não aceita "
               "respostas; a resposta não foi enviada.")
ML_REFUSED = f"{PREFIX} o Mercado Livre recusou a resposta: {{detail}}"
MEDIATED_TOO_LONG = (f"{PREFIX} esta venda é atendida pelo agente de IA do Mercado Livre, que "
                     "aceita uma mensagem por vez com até 350 caracteres. Sua mensagem tem "
                     "{length} caracteres e não foi enviada: encurte e envie de novo.")
SALE_TOO_LONG = (f"{PREFIX} a mensagem tem {{length}} caracteres; no pós-venda a ponte divide em "
                 "partes de 350 até {max} caracteres. Nada foi enviado: encurte e envie de novo.")
SALE_NOT_FOUND = (f"{PREFIX} o Mercado Livre não encontrou a conversa desta venda ou não a "
                  "libera para esta conta (confira o ML_SELLER_ID); a mensagem não foi enviada.")
DELIVERY_GAVE_UP = (f"{PREFIX} não consegui entregar esta mensagem ao Mercado Livre depois de "
                    "{attempts} tentativas (último erro: {error}). Envie de novo quando o "
                    "Mercado Livre voltar.")
DELIVERY_MAYBE_SENT = (f"{PREFIX} não consegui confirmar a entrega desta mensagem ao Mercado "
                       "Livre depois de {attempts} tentativas (último erro: {error}). Ela pode ter sido "
                       "entregue: confira no Mercado Livre antes de enviar de novo.")
DELETED_PARTLY_SENT = (f"{PREFIX} a mensagem foi apagada no Chatwoot depois de {{sent}} de "
                       "{total} partes já enviadas ao Mercado Livre (lá não dá para apagar); as "
                       "demais não foram enviadas.")
QUESTION_ANSWERED_ON_ML = (f"{PREFIX} esta pergunta já foi respondida no Mercado Livre (direto no "
                           "site) com outro texto; esta mensagem não foi enviada. A resposta que "
                           "o comprador vê aparece nesta conversa.")

QUESTION_STATUS_PT = {
    "CLOSED_UNANSWERED": "o anúncio foi encerrado sem resposta",
    "UNDER_REVIEW": "o anúncio e a pergunta estão em revisão pelo Mercado Livre",
    "BANNED": "a pergunta foi banida por moderação",
    "DELETED": "a pergunta foi excluída",
    "DISABLED": "a pergunta foi desativada",
}

ORDER_STATUS_PT = {"paid": "paga", "confirmed": "confirmada", "payment_required":
                   "aguardando pagamento", "payment_in_process": "pagamento em processamento",
                   "partially_paid": "parcialmente paga", "cancelled": "cancelada"}


def money(value, currency: str = "BRL") -> str:
    """1234.5 → 'R$ 1.234,50'."""
    try:
        amount = float(value)
    except (TypeError, ValueError):
        return ""
    text = f"{amount:,.2f}".replace(",", "X").replace(".", ",").replace("X", ".")
    return f"R$ {text}" if currency in ("BRL", "", None) else f"{currency} {text}"


# Brasília time; Brazil has had no daylight saving time since 2019.
_BRT = timezone(timedelta(hours=-3))


def _date(value: str | None) -> str:
    """Mercado Livre's ISO date (any offset, often -04:00) as Brasília time for the agent."""
    moment = parse_date(value)
    if moment is None:
        return value or ""
    return moment.astimezone(_BRT).strftime("%d/%m/%Y %H:%M")


def question_message(question: dict, item: dict | None, others: list[dict]) -> str:
    """The incoming message of a question: the text, then the item's title, price and link."""
    lines = [question.get("text") or "(pergunta sem texto)", "", "—"]
    if item:
        if item.get("title"):
            lines.append(f"📦 {item['title']}")
        if item.get("price") is not None:
            lines.append(f"💰 {money(item.get('price'), item.get('currency_id') or 'BRL')}")
        if item.get("permalink"):
            lines.append(f"🔗 {item['permalink']}")
    else:
        lines.append(f"📦 Anúncio {question.get('item_id')}")
    lines.append(f"❓ Pergunta {question.get('id')} · {_date(question.get('date_created'))}")
    if others:
        lines.append("")
        lines.append("Outras perguntas deste comprador neste anúncio:")
        for other in others[-5:]:
            lines.append(f"• conversa #{other['conversation_id']}: “{other['text']}”")
    return "\n".join(lines)


def order_summary(pack_id: str, orders: list[dict]) -> str:
    """The private note at the top of a sale's conversation."""
    lines = ["🛒 Venda no Mercado Livre"]
    if not orders:
        lines.append(f"Pacote/pedido {pack_id} (detalhes indisponíveis)")
        return "\n".join(lines)
    buyer = orders[0].get("buyer") or {}
    ids = ", ".join(str(o.get("id")) for o in orders)
    lines.append(f"Pedido(s): {ids}" + (f" · pacote {pack_id}" if str(pack_id) not in ids else ""))
    name = buyer.get("nickname") or " ".join(
        x for x in (buyer.get("first_name"), buyer.get("last_name")) if x)
    lines.append(f"Comprador: {name or 'sem apelido'} (ID {buyer.get('id')})")
    lines.append("Itens:")
    total, currency = 0.0, "BRL"
    for order in orders:
        currency = order.get("currency_id") or currency
        total += float(order.get("total_amount") or 0)
        for entry in order.get("order_items") or []:
            item = entry.get("item") or {}
            lines.append(f"• {entry.get('quantity', 1)} × {item.get('title', item.get('id'))} — "
                         f"{money(entry.get('unit_price'), entry.get('currency_id') or currency)}")
    lines.append(f"Total: {money(total, currency)}")
    statuses = {ORDER_STATUS_PT.get(o.get("status"), o.get("status")) for o in orders}
    lines.append("Situação: " + ", ".join(sorted(s for s in statuses if s)))
    return "\n".join(lines)


def ml_message_text(message: dict, skipped: list[str]) -> str:
    """A post-sale message as shown in Chatwoot."""
    text = message_text(message)
    extra = []
    if (message.get("message_moderation") or {}).get("status") in ("rejected", "pending"):
        extra.append(f"({PREFIX} mensagem em moderação no Mercado Livre)")
    if skipped:
        extra.append(f"({PREFIX} anexos não trazidos: {', '.join(skipped)})")
    return "\n".join([text] + extra).strip() or "📎"


def sale_blocked(substatus: str | None) -> str:
    """Why a sale's conversation cannot receive messages."""
    reason = BLOCKED_SUBSTATUS_PT.get(substatus or "", substatus or "motivo não informado")
    return (f"{PREFIX} o Mercado Livre bloqueou esta conversa ({reason}); a mensagem não foi "
            "enviada.")


def sale_refused(code: str, detail: str, index: int, total: int) -> str:
    """Why Mercado Livre refused a post-sale message (and what already went, if split)."""
    if "blocked_conversation" in (code or "") or "blocked" in detail:
        reason = "a conversa está bloqueada"
    elif "mediation" in detail:
        reason = "há uma mediação em andamento"
    else:
        reason = detail
    sent = (f" As partes 1 a {index} de {total} já tinham sido enviadas." if index else "")
    return f"{PREFIX} o Mercado Livre recusou a mensagem: {reason}.{sent}"


def attachment_skipped(skipped: list[str]) -> str:
    """Note listing agent attachments that did not go to Mercado Livre (the text did)."""
    return (f"{PREFIX} estes anexos não foram enviados ao Mercado Livre (o texto foi): "
            + "; ".join(skipped))


def attachments_all_skipped(skipped: list[str]) -> str:
    """Note for a reply with only attachments, none of which could go: nothing was sent."""
    return (f"{PREFIX} nenhum anexo pôde ser enviado ao Mercado Livre e a mensagem não tem "
            "texto; nada foi enviado: " + "; ".join(skipped))


def attachments_only_text(attachments: list[dict]) -> str:
    """Text for a message that has only attachments (Mercado Livre wants a text)."""
    names = ", ".join(a.get("filename") or "anexo" for a in attachments)
    return f"Anexo: {names}"[:350]


# --- the seller's AI agent on questions (meli_ai) ------------------------------------------------

AI_APPROVE_COMMAND = "#ok"  # an agent's reply that sends the AI's suggestion as it is
AI_SUGGESTION = "💡 Sugestão da IA: {text}"
AI_SUGGESTION_HOW = ("Para enviar esta resposta ao comprador como está, responda exatamente "
                     f"{AI_APPROVE_COMMAND}; ou escreva a sua própria resposta.")
AI_HELD = (f"{PREFIX} esta resposta da IA não foi enviada automaticamente porque {{reasons}}. "
           "O Mercado Livre proíbe dados de contato (telefone, e-mail, links, endereço) nas "
           "respostas e aceita no máximo 2.000 caracteres: revise antes de enviar.")
AI_HELD_REASONS = {"phone": "contém um telefone", "email": "contém um e-mail",
                   "link": "contém um link", "address": "contém um endereço",
                   "too_long": "tem {length} caracteres"}
AI_UNAVAILABLE = (f"{PREFIX} o agente de IA (n8n) não respondeu a esta pergunta ({{error}}). "
                  "Ela continua aqui para a equipe responder.")
AI_NOTHING_TO_APPROVE = (f"{PREFIX} {AI_APPROVE_COMMAND} envia a sugestão da IA, mas esta "
                         "pergunta não tem sugestão pendente; nada foi enviado ao Mercado Livre.")
AI_APPROVED = f"✅ Sugestão da IA enviada ao comprador ({AI_APPROVE_COMMAND})."


def ai_suggestion_note(text: str, held: list[tuple[str, int]]) -> str:
    """The private note with the AI's suggestion; `held` lists why it was not sent by itself
    ([(reason, length)], empty in `sugerir` mode)."""
    lines = [AI_SUGGESTION.format(text=text), ""]
    if held:
        reasons = [AI_HELD_REASONS[r].format(length=n) for r, n in held]
        joined = reasons[0] if len(reasons) == 1 else \
            ", ".join(reasons[:-1]) + " e " + reasons[-1]
        lines += [AI_HELD.format(reasons=joined), ""]
    lines.append(AI_SUGGESTION_HOW)
    return "\n".join(lines)
