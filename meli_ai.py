"""The seller's AI agent (an n8n workflow) on Mercado Livre questions: it is asked about each
new question, and its answer becomes a private suggestion or, in `automatico` mode, the
question's public answer — with the agent in control in Chatwoot.

Owns: the `n8n.ml_question` job (call the workflow with the question, the item and the
buyer's earlier questions on it), the `ml.ai_answer` job (what happens to an AI answer: a
suggestion note, or the answer posted on Mercado Livre through the agents' own path,
`meli_questions.answer_question`), the rules that hold an answer back (contact data, length),
the mode in force at a moment (`ML_AI_MODE`, `ML_AI_HOURS`), and reading an answer the
workflow posts later (`record_async_answer`, for `POST /mercadolivre/send-response`).
Must not: serve HTTP (meli_routes); hold SQL (meli_ai_store); know wire formats (n8n_api,
mercado_livre_api); send a token to the workflow.

Ordering: `n8n.ml_question` runs under `ml-ai:<conversation>` in the n8n lane, so a slow AI
never holds up the conversation's replies; its answer is published by `ml.ai_answer` under
`cw-out:<conversation>`, the key of the agents' replies (meli_common), so the two run one at a
time in the order they came: an agent's reply queued before it wins (the AI answer is dropped),
and `#ok` finds the suggestion written before it.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone

import config
import ids
import meli_ai_store as ai_store
import meli_store as store
import meli_texts as texts
import outbox
from chatwoot_api import BRIDGE_ORIGIN_KEY, markdown_to_text
from meli_common import (ITEM_CACHE_SECONDS, add_label, cw, failure_follow_up,
                         find_message_by_source, ml, note_follow_up, reply_ordering_key)
from meli_questions import FINAL_STATUSES, answer_question
from mercado_livre_api import ANSWER_MAX_CHARS, MercadoLivreError, parse_date
from n8n_api import N8nClient, N8nError, extract_answer
from outbox import FollowUp

log = logging.getLogger("ponte.meli.ai")

MODE_OFF, MODE_SUGGEST, MODE_AUTO = "desligado", "sugerir", "automatico"
ASK_KIND = "n8n.ml_question"
PUBLISH_KIND = "ml.ai_answer"
LABEL_AI_ANSWERED = "ia-respondeu"
CHAT_TYPE = "mercadolivre_question"
AI_ATTEMPTS = 3              # calls to the workflow before the question is left to the agents
PREVIOUS_QUESTIONS_MAX = 20  # the buyer's earlier questions on the item sent to the workflow
SAO_PAULO = "America/Sao_Paulo"
# Brazil has had no daylight saving time since 2019: the fallback when tzdata is missing.
_SAO_PAULO_FIXED = timezone(timedelta(hours=-3))

# Contact data Mercado Livre forbids in answers. Tuned to hold back too much rather than too
# little: a held answer costs an agent one `#ok`, a sent one cannot be taken back.
_CONTACT_PATTERNS = {
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "link": re.compile(r"(?:https?://|www\.)\S+|\b(?:wa\.me|bit\.ly|t\.me)/\S*"
                       r"|\b[\w-]+\.(?:com|net|org|shop|store|site|online|link|app|io|me)"
                       r"(?:\.br)?\b|\b[\w-]+\.(?:br|ly)\b", re.I),
    "phone": re.compile(r"(?:\+?55[\s.-]?)?(?:\(\s?[1-9]{2}\s?\)|\b[1-9]{2})[\s.-]?9?\s?\d{4}"
                        r"[\s.-]?\d{4}\b|\b9?\d{4}-\d{4}\b"),
    "address": re.compile(r"\b(?:rua|r\.|avenida|av\.?|travessa|tv\.|alameda|al\.|rodovia|"
                          r"estrada|praça|praca|largo)\s+[^\n,;:]{2,60}?,?\s*(?:n[º°o.]\s*)?"
                          r"\d{1,5}\b|\b\d{5}-\d{3}\b", re.I),
}


# --- settings ------------------------------------------------------------------------------------

def enabled(settings) -> bool:
    """True when new questions go to the workflow (ML_AI_MODE is not `desligado`)."""
    return settings.ml_ai_mode != MODE_OFF and bool(settings.ml_ai_webhook_url)


def _zone(name: str):
    try:
        import zoneinfo
        return zoneinfo.ZoneInfo(name or SAO_PAULO)
    except (ValueError, KeyError, OSError):
        return _SAO_PAULO_FIXED


def effective_mode(settings, now: float) -> str:
    """The mode in force at `now`: `automatico` only inside ML_AI_HOURS (when set, in
    ML_AI_TIMEZONE), `sugerir` outside them."""
    mode = settings.ml_ai_mode
    hours = config.parse_ai_hours(settings.ml_ai_hours) if mode == MODE_AUTO else None
    if hours is None:
        return mode
    local = datetime.fromtimestamp(now, _zone(settings.ml_ai_timezone))
    minute = local.hour * 60 + local.minute
    start, end = hours
    inside = start <= minute < end if start < end else (minute >= start or minute < end)
    return MODE_AUTO if inside else MODE_SUGGEST


# --- the rules ----------------------------------------------------------------------------------

def held_reasons(text: str) -> list[tuple[str, int]]:
    """Why an AI answer may not go out by itself: contact data (`phone`, `email`, `link`,
    `address`) and `too_long`, each with the text's length; [] when it may."""
    reasons = [(name, len(text)) for name, pattern in _CONTACT_PATTERNS.items()
               if pattern.search(text)]
    if len(text) > ANSWER_MAX_CHARS:
        reasons.append(("too_long", len(text)))
    return reasons


def _settled(ctx, qid: str) -> str | None:
    """Why the question takes no AI answer any more (answered, an agent replied, closed), or
    None."""
    if store.get_answer(ctx.conn, qid) is not None:
        return "already_answered"
    row = ai_store.get(ctx.conn, qid)
    if row is not None and row.agent_replied_at is not None:
        return "agent_replied"
    question = store.get_question(ctx.conn, qid)
    if question is not None and question.closed_status in FINAL_STATUSES:
        return "closed"
    return None


# --- asking the workflow -------------------------------------------------------------------------

def ask_follow_up(settings, question: dict, conversation_id: int) -> FollowUp | None:
    """The job that asks the workflow about a question just imported (None when the AI is
    off)."""
    if not enabled(settings):
        return None
    qid = str(question["id"])
    return FollowUp(ASK_KIND, f"ml-ai:{qid}",
                    {"question": question, "conversation_id": int(conversation_id)},
                    ordering_key=f"ml-ai:{conversation_id}")


def ai_client(ctx) -> N8nClient:
    """The client of the questions workflow, one per worker thread (kept on its clients)."""
    client = getattr(ctx.clients, "_ml_ai_n8n", None)
    if client is None:
        s = ctx.settings
        client = N8nClient(s.ml_ai_webhook_url, s.ml_ai_api_key,
                           timeout_seconds=s.ml_ai_timeout_seconds,
                           max_block_seconds=s.retry_after_max_seconds)
        ctx.clients._ml_ai_n8n = client
    return client


def item_context(ctx, item_id: str) -> dict:
    """The item as the workflow reads it (cached for an hour): id, title, price, available
    quantity, permalink, attributes and the plain-text description. Mercado Livre failing
    leaves what is known (the AI can still answer from the question)."""
    if not item_id:
        return {}
    cached = ai_store.get_item(ctx.conn, item_id)
    if cached is not None and ctx.now() - cached.fetched_at < ITEM_CACHE_SECONDS:
        return cached.as_context()
    try:
        item = ml(ctx).get_item_details(item_id)
        description = ml(ctx).get_item_description(item_id)
    except MercadoLivreError as exc:
        log.warning("ml_ai_item_unavailable", extra={"ml_item_id": item_id, "status": exc.status})
        if cached is not None:
            return cached.as_context()
        if exc.retryable:
            # Busy, down or our rate limit full: ask again later rather than let the AI answer
            # (and maybe publish) without the item's facts.
            raise
        return {"id": item_id}
    if not item.get("id"):
        return {"id": item_id}
    return ai_store.put_item(ctx.conn, item, description, ctx.now()).as_context()


def previous_questions(ctx, item_id: str, buyer_id: str, qid: str) -> list[dict]:
    """The buyer's earlier questions on the item, with their answers, oldest first."""
    if not item_id or not buyer_id:
        return []
    try:
        found = ml(ctx).search_buyer_questions(item_id, buyer_id)
    except MercadoLivreError as exc:
        log.warning("ml_ai_history_unavailable", extra={"ml_item_id": item_id,
                                                        "status": exc.status})
        if exc.retryable:
            raise  # as for the item: later, with the buyer's history
        return []
    out = []
    for q in found:
        if str(q.get("id")) == qid:
            continue
        answer = q.get("answer") if isinstance(q.get("answer"), dict) else None
        out.append({"id": q.get("id"), "text": q.get("text") or "",
                    "date_created": q.get("date_created"), "status": q.get("status"),
                    "answer": {"text": answer.get("text") or "",
                               "date_created": answer.get("date_created")} if answer else None})
    return out[-PREVIOUS_QUESTIONS_MAX:]


def request_body(ctx, question: dict, conversation_id: int) -> dict:
    """What the workflow receives: the fields WhatsApp's workflows already read
    (`message_text`, `conversation_id`, `contact_id`, `timestamp`, `chat_type`) and the
    question's own context. Never a token."""
    qid = str(question["id"])
    item_id = str(question.get("item_id") or "")
    buyer = str((question.get("from") or {}).get("id") or question.get("buyer_id") or "")
    created = parse_date(question.get("date_created"))
    return {
        "chat_type": CHAT_TYPE, "site_id": ctx.settings.ml_site_id,
        "conversation_id": str(conversation_id), "contact_id": buyer,
        "message_text": question.get("text") or "",
        "timestamp": int(created.timestamp()) if created else int(ctx.now()),
        "question": {"id": int(qid) if ids.ascii_id(qid) else qid, "text": question.get("text") or "",
                     "date_created": question.get("date_created")},
        "item": item_context(ctx, item_id),
        "previous_questions": previous_questions(ctx, item_id, buyer, qid),
        "mode": effective_mode(ctx.settings, ctx.now()),
        "answer_max_chars": ANSWER_MAX_CHARS,
        "bridge_correlation_id": f"ml-question:{qid}",
        "reply_to": "/mercadolivre/send-response",
    }


def _should_send(answer) -> bool:
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    value = answer.get("should_send") if isinstance(answer, dict) else None
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "nao", "não")
    return value is None or bool(value)


def handle_ask(ctx, job):
    """`n8n.ml_question`: ask the workflow; its answer goes to `ml.ai_answer`. An empty answer
    means the workflow posts it later; `should_send: false` means none. n8n failing
    AI_ATTEMPTS times (or refusing for good) kills the job: `on_dead_ask` leaves the question
    to the agents with a private note."""
    p = job.payload
    question = p["question"]
    qid = str(question["id"])
    conversation_id = int(p["conversation_id"])
    if not enabled(ctx.settings):
        return {"status": "ai_off"}
    settled = _settled(ctx, qid)
    if settled:
        return {"status": "skipped", "reason": settled}
    body = request_body(ctx, question, conversation_id)
    try:
        with ctx.away_from_database():
            answer = ai_client(ctx).send(body, idempotency_key=f"ml-ai:{qid}")
    except N8nError as exc:
        if exc.retryable and job.attempt < AI_ATTEMPTS:
            raise
        log.warning("ml_ai_unavailable", extra={"peer": "n8n", "ml_question_id": qid,
                                                "status": exc.status, "attempt": job.attempt})
        # Dead, not done: the n8n lane counts it as a failure (the `n8n_failing` alert and
        # /admin see it), and on_dead_ask leaves the note for the agents.
        exc.retryable = False
        raise
    if not _should_send(answer):
        log.info("ml_ai_declined", extra={"ml_question_id": qid})
        return {"status": "not_sent"}
    found = extract_answer(answer)
    if not found:
        return {"status": "awaiting_async"}
    log.info("ml_ai_answered", extra={"ml_question_id": qid, "source": "sync"})
    return {"status": "answered"}, [publish_follow_up(qid, conversation_id, "\n\n".join(found))]


def _error_words(error: str) -> str:
    """A job's error as the agents read it: `n8n 503: …` → `HTTP 503`."""
    status = re.match(r"n8n (\d{3}):", error)
    if status:
        return f"HTTP {status.group(1)}"
    if error.startswith("n8n no-status"):
        return "sem conexão ou tempo esgotado"
    return error[:120]


def on_dead_ask(ctx, job, error: str) -> list[FollowUp]:
    """The workflow did not answer (n8n down or failing AI_ATTEMPTS times, or a job that died
    some other way): no answer, and a private note tells the agents the question is theirs."""
    p = job.payload
    return [note_follow_up(int(p["conversation_id"]),
                           texts.AI_UNAVAILABLE.format(error=_error_words(error)),
                           f"ml-ai-failed:{p['question']['id']}")]


def publish_follow_up(qid: str, conversation_id: int, text: str) -> FollowUp:
    """The job that publishes an AI answer, behind the conversation's replies. One per question
    (its dedupe key), whether the answer came back at once or later."""
    return FollowUp(PUBLISH_KIND, f"ml-ai-answer:{qid}",
                    {"question_id": qid, "conversation_id": int(conversation_id), "text": text},
                    ordering_key=reply_ordering_key(conversation_id))


# --- publishing an answer ------------------------------------------------------------------------

def handle_publish(ctx, job):
    """`ml.ai_answer`: an AI answer becomes a suggestion note (`sugerir`, or held back by a
    rule) or the question's answer on Mercado Livre (`automatico`): an outgoing message in the
    conversation, labelled `ia-respondeu`, posted like an agent's reply. Dropped when an agent
    replied or the question was settled first."""
    p = job.payload
    qid = str(p["question_id"])
    conversation_id = int(p["conversation_id"])
    text = markdown_to_text(p.get("text") or "")
    row = ai_store.get(ctx.conn, qid)
    resuming = row is not None and row.status == ai_store.STATUS_PUBLISHING
    if not resuming:
        settled = _settled(ctx, qid)
        if settled or not text or ctx.settings.ml_ai_mode == MODE_OFF:
            reason = settled or ("empty" if not text else "ai_off")
            log.info("ml_ai_answer_dropped", extra={"ml_question_id": qid, "reason": reason})
            return {"status": "dropped", "reason": reason}
        held = held_reasons(text)
        mode = effective_mode(ctx.settings, ctx.now())
        if mode != MODE_AUTO or held:
            ai_store.save_answer(ctx.conn, qid, conversation_id, text,
                                 ai_store.STATUS_SUGGESTED,
                                 ",".join(r for r, _ in held) or None, ctx.now())
            log.info("ml_ai_suggested", extra={"ml_question_id": qid, "mode": mode,
                                               "held": [r for r, _ in held]})
            return {"status": "suggested", "held": [r for r, _ in held]}, [note_follow_up(
                conversation_id, texts.ai_suggestion_note(text, held), f"ml-ai-suggestion:{qid}")]
        ai_store.save_answer(ctx.conn, qid, conversation_id, text, ai_store.STATUS_PUBLISHING,
                             None, ctx.now())
    message_id = _answer_message(ctx, conversation_id, qid, text, row if resuming else None)
    reply = {"conversation_id": conversation_id, "message_id": message_id, "content": text,
             "ai": True}
    outcome = answer_question(ctx, job, reply, qid)
    result, follow_ups = outcome if isinstance(outcome, tuple) else (outcome, [])
    if result.get("status") == "answered":
        add_label(ctx, conversation_id, LABEL_AI_ANSWERED)
        ai_store.set_status(ctx.conn, qid, ai_store.STATUS_PUBLISHED, ctx.now())
        log.info("ml_ai_published", extra={"ml_question_id": qid,
                                           "chatwoot_message_id": message_id})
    else:
        ai_store.set_status(ctx.conn, qid, ai_store.STATUS_REFUSED, ctx.now())
    return {**result, "ai": True}, follow_ups


def _answer_message(ctx, conversation_id: int, qid: str, text: str,
                    row: ai_store.AiAnswer | None) -> int:
    """The outgoing Chatwoot message that shows the automatic answer: the one recorded or
    created by an earlier run, else a new one (source_id `meli:ai-answer:<id>`, never
    forwarded back)."""
    if row is not None and row.chatwoot_message_id:
        return int(row.chatwoot_message_id)
    source_id = f"meli:ai-answer:{qid}"
    message = find_message_by_source(ctx, conversation_id, source_id) if row else None
    if message is None:
        message = cw(ctx).create_message(
            conversation_id, text, message_type="outgoing", source_id=source_id,
            content_attributes={BRIDGE_ORIGIN_KEY: "ia", "meli_question_id": qid})
    message_id = int(message["id"])
    ai_store.set_status(ctx.conn, qid, ai_store.STATUS_PUBLISHING, ctx.now(), message_id)
    return message_id


def on_dead_publish(ctx, job, error: str) -> list[FollowUp]:
    """An automatic answer that never got through (Mercado Livre down for too long): the
    agents are told, on the message when there is one."""
    p = job.payload
    row = ai_store.get(ctx.conn, p["question_id"])
    note = texts.DELIVERY_GAVE_UP.format(attempts=job.attempt, error=error[:200])
    if row is not None and row.chatwoot_message_id:
        return [failure_follow_up({"conversation_id": p["conversation_id"],
                                   "message_id": row.chatwoot_message_id}, note,
                                  "mercadolivre_unavailable")]
    return [note_follow_up(int(p["conversation_id"]), note, f"ml-ai-dead:{p['question_id']}")]


# --- the asynchronous answer (POST /mercadolivre/send-response) -----------------------------------

def parse_async_answer(body) -> tuple[str, str, bool]:
    """(question id, text, should_send) of an answer the workflow posts later. The question id
    comes from `question_id` or the `bridge_correlation_id` we sent (`ml-question:<id>`); the
    text is read like a synchronous answer (`response_text`, `output`, ...). Raises ValueError
    (pt-BR) when it cannot be used."""
    if not isinstance(body, dict):
        raise ValueError("o corpo precisa ser um objeto JSON")
    qid = str(body.get("question_id") or "").strip()
    correlation = str(body.get("bridge_correlation_id") or body.get("correlation_id") or "")
    if not qid and correlation.startswith("ml-question:"):
        qid = correlation.split(":", 1)[1].strip()
    if ids.ascii_id(qid) is None:
        raise ValueError("informe question_id (o id da pergunta no Mercado Livre)")
    should_send = _should_send(body)
    found = extract_answer({"response_text": body.get("response_text")}) or extract_answer(body)
    text = "\n\n".join(found or [])
    if should_send and not text.strip():
        raise ValueError("response_text vazio")
    return qid, text, should_send


def record_async_answer(conn, settings, body, now: float) -> dict:
    """Queue an answer posted by the workflow (inside the caller's transaction). Raises
    ValueError for a body that cannot be used, LookupError for a question ponte has not
    brought into Chatwoot, PermissionError when ML_AI_MODE is `desligado`."""
    qid, text, should_send = parse_async_answer(body)
    if settings.ml_ai_mode == MODE_OFF:
        raise PermissionError("ML_AI_MODE=desligado")
    question = store.get_question(conn, qid)
    if question is None or not question.chatwoot_conversation_id:
        raise LookupError(qid)
    if not should_send:
        return {"queued": False, "should_send": False, "question_id": qid}
    follow = publish_follow_up(qid, question.chatwoot_conversation_id, text)
    new = outbox.enqueue_job(conn, follow.kind, follow.dedupe_key, follow.payload,
                             ordering_key=follow.ordering_key, now=now)
    return {"queued": bool(new), "duplicate": not new, "question_id": qid}


# Lanes: the workflow's call waits in the n8n lane (the kind's prefix); publishing talks to
# Mercado Livre (the kind's prefix).
HANDLERS = {ASK_KIND: handle_ask, PUBLISH_KIND: handle_publish}
ON_DEAD = {ASK_KIND: on_dead_ask, PUBLISH_KIND: on_dead_publish}
