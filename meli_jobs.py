"""Bridge B's job catalogue: what the poller does with Mercado Livre questions and sales and
with agents' replies from Chatwoot.

Owns: `HANDLERS` (job kinds `ml.*` and `chatwoot.*`), `ON_DEAD`, `SCHEDULES` (question poll,
unread-messages poll, token refresh), routing an agent's reply to a question or a sale, and the
Chatwoot follow-ups (message delivered/failed, private notes).
Must not: serve HTTP or parse webhooks (meli_routes); know wire formats (the peer modules).
The work itself lives in meli_questions and meli_sales; shared helpers in meli_common.

Idempotency: every step that creates something in a peer records the new id as soon as the
peer's answer arrives, and a re-run (lease expiry, retry) resumes from what is recorded. An answer
can be lost after the peer acted (timeout, crash), so a re-run looks before creating again: the
conversation by its custom attribute among the contact's conversations, a message by its
`source_id`, a post-sale part by its text among ponte's unrecorded messages. So a question becomes
exactly one conversation and one message, and a reply is sent once (multi-part replies resume at
the next unsent part).

Concurrency: handlers run in N threads at once; the ordering keys that keep one conversation's
jobs in order are listed in meli_common, and the state is in meli_store's tables (whose
docstring says what `PRUNE` deletes past retention and what stays).
"""
from __future__ import annotations

import meli_ai
import meli_ai_store
import meli_auth
import meli_store
import meli_texts as texts
import task_runs
from meli_common import (conversation_target, cw, failure_follow_up, log, refuse,
                         reply_in_flight)
from meli_questions import (answer_question, handle_fetch_question, handle_import_question,
                            handle_mark_answered, handle_mirror_answer, poll_questions)
from meli_sales import (handle_fetch_message, handle_fetch_order, handle_sync_pack,
                        on_dead_sync_pack, poll_messages, send_sale_message)
from outbox import FollowUp
from peer_http import PeerError

__all__ = ["HANDLERS", "ON_DEAD", "SCHEDULES", "poll_questions", "poll_messages"]


def handle_forward_reply(ctx, job):
    """`chatwoot.forward_reply`: an agent's public reply goes to Mercado Livre — an answer to the
    conversation's question, or a message in the conversation's sale."""
    reply = job.payload
    target = conversation_target(ctx, reply["conversation_id"], reply.get("custom_attributes"))
    if target is None:
        return refuse(reply, texts.NOT_LINKED, "not_linked")
    if target.kind == meli_store.KIND_QUESTION:
        return answer_question(ctx, job, reply, str(target.ml_question_id))
    return send_sale_message(ctx, job, reply, str(target.ml_pack_id))


def on_dead_forward_reply(ctx, job, error: str) -> list[FollowUp]:
    """A reply that never got through (Mercado Livre down for too long): tell the agent, and
    warn that it may have been delivered when the last send's outcome is unknown."""
    reply = job.payload
    note = texts.DELIVERY_MAYBE_SENT if reply_in_flight(ctx, reply["message_id"]) \
        else texts.DELIVERY_GAVE_UP
    return [failure_follow_up(reply, note.format(attempts=job.attempt, error=error[:200]),
                              "mercadolivre_unavailable")]


def handle_mark_delivered(ctx, job):
    """`chatwoot.mark_delivered`: the agent's message shows as delivered."""
    p = job.payload
    cw(ctx).update_message_status(int(p["conversation_id"]), int(p["message_id"]), "delivered")
    return {"status": "marked"}


def handle_report_failure(ctx, job):
    """`chatwoot.report_failure`: private note saying why, and the message marked failed."""
    p = job.payload
    client = cw(ctx)
    conversation_id = int(p["conversation_id"])
    client.create_private_note(conversation_id, p["note"])
    if p.get("message_id"):
        client.update_message_status(conversation_id, int(p["message_id"]), "failed",
                                     p.get("external_error") or "")
    return {"status": "reported"}


def handle_note(ctx, job):
    """`chatwoot.note`: a private note for the agents."""
    cw(ctx).create_private_note(int(job.payload["conversation_id"]), job.payload["note"])
    return {"status": "noted"}


def _guarded(task):
    """A schedule task that logs peer failures instead of breaking the poller loop."""

    def run(ctx):
        try:
            outcome = task(ctx)
        except PeerError as exc:
            log.warning("meli_task_failed", extra={"task": task.__name__, "peer": exc.peer,
                                                   "status": exc.status,
                                                   "error": str(exc)[:200]})
            task_runs.record(ctx.conn, task.__name__, False, ctx.now(), str(exc))
            return None
        except Exception as exc:
            task_runs.record(ctx.conn, task.__name__, False, ctx.now(),
                             f"{type(exc).__name__}: {exc}")
            raise
        task_runs.record(ctx.conn, task.__name__, True, ctx.now())  # /health: polls that work
        return outcome

    run.__name__ = task.__name__
    run.__doc__ = task.__doc__
    return run


# An agent's reply is sent to Mercado Livre: it waits in Mercado Livre's lane of the poller's
# pool, not Chatwoot's (see job_runner.lane_of).
handle_forward_reply.lane = "ml"

HANDLERS = {
    "ml.import_question": handle_import_question,
    "ml.fetch_question": handle_fetch_question,
    "ml.mirror_answer": handle_mirror_answer,
    "ml.sync_pack": handle_sync_pack,
    "ml.fetch_message": handle_fetch_message,
    "ml.fetch_order": handle_fetch_order,
    "chatwoot.forward_reply": handle_forward_reply,
    "chatwoot.mark_answered": handle_mark_answered,
    "chatwoot.mark_delivered": handle_mark_delivered,
    "chatwoot.report_failure": handle_report_failure,
    "chatwoot.note": handle_note,
    **meli_ai.HANDLERS,  # the seller's AI agent on questions: n8n.ml_question, ml.ai_answer
}


ON_DEAD = {"chatwoot.forward_reply": on_dead_forward_reply, "ml.sync_pack": on_dead_sync_pack,
           **meli_ai.ON_DEAD}
PRUNE = [meli_store.prune, meli_auth.prune_states, meli_ai_store.prune]


SCHEDULES = [
    (lambda s: s.ml_poll_questions_seconds, _guarded(poll_questions)),
    (lambda s: s.ml_poll_messages_seconds, _guarded(poll_messages)),
    (60, _guarded(meli_auth.refresh_if_due)),
]
