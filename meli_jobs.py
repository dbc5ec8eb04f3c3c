"""Bridge B logic: what the poller does with Mercado Livre questions and sales and with agents'
replies from Chatwoot.

Owns: `HANDLERS` (job kinds `ml.*` and `chatwoot.*`), `ON_DEAD`, `SCHEDULES` (question poll,
unread-messages poll, token refresh) and the mappings between Mercado Livre ids and Chatwoot ids
(namespaces `NS_*` in db_manager's mappings table).
Must not: serve HTTP or parse webhooks (meli_routes); know wire formats (the peer modules).

Idempotency: every step that creates something in a peer records the new id before the next
step, and a re-run (lease expiry, retry) resumes from what is recorded, so a question becomes
exactly one conversation and one message, and a reply is sent once (multi-part replies resume at
the next unsent part).
"""
from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import Any

import db_manager
import meli_texts as texts
from chatwoot_api import BRIDGE_ORIGIN_KEY, ChatwootClient, ChatwootError, markdown_to_text
from db_manager import FollowUp
from mercado_livre_api import (ANSWER_MAX_CHARS, ATTACHMENT_MAX_BYTES, MercadoLivreError,
                               attachment_mime, buyer_id_of_question, is_agent_mediated,
                               message_sort_key, pack_id_of_message, parse_pack_resource,
                               plain_post_sale_text, reply_recipient, split_message)
from peer_http import PeerError

log = logging.getLogger("ponte.meli")

NS_QUESTION = "ml_question"        # question id → {conversation_id, message_id, item_id, buyer_id}
NS_THREAD = "ml_question_thread"   # "<buyer>:<item>" → [{question_id, conversation_id, text}]
NS_CONTACT = "cw_contact"          # buyer id → {contact_id}
NS_CONTACT_INBOX = "cw_contact_inbox"  # "<buyer>:<inbox>" → {source_id}
NS_CONVERSATION = "cw_conversation"  # display id → {kind: question|sale, question_id|pack_id}
NS_PACK = "ml_pack"                # pack (or order) id → {conversation_id, summary_posted}
NS_ML_MESSAGE = "ml_message"       # ML message id → {chatwoot_message_id} | {sent_by_ponte}
NS_UNREAD = "ml_unread"            # "last" → {pack id: unread count} of the last poll
NS_ITEM = "ml_item"                # item id → {title, price, currency_id, permalink, thumbnail}
NS_OUTGOING = "cw_outgoing"        # Chatwoot message id → {parts_sent, attachment_ids, ...}
NS_ANSWERED = "ml_answered"        # question id → {chatwoot_message_id, text}

QUESTION_PAGE = 50
QUESTION_MAX_PAGES = 20            # Mercado Livre refuses offsets past 1,000
PACK_PAGE = 50
ITEM_CACHE_SECONDS = 3600
MAX_REPLY_PARTS = 5                # 5 × 350 characters; longer replies are refused with a note
LABEL_ANSWERED = "respondida"
LABEL_ANSWERED_ON_ML = "respondida-no-ml"


# --- plumbing -----------------------------------------------------------------------------------

def ml(ctx):
    """The Mercado Livre client of this process (tokens from the database)."""
    return ctx.clients.meli


def cw(ctx) -> ChatwootClient:
    """The Chatwoot client of this process."""
    return ctx.clients.chatwoot


def _get(ctx, namespace: str, key) -> Any:
    return db_manager.mapping_get(ctx.conn, namespace, str(key))


def _put(ctx, namespace: str, key, value) -> None:
    with db_manager.transaction(ctx.conn):
        db_manager.mapping_put(ctx.conn, namespace, str(key), value, now=ctx.now())


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def questions_inbox(ctx) -> int:
    return int(ctx.settings.chatwoot_questions_inbox_id)


def sales_inbox(ctx) -> int:
    return int(ctx.settings.chatwoot_sales_inbox_id)


# --- contacts and items -------------------------------------------------------------------------

def ensure_contact(ctx, inbox_id: int, buyer_id: str, nickname: str = "") -> dict:
    """The buyer's Chatwoot contact (identifier `meli:<buyer id>`) attached to `inbox_id`;
    returns {contact_id, source_id}. Safe to repeat and to race (unique identifier → lookup)."""
    buyer_id = str(buyer_id)
    identifier = source_id = f"meli:{buyer_id}"
    client = cw(ctx)
    known = _get(ctx, NS_CONTACT, buyer_id)
    if known is None:
        if not nickname:
            nickname = buyer_nickname(ctx, buyer_id)
        try:
            created = client.create_contact(
                inbox_id, nickname, identifier, source_id,
                custom_attributes={"meli_user_id": buyer_id, "meli_nickname": nickname},
                additional_attributes={"meli_site_id": ctx.settings.ml_site_id})
            contact_id = int(created["contact"]["id"])
            _put(ctx, NS_CONTACT_INBOX, f"{buyer_id}:{inbox_id}", {"source_id": source_id})
        except ChatwootError as exc:
            if exc.status != 422:
                raise
            found = client.find_contact_by_identifier(identifier)
            if found is None:
                raise
            contact_id = int(found["id"])
        known = {"contact_id": contact_id}
        _put(ctx, NS_CONTACT, buyer_id, known)
    if _get(ctx, NS_CONTACT_INBOX, f"{buyer_id}:{inbox_id}") is None:
        client.create_contact_inbox(known["contact_id"], inbox_id, source_id)
        _put(ctx, NS_CONTACT_INBOX, f"{buyer_id}:{inbox_id}", {"source_id": source_id})
    return {"contact_id": known["contact_id"], "source_id": source_id}


def buyer_nickname(ctx, buyer_id: str) -> str:
    """The buyer's public nickname; a neutral name when the profile cannot be read."""
    try:
        return str(ml(ctx).get_user(buyer_id).get("nickname") or f"Comprador {buyer_id}")
    except MercadoLivreError as exc:
        if exc.retryable and exc.status != 404:
            raise
        return f"Comprador {buyer_id}"


def item_info(ctx, item_id: str) -> dict | None:
    """Title, price, link and thumbnail of an item (cached for an hour)."""
    if not item_id:
        return None
    cached = _get(ctx, NS_ITEM, item_id)
    if cached and ctx.now() - cached.get("fetched_at", 0) < ITEM_CACHE_SECONDS:
        return cached
    try:
        item = ml(ctx).get_item(item_id)
    except MercadoLivreError as exc:
        if exc.retryable:
            raise
        return None
    return cache_item(ctx, item)


def cache_item(ctx, item: dict) -> dict:
    """Keep the fields the bridge shows, with the time they were read."""
    info = {k: item.get(k) for k in ("id", "title", "price", "currency_id", "permalink",
                                     "thumbnail", "secure_thumbnail", "status")}
    info["fetched_at"] = ctx.now()
    _put(ctx, NS_ITEM, item.get("id"), info)
    return info


def _thumbnail(ctx, item: dict | None) -> list[tuple[str, bytes, str]]:
    url = (item or {}).get("secure_thumbnail") or (item or {}).get("thumbnail")
    if not url:
        return []
    try:
        data, content_type = ml(ctx).download_public(url)
    except PeerError as exc:
        log.info("ml_thumbnail_skipped", extra={"peer": "mercadolivre", "status": exc.status})
        return []
    mime = (content_type or "image/jpeg").split(";")[0]
    if not mime.startswith("image/") or not data:
        return []
    return [(f"{item.get('id', 'anuncio')}.{mime.split('/')[-1].replace('jpeg', 'jpg')}",
             data, mime)]


# --- questions ----------------------------------------------------------------------------------

def poll_questions(ctx) -> dict:
    """Schedule: page through UNANSWERED questions (oldest first) and enqueue each new one.
    One API call when nothing is new."""
    client = ml(ctx)
    enqueued = pages = offset = 0
    while pages < QUESTION_MAX_PAGES:
        page = client.search_questions("UNANSWERED", offset=offset, limit=QUESTION_PAGE)
        pages += 1
        questions = page.get("questions") or []
        new = [q for q in questions if _get(ctx, NS_QUESTION, q.get("id")) is None
               and db_manager.get_job(ctx.conn, dedupe_key=f"ml-question:{q.get('id')}") is None]
        if new:
            missing = [q.get("item_id") for q in new if q.get("item_id")
                       and not _fresh_item(ctx, q["item_id"])]
            if missing:
                try:
                    for item in client.get_items(missing).values():
                        cache_item(ctx, item)
                except MercadoLivreError as exc:
                    log.warning("ml_items_prefetch_failed", extra={"status": exc.status})
            with db_manager.transaction(ctx.conn):
                for q in new:
                    if db_manager.enqueue_job(ctx.conn, "ml.import_question",
                                              f"ml-question:{q['id']}", {"question": q},
                                              now=ctx.now()):
                        enqueued += 1
        total = int(page.get("total") or 0)
        offset += QUESTION_PAGE
        if len(questions) < QUESTION_PAGE or offset >= total:
            break
    if enqueued:
        log.info("ml_questions_enqueued", extra={"count": enqueued, "pages": pages})
    return {"enqueued": enqueued, "pages": pages}


def _fresh_item(ctx, item_id: str) -> bool:
    cached = _get(ctx, NS_ITEM, item_id)
    return bool(cached) and ctx.now() - cached.get("fetched_at", 0) < ITEM_CACHE_SECONDS


def handle_import_question(ctx, job):
    """`ml.import_question`: one new question → one conversation + one incoming message."""
    q = job.payload["question"]
    qid = str(q["id"])
    known = _get(ctx, NS_QUESTION, qid) or {}
    if known.get("message_id"):
        return {"status": "already_imported", "conversation_id": known["conversation_id"]}
    if q.get("status") not in (None, "UNANSWERED"):
        return {"status": "skipped", "question_status": q.get("status")}
    client = cw(ctx)
    buyer = buyer_id_of_question(q)
    item_id = str(q.get("item_id") or "")
    thread_key = f"{buyer}:{item_id}"
    thread = _get(ctx, NS_THREAD, thread_key) or []
    conversation_id = known.get("conversation_id")
    created_now = not conversation_id
    if not conversation_id:
        contact = ensure_contact(ctx, questions_inbox(ctx), buyer)
        conversation = client.create_conversation(
            questions_inbox(ctx), contact["contact_id"], contact["source_id"],
            custom_attributes={"meli_question_id": qid, "meli_item_id": item_id,
                               "meli_buyer_id": buyer},
            additional_attributes={"meli_resource": "questions", "meli_item_id": item_id})
        conversation_id = int(conversation["id"])
        known = {"conversation_id": conversation_id, "item_id": item_id, "buyer_id": buyer}
        with db_manager.transaction(ctx.conn):
            db_manager.mapping_put(ctx.conn, NS_QUESTION, qid, known, now=ctx.now())
            db_manager.mapping_put(ctx.conn, NS_CONVERSATION, str(conversation_id),
                                   {"kind": "question", "question_id": qid, "item_id": item_id,
                                    "buyer_id": buyer}, now=ctx.now())
            db_manager.mapping_put(ctx.conn, NS_THREAD, thread_key, thread + [
                {"question_id": qid, "conversation_id": conversation_id,
                 "text": (q.get("text") or "")[:120]}], now=ctx.now())
    source_id = f"meli:question:{qid}"
    # A conversation recorded by an earlier run may already hold the message.
    resumed = job.attempt > 1 or not created_now
    existing = _find_message_by_source(ctx, conversation_id, source_id) if resumed else None
    if existing is None:
        item = item_info(ctx, item_id)
        others = [t for t in thread if t["question_id"] != qid]
        content = texts.question_message(q, item, others)
        message = client.create_message(
            conversation_id, content, message_type="incoming", source_id=source_id,
            content_attributes={"meli_resource": "questions", "meli_question_id": qid,
                                "meli_item_id": item_id,
                                "external_created_at": q.get("date_created")},
            attachments=_thumbnail(ctx, item))
        existing = message
    _put(ctx, NS_QUESTION, qid, {**known, "message_id": int(existing["id"])})
    log.info("ml_question_imported", extra={"ml_question_id": qid,
                                            "chatwoot_conversation_id": conversation_id})
    return {"status": "imported", "conversation_id": conversation_id,
            "message_id": int(existing["id"])}


def _find_message_by_source(ctx, conversation_id: int, source_id: str) -> dict | None:
    for message in cw(ctx).list_messages(conversation_id):
        if message.get("source_id") == source_id:
            return message
    return None


def handle_fetch_question(ctx, job):
    """`ml.fetch_question` (from a notification): read the question with our token; a new one
    is imported like a polled one; one answered directly on Mercado Livre is mirrored."""
    qid = str(job.payload["question_id"])
    try:
        q = ml(ctx).get_question(qid)
    except MercadoLivreError as exc:
        if exc.status == 404:
            return {"status": "not_found"}
        raise
    if str(q.get("seller_id") or ctx.settings.ml_seller_id) != str(ctx.settings.ml_seller_id):
        return {"status": "other_seller"}
    known = _get(ctx, NS_QUESTION, qid)
    if q.get("status") == "UNANSWERED" and not (known and known.get("message_id")):
        return {"status": "new"}, [FollowUp("ml.import_question", f"ml-question:{qid}",
                                            {"question": q})]
    answer = q.get("answer") or {}
    if q.get("status") == "ANSWERED" and known and answer.get("text"):
        ours = _get(ctx, NS_ANSWERED, qid)
        if ours is None or ours.get("text") != answer.get("text"):
            return {"status": "answered_on_ml"}, [FollowUp(
                "ml.mirror_answer", f"ml-answer:{qid}",
                {"question_id": qid, "conversation_id": known["conversation_id"],
                 "text": answer.get("text"), "date_created": answer.get("date_created")})]
    return {"status": "nothing_to_do", "question_status": q.get("status")}


def handle_mirror_answer(ctx, job):
    """`ml.mirror_answer`: an answer typed on Mercado Livre shows in the conversation as ours
    (source_id `meli:answer:<id>`, never sent back)."""
    p = job.payload
    conversation_id = int(p["conversation_id"])
    source_id = f"meli:answer:{p['question_id']}"
    if job.attempt == 1 or _find_message_by_source(ctx, conversation_id, source_id) is None:
        cw(ctx).create_message(conversation_id, p["text"], message_type="outgoing",
                               source_id=source_id,
                               content_attributes={BRIDGE_ORIGIN_KEY: "mercadolivre",
                                                   "meli_question_id": str(p["question_id"])})
    _add_label(ctx, conversation_id, LABEL_ANSWERED_ON_ML)
    return {"status": "mirrored"}


# --- post-sale messages -------------------------------------------------------------------------

def poll_messages(ctx) -> dict:
    """Schedule: one `messages/unread` call; a pack whose unread count changed since the last
    poll gets a sync job (reads use mark_as_read=false, so counts persist until answered)."""
    answer = ml(ctx).unread_messages()
    current: dict[str, int] = {}
    for result in answer.get("results") or []:
        parsed = parse_pack_resource(str(result.get("resource") or ""))
        if parsed:
            current[parsed[0]] = int(result.get("count") or 0)
    previous = _get(ctx, NS_UNREAD, "last") or {}
    changed = [pack for pack, count in current.items() if previous.get(pack) != count]
    with db_manager.transaction(ctx.conn):
        for pack in changed:
            db_manager.enqueue_job(ctx.conn, "ml.sync_pack",
                                   f"ml-pack-sync:{pack}:unread:{uuid.uuid4().hex[:12]}",
                                   {"pack_id": pack}, ordering_key=f"ml-pack-in:{pack}",
                                   now=ctx.now())
        if current != previous:
            db_manager.mapping_put(ctx.conn, NS_UNREAD, "last", current, now=ctx.now())
    return {"packs": len(current), "enqueued": len(changed)}


def read_pack(ctx, pack_id: str, mark_as_read: bool = False) -> tuple[list[dict], dict]:
    """All messages of a sale's conversation (oldest first) and its conversation_status."""
    client = ml(ctx)
    messages: list[dict] = []
    status: dict = {}
    offset = 0
    while True:
        page = client.get_pack_messages(pack_id, offset=offset, limit=PACK_PAGE,
                                        mark_as_read=mark_as_read)
        status = page.get("conversation_status") or status
        batch = page.get("messages") or []
        messages.extend(batch)
        total = int((page.get("paging") or {}).get("total") or 0)
        offset += PACK_PAGE
        if not batch or offset >= total or offset >= 2000:
            break
    messages.sort(key=message_sort_key)
    return messages, status


def handle_sync_pack(ctx, job):
    """`ml.sync_pack`: mirror every message of a sale not yet in Chatwoot, in order, into the
    sale's one conversation (created with the order summary on top)."""
    pack_id = str(job.payload["pack_id"])
    try:
        messages, _status = read_pack(ctx, pack_id)
    except MercadoLivreError as exc:
        if exc.status == 404:
            return {"status": "no_conversation"}
        raise
    seller = str(ctx.settings.ml_seller_id)
    app_id = str(ctx.settings.ml_client_id)
    new = [m for m in messages if _get(ctx, NS_ML_MESSAGE, m.get("id")) is None]
    ours = [m for m in new if str((m.get("from") or {}).get("user_id")) == seller
            and str(m.get("client_id")) == app_id]
    for m in ours:  # sent by ponte itself: already in Chatwoot as the agent's message
        _put(ctx, NS_ML_MESSAGE, m["id"], {"sent_by_ponte": True})
    new = [m for m in new if m not in ours]
    if not new:
        return {"status": "up_to_date"}
    conversation_id = ensure_sale_conversation(ctx, pack_id)
    client = cw(ctx)
    mirrored = 0
    for m in new:
        source_id = f"meli:msg:{m['id']}"
        if job.attempt > 1:
            found = _find_message_by_source(ctx, conversation_id, source_id)
            if found:
                _put(ctx, NS_ML_MESSAGE, m["id"], {"chatwoot_message_id": int(found["id"])})
                continue
        from_seller = str((m.get("from") or {}).get("user_id")) == seller
        files, skipped = _download_ml_attachments(ctx, m)
        content = texts.ml_message_text(m, skipped)
        attributes = {"meli_resource": "messages", "meli_message_id": m["id"],
                      "meli_pack_id": pack_id,
                      "external_created_at": (m.get("message_date") or {}).get("created")}
        if from_seller:
            attributes[BRIDGE_ORIGIN_KEY] = "mercadolivre"
        created = client.create_message(conversation_id, content,
                                        message_type="outgoing" if from_seller else "incoming",
                                        source_id=source_id, content_attributes=attributes,
                                        attachments=files)
        _put(ctx, NS_ML_MESSAGE, m["id"], {"chatwoot_message_id": int(created["id"])})
        mirrored += 1
    log.info("ml_pack_synced", extra={"ml_pack_id": pack_id, "mirrored": mirrored,
                                      "chatwoot_conversation_id": conversation_id})
    return {"status": "synced", "mirrored": mirrored, "conversation_id": conversation_id}


def _download_ml_attachments(ctx, message: dict) -> tuple[list, list[str]]:
    files, skipped = [], []
    for a in message.get("message_attachments") or []:
        name = a.get("original_filename") or a.get("filename") or "anexo"
        if a.get("potential_security_threat"):
            skipped.append(f"{name} (marcado como ameaça pelo Mercado Livre)")
            continue
        try:
            data, content_type = ml(ctx).download_attachment(a["filename"])
        except MercadoLivreError as exc:
            if exc.retryable:
                raise
            skipped.append(f"{name} (não foi possível baixar: {exc.status})")
            continue
        files.append((name, data, a.get("type") or content_type or "application/octet-stream"))
    return files, skipped


def ensure_sale_conversation(ctx, pack_id: str) -> int:
    """The one Chatwoot conversation of a sale, created with the order summary as its first
    (private) message."""
    known = _get(ctx, NS_PACK, pack_id) or {}
    client = cw(ctx)
    if not known.get("conversation_id"):
        orders = sale_orders(ctx, pack_id)
        buyer = (orders[0].get("buyer") or {}) if orders else {}
        buyer_id = str(buyer.get("id") or "")
        if not buyer_id:
            raise MercadoLivreError(None, f"sale {pack_id} without buyer", True)
        if not buyer.get("nickname"):  # recent order samples omit it; the profile has it
            buyer["nickname"] = buyer_nickname(ctx, buyer_id)
        contact = ensure_contact(ctx, sales_inbox(ctx), buyer_id, buyer["nickname"])
        conversation = client.create_conversation(
            sales_inbox(ctx), contact["contact_id"], contact["source_id"],
            custom_attributes={"meli_pack_id": pack_id, "meli_buyer_id": buyer_id,
                               "meli_order_ids": ",".join(str(o.get("id")) for o in orders)},
            additional_attributes={"meli_resource": "messages"})
        known = {"conversation_id": int(conversation["id"]), "buyer_id": buyer_id,
                 "summary_posted": False, "summary": texts.order_summary(pack_id, orders)}
        with db_manager.transaction(ctx.conn):
            db_manager.mapping_put(ctx.conn, NS_PACK, pack_id, known, now=ctx.now())
            db_manager.mapping_put(ctx.conn, NS_CONVERSATION, str(known["conversation_id"]),
                                   {"kind": "sale", "pack_id": pack_id, "buyer_id": buyer_id},
                                   now=ctx.now())
    if not known.get("summary_posted"):
        source_id = f"meli:order-summary:{pack_id}"
        if _find_message_by_source(ctx, known["conversation_id"], source_id) is None:
            client.create_message(known["conversation_id"], known["summary"], private=True,
                                  source_id=source_id,
                                  content_attributes={BRIDGE_ORIGIN_KEY: "ponte"})
        known["summary_posted"] = True
        _put(ctx, NS_PACK, pack_id, known)
    return int(known["conversation_id"])


def sale_orders(ctx, pack_id: str) -> list[dict]:
    """The seller's orders of a pack; a pack id that is really an order id (pack_id null)
    gives that order."""
    client = ml(ctx)
    try:
        pack = client.get_pack(pack_id)
        order_ids = [o.get("id") for o in pack.get("orders") or []][:10]
    except MercadoLivreError as exc:
        if exc.status != 404:
            raise
        order_ids = [pack_id]
    orders = []
    for order_id in order_ids:
        try:
            orders.append(client.get_order(order_id))
        except MercadoLivreError as exc:
            if exc.status not in (403, 404):  # another seller's order in a shared pack
                raise
    return orders


def handle_fetch_message(ctx, job):
    """`ml.fetch_message` (from a `messages` notification): find the message's sale and sync it."""
    try:
        body = ml(ctx).get_message(job.payload["message_id"])
    except MercadoLivreError as exc:
        if exc.status == 404:
            return {"status": "not_found"}
        raise
    messages = body.get("messages") or ([body] if body.get("id") else [])
    packs = {pack_id_of_message(m) for m in messages} - {None}
    return {"packs": sorted(packs)}, [
        FollowUp("ml.sync_pack", f"ml-pack-sync:{pack}:msg:{job.payload['message_id']}",
                 {"pack_id": pack}, ordering_key=f"ml-pack-in:{pack}") for pack in sorted(packs)]


def handle_fetch_order(ctx, job):
    """`ml.fetch_order` (from an `orders_v2` notification): sync the sale's messages, if any."""
    try:
        order = ml(ctx).get_order(job.payload["order_id"])
    except MercadoLivreError as exc:
        if exc.status in (403, 404):
            return {"status": "not_found"}
        raise
    pack = str(order.get("pack_id") or order.get("id"))
    return {"pack_id": pack}, [FollowUp("ml.sync_pack", f"ml-pack-sync:{pack}:order:{job.id}",
                                        {"pack_id": pack}, ordering_key=f"ml-pack-in:{pack}")]


# --- agents' replies ----------------------------------------------------------------------------

def conversation_target(ctx, conversation_id: int, custom_attributes: dict | None) -> dict | None:
    """What a Chatwoot conversation is about: a question or a sale (from our mappings, else from
    the conversation's custom attributes)."""
    known = _get(ctx, NS_CONVERSATION, conversation_id)
    if known:
        return known
    attrs = custom_attributes or {}
    if attrs.get("meli_question_id"):
        return {"kind": "question", "question_id": str(attrs["meli_question_id"])}
    if attrs.get("meli_pack_id"):
        return {"kind": "sale", "pack_id": str(attrs["meli_pack_id"])}
    return None


def _refuse(reply: dict, note: str, reason: str, extra: dict | None = None):
    """Job result + the follow-up that tells the agent (private note, message marked failed)."""
    follow = FollowUp("chatwoot.report_failure", f"cw-fail:{reply['message_id']}",
                      {"conversation_id": reply["conversation_id"],
                       "message_id": reply["message_id"], "note": note, "external_error": reason})
    log.info("chatwoot_reply_refused", extra={"reason": reason,
                                              "chatwoot_message_id": reply["message_id"]})
    return {"status": "refused", "reason": reason, **(extra or {})}, [follow]


def handle_forward_reply(ctx, job):
    """`chatwoot.forward_reply`: an agent's public reply goes to Mercado Livre — an answer to the
    conversation's question, or a message in the conversation's sale."""
    reply = job.payload
    target = conversation_target(ctx, reply["conversation_id"], reply.get("custom_attributes"))
    if target is None:
        return _refuse(reply, texts.NOT_LINKED, "not_linked")
    if target["kind"] == "question":
        return _answer_question(ctx, job, reply, str(target["question_id"]))
    return _send_sale_message(ctx, job, reply, str(target["pack_id"]))


def _answer_question(ctx, job, reply: dict, qid: str):
    text = markdown_to_text(reply.get("content") or "")
    notes = []
    if reply.get("attachments"):
        notes.append(texts.ANSWER_NO_ATTACHMENTS.format(
            names=", ".join(a["filename"] for a in reply["attachments"])))
    if not text:
        return _refuse(reply, "\n".join(notes + [texts.EMPTY_REPLY]), "empty")
    if len(text) > ANSWER_MAX_CHARS:
        return _refuse(reply, texts.ANSWER_TOO_LONG.format(length=len(text)), "too_long")
    ours = _get(ctx, NS_ANSWERED, qid)
    if ours and ours.get("chatwoot_message_id") != reply["message_id"]:
        return _refuse(reply, texts.ALREADY_ANSWERED_BY_US.format(
            message_id=ours["chatwoot_message_id"]), "already_answered")
    if not ours:
        try:
            ml(ctx).answer_question(qid, text)
        except MercadoLivreError as exc:
            if exc.retryable:
                raise
            outcome = _explain_answer_error(ctx, qid, text, exc)
            if outcome != "ours":
                return _refuse(reply, outcome, exc.code or str(exc.status))
        _put(ctx, NS_ANSWERED, qid, {"chatwoot_message_id": reply["message_id"], "text": text})
    follow_ups = [FollowUp("chatwoot.mark_answered", f"cw-answered:{reply['message_id']}",
                           {"conversation_id": reply["conversation_id"],
                            "message_id": reply["message_id"], "question_id": qid})]
    if notes:
        follow_ups.append(_note(reply["conversation_id"], "\n".join(notes),
                                f"attachments:{reply['message_id']}"))
    log.info("ml_question_answered", extra={"ml_question_id": qid,
                                            "chatwoot_message_id": reply["message_id"]})
    return {"status": "answered", "question_id": qid}, follow_ups


def _explain_answer_error(ctx, qid: str, text: str, exc: MercadoLivreError) -> str:
    """Why Mercado Livre refused an answer, in words for the agent ("ours" when the question is
    in fact answered with this very text — a previous run got through)."""
    if exc.status == 404:
        return texts.QUESTION_DELETED
    try:
        q = ml(ctx).get_question(qid)
    except MercadoLivreError as again:
        if again.status == 404:
            return texts.QUESTION_DELETED
        q = {}
    status = q.get("status")
    if status == "ANSWERED" and (q.get("answer") or {}).get("text") == text:
        return "ours"
    if status == "ANSWERED":
        return texts.QUESTION_ALREADY_ANSWERED
    if status in texts.QUESTION_STATUS_PT:
        return texts.QUESTION_NOT_ANSWERABLE.format(reason=texts.QUESTION_STATUS_PT[status])
    if exc.code in ("not_active_item", "item_closed", "closed_item"):
        return texts.ITEM_CLOSED
    if exc.code == "not_unanswered_question":
        return texts.QUESTION_ALREADY_ANSWERED
    return texts.ML_REFUSED.format(detail=_short(exc))


def _short(exc: PeerError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or body.get("error") or exc.detail)[:300]


def _send_sale_message(ctx, job, reply: dict, pack_id: str):
    client = ml(ctx)
    key = str(reply["message_id"])
    progress = _get(ctx, NS_OUTGOING, key) or {"parts_sent": 0, "attachment_ids": None,
                                               "ml_message_ids": [], "skipped": []}
    text = plain_post_sale_text(markdown_to_text(reply.get("content") or ""))
    # A plain read (marks the buyer's messages read: the agent has answered them) that also
    # gives the conversation status and the latest sender.
    messages, status = read_pack(ctx, pack_id, mark_as_read=True)
    _sync_if_unmirrored(ctx, pack_id, messages, reply["message_id"])
    if status.get("status") == "blocked" and progress["parts_sent"] == 0:
        return _refuse(reply, texts.sale_blocked(status.get("substatus")), "blocked")
    mediated = is_agent_mediated({"conversation_status": status, "messages": messages},
                                 ctx.settings.ml_site_id)
    parts = split_message(text) if text else []
    if len(parts) > 1 and mediated and progress["parts_sent"] == 0:
        return _refuse(reply, texts.MEDIATED_TOO_LONG.format(length=len(text)), "too_long")
    if len(parts) > MAX_REPLY_PARTS:
        return _refuse(reply, texts.SALE_TOO_LONG.format(length=len(text),
                                                         max=MAX_REPLY_PARTS * 350), "too_long")
    if progress["attachment_ids"] is None:
        ids, skipped = _upload_attachments(ctx, reply.get("attachments") or [])
        progress.update(attachment_ids=ids, skipped=skipped)
        _put(ctx, NS_OUTGOING, key, progress)
    if not parts and progress["attachment_ids"]:
        parts = [texts.attachments_only_text(reply.get("attachments") or [])]
    if not parts:
        note = "\n".join([texts.attachment_skipped(progress["skipped"])]
                         if progress["skipped"] else []) or texts.EMPTY_REPLY
        return _refuse(reply, note, "empty")
    buyer = (_get(ctx, NS_PACK, pack_id) or {}).get("buyer_id", "")
    recipient = reply_recipient(messages, ctx.settings.ml_seller_id, ctx.settings.ml_site_id,
                                buyer)
    for index in range(progress["parts_sent"], len(parts)):
        attachments = progress["attachment_ids"] if index == 0 else None
        try:
            sent = client.send_pack_message(pack_id, recipient, parts[index], attachments)
        except MercadoLivreError as exc:
            if exc.retryable:
                raise
            note = texts.sale_refused(exc.code, _short(exc), index, len(parts))
            return _refuse(reply, note, exc.code or str(exc.status))
        progress["parts_sent"] = index + 1
        ml_id = str(sent.get("id") or "")
        if ml_id:
            progress["ml_message_ids"].append(ml_id)
        with db_manager.transaction(ctx.conn):
            db_manager.mapping_put(ctx.conn, NS_OUTGOING, key, progress, now=ctx.now())
            if ml_id:
                db_manager.mapping_put(ctx.conn, NS_ML_MESSAGE, ml_id,
                                       {"sent_by_ponte": True, "chatwoot_message_id":
                                        reply["message_id"]}, now=ctx.now())
    follow_ups = [FollowUp("chatwoot.mark_delivered", f"cw-delivered:{reply['message_id']}",
                           {"conversation_id": reply["conversation_id"],
                            "message_id": reply["message_id"]})]
    if progress["skipped"]:
        follow_ups.append(_note(reply["conversation_id"],
                                texts.attachment_skipped(progress["skipped"]),
                                f"attachments:{reply['message_id']}"))
    log.info("ml_sale_message_sent", extra={"ml_pack_id": pack_id, "parts": len(parts),
                                            "chatwoot_message_id": reply["message_id"]})
    return {"status": "sent", "parts": len(parts), "ml_message_ids": progress["ml_message_ids"]}, \
        follow_ups


def _sync_if_unmirrored(ctx, pack_id: str, messages: list[dict], reason: int) -> None:
    """That read marked the buyer's messages as read, so the unread poll will not see any that
    arrived since the last sync: queue a sync for them."""
    seller = str(ctx.settings.ml_seller_id)
    if any(_get(ctx, NS_ML_MESSAGE, m.get("id")) is None
           and str((m.get("from") or {}).get("user_id")) != seller for m in messages):
        with db_manager.transaction(ctx.conn):
            db_manager.enqueue_job(ctx.conn, "ml.sync_pack", f"ml-pack-sync:{pack_id}:reply:{reason}",
                                   {"pack_id": pack_id}, ordering_key=f"ml-pack-in:{pack_id}",
                                   now=ctx.now())


def _upload_attachments(ctx, attachments: list[dict]) -> tuple[list[str], list[str]]:
    """Fetch each agent attachment from Chatwoot and upload the ones Mercado Livre accepts."""
    ids, skipped = [], []
    for a in attachments:
        name = a.get("filename") or "anexo"
        if a.get("file_size") and int(a["file_size"]) > ATTACHMENT_MAX_BYTES:
            skipped.append(f"{name} (maior que 25 MB)")
            continue
        declared = a.get("content_type") or ""
        if declared and attachment_mime(name, declared) is None:
            skipped.append(f"{name} (formato {declared} não aceito: use JPG, PNG, PDF ou TXT)")
            continue
        try:
            data, served_type = cw(ctx).download(a["data_url"], ATTACHMENT_MAX_BYTES)
        except ChatwootError as exc:
            if exc.retryable:
                raise
            skipped.append(f"{name} (não foi possível baixar do Chatwoot: {exc.detail[:80]})")
            continue
        mime = attachment_mime(name, declared or served_type)
        if mime is None:
            skipped.append(f"{name} (formato não aceito: use JPG, PNG, PDF ou TXT)")
            continue
        if not data:
            skipped.append(f"{name} (arquivo vazio)")
            continue
        try:
            ids.append(ml(ctx).upload_attachment(name, data, mime))
        except MercadoLivreError as exc:
            if exc.retryable:
                raise
            skipped.append(f"{name} (recusado pelo Mercado Livre: {_short(exc)[:120]})")
    return ids, skipped


def _note(conversation_id: int, text: str, key: str) -> FollowUp:
    return FollowUp("chatwoot.note", f"cw-note:{key}",
                    {"conversation_id": conversation_id, "note": text})


def on_dead_forward_reply(ctx, job, error: str) -> list[FollowUp]:
    """A reply that never got through (Mercado Livre down for too long): tell the agent."""
    reply = job.payload
    return [FollowUp("chatwoot.report_failure", f"cw-fail:{reply['message_id']}",
                     {"conversation_id": reply["conversation_id"],
                      "message_id": reply["message_id"],
                      "note": texts.DELIVERY_GAVE_UP.format(attempts=job.attempt,
                                                            error=error[:200]),
                      "external_error": "mercadolivre_unavailable"})]


# --- Chatwoot follow-ups ------------------------------------------------------------------------

def _add_label(ctx, conversation_id: int, label: str) -> None:
    client = cw(ctx)
    labels = client.get_labels(conversation_id)
    if label not in labels:
        client.set_labels(conversation_id, labels + [label])


def handle_mark_answered(ctx, job):
    """`chatwoot.mark_answered`: label + custom attribute on the conversation, message marked
    delivered, conversation resolved when CHATWOOT_RESOLVE_ANSWERED=true."""
    p = job.payload
    client = cw(ctx)
    conversation_id = int(p["conversation_id"])
    _add_label(ctx, conversation_id, LABEL_ANSWERED)
    attrs = dict(client.get_conversation(conversation_id).get("custom_attributes") or {})
    attrs.update(meli_answered=True, meli_answered_at=_iso(ctx.now()))
    client.set_custom_attributes(conversation_id, attrs)
    client.update_message_status(conversation_id, int(p["message_id"]), "delivered")
    if ctx.settings.chatwoot_resolve_answered:
        client.toggle_status(conversation_id, "resolved")
    return {"status": "marked"}


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


# --- tokens -------------------------------------------------------------------------------------

def refresh_token_if_due(ctx) -> None:
    """Schedule: refresh the Mercado Livre pair ahead of expiry, off the request path."""
    import meli_auth

    row = db_manager.token_get(ctx.conn, meli_auth.PROVIDER)
    if row and row["status"] == "ok" and row["refresh_token"] and row["expires_at"] is not None \
            and row["expires_at"] - ctx.now() < meli_auth.REFRESH_MARGIN_SECONDS * 3:
        source = meli_auth.MeliTokenSource(ctx.settings, ctx.conn, ctx.now)
        source.refresh(row["access_token"])


def _guarded(task):
    """A schedule task that logs peer failures instead of breaking the poller loop."""

    def run(ctx):
        try:
            return task(ctx)
        except PeerError as exc:
            log.warning("meli_task_failed", extra={"task": task.__name__, "peer": exc.peer,
                                                   "status": exc.status,
                                                   "error": str(exc)[:200]})
            return None

    run.__name__ = task.__name__
    run.__doc__ = task.__doc__
    return run


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
}

ON_DEAD = {"chatwoot.forward_reply": on_dead_forward_reply}

SCHEDULES = [
    (lambda s: s.ml_poll_questions_seconds, _guarded(poll_questions)),
    (lambda s: s.ml_poll_messages_seconds, _guarded(poll_messages)),
    (60, _guarded(refresh_token_if_due)),
]
