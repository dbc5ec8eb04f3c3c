"""What bridge A records when something arrives: Kommo webhooks, n8n's asynchronous answers and
bot commands from the HTTP API. Database only — every effect on a peer becomes a job.

Owns: dedupe of Kommo messages and notes, bursts (debounce) of customer messages as one durable
`n8n.forward_message` job, skipping while paused, seller commands from notes and chat, and the
jobs for answers and confirmations.
Must not: call a peer or touch flask.
"""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass, field

import bot_control
import db_manager
import outbox
import ponte_metrics
import whatsapp_store
from kommo_api import KommoMessage, KommoNote, KommoWebhook, parse_kommo_webhook
from n8n_api import N8nAsyncAnswer

log = logging.getLogger("ponte.whatsapp")

INTAKE = "kommo.intake"
# One order for every delivery: a #pausar note must be applied before the customer message
# that came after it, whichever contact the note's lead belongs to.
INTAKE_ORDER = "kommo-intake"
# Applying a delivery only touches the database; if it fails, it is a bug, and the deliveries
# behind it must not wait through a long backoff.
INTAKE_MAX_ATTEMPTS = 3
FORWARD = "n8n.forward_message"
SEND_REPLY = "kommo.send_reply"
ADD_NOTE = "kommo.add_note"
BOT_COMMAND = "kommo.bot_command"
# Notes written through the API by integrations (ours included) carry created_by=0.
INTEGRATION_USER = "0"


def ordering_key(contact_id: str) -> str:
    return f"kommo-contact:{contact_id}"


@dataclass
class IntakeSummary:
    """What one webhook produced, for the event log and the operator."""

    messages_new: int = 0
    messages_duplicate: int = 0
    messages_skipped_paused: int = 0
    commands: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v}


def delivery_key(raw: bytes) -> str:
    """Dedupe key of a webhook delivery: Kommo's retries re-send the same body."""
    return "kommo-delivery:" + hashlib.sha256(raw).hexdigest()


def record_delivery(conn, hook: KommoWebhook, raw: bytes, now: float,
                    request_id: str | None = None) -> str:
    """Record one parsed webhook delivery before it is acknowledged (inside the caller's
    transaction): a `kommo.intake` job (staged: `outbox.stage_job`) holding the body as it
    came when it has messages or notes, else an ignored event. Returns 'queued', 'ignored' or
    'duplicate'. A re-delivery of a job already in the queue changes nothing ('duplicate');
    one that comes before the poller has moved the first is staged again ('queued') and
    dropped by the move, so it is applied once either way."""
    key = delivery_key(raw)
    if hook.messages or hook.notes:
        new = outbox.stage_job(
            conn, INTAKE, key, {"body": raw.decode("utf-8", "replace"), "received_at": now,
                                "request_id": request_id},
            ordering_key=INTAKE_ORDER, max_attempts=INTAKE_MAX_ATTEMPTS, now=now)
        ponte_metrics.note_webhook_event("add_message" if hook.messages else "add_note", new)
        return "queued" if new else "duplicate"
    new = db_manager.record_event(
        conn, "kommo", key, "other", "ignored",
        {"ignored": [f"{i.key}: {i.reason}" for i in hook.ignored]}, request_id=request_id,
        now=now)
    return "ignored" if new else "duplicate"


def apply_delivery(conn, settings, payload: dict) -> IntakeSummary:
    """Apply a delivery recorded by `record_delivery` (inside the caller's transaction): dedupe,
    bursts, pauses and commands, with its arrival time as the clock (debounce windows and
    pauses date from when Kommo called). What it did is the `kommo.intake` job's result."""
    hook = parse_kommo_webhook(payload["body"].encode())
    now = payload["received_at"]
    summary = IntakeSummary()
    for message in hook.messages:
        if message.from_customer:
            _record_customer_message(conn, settings, message, now, summary)
        elif message.direction == "outgoing" and message.author_type in ("internal", "user"):
            _record_seller_chat_message(conn, settings, message, now, summary)
        else:
            summary.ignored.append(f"message {message.message_id}: "
                                   f"{message.direction}/{message.author_type or '?'}")
    for note in hook.notes:
        _record_note(conn, settings, note, now, summary)
    summary.ignored += [f"{i.key}: {i.reason}" for i in hook.ignored]
    return summary


def _record_customer_message(conn, settings, msg: KommoMessage, now: float,
                             summary: IntakeSummary) -> None:
    if not msg.message_id or not msg.contact_id:
        summary.ignored.append("message without id or contact_id")
        return
    if whatsapp_store.message_exists(conn, msg.message_id):  # Kommo sent it again
        summary.messages_duplicate += 1
        return
    whatsapp_store.upsert_conversation(conn, msg.contact_id, msg.lead_id, msg.talk_id,
                                       msg.chat_id, msg.author_name, msg.origin, now)
    whatsapp_store.remember_lead(conn, msg.lead_id, msg.contact_id, now)
    attachments = [{"type": a.type, "link": a.link, "file_name": a.file_name}
                   for a in msg.attachments]
    state = whatsapp_store.get_bot_state(conn, msg.contact_id)
    # A message is applied a moment after it arrived; if a seller or the API changed the bot
    # meanwhile, it arrived under the previous state: paused (so it waits), or active with a
    # pause since (a burst from before a pause is never sent).
    if state["status"] == "paused" or _changed_after(state, now):
        whatsapp_store.insert_message(conn, msg.message_id, msg.contact_id, msg.text,
                                      msg.message_type, attachments, msg.created_at or now, now,
                                      "skipped_paused", None)
        summary.messages_skipped_paused += 1
        return
    batch_key = _batch_for(conn, settings, msg, state["pause_count"], now)
    whatsapp_store.insert_message(conn, msg.message_id, msg.contact_id, msg.text,
                                  msg.message_type, attachments, msg.created_at or now, now,
                                  "queued", batch_key)
    summary.messages_new += 1


def _changed_after(state: dict, moment: float) -> bool:
    return bool(state.get("since_at")) and state["since_at"] > moment


def _batch_for(conn, settings, msg: KommoMessage, pause_count: int, now: float) -> str:
    """The forward job this message rides on: the contact's still-waiting burst if its window
    is open, else a new job (which remembers the pause count: a burst from before a pause is
    never sent, even after #voltar)."""
    debounce = max(0.0, settings.bot_debounce_seconds)
    conversation = whatsapp_store.get_conversation(conn, contact_id=msg.contact_id)
    open_key = conversation.get("open_batch_key") if conversation else None
    if open_key:
        started = conversation["batch_started_at"] or now
        due = min(now + debounce, started + max(debounce, settings.bot_debounce_max_seconds))
        # Only a job that has not started can take more messages; once claimed, the burst is
        # closed and this message opens the next one.
        if outbox.reschedule_pending_job(conn, open_key, due, now):
            return open_key
    batch_key = f"kommo-msg:{msg.message_id}"
    outbox.enqueue_job(conn, FORWARD, batch_key,
                       {"contact_id": msg.contact_id, "pause_count": pause_count},
                       available_at=now + debounce, ordering_key=ordering_key(msg.contact_id),
                       now=now)
    whatsapp_store.set_open_batch(conn, msg.contact_id, batch_key, now)
    return batch_key


def _record_seller_chat_message(conn, settings, msg: KommoMessage, now: float,
                                summary: IntakeSummary) -> None:
    if db_manager.mapping_get(conn, "kommo-sent", msg.message_id):
        summary.ignored.append(f"message {msg.message_id}: our own reply")
        return
    command = bot_control.parse_command(msg.text)
    who = msg.author_name or msg.author_user_id or "vendedor"
    if command:
        if _apply_and_confirm(conn, settings, command, lead_id=msg.lead_id,
                              contact_id=msg.contact_id, by=who, by_kind="seller", source="chat",
                              dedupe_key=f"kommo-outmsg:{msg.message_id}", now=now):
            summary.commands.append(command.name)
        else:
            summary.ignored.append(f"seller message {msg.message_id}: already applied")
    elif settings.bot_pause_on_human_reply and msg.contact_id:
        pause = bot_control.Command("pause", "auto", "vendedor respondeu no chat")
        if whatsapp_store.get_bot_state(conn, msg.contact_id)["status"] == "active" and \
                _apply_and_confirm(conn, settings, pause, lead_id=msg.lead_id,
                                   contact_id=msg.contact_id, by=who, by_kind="human_reply",
                                   source="chat", dedupe_key=f"kommo-outmsg:{msg.message_id}",
                                   now=now):
            summary.commands.append("pause(human_reply)")
    else:
        summary.ignored.append(f"seller message {msg.message_id}")


def _record_note(conn, settings, note: KommoNote, now: float, summary: IntakeSummary) -> None:
    if note.created_by in (INTEGRATION_USER, ""):
        summary.ignored.append(f"note {note.note_id}: written by an integration")
        return
    command = bot_control.parse_command(note.text)
    if command is None:
        summary.ignored.append(f"note {note.note_id}: not a command")
        return
    if _apply_and_confirm(conn, settings, command, lead_id=note.lead_id, contact_id=None,
                          by=f"usuário {note.created_by}", by_kind="seller", source="note",
                          dedupe_key=f"kommo-note:{note.note_id}", now=now):
        summary.commands.append(command.name)
    else:
        summary.ignored.append(f"note {note.note_id}: already applied")


def _apply_and_confirm(conn, settings, command: bot_control.Command, *, lead_id: str | None,
                     contact_id: str | None, by: str, by_kind: str, source: str,
                     dedupe_key: str, now: float) -> bool:
    """Apply the command now when we know the contact (a pause must stop the very next customer
    message), and queue the job that confirms it on the lead (and asks Kommo for the contact
    first when the lead was never seen in a message). False when it was applied before."""
    if not contact_id and lead_id:
        contact_id = whatsapp_store.contact_of_lead(conn, lead_id)
    payload = {"lead_id": lead_id, "contact_id": contact_id, "command": command.name,
               "word": command.word, "reason": command.reason, "by": by, "by_kind": by_kind,
               "source": source}
    if outbox.get_job(conn, dedupe_key=dedupe_key):
        return False  # the same note delivered again
    state = whatsapp_store.get_bot_state(conn, contact_id) if contact_id else None
    if state and command.name in ("pause", "resume") and _changed_after(state, now):
        # Someone (the API, the assistant's handoff) changed the bot after this command was
        # written: the newer decision stands.
        payload["confirmation"] = bot_control.not_applied_text(command, state)
    elif contact_id:
        payload["confirmation"] = bot_control.apply_command(
            conn, contact_id, command, by, by_kind, now, settings.bot_auto_resume_hours)
    # A lead never seen in a message: its commands wait for Kommo to name the contact, one at
    # a time in the order the seller wrote them (a #pausar then #voltar must not swap).
    order = ordering_key(contact_id) if contact_id else f"kommo-lead:{lead_id}" if lead_id \
        else None
    outbox.enqueue_job(conn, BOT_COMMAND, dedupe_key, payload, ordering_key=order, now=now)
    log.info("bot_command_recorded", extra={"command": command.name, "source": source,
                                            "contact_id": contact_id, "lead_id": lead_id})
    return True


# --- HTTP API and n8n's asynchronous answers ----------------------------------------------------

def api_command(conn, settings, contact_id: str, command: bot_control.Command, by: str,
                now: float) -> dict:
    """Apply a command from `/bot/*` and queue its confirmation note (inside a transaction).
    Returns the new state."""
    conversation = whatsapp_store.get_conversation(conn, contact_id=contact_id)
    confirmation = bot_control.apply_command(conn, contact_id, command, by, "api", now,
                                             settings.bot_auto_resume_hours)
    lead_id = conversation["kommo_lead_id"] if conversation else None
    if lead_id and command.name in ("pause", "resume"):
        outbox.enqueue_job(conn, ADD_NOTE, f"bot-api:{uuid.uuid4().hex}",
                           {"lead_id": lead_id, "text": confirmation},
                           ordering_key=ordering_key(contact_id), now=now)
    state = whatsapp_store.get_bot_state(conn, contact_id)
    return {**bot_control.state_json(state), "message": confirmation}


# How long an answer without a correlation id, repeated word for word, counts as n8n retrying
# the same POST rather than a new answer; the last one is kept under its fingerprint.
ASYNC_RETRY_WINDOW_SECONDS = 3600
ASYNC_ANSWER_NAMESPACE = "n8n-answer"


def record_async_answer(conn, settings, answer: N8nAsyncAnswer, now: float) -> dict:
    """Record an answer posted to `/send-response`. Raises LookupError for an unknown
    conversation. Returns what was done (`queued`, `suppressed`, `duplicate`, `handoff`)."""
    conversation = (whatsapp_store.get_conversation(conn, talk_id=answer.conversation_id)
                    if answer.conversation_id else None)
    if conversation is None and answer.contact_id:
        conversation = whatsapp_store.get_conversation(conn, contact_id=answer.contact_id)
    if conversation is None:
        raise LookupError("conversa desconhecida")
    contact_id = conversation["kommo_contact_id"]
    result = {"conversation_id": conversation["kommo_talk_id"], "contact_id": contact_id,
              "queued": 0, "handoff": False, "suppressed": False, "duplicate": False}
    correlation = answer.correlation_id
    if not correlation:
        # Without an id, the same words for the same contact within the hour are n8n retrying
        # the POST; later, they are the assistant saying the same thing again ("Certo!").
        fingerprint = _answer_fingerprint(contact_id, answer)
        last = db_manager.mapping_get(conn, ASYNC_ANSWER_NAMESPACE, fingerprint)
        if last and now - last["at"] < ASYNC_RETRY_WINDOW_SECONDS:
            result["duplicate"] = True
            return result
        correlation = fingerprint if last is None else f"{fingerprint}-{int(now)}"
        db_manager.mapping_put(conn, ASYNC_ANSWER_NAMESPACE, fingerprint,
                               {"correlation": correlation, "at": now}, now=now)
    state = whatsapp_store.get_bot_state(conn, contact_id)
    # The question this answers was asked under some pause count; a pause since then (even if
    # already undone by #voltar) makes the answer stale.
    asked = db_manager.mapping_get(conn, "n8n-correlation", answer.correlation_id) \
        if answer.correlation_id else None
    stale = not bot_control.may_answer(state, asked["pause_count"] if asked
                                       else state["pause_count"])
    if stale:
        log.warning("n8n_answer_suppressed_paused", extra={"contact_id": contact_id,
                                                          "correlation_id": correlation})
        result["suppressed"] = True
    if answer.should_handoff and not stale:
        # Pause first; the farewell text ("I'll pass you to a human") rides on this very pause.
        _apply_and_confirm(conn, settings, bot_control.Command("pause", "handoff",
                                                               "o assistente pediu um humano"),
                           lead_id=conversation["kommo_lead_id"], contact_id=contact_id,
                           by="assistente de IA", by_kind="ai", source="n8n",
                           dedupe_key=f"n8n-handoff:{correlation}", now=now)
        result["handoff"] = True
        state = whatsapp_store.get_bot_state(conn, contact_id)
    if answer.should_send and not stale:
        result["queued"] = enqueue_replies(conn, contact_id, conversation, list(answer.texts),
                                           correlation, state["pause_count"], now,
                                           source="n8n-handoff" if result["handoff"]
                                           else "n8n-async")
    return result


def _answer_fingerprint(contact_id: str, answer: N8nAsyncAnswer) -> str:
    text = "\x1f".join(answer.texts) + f"|{answer.should_send}|{answer.should_handoff}"
    return "fp-" + hashlib.sha256(f"{contact_id}|{text}".encode()).hexdigest()[:32]


def reply_follow_ups(contact_id: str, conversation: dict, texts: list[str], correlation: str,
                     pause_count: int, source: str) -> list[outbox.FollowUp]:
    """One `kommo.send_reply` job per text, deduplicated by correlation id and position."""
    return [outbox.FollowUp(SEND_REPLY, reply_key(correlation, index), {
        "contact_id": contact_id, "talk_id": conversation["kommo_talk_id"],
        "lead_id": conversation["kommo_lead_id"], "text": text, "correlation_id": correlation,
        "pause_count": pause_count, "source": source}, ordering_key=ordering_key(contact_id))
        for index, text in enumerate(texts)]


def reply_key(correlation: str, index: int) -> str:
    """Dedupe key of the `index`-th reply of the answer `correlation`."""
    return f"n8n-reply:{correlation}:{index}"


def enqueue_replies(conn, contact_id: str, conversation: dict, texts: list[str],
                    correlation: str, pause_count: int, now: float, source: str) -> int:
    """Queue the reply jobs of an answer; returns how many were new."""
    return sum(1 for f in reply_follow_ups(contact_id, conversation, texts, correlation,
                                           pause_count, source)
               if outbox.enqueue_job(conn, f.kind, f.dedupe_key, f.payload,
                                     ordering_key=f.ordering_key, now=now))


def correlation_for(batch_key: str) -> str:
    """A stable correlation id for a burst: the same across retries, so n8n can dedupe too."""
    return "ponte-" + hashlib.sha256(batch_key.encode()).hexdigest()[:24]
