"""Bridge B, pre-sale questions: new questions into Chatwoot conversations, agents' replies into
public answers, answers typed on Mercado Livre mirrored back.

Owns: the `ml.import_question`, `ml.fetch_question`, `ml.mirror_answer` and
`chatwoot.mark_answered` handlers, the question poll, and answering a question.
Must not: serve HTTP; know wire formats (the peer modules); hold SQL (meli_store).
Ordering keys: see meli_common.
"""
from __future__ import annotations

import db_manager
import meli_ai_store as ai_store
import meli_store as store
import meli_texts as texts
import outbox
from chatwoot_api import BRIDGE_ORIGIN_KEY, markdown_to_text
from meli_common import (LABEL_ANSWERED, LABEL_ANSWERED_ON_ML, QUESTION_MAX_OFFSET,
                         QUESTION_MAX_PAGES, QUESTION_PAGE, add_label, buyer_ordering_key,
                         cache_item, cw, ensure_contact, find_message_by_source, fresh_item, iso,
                         item_info, log, ml, next_page_offset, note_follow_up, open_conversation,
                         questions_inbox, refuse, reply_deleted, reply_ordering_key, short_error,
                         squash, thumbnail)
from mercado_livre_api import (ANSWER_MAX_CHARS, MercadoLivreError, buyer_id_of_question,
                               parse_date, question_sort_key)
from outbox import FollowUp

FINAL_STATUSES = ("ANSWERED", "DELETED", "BANNED", "CLOSED_UNANSWERED", "DISABLED")
CLOCK_SKEW_SECONDS = 30  # between Mercado Livre's answer dates and our clock
DEAD_IMPORT_RETRY_SECONDS = 3600
FULL_SWEEP_SECONDS = 3600
SWEEP_CHECK_MAX = 50  # imported questions re-read per full sweep when they left UNANSWERED
SWEEP_CHECK_LIMIT = 24  # sweeps that re-read one question before it is left alone


def poll_questions(ctx) -> dict:
    """Schedule: find UNANSWERED questions not yet in Chatwoot and enqueue them, oldest first.

    Pages newest first and stops at the first page with nothing new, so an idle cycle costs one
    call however many open questions the seller has (ascending pages would have to walk the whole
    backlog to reach the new ones, and cannot reach past offset 1,000). Once an hour the sweep
    walks every page (bounded) to catch anything missed."""
    client = ml(ctx)
    full = ctx.now() - store.full_sweep_at(ctx.conn) >= FULL_SWEEP_SECONDS
    found: list[dict] = []
    seen: set[str] = set()
    complete = False
    pages = offset = 0
    while pages < QUESTION_MAX_PAGES:
        page = client.search_questions("UNANSWERED", offset=offset, limit=QUESTION_PAGE,
                                       newest_first=True)
        pages += 1
        questions = page.get("questions") or []
        seen.update(str(q.get("id")) for q in questions)
        new = [q for q in questions if _needs_import(ctx, q.get("id"))]
        found.extend(new)
        # By what came back: Mercado Livre may page at 10 whatever limit was asked.
        offset = next_page_offset(offset, len(questions),
                                  {"total": page.get("total"), "limit": page.get("limit")},
                                  QUESTION_PAGE)
        if offset is None:
            complete = True
            break
        if offset > QUESTION_MAX_OFFSET or (not new and not full):
            break
    enqueued = 0
    if found:
        found.sort(key=question_sort_key)
        missing = [q.get("item_id") for q in found if q.get("item_id")
                   and not fresh_item(ctx, q["item_id"])]
        if missing:
            try:
                for item in client.get_items(missing).values():
                    cache_item(ctx, item)
            except MercadoLivreError as exc:
                log.warning("ml_items_prefetch_failed", extra={"status": exc.status})
        with db_manager.transaction(ctx.conn):
            for q in found:
                if outbox.enqueue_job(ctx.conn, "ml.import_question",
                                      f"ml-question:{q['id']}", {"question": q},
                                      ordering_key=buyer_ordering_key(q), now=ctx.now()):
                    enqueued += 1
    checks = 0
    if full and complete:
        checks = _check_questions_gone(ctx, seen)
    if full:
        store.set_full_sweep_at(ctx.conn, ctx.now())
    if enqueued:
        log.info("ml_questions_enqueued", extra={"count": enqueued, "pages": pages})
    result = {"enqueued": enqueued, "pages": pages, "full_sweep": full}
    if checks:
        result["checks"] = checks
    return result


def _check_questions_gone(ctx, unanswered: set[str]) -> int:
    """After a sweep that saw every UNANSWERED question: queue `ml.fetch_question` for
    imported questions that are no longer among them (answered on Mercado Livre's site
    without a notification reaching us, deleted, closed), at most SWEEP_CHECK_MAX a sweep,
    the longest-waiting first."""
    gone = [qid for qid in store.open_question_ids(ctx.conn)
            if qid not in unanswered][:SWEEP_CHECK_MAX]
    with db_manager.transaction(ctx.conn):
        for qid in gone:
            _queue_check(ctx, qid)
    if gone:
        log.info("ml_questions_rechecked", extra={"count": len(gone)})
    return len(gone)


def _queue_check(ctx, qid: str) -> None:
    """One sweep slot for a question that left UNANSWERED: queue a re-read unless the last one
    is still queued or died (a question that keeps failing gets no new dead job every hour).
    Counting the slot bumps the question's `updated_at`, which moves it to the back of the
    sweep's queue (`open_question_ids` is oldest first). After SWEEP_CHECK_LIMIT slots with
    nothing settled the question is closed for the sweep. Runs inside the sweep's transaction,
    so the read and the count are one step."""
    known = store.get_question(ctx.conn, qid)
    if known is None:
        return
    last = known.sweep_check_key
    job = outbox.get_job(ctx.conn, dedupe_key=last) if last else None
    if job is None or job["status"] == "done":
        last = f"ml-question-check:{qid}:{known.sweep_checks + 1}"
        outbox.enqueue_job(ctx.conn, "ml.fetch_question", last, {"question_id": qid},
                           now=ctx.now())
    counted = store.count_sweep_check(ctx.conn, qid, last, SWEEP_CHECK_LIMIT, ctx.now())
    if counted is not None and counted.closed_status == store.CLOSED_UNSETTLED:
        log.warning("ml_question_sweep_gave_up", extra={"ml_question_id": qid,
                                                        "checks": counted.sweep_checks})


def _needs_import(ctx, question_id) -> bool:
    """True for a question without its Chatwoot message and without a live import job. An
    import that died (Chatwoot down for hours) is re-armed an hour later while the question is
    still unanswered, instead of waiting for an operator."""
    known = store.get_question(ctx.conn, question_id)
    if known is not None and known.chatwoot_message_id:
        return False
    job = outbox.get_job(ctx.conn, dedupe_key=f"ml-question:{question_id}")
    if job is None:
        return True
    if job["status"] == "dead" and (job["finished_at"] or 0) < ctx.now() - DEAD_IMPORT_RETRY_SECONDS:
        outbox.retry_dead_job(ctx.conn, job["id"], now=ctx.now())
        log.info("ml_question_import_rearmed", extra={"ml_question_id": str(question_id),
                                                      "job_id": job["id"]})
    return False


def handle_import_question(ctx, job):
    """`ml.import_question`: one new question → one conversation + one incoming message."""
    q = job.payload["question"]
    qid = str(q["id"])
    known = store.get_question(ctx.conn, qid)
    if known is not None and known.chatwoot_message_id:
        # A re-run after a crash that recorded the message but lost the job's completion.
        return {"status": "already_imported",
                "conversation_id": known.chatwoot_conversation_id}, \
            _ask_ai(ctx, q, known.chatwoot_conversation_id)
    if q.get("status") not in (None, "UNANSWERED"):
        return {"status": "skipped", "question_status": q.get("status")}
    client = cw(ctx)
    buyer = buyer_id_of_question(q)
    item_id = str(q.get("item_id") or "")
    # Read before this question joins it; the buyer's ordering key keeps a question of the
    # same thread from joining meanwhile.
    others = [{"conversation_id": t.chatwoot_conversation_id, "text": t.question_text}
              for t in store.question_thread(ctx.conn, buyer, item_id)
              if t.ml_question_id != qid]
    conversation_id = known.chatwoot_conversation_id if known else None
    # A conversation recorded by an earlier run may already hold the message.
    resumed = bool(conversation_id)
    if not resumed:
        contact = ensure_contact(ctx, questions_inbox(ctx), buyer)
        conversation_id = open_conversation(
            ctx, questions_inbox(ctx), contact, "meli_question_id", qid,
            custom_attributes={"meli_question_id": qid, "meli_item_id": item_id,
                               "meli_buyer_id": buyer},
            additional_attributes={"meli_resource": "questions", "meli_item_id": item_id},
            opening=bool(known and known.opening),
            mark_opening=lambda: store.mark_question_opening(ctx.conn, qid, item_id, buyer,
                                                             ctx.now()))
        store.record_question_conversation(ctx.conn, qid, item_id, buyer,
                                           (q.get("text") or "")[:120], conversation_id,
                                           ctx.now())
    source_id = f"meli:question:{qid}"
    existing = find_message_by_source(ctx, conversation_id, source_id) if resumed else None
    if existing is None:
        item = item_info(ctx, item_id)
        content = texts.question_message(q, item, others)
        message = client.create_message(
            conversation_id, content, message_type="incoming", source_id=source_id,
            content_attributes={"meli_resource": "questions", "meli_question_id": qid,
                                "meli_item_id": item_id,
                                "external_created_at": q.get("date_created")},
            attachments=thumbnail(ctx, item))
        existing = message
    store.record_question_message(ctx.conn, qid, int(existing["id"]), ctx.now())
    log.info("ml_question_imported", extra={"ml_question_id": qid,
                                            "chatwoot_conversation_id": conversation_id})
    return {"status": "imported", "conversation_id": conversation_id,
            "message_id": int(existing["id"])}, _ask_ai(ctx, q, conversation_id)


def _ask_ai(ctx, question: dict, conversation_id: int) -> list[FollowUp]:
    """The seller's AI agent is asked about the question just imported (when ML_AI_MODE is on)."""
    import meli_ai  # meli_ai builds on this module (answer_question): imported when used

    follow = meli_ai.ask_follow_up(ctx.settings, question, conversation_id)
    return [follow] if follow else []


def handle_fetch_question(ctx, job):
    """`ml.fetch_question` (from a notification): read the question with our token; a new one
    is imported like a polled one; one answered directly on Mercado Livre is mirrored."""
    qid = str(job.payload["question_id"])
    known = store.get_question(ctx.conn, qid)
    try:
        q = ml(ctx).get_question(qid)
    except MercadoLivreError as exc:
        if exc.status == 404:
            _close(ctx, qid, "DELETED")
            return {"status": "not_found"}
        raise
    if str(q.get("seller_id") or ctx.settings.ml_seller_id) != str(ctx.settings.ml_seller_id):
        return {"status": "other_seller"}
    if q.get("status") == "UNANSWERED" and not (known and known.chatwoot_message_id):
        return {"status": "new"}, [FollowUp("ml.import_question", f"ml-question:{qid}",
                                            {"question": q},
                                            ordering_key=buyer_ordering_key(q))]
    answer = q.get("answer") or {}
    if q.get("status") == "ANSWERED" and known and known.chatwoot_conversation_id \
            and answer.get("text"):
        # Answered by ponte (Mercado Livre may store our text altered) or already mirrored.
        if store.get_answer(ctx.conn, qid) is None:
            # Queued behind the conversation's replies: one still being retried may be the
            # very answer Mercado Livre now shows (its reply to our POST was lost).
            return {"status": "answered_on_ml"}, [FollowUp(
                "ml.mirror_answer", f"ml-answer:{qid}",
                {"question_id": qid, "conversation_id": known.chatwoot_conversation_id,
                 "text": answer.get("text"), "date_created": answer.get("date_created")},
                ordering_key=reply_ordering_key(known.chatwoot_conversation_id))]
    if q.get("status") != "UNANSWERED":
        _close(ctx, qid, str(q.get("status")))
    return {"status": "nothing_to_do", "question_status": q.get("status")}


def _close(ctx, qid: str, status: str) -> None:
    """Remember that an imported question reached a final status, so sweeps stop re-reading
    it (UNDER_REVIEW is not final: the question may come back and be answered). One
    statement: this job has no ordering key."""
    if status in FINAL_STATUSES:
        store.close_question(ctx.conn, qid, status, ctx.now())


def handle_mirror_answer(ctx, job):
    """`ml.mirror_answer`: an answer typed on Mercado Livre shows in the conversation as ours
    (source_id `meli:answer:<id>`, never sent back)."""
    p = job.payload
    qid = str(p["question_id"])
    conversation_id = int(p["conversation_id"])
    done = store.get_answer(ctx.conn, qid)
    if done and done.answered_by == store.ANSWERED_BY_PONTE:
        return {"status": "answered_by_ponte"}
    if done is None:
        source_id = f"meli:answer:{qid}"
        # Marked before posting: a run that lost Chatwoot's answer (retry, crash, or a job
        # that died and was re-armed with a fresh attempt count) looks before posting again.
        known = store.get_question(ctx.conn, qid)
        if known is None or known.mirror_posting:
            existing = find_message_by_source(ctx, conversation_id, source_id)
        else:
            existing = None
            store.mark_mirror_posting(ctx.conn, qid, ctx.now())
        if existing is None:
            cw(ctx).create_message(conversation_id, p["text"], message_type="outgoing",
                                   source_id=source_id,
                                   content_attributes={BRIDGE_ORIGIN_KEY: "mercadolivre",
                                                       "meli_question_id": qid})
        store.record_answer(ctx.conn, qid, store.ANSWERED_BY_MERCADOLIVRE, None, ctx.now())
    add_label(ctx, conversation_id, LABEL_ANSWERED_ON_ML)
    return {"status": "mirrored"}


def answer_question(ctx, job, reply: dict, qid: str):
    """Publish an agent's reply as the question's answer, or refuse it with a note. A reply of
    exactly `#ok` publishes the AI's pending suggestion instead (meli_ai); any other agent reply
    marks the question so that a later AI answer is dropped. meli_ai publishes the AI's own
    answers through here too (`reply["ai"]`)."""
    text = markdown_to_text(reply.get("content") or "")
    approved = text.strip().casefold() == texts.AI_APPROVE_COMMAND
    if approved:  # the agent sends the AI's suggestion as it is; "#ok" never goes out
        suggestion = ai_store.get(ctx.conn, qid)
        # APPROVED too: a re-run of this very reply (the checks below see it went out)
        if suggestion is None or not suggestion.answer_text or suggestion.status not in (
                ai_store.STATUS_SUGGESTED, ai_store.STATUS_APPROVED):
            return refuse(reply, texts.AI_NOTHING_TO_APPROVE, "no_ai_suggestion")
        text = suggestion.answer_text
    elif not reply.get("ai"):
        ai_store.mark_agent_replied(ctx.conn, qid, ctx.now())  # a late AI answer is dropped
    notes = []
    if reply.get("attachments"):
        notes.append(texts.ANSWER_NO_ATTACHMENTS.format(
            names=", ".join(a["filename"] for a in reply["attachments"])))
    if not text:
        return refuse(reply, "\n".join(notes + [texts.EMPTY_REPLY]), "empty")
    if len(text) > ANSWER_MAX_CHARS:
        return refuse(reply, texts.ANSWER_TOO_LONG.format(length=len(text)), "too_long")
    ours = store.get_answer(ctx.conn, qid)
    if ours and ours.answered_by == store.ANSWERED_BY_MERCADOLIVRE:
        return refuse(reply, texts.QUESTION_ALREADY_ANSWERED, "already_answered")
    if ours and ours.chatwoot_message_id != int(reply["message_id"]):
        return refuse(reply, texts.ALREADY_ANSWERED_BY_US.format(
            message_id=ours.chatwoot_message_id), "already_answered")
    if not ours and reply_deleted(ctx, reply):
        return {"status": "deleted", "question_id": qid}
    if not ours:
        # In flight before the POST: a run that loses Mercado Livre's answer (timeout, crash,
        # job died and re-armed) knows its POST may have gone through; an error that may have
        # reached Mercado Livre also records when (its unknown posts). Only this job (ordering
        # key cw-out:<conversation>) writes the reply's progress.
        key = int(reply["message_id"])
        posted_at = ctx.now()
        store.start_reply_part(ctx.conn, key, 0, posted_at)
        try:
            ml(ctx).answer_question(qid, text)
        except MercadoLivreError as exc:
            if exc.may_have_reached:
                store.record_unknown_post(ctx.conn, key, posted_at, ctx.now())
            reached = store.unknown_posts(ctx.conn, key)
            if not reached:
                store.clear_in_flight(ctx.conn, key, ctx.now())
            if exc.retryable:
                raise
            outcome = _explain_answer_error(ctx, qid, text, exc, reached)
            if outcome != "ours":
                return refuse(reply, outcome, exc.code or str(exc.status))
        store.record_answer(ctx.conn, qid, store.ANSWERED_BY_PONTE, key, ctx.now())
    follow_ups = [FollowUp("chatwoot.mark_answered", f"cw-answered:{reply['message_id']}",
                           {"conversation_id": reply["conversation_id"],
                            "message_id": reply["message_id"], "question_id": qid},
                           # its labels and attributes are read, changed and written back
                           ordering_key=reply_ordering_key(reply["conversation_id"]))]
    if notes:
        follow_ups.append(note_follow_up(reply["conversation_id"], "\n".join(notes),
                                f"attachments:{reply['message_id']}"))
    if approved:
        ai_store.set_status(ctx.conn, qid, ai_store.STATUS_APPROVED, ctx.now())
        follow_ups.append(note_follow_up(reply["conversation_id"], texts.AI_APPROVED,
                                         f"ml-ai-approved:{qid}"))
    log.info("ml_question_answered", extra={"ml_question_id": qid,
                                            "chatwoot_message_id": reply["message_id"]})
    return {"status": "answered", "question_id": qid}, follow_ups


def _explain_answer_error(ctx, qid: str, text: str, exc: MercadoLivreError,
                          reached: list | None = None) -> str:
    """Why Mercado Livre refused an answer, in words for the agent ("ours" when the question is
    in fact answered by a previous run that got through: the same text, whitespace aside, or
    an answer created while one of our POSTs whose outcome is unknown was under way —
    `reached` lists those POSTs as [started, failed] epoch pairs)."""
    if exc.status == 404:
        return texts.QUESTION_DELETED
    try:
        q = ml(ctx).get_question(qid)
    except MercadoLivreError as again:
        if again.status == 404:
            return texts.QUESTION_DELETED
        q = {}
    status = q.get("status")
    answer = q.get("answer") or {}
    if status == "ANSWERED" and (squash(answer.get("text") or "") == squash(text)
                                 or _created_during(answer.get("date_created"), reached or [])):
        return "ours"
    if status == "ANSWERED":
        return texts.QUESTION_ANSWERED_ON_ML if answer.get("text") \
            else texts.QUESTION_ALREADY_ANSWERED
    if status in texts.QUESTION_STATUS_PT:
        return texts.QUESTION_NOT_ANSWERABLE.format(reason=texts.QUESTION_STATUS_PT[status])
    if exc.code in ("not_active_item", "item_closed", "closed_item"):
        return texts.ITEM_CLOSED
    if exc.code == "not_unanswered_question":
        return texts.QUESTION_ALREADY_ANSWERED
    return texts.ML_REFUSED.format(detail=short_error(exc))


def _created_during(date_created: str | None, windows: list) -> bool:
    """True when an answer's creation time falls inside one of the windows (with a little
    slack for clock skew) in which a POST of ours may have reached Mercado Livre."""
    moment = parse_date(date_created)
    if moment is None:
        return False
    created = moment.timestamp()
    return any(start - CLOCK_SKEW_SECONDS <= created <= end + CLOCK_SKEW_SECONDS
               for start, end in windows)


def handle_mark_answered(ctx, job):
    """`chatwoot.mark_answered`: label + custom attribute on the conversation, message marked
    delivered, conversation resolved when CHATWOOT_RESOLVE_ANSWERED=true."""
    p = job.payload
    client = cw(ctx)
    conversation_id = int(p["conversation_id"])
    add_label(ctx, conversation_id, LABEL_ANSWERED)
    attrs = dict(client.get_conversation(conversation_id).get("custom_attributes") or {})
    attrs.update(meli_answered=True, meli_answered_at=iso(ctx.now()))
    client.set_custom_attributes(conversation_id, attrs)
    client.update_message_status(conversation_id, int(p["message_id"]), "delivered")
    if ctx.settings.chatwoot_resolve_answered:
        client.toggle_status(conversation_id, "resolved")
    return {"status": "marked"}
