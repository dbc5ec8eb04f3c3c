"""Shared helpers of bridge B's jobs: the clients, buyers' contacts, item details, the
conversation a reply belongs to, the ordering keys, and the follow-ups that tell an agent why a
reply did not go. The state itself is in meli_store's tables.

Owns: what meli_questions, meli_sales and meli_jobs all use, among them how Mercado Livre's
lists are paged (`next_page_offset`: by what came back, never by the limit asked).
Must not: hold a job handler or a schedule; serve HTTP; know wire formats (the peer modules);
hold SQL (meli_store).

Ordering keys (at most one running job per key, in enqueue order):
- `ml-buyer:<buyer id>` — `ml.import_question`: a buyer's questions share one Chatwoot contact
  and, per item, one thread whose earlier questions each new question's message cites.
- `cw-out:<conversation id>` — `chatwoot.forward_reply`, `ml.mirror_answer` and
  `chatwoot.mark_answered`: what goes out of one conversation, its answer and its labels.
- `ml-pack-in:<pack id>` — `ml.sync_pack`: what comes into one sale's conversation.
`ml.fetch_question`, `ml.fetch_message`, `ml.fetch_order` and the Chatwoot notes and status
updates have none: they only read, write in single statements, or enqueue keyed follow-ups.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any, Callable

import meli_store as store
from chatwoot_api import ChatwootClient, ChatwootError
from mercado_livre_api import MercadoLivreError, buyer_id_of_question
from outbox import FollowUp
from peer_http import PeerError

log = logging.getLogger("ponte.meli")

QUESTION_PAGE = 50                 # asked for; Mercado Livre may answer with fewer (paged by
QUESTION_MAX_OFFSET = 1000         # what came back); it refuses offsets past 1,000
QUESTION_MAX_PAGES = 100           # calls per poll, however small Mercado Livre's pages are
PACK_PAGE = 50
PACK_MAX_OFFSET = 2000             # messages read per sale, at most
PACK_MAX_PAGES = 200
ITEM_CACHE_SECONDS = 3600
# Pages of 20 a crash-recovery lookup reads from a conversation's newest message back: what a
# run that died may have posted is recent, but a busy sale's conversation moves on meanwhile.
CHATWOOT_LOOKBACK_PAGES = 10
MAX_REPLY_PARTS = 5                # 5 × 350 characters; longer replies are refused with a note
LABEL_ANSWERED = "respondida"
LABEL_ANSWERED_ON_ML = "respondida-no-ml"


def next_page_offset(offset: int, returned: int, paging: dict | None, asked_limit: int
                     ) -> int | None:
    """Where the next page of a Mercado Livre list starts, or None when the list is done.
    `paging` is what the page said of itself: `{"total", "limit"}` (a pack's `paging`, or a
    questions search's top-level `total` and `limit`).

    Mercado Livre may answer with fewer items than `asked_limit` (its documented default page is
    10, and an example answers a limit=2 request with `paging.limit: 10`), so the offset moves by
    the number of items that came back, never by the limit asked. The list is done when a page
    is empty, when the offset reaches `paging.total`, or — without a total — when a page holds
    fewer items than the page size Mercado Livre said it used (`paging.limit`, else the limit
    asked)."""
    if returned <= 0:
        return None
    paging = paging if isinstance(paging, dict) else {}
    following = offset + returned
    total = _count(paging.get("total"))
    if total is not None:
        return following if following < total else None
    page_size = _count(paging.get("limit")) or asked_limit
    return following if returned >= min(page_size, asked_limit) else None


def _count(value: Any) -> int | None:
    """A non-negative JSON integer (or a string of ASCII digits), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value.strip()):
        return int(value.strip())
    return None


def ml(ctx):
    """The Mercado Livre client of this process (tokens from the database)."""
    return ctx.clients.meli


def cw(ctx) -> ChatwootClient:
    """The Chatwoot client of this process."""
    return ctx.clients.chatwoot


def buyer_ordering_key(question: dict) -> str:
    """The ordering key of a question's import: its buyer's (see the module docstring)."""
    return f"ml-buyer:{buyer_id_of_question(question)}"


def reply_ordering_key(conversation_id) -> str:
    """The ordering key of what goes out of a conversation (see the module docstring)."""
    return f"cw-out:{conversation_id}"


def pack_ordering_key(pack_id) -> str:
    """The ordering key of what comes into a sale's conversation."""
    return f"ml-pack-in:{pack_id}"


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
    returns {contact_id, source_id}. Safe to repeat and to race (unique identifier → lookup;
    attaching to an inbox is idempotent in Chatwoot)."""
    buyer_id = str(buyer_id)
    identifier = source_id = f"meli:{buyer_id}"
    client = cw(ctx)
    known = store.get_contact(ctx.conn, buyer_id)
    contact_id = known.chatwoot_contact_id if known else None
    if contact_id is None:
        if not nickname:
            nickname = buyer_nickname(ctx, buyer_id)
        try:
            created = client.create_contact(
                inbox_id, nickname, identifier, source_id,
                custom_attributes={"meli_user_id": buyer_id, "meli_nickname": nickname},
                additional_attributes={"meli_site_id": ctx.settings.ml_site_id})
            contact_id = int(created["contact"]["id"])
            store.record_contact_inbox(ctx.conn, buyer_id, inbox_id, source_id, ctx.now())
        except ChatwootError as exc:
            if exc.status != 422:
                raise
            found = client.find_contact_by_identifier(identifier)
            if found is None:
                raise
            contact_id = int(found["id"])
        store.record_contact(ctx.conn, buyer_id, contact_id, ctx.now())
    if not store.has_contact_inbox(ctx.conn, buyer_id, inbox_id):
        client.create_contact_inbox(contact_id, inbox_id, source_id)
        store.record_contact_inbox(ctx.conn, buyer_id, inbox_id, source_id, ctx.now())
    return {"contact_id": contact_id, "source_id": source_id}


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
    cached = store.get_item(ctx.conn, item_id)
    if _fresh(ctx, cached):
        return cached.as_info()
    try:
        item = ml(ctx).get_item(item_id)
    except MercadoLivreError as exc:
        if exc.retryable:
            raise
        return None
    return cache_item(ctx, item)


def cache_item(ctx, item: dict) -> dict:
    """Keep the fields the bridge shows, with the time they were read."""
    return store.put_item(ctx.conn, item, ctx.now()).as_info()


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
    return _fresh(ctx, store.get_item(ctx.conn, item_id))


def _fresh(ctx, cached_item: store.MlItem | None) -> bool:
    return cached_item is not None and ctx.now() - cached_item.fetched_at < ITEM_CACHE_SECONDS


def find_message_by_source(ctx, conversation_id: int, source_id: str) -> dict | None:
    """A message already in the conversation with this `source_id` (resuming after a crash)."""
    return find_messages_by_source(ctx, conversation_id, {source_id}).get(source_id)


def find_messages_by_source(ctx, conversation_id: int, source_ids: set[str]) -> dict[str, dict]:
    """{source_id: message} of the messages already in the conversation with one of
    `source_ids`, read from the newest back (Chatwoot answers 20 a page) until all are found or
    CHATWOOT_LOOKBACK_PAGES pages were read."""
    found: dict[str, dict] = {}
    for page in cw(ctx).messages_back(conversation_id, CHATWOOT_LOOKBACK_PAGES):
        for message in page:
            source_id = message.get("source_id")
            if source_id in source_ids and source_id not in found:
                found[source_id] = message
        if len(found) == len(source_ids):
            break
    return found


def open_conversation(ctx, inbox_id: int, contact: dict, attribute: str, value: str,
                      custom_attributes: dict, additional_attributes: dict,
                      opening: bool, mark_opening: Callable[[], None]) -> int:
    """A new conversation of the contact in `inbox_id` with these attributes — or the one an
    earlier run created before its answer was lost (a timeout, a crash, a job that died and was
    re-armed). Each run calls `mark_opening` (which marks the caller's row `opening`) before it
    creates, so the contact's conversations are searched (for `attribute` = `value`) only when
    such a run may have existed (`opening`: the caller's row was marked). Until the caller
    records the conversation, its row has no conversation id."""
    client = cw(ctx)
    if opening:
        for conversation in client.list_contact_conversations(contact["contact_id"]):
            attrs = conversation.get("custom_attributes")
            if str(conversation.get("inbox_id")) == str(inbox_id) and isinstance(attrs, dict) \
                    and str(attrs.get(attribute) or "") == str(value):
                return int(conversation["id"])
    mark_opening()
    conversation = client.create_conversation(inbox_id, contact["contact_id"],
                                              contact["source_id"],
                                              custom_attributes=custom_attributes,
                                              additional_attributes=additional_attributes)
    return int(conversation["id"])


def conversation_target(ctx, conversation_id: int,
                        custom_attributes: dict | None) -> store.CwConversation | None:
    """What a Chatwoot conversation is about: a question or a sale (from our tables, else from
    the conversation's custom attributes, e.g. once a settled question was pruned)."""
    known = store.get_conversation(ctx.conn, conversation_id)
    if known:
        return known
    attrs = custom_attributes or {}
    item, buyer = str(attrs.get("meli_item_id") or ""), str(attrs.get("meli_buyer_id") or "")
    if attrs.get("meli_question_id"):
        return store.CwConversation(int(conversation_id), store.KIND_QUESTION,
                                    str(attrs["meli_question_id"]), None, item, buyer, None)
    if attrs.get("meli_pack_id"):
        return store.CwConversation(int(conversation_id), store.KIND_SALE, None,
                                    str(attrs["meli_pack_id"]), item, buyer, None)
    return None


def reply_deleted(ctx, reply: dict) -> bool:
    """True when the agent deleted this reply in Chatwoot (its `message_updated` with
    `content_attributes.deleted` reached the webhook): what was not sent yet must not be."""
    if not store.reply_deleted(ctx.conn, reply["message_id"]):
        return False
    log.info("chatwoot_reply_deleted_not_sent",
             extra={"chatwoot_message_id": reply["message_id"],
                    "chatwoot_conversation_id": reply.get("conversation_id")})
    return True


def reply_in_flight(ctx, message_id) -> bool:
    """True when an agent reply (or one of its parts) was being sent to Mercado Livre and the
    outcome is unknown: it may have been delivered."""
    progress = store.get_reply(ctx.conn, message_id)
    return progress is not None and progress.in_flight_part is not None


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
