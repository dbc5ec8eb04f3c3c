"""Jobs of bridge A, run by the poller: apply recorded Kommo webhooks, forward a burst to n8n, deliver answers into the
WhatsApp chat, confirm commands on the lead, auto-resume paused bots.

Owns: `HANDLERS`, `ON_DEAD`, `SCHEDULES`, `PRUNE` of bridge A.
Must not: parse webhooks (kommo_api) or hold SQL (whatsapp_store, outbox, db_manager).
"""
from __future__ import annotations

import datetime as dt
import logging
import re

import bot_control
import db_manager
import kommo_api
import kommo_auth
import outbox
import whatsapp_intake
import whatsapp_resend
import whatsapp_store
from job_runner import JobContext, JobDeferred, JobDone, JobFailed
from n8n_api import extract_answer
from outbox import FollowUp, Job
from whatsapp_intake import (ADD_NOTE, BOT_COMMAND, FORWARD, INTAKE, SEND_REPLY,
                             correlation_for, ordering_key, reply_follow_ups)

log = logging.getLogger("ponte.whatsapp")

WHATSAPP_ORIGINS = {"waba", "whatsapp", "com.amocrm.amocrmwa", "wa", "whatsapp_business"}
SALESBOT_SPACING_SECONDS = 8  # Kommo runs one bot per lead at a time; give the last one room


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, bot_control.BRT).isoformat(timespec="seconds")


def chat_type(origin: str) -> str:
    """`whatsapp` for WhatsApp origins (what existing workflows test for), else the origin."""
    low = (origin or "").lower()
    if low in WHATSAPP_ORIGINS or "whatsapp" in low:
        return "whatsapp"
    return low or "unknown"


def build_n8n_request(conversation: dict, messages: list[dict], correlation_id: str) -> dict:
    """The JSON the seller's workflow receives. Keeps the seed's field names
    (`conversation_id`, `contact_id`, `message_text`, `timestamp`, `chat_type`)."""
    last = messages[-1]
    attachments = [a for m in messages for a in m["attachments"]]
    return {
        "conversation_id": conversation["kommo_talk_id"] or f"contact-{conversation['kommo_contact_id']}",
        "contact_id": conversation["kommo_contact_id"],
        "message_text": "\n".join(m["text"] for m in messages if m["text"]),
        "timestamp": _iso(last["sent_at"]),
        "chat_type": chat_type(conversation["origin"]),
        "lead_id": conversation["kommo_lead_id"] or None,
        "talk_id": conversation["kommo_talk_id"] or None,
        "chat_id": conversation["kommo_chat_id"] or None,
        "contact_name": conversation["contact_name"],
        "message_id": last["kommo_message_id"],
        "messages": [{"message_id": m["kommo_message_id"], "text": m["text"],
                      "message_type": m["message_type"], "timestamp": _iso(m["sent_at"]),
                      "attachments": m["attachments"]} for m in messages],
        "attachments": attachments,
        "origin": conversation["origin"],
        "correlation_id": correlation_id,
        "bridge_correlation_id": correlation_id,
        # The same for every retry of this burst (also sent as the Idempotency-Key header):
        # the workflow skips a repeat with it (see the templates in n8n/).
        "idempotency_key": correlation_id,
        "source": "kommo",
    }


def forward_message(ctx: JobContext, job: Job):
    """Send a burst of customer messages to n8n; a synchronous answer becomes reply jobs."""
    contact_id = job.payload["contact_id"]
    conn = ctx.conn
    correlation = correlation_for(job.dedupe_key)
    # One write transaction before the call: the burst is closed (later messages open a new
    # job), and the correlation an asynchronous answer will carry is stored before n8n has it.
    with db_manager.transaction(conn):
        conversation = whatsapp_store.get_conversation(conn, contact_id=contact_id)
        if conversation and conversation["open_batch_key"] == job.dedupe_key:
            whatsapp_store.set_open_batch(conn, contact_id, None, None)
        messages = whatsapp_store.batch_messages(conn, job.dedupe_key)
        state = whatsapp_store.get_bot_state(conn, contact_id)
        answering = bot_control.may_answer(state, job.payload.get("pause_count",
                                                                  state["pause_count"]))
        if not answering:
            whatsapp_store.set_batch_status(conn, job.dedupe_key, "skipped_paused")
        elif messages and conversation is not None:
            db_manager.mapping_put(conn, "n8n-correlation", correlation,
                                   {"contact_id": contact_id, "pause_count": state["pause_count"],
                                    "batch_key": job.dedupe_key}, now=ctx.now())
    if not answering:
        log.info("n8n_forward_skipped_paused", extra={"contact_id": contact_id})
        return {"skipped": "paused", "messages": len(messages)}
    if not messages or conversation is None:
        return {"skipped": "no messages"}
    body = build_n8n_request(conversation, messages, correlation)
    with ctx.away_from_database():
        answer = ctx.clients.n8n.send(body, idempotency_key=correlation)
    texts = extract_answer(answer) or []
    log.info("n8n_forwarded", extra={"peer": "n8n", "contact_id": contact_id,
                                     "messages": len(messages), "answers": len(texts),
                                     "correlation_id": correlation})
    return JobDone(
        {"messages": len(messages), "answers": len(texts), "correlation_id": correlation},
        reply_follow_ups(contact_id, conversation, texts, correlation, state["pause_count"],
                         "n8n-sync"),
        writes=lambda c: whatsapp_store.set_batch_status(c, job.dedupe_key, "forwarded"))


def send_reply(ctx: JobContext, job: Job):
    """Deliver one answer into the customer's WhatsApp chat, unless a seller paused the bot
    since the question was sent to n8n."""
    p = job.payload
    state = whatsapp_store.get_bot_state(ctx.conn, p["contact_id"])
    if not bot_control.may_answer(state, p.get("pause_count", 0),
                                  handoff_farewell=p.get("source") == "n8n-handoff"):
        log.warning("reply_suppressed_paused", extra={"contact_id": p["contact_id"],
                                                      "correlation_id": p.get("correlation_id")})
        return {"suppressed": "paused"}
    s = ctx.settings
    kommo = ctx.clients.kommo
    if s.kommo_reply_mode == "salesbot":
        if not p.get("lead_id"):
            raise JobFailed("modo salesbot sem lead para este contato", retryable=False)
        key = f"salesbot-last-run:{p['lead_id']}"
        last = db_manager.mapping_get(ctx.conn, "kommo", key)
        if last and ctx.now() - last < SALESBOT_SPACING_SECONDS:
            raise JobDeferred(last + SALESBOT_SPACING_SECONDS)
        already = _already_in_talk(ctx, job)
        if already is not None:  # the bot ran (an earlier attempt): the next one keeps its gap
            return JobDone({"sent": "salesbot", "already_delivered": True},
                           writes=_salesbot_ran(key, ctx.now()))
        # Writing the field again is harmless; running the bot again sends the text again.
        kommo.set_lead_text_field(p["lead_id"], s.kommo_reply_field_id, p["text"])
        with whatsapp_resend.kommo_write(ctx.conn, job, ctx.now()):
            kommo.run_salesbot(s.kommo_salesbot_id, p["lead_id"])
        return JobDone({"sent": "salesbot"}, writes=_salesbot_ran(key, ctx.now()))
    if not p.get("talk_id"):
        raise JobFailed("conversa sem talk_id: não há como responder pelo Chats API",
                        retryable=False)
    already = _already_in_talk(ctx, job)
    if already is not None:
        return JobDone({"sent": "talk", "kommo_message_id": already.item_id,
                        "already_delivered": True},
                       writes=_remember_sent(job, already.item_id, ctx.now()))
    with whatsapp_resend.kommo_write(ctx.conn, job, ctx.now()):
        answer = kommo.send_talk_message(p["talk_id"], p["text"])
    kommo_message_id = (answer or {}).get("id")
    return JobDone({"sent": "talk", "kommo_message_id": kommo_message_id},
                   writes=_remember_sent(job, kommo_message_id, ctx.now()) if kommo_message_id
                   else None)


def _salesbot_ran(key: str, at: float):
    """The write that records when the Salesbot last ran on a lead (the next run keeps
    SALESBOT_SPACING_SECONDS from it), committed with the job's completion."""
    return lambda conn: db_manager.mapping_put(conn, "kommo", key, at, now=at)


def _remember_sent(job: Job, kommo_message_id: str, now: float):
    """The write that records a reply's Kommo message as ours, committed with the job's
    completion: if Kommo reports our own send back as an outgoing message, it is not a
    seller; and a read-back for another reply must not take this message for its own (same
    short text)."""
    return lambda conn: db_manager.mapping_put(conn, "kommo-sent", kommo_message_id,
                                               job.dedupe_key, now=now)


def _already_in_talk(ctx: JobContext, job: Job):
    """On a retry whose earlier attempt may have reached Kommo: the message already in the
    talk, or None (then send; unverified when Kommo would not tell, which is logged)."""
    p = job.payload
    return whatsapp_resend.already_written(
        ctx.conn, job, "reply", lambda since: whatsapp_resend.check_talk(
            ctx.clients.kommo, p.get("talk_id"), p["text"], since,
            accounted_for=lambda item_id: db_manager.mapping_get(
                ctx.conn, "kommo-sent", item_id) not in (None, job.dedupe_key)),
        contact_id=p.get("contact_id"), correlation_id=p.get("correlation_id"))


def intake(ctx: JobContext, job: Job):
    """Apply a Kommo webhook the web process recorded: new customer messages join a burst for
    n8n, seller commands take effect (database only, in arrival order)."""
    summary = whatsapp_intake.apply_delivery(ctx.conn, ctx.settings, job.payload)
    # Routine deliveries are already in the job lines; INFO only for what a person did.
    log.log(logging.INFO if summary.commands else logging.DEBUG, "kommo_webhook_applied",
            extra=summary.as_dict())
    return summary.as_dict()


intake.atomic = True
# Applied before anything else that is due: a #pausar that arrived while the poller was busy
# (a slow n8n) must stop a reply queued before it, as it did when commands applied in the
# webhook request.
intake.urgent = True


def add_note(ctx: JobContext, job: Job):
    """Write a note on the lead (where the seller reads; never reaches the customer)."""
    lead_id = job.payload.get("lead_id")
    if not lead_id and job.payload.get("contact_id"):
        conversation = whatsapp_store.get_conversation(ctx.conn,
                                                       contact_id=job.payload["contact_id"])
        lead_id = conversation and conversation["kommo_lead_id"]
    if not lead_id:
        log.warning("note_without_lead", extra={"text_chars": len(job.payload["text"])})
        return {"skipped": "no lead"}
    found = whatsapp_resend.already_written(
        ctx.conn, job, "note", lambda since: whatsapp_resend.check_notes(
            ctx.clients.kommo, lead_id, job.payload["text"], since), lead_id=lead_id)
    if found is not None:
        return {"noted": lead_id, "already_delivered": True, "kommo_note_id": found.item_id}
    with whatsapp_resend.kommo_write(ctx.conn, job, ctx.now()):
        ctx.clients.kommo.add_lead_note(lead_id, job.payload["text"])
    return {"noted": lead_id}


def bot_command(ctx: JobContext, job: Job):
    """Confirm a seller command on the lead; first find the contact of the lead (and apply the
    command) when the webhook did not know it."""
    p = dict(job.payload)
    contact_id = p.get("contact_id") or whatsapp_store.contact_of_lead(ctx.conn, p["lead_id"])
    if not contact_id:
        lead = ctx.clients.kommo.get_lead(p["lead_id"])
        contact_id = kommo_api.main_contact_id(lead)
        if not contact_id:
            return None, [FollowUp(ADD_NOTE, f"note:{job.dedupe_key}", {
                "lead_id": p["lead_id"],
                "text": "🤖 Não encontrei o contato deste lead; comando ignorado."})]
    confirmation = p.get("confirmation")
    if confirmation is None:
        with db_manager.transaction(ctx.conn):
            whatsapp_store.remember_lead(ctx.conn, p.get("lead_id"), contact_id, ctx.now())
            command = bot_control.Command(p["command"], p.get("word", ""), p.get("reason", ""))
            confirmation = bot_control.apply_command(ctx.conn, contact_id, command, p["by"],
                                                     p["by_kind"], ctx.now(),
                                                     ctx.settings.bot_auto_resume_hours)
    return {"contact_id": contact_id}, [FollowUp(ADD_NOTE, f"note:{job.dedupe_key}", {
        "lead_id": p.get("lead_id"), "contact_id": contact_id, "text": confirmation},
        ordering_key=ordering_key(contact_id))]


INTAKE_DEAD_NOTE = ("⚠️ A ponte não conseguiu processar uma mensagem ou nota deste lead (erro "
                    "interno) e o assistente não vai responder a ela. Atenda o cliente por "
                    "aqui; o operador encontra a entrega em /admin/jobs?status=dead.")


def intake_dead(ctx: JobContext, job: Job, error: str) -> list[FollowUp]:
    """A delivery could not be applied (a defect, since applying only touches the database):
    tell the seller on every lead it concerns, so no customer waits in silence."""
    try:
        hook = kommo_api.parse_kommo_webhook(job.payload["body"].encode())
    except kommo_api.KommoParseError:
        return []
    leads = {m.lead_id for m in hook.messages if m.lead_id} | \
        {n.lead_id for n in hook.notes if n.lead_id}
    return [FollowUp(ADD_NOTE, f"note:{job.dedupe_key}:{lead}",
                     {"lead_id": lead, "text": INTAKE_DEAD_NOTE}) for lead in sorted(leads)]


def command_dead(ctx: JobContext, job: Job, error: str) -> list[FollowUp]:
    """A command could not be applied (Kommo would not tell us the lead's contact): say so."""
    p = job.payload
    word = p.get("word") or p.get("command")
    return [FollowUp(ADD_NOTE, f"note:command-dead:{job.dedupe_key}", {
        "lead_id": p.get("lead_id"), "contact_id": p.get("contact_id"),
        "text": f"⚠️ Não consegui aplicar o comando #{word}: {kommo_reason(error)} "
                "Tente de novo ou use a API /bot."})]


def forward_dead(ctx: JobContext, job: Job, error: str) -> list[FollowUp]:
    """n8n never answered: tell the seller on the lead, and the customer once if configured."""
    contact_id = job.payload["contact_id"]
    with db_manager.transaction(ctx.conn):
        whatsapp_store.set_batch_status(ctx.conn, job.dedupe_key, "failed")
    conversation = whatsapp_store.get_conversation(ctx.conn, contact_id=contact_id) or {}
    follow = [FollowUp(ADD_NOTE, f"note:n8n-dead:{job.dedupe_key}", {
        "contact_id": contact_id, "lead_id": conversation.get("kommo_lead_id"),
        "text": "⚠️ O assistente de IA não respondeu a esta conversa depois de várias "
                f"tentativas. Responda o cliente manualmente.\nDetalhe: {error[:200]}"})]
    state = whatsapp_store.get_bot_state(ctx.conn, contact_id)
    if ctx.settings.bot_fallback_message and conversation and state["status"] == "active":
        follow.append(FollowUp(SEND_REPLY, f"fallback:{job.dedupe_key}", {
            "contact_id": contact_id, "talk_id": conversation.get("kommo_talk_id"),
            "lead_id": conversation.get("kommo_lead_id"),
            "text": ctx.settings.bot_fallback_message, "source": "fallback",
            "pause_count": state["pause_count"]}, ordering_key=ordering_key(contact_id)))
    return follow


def reply_dead(ctx: JobContext, job: Job, error: str) -> list[FollowUp]:
    """An answer could not be delivered (closed talk, quota...): say so on the lead."""
    p = job.payload
    return [FollowUp(ADD_NOTE, f"note:reply-dead:{job.dedupe_key}", {
        "contact_id": p.get("contact_id"), "lead_id": p.get("lead_id"),
        "text": "⚠️ Não consegui entregar a resposta do assistente no WhatsApp.\n"
                f"Motivo: {kommo_reason(error)}\nResposta: {p['text'][:1000]}"})]


_KOMMO_STATUS = re.compile(r"^kommo (\d{3}):")
_KOMMO_REASONS = {
    402: "limite/cota do Chats API do Kommo atingido (402).",
    422: "a conversa está fechada no Kommo (422).",
    403: "o token não tem permissão ou a conta foi bloqueada (403).",
    404: "o Kommo não encontrou a conversa ou o lead (404).",
    401: "o Kommo recusou o token (401).",
}


def kommo_reason(error: str) -> str:
    """A failed job's error (`str(KommoError)`: "kommo <status>: ...") in words for a seller."""
    match = _KOMMO_STATUS.match(error)
    return _KOMMO_REASONS.get(int(match.group(1)), error[:200]) if match else error[:200]


def auto_resume(ctx: JobContext) -> int:
    """Poller task: reactivate bots whose pause reached `BOT_AUTO_RESUME_HOURS`."""
    resumed = 0
    for state in whatsapp_store.due_auto_resumes(ctx.conn, ctx.now()):
        contact_id = state["kommo_contact_id"]
        with db_manager.transaction(ctx.conn):
            # Only that very pause: a seller who paused again meanwhile keeps the conversation.
            if not whatsapp_store.set_active(ctx.conn, contact_id, "auto", ctx.now(),
                                             only_if_pause_count=state["pause_count"]):
                continue
            outbox.enqueue_job(ctx.conn, ADD_NOTE, f"auto-resume:{contact_id}:"
                               f"{state['pause_count']}", {
                                   "contact_id": contact_id,
                                   "text": bot_control.TEXT_RESUMED +
                                   " (reativação automática)"},
                               ordering_key=ordering_key(contact_id), now=ctx.now())
        resumed += 1
        log.info("bot_auto_resumed", extra={"contact_id": contact_id})
    return resumed


HANDLERS = {INTAKE: intake, FORWARD: forward_message, SEND_REPLY: send_reply, ADD_NOTE: add_note,
            BOT_COMMAND: bot_command}
ON_DEAD = {INTAKE: intake_dead, FORWARD: forward_dead, SEND_REPLY: reply_dead, BOT_COMMAND: command_dead}
SCHEDULES = [(30, auto_resume), (300, kommo_auth.refresh_if_due)]
PRUNE = [whatsapp_store.prune, kommo_auth.prune_states]
