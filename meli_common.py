"""Shared helpers of bridge B's jobs: the clients, the mappings between Mercado Livre ids and
Chatwoot ids (namespaces `NS_*` in db_manager's mappings table), buyers' contacts, item details,
and the follow-ups that tell an agent why a reply did not go.

Owns: what meli_questions, meli_sales and meli_jobs all use.
Must not: hold a job handler or a schedule; serve HTTP; know wire formats (the peer modules).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import db_manager
from chatwoot_api import ChatwootClient, ChatwootError
from mercado_livre_api import ITEM_FIELDS, MercadoLivreError
from outbox import FollowUp
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
NS_ANSWERED = "ml_answered"        # question id → {chatwoot_message_id} or {mirrored}

QUESTION_PAGE = 50
QUESTION_MAX_PAGES = 20            # Mercado Livre refuses offsets past 1,000
PACK_PAGE = 50
ITEM_CACHE_SECONDS = 3600
MAX_REPLY_PARTS = 5                # 5 × 350 characters; longer replies are refused with a note
LABEL_ANSWERED = "respondida"
LABEL_ANSWERED_ON_ML = "respondida-no-ml"


def ml(ctx):
    """The Mercado Livre client of this process (tokens from the database)."""
    return ctx.clients.meli


def cw(ctx) -> ChatwootClient:
    """The Chatwoot client of this process."""
    return ctx.clients.chatwoot


def get_mapping(ctx, namespace: str, key) -> Any:
    """The value stored under (namespace, key), or None."""
    return db_manager.mapping_get(ctx.conn, namespace, str(key))


def put_mapping(ctx, namespace: str, key, value) -> None:
    """Store a value at once (its own transaction: the next step must see it after a crash)."""
    with db_manager.transaction(ctx.conn):
        db_manager.mapping_put(ctx.conn, namespace, str(key), value, now=ctx.now())


def iso(ts: float) -> str:
    """Epoch seconds → ISO-8601 UTC."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def questions_inbox(ctx) -> int:
    """CHATWOOT_QUESTIONS_INBOX_ID as a number."""
    return int(ctx.settings.chatwoot_questions_inbox_id)


def sales_inbox(ctx) -> int:
    """CHATWOOT_SALES_INBOX_ID as a number."""
    return int(ctx.settings.chatwoot_sales_inbox_id)


def ensure_contact(ctx, inbox_id: int, buyer_id: str, nickname: str = "") -> dict:
    """The buyer's Chatwoot contact (identifier `meli:<buyer id>`) attached to `inbox_id`;
    returns {contact_id, source_id}. Safe to repeat and to race (unique identifier → lookup)."""
    buyer_id = str(buyer_id)
    identifier = source_id = f"meli:{buyer_id}"
    client = cw(ctx)
    known = get_mapping(ctx, NS_CONTACT, buyer_id)
    if known is None:
        if not nickname:
            nickname = buyer_nickname(ctx, buyer_id)
        try:
            created = client.create_contact(
                inbox_id, nickname, identifier, source_id,
                custom_attributes={"meli_user_id": buyer_id, "meli_nickname": nickname},
                additional_attributes={"meli_site_id": ctx.settings.ml_site_id})
            contact_id = int(created["contact"]["id"])
            put_mapping(ctx, NS_CONTACT_INBOX, f"{buyer_id}:{inbox_id}", {"source_id": source_id})
        except ChatwootError as exc:
            if exc.status != 422:
                raise
            found = client.find_contact_by_identifier(identifier)
            if found is None:
                raise
            contact_id = int(found["id"])
        known = {"contact_id": contact_id}
        put_mapping(ctx, NS_CONTACT, buyer_id, known)
    if get_mapping(ctx, NS_CONTACT_INBOX, f"{buyer_id}:{inbox_id}") is None:
        client.create_contact_inbox(known["contact_id"], inbox_id, source_id)
        put_mapping(ctx, NS_CONTACT_INBOX, f"{buyer_id}:{inbox_id}", {"source_id": source_id})
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
    cached = get_mapping(ctx, NS_ITEM, item_id)
    if _fresh(ctx, cached):
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
    info = {k: item.get(k) for k in ITEM_FIELDS}
    info["fetched_at"] = ctx.now()
    put_mapping(ctx, NS_ITEM, item.get("id"), info)
    return info


def thumbnail(ctx, item: dict | None) -> list[tuple[str, bytes, str]]:
    """The item's thumbnail as an attachment for the question message ([] when unavailable)."""
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


def fresh_item(ctx, item_id: str) -> bool:
    """True when the item is cached and younger than an hour."""
    return _fresh(ctx, get_mapping(ctx, NS_ITEM, item_id))


def _fresh(ctx, cached_item: dict | None) -> bool:
    return bool(cached_item) and \
        ctx.now() - cached_item.get("fetched_at", 0) < ITEM_CACHE_SECONDS


def find_message_by_source(ctx, conversation_id: int, source_id: str) -> dict | None:
    """A message already in the conversation with this `source_id` (resuming after a crash)."""
    for message in cw(ctx).list_messages(conversation_id):
        if message.get("source_id") == source_id:
            return message
    return None


def open_conversation(ctx, inbox_id: int, contact: dict, attribute: str, value: str,
                      custom_attributes: dict, additional_attributes: dict,
                      namespace: str, key: str, pending: dict) -> int:
    """A new conversation of the contact in `inbox_id` with these attributes — or the one an
    earlier run created before its answer was lost (a timeout, a crash, a job that died and was
    re-armed). Each run marks the caller's mapping `namespace`/`key` (whose value the caller
    read: `pending`) as `opening` before it creates, so the contact's conversations are searched
    (for `attribute` = `value`) only when such a run may have existed. Until the caller records
    the conversation, that mapping has no `conversation_id`."""
    client = cw(ctx)
    if pending.get("opening"):
        for conversation in client.list_contact_conversations(contact["contact_id"]):
            attrs = conversation.get("custom_attributes")
            if str(conversation.get("inbox_id")) == str(inbox_id) and isinstance(attrs, dict) \
                    and str(attrs.get(attribute) or "") == str(value):
                return int(conversation["id"])
    put_mapping(ctx, namespace, key, {**pending, "opening": True})
    conversation = client.create_conversation(inbox_id, contact["contact_id"],
                                              contact["source_id"],
                                              custom_attributes=custom_attributes,
                                              additional_attributes=additional_attributes)
    return int(conversation["id"])


def conversation_target(ctx, conversation_id: int, custom_attributes: dict | None) -> dict | None:
    """What a Chatwoot conversation is about: a question or a sale (from our mappings, else from
    the conversation's custom attributes)."""
    known = get_mapping(ctx, NS_CONVERSATION, conversation_id)
    if known:
        return known
    attrs = custom_attributes or {}
    if attrs.get("meli_question_id"):
        return {"kind": "question", "question_id": str(attrs["meli_question_id"])}
    if attrs.get("meli_pack_id"):
        return {"kind": "sale", "pack_id": str(attrs["meli_pack_id"])}
    return None


def reply_in_flight(ctx, message_id) -> bool:
    """True when an agent reply (or one of its parts) was being sent to Mercado Livre and the
    outcome is unknown: it may have been delivered."""
    return (get_mapping(ctx, NS_OUTGOING, str(message_id)) or {}).get("in_flight") is not None


def failure_follow_up(reply: dict, note: str, reason: str) -> FollowUp:
    """The job that tells the agent a reply did not reach Mercado Livre: a private note with
    `note`, and the message marked failed with `reason`."""
    return FollowUp("chatwoot.report_failure", f"cw-fail:{reply['message_id']}",
                    {"conversation_id": reply["conversation_id"],
                     "message_id": reply["message_id"], "note": note, "external_error": reason})


def squash(text: str) -> str:
    """`text` with every run of whitespace as one space (to compare texts typed elsewhere)."""
    return " ".join(str(text).split())


def refuse(reply: dict, note: str, reason: str, extra: dict | None = None):
    """Job result + the follow-up that tells the agent (private note, message marked failed)."""
    follow = failure_follow_up(reply, note, reason)
    log.info("chatwoot_reply_refused", extra={"reason": reason,
                                              "chatwoot_message_id": reply["message_id"]})
    return {"status": "refused", "reason": reason, **(extra or {})}, [follow]


def note_follow_up(conversation_id: int, text: str, key: str) -> FollowUp:
    """A follow-up job that posts a private note once (deduped by `key`)."""
    return FollowUp("chatwoot.note", f"cw-note:{key}",
                    {"conversation_id": conversation_id, "note": text})


def short_error(exc: PeerError) -> str:
    """The human part of a peer's error answer, for a note."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or body.get("error") or exc.detail)[:300]


def add_label(ctx, conversation_id: int, label: str) -> None:
    """Add a label, keeping the others (Chatwoot's POST replaces the whole list)."""
    client = cw(ctx)
    labels = client.get_labels(conversation_id)
    if label not in labels:
        client.set_labels(conversation_id, labels + [label])
