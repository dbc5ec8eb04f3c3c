"""Bridge B, post-sale messages: every message of a sale into one Chatwoot conversation (order
summary on top), agents' replies back to the sale (350-character parts, attachments, the
messaging agent, blocked conversations).

Owns: the `ml.sync_pack`, `ml.fetch_message` and `ml.fetch_order` handlers, the unread poll,
and sending a reply to a sale.
Must not: serve HTTP; know wire formats (the peer modules); hold SQL (meli_store).
Ordering keys: see meli_common. A sale's sync (`ml-pack-in:<pack>`) and a reply to it
(`cw-out:<conversation>`) may run at once: both write the sale's message map, each only the
columns it owns, in single statements; the unread snapshot is written by the poll and by
replies, each change one statement or one transaction.
"""
from __future__ import annotations

import uuid

import db_manager
import meli_store as store
import meli_texts as texts
import outbox
from chatwoot_api import BRIDGE_ORIGIN_KEY, ChatwootError, markdown_to_text
from meli_common import (MAX_REPLY_PARTS, PACK_MAX_OFFSET, PACK_MAX_PAGES, PACK_PAGE,
                         buyer_nickname, cw, ensure_contact, find_message_by_source,
                         find_messages_by_source, log, ml, next_page_offset, note_follow_up,
                         open_conversation, pack_ordering_key, refuse, reply_deleted, sales_inbox,
                         short_error, squash)
from mercado_livre_api import (ATTACHMENT_MAX_BYTES, SELLER_MESSAGE_MAX_CHARS, MercadoLivreError,
                               attachment_mime, is_agent_mediated, message_sort_key, message_text,
                               pack_id_of_message, parse_pack_resource, plain_post_sale_text,
                               reply_recipient, split_message)
from outbox import FollowUp


CHATWOOT_MAX_FILES = 15
ATTACHMENT_DOWNLOAD_ATTEMPTS = 3


def poll_messages(ctx) -> dict:
    """Schedule: one `messages/unread` call; a pack whose unread count changed since the last
    poll gets a sync job (reads use mark_as_read=false, so counts persist until answered), and
    so does a pack that left the list (the seller answered on Mercado Livre's site). A reply
    sent by ponte reads its pack with mark_as_read and drops it from the snapshot, so the
    buyer's next message counts as a change even when the count is the same again (also when
    that reply ran while this poll waited for Mercado Livre's answer)."""
    forgotten_before = store.forgotten_counts(ctx.conn)
    answer = ml(ctx).unread_messages()
    current: dict[str, int] = {}
    for result in answer.get("results") or []:
        parsed = parse_pack_resource(str(result.get("resource") or ""))
        if parsed:
            current[parsed[0]] = int(result.get("count") or 0)
    # One transaction (BEGIN IMMEDIATE): no reply's forget_unread lands between the reads
    # and the write of the snapshot.
    with db_manager.transaction(ctx.conn):
        # A reply that read its pack with mark_as_read while this poll waited for Mercado
        # Livre: the count seen here predates it, so it is not kept (the buyer's next message
        # must count as a change).
        for pack, generation in store.forgotten_counts(ctx.conn).items():
            if forgotten_before.get(pack) != generation:
                current.pop(pack, None)
        previous = store.unread_snapshot(ctx.conn)
        changed = [pack for pack, count in current.items() if previous.get(pack) != count]
        changed += [pack for pack in previous if pack not in current]
        for pack in changed:
            outbox.enqueue_job(ctx.conn, "ml.sync_pack",
                               f"ml-pack-sync:{pack}:unread:{uuid.uuid4().hex[:12]}",
                               {"pack_id": pack}, ordering_key=pack_ordering_key(pack),
                               now=ctx.now())
        store.save_unread_snapshot(ctx.conn, current, previous, ctx.now())
    return {"packs": len(current), "enqueued": len(changed)}


def forget_unread(ctx, pack_id: str) -> None:
    """Drop a pack from the unread snapshot, right after reading the pack with mark_as_read
    (its count went to 0 without the poll seeing it)."""
    store.forget_unread(ctx.conn, pack_id, ctx.now())


def on_dead_sync_pack(ctx, job, error: str) -> list:
    """A sale's sync gave up (Chatwoot or Mercado Livre down for hours): forget its unread count
    so the next unread poll queues it again, as long as the buyer's messages are still unread."""
    forget_unread(ctx, job.payload["pack_id"])
    return []


def read_pack(ctx, pack_id: str, mark_as_read: bool = False) -> tuple[list[dict], dict]:
    """All messages of a sale's conversation (oldest first) and its conversation_status."""
    client = ml(ctx)
    messages: list[dict] = []
    status: dict = {}
    offset: int | None = 0
    for _page in range(PACK_MAX_PAGES):
        page = client.get_pack_messages(pack_id, offset=offset, limit=PACK_PAGE,
                                        mark_as_read=mark_as_read)
        status = page.get("conversation_status") or status
        batch = page.get("messages") or []
        messages.extend(batch)
        # By what came back: Mercado Livre's documented page is 10, whatever limit was asked.
        offset = next_page_offset(offset, len(batch), page.get("paging"), PACK_PAGE)
        if offset is None or offset >= PACK_MAX_OFFSET:
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
    known = store.get_ml_messages(ctx.conn, [m.get("id") for m in messages])
    new = [m for m in messages if _unmirrored(known.get(str(m.get("id"))))]
    ours = [m for m in new if _sent_by_ponte(ctx, m)]
    for m in ours:  # sent by ponte itself: already in Chatwoot as the agent's message
        store.mark_sent_by_ponte(ctx.conn, m["id"], pack_id, ctx.now())
    new = [m for m in new if m not in ours]
    if not new:
        return {"status": "up_to_date"}
    conversation_id = ensure_sale_conversation(ctx, pack_id)
    client = cw(ctx)
    # What an earlier run (retried, crashed, or died and replaced by a fresh sync job) may have
    # posted without recording it: each message is marked `posting` before it goes to Chatwoot,
    # and each chunk of files has its source_id.
    wanted = set()
    for m in new:
        if known.get(str(m.get("id"))) and known[str(m.get("id"))].posting:
            files = len(m.get("message_attachments") or [])
            wanted.update(f"meli:msg:{m['id']}" + (f":{start}" if start else "")
                          for start in range(0, max(files, 1), CHATWOOT_MAX_FILES))
    posted = find_messages_by_source(ctx, conversation_id, wanted) if wanted else {}
    mirrored = 0
    for m in new:
        source_id = f"meli:msg:{m['id']}"
        attachments = m.get("message_attachments") or []
        if source_id in posted and len(attachments) <= CHATWOOT_MAX_FILES:
            store.record_mirrored(ctx.conn, m["id"], pack_id, int(posted[source_id]["id"]),
                                  ctx.now())
            continue
        from_seller = str((m.get("from") or {}).get("user_id")) == seller
        files, skipped = _download_ml_attachments(ctx, m)
        content = texts.ml_message_text(m, skipped)
        attributes = {"meli_resource": "messages", "meli_message_id": m["id"],
                      "meli_pack_id": pack_id,
                      "external_created_at": (m.get("message_date") or {}).get("created")}
        if from_seller:
            attributes[BRIDGE_ORIGIN_KEY] = "mercadolivre"
        kind = "outgoing" if from_seller else "incoming"
        first_id = None
        store.mark_posting(ctx.conn, m["id"], pack_id, ctx.now())
        # Chatwoot takes at most 15 files a message; Mercado Livre allows 25.
        for start in range(0, max(len(files), 1), CHATWOOT_MAX_FILES):
            chunk_source = source_id if start == 0 else f"{source_id}:{start}"
            created = posted.get(chunk_source)
            if created is None:
                created = client.create_message(
                    conversation_id, content if start == 0 else "📎", message_type=kind,
                    source_id=chunk_source, content_attributes=attributes,
                    attachments=files[start:start + CHATWOOT_MAX_FILES])
            first_id = first_id if first_id is not None else int(created["id"])
        store.record_mirrored(ctx.conn, m["id"], pack_id, first_id, ctx.now())
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
    (private) message; before creating it, looks for one an earlier run created."""
    known = store.get_pack(ctx.conn, pack_id)
    client = cw(ctx)
    # The summary is posted only after the conversation is recorded: without it there is none.
    fresh = not (known and known.chatwoot_conversation_id)
    if fresh:
        orders = sale_orders(ctx, pack_id)
        buyer = (orders[0].get("buyer") or {}) if orders else {}
        buyer_id = str(buyer.get("id") or "")
        if not buyer_id:
            raise MercadoLivreError(None, f"sale {pack_id} without buyer", True)
        if not buyer.get("nickname"):  # recent order samples omit it; the profile has it
            buyer["nickname"] = buyer_nickname(ctx, buyer_id)
        contact = ensure_contact(ctx, sales_inbox(ctx), buyer_id, buyer["nickname"])
        conversation_id = open_conversation(
            ctx, sales_inbox(ctx), contact, "meli_pack_id", pack_id,
            custom_attributes={"meli_pack_id": pack_id, "meli_buyer_id": buyer_id,
                               "meli_order_ids": ",".join(str(o.get("id")) for o in orders)},
            additional_attributes={"meli_resource": "messages"},
            opening=bool(known and known.opening),
            mark_opening=lambda: store.mark_pack_opening(ctx.conn, pack_id, ctx.now()))
        known = store.record_pack_conversation(ctx.conn, pack_id, conversation_id, buyer_id,
                                               texts.order_summary(pack_id, orders), ctx.now())
    if not known.summary_posted:
        source_id = f"meli:order-summary:{pack_id}"
        if fresh or find_message_by_source(ctx, known.chatwoot_conversation_id,
                                           source_id) is None:
            client.create_message(known.chatwoot_conversation_id, known.order_summary,
                                  private=True, source_id=source_id,
                                  content_attributes={BRIDGE_ORIGIN_KEY: "ponte"})
        store.mark_summary_posted(ctx.conn, pack_id, ctx.now())
    return int(known.chatwoot_conversation_id)


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
                 {"pack_id": pack}, ordering_key=pack_ordering_key(pack))
        for pack in sorted(packs)]


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
                                        {"pack_id": pack}, ordering_key=pack_ordering_key(pack))]


def send_sale_message(ctx, job, reply: dict, pack_id: str):
    """Send an agent's reply to the sale (in parts, with attachments), or refuse it with a
    note; a retry resumes at the first part not yet sent."""
    client = ml(ctx)
    key = int(reply["message_id"])
    # Written only by this job (ordering key cw-out:<conversation>).
    progress = store.get_reply(ctx.conn, key)
    parts_sent = progress.parts_sent if progress else 0
    in_flight = progress.in_flight_part if progress else None
    attachment_ids = progress.attachment_ids if progress else None
    skipped = progress.skipped_attachments if progress else []
    if in_flight is None and reply_deleted(ctx, reply):
        return {"status": "deleted", "parts_sent": parts_sent}
    text = plain_post_sale_text(markdown_to_text(reply.get("content") or ""))
    # A plain read (marks the buyer's messages read: the agent has answered them) that also
    # gives the conversation status and the latest sender.
    try:
        messages, status = read_pack(ctx, pack_id, mark_as_read=True)
    except MercadoLivreError as exc:
        if exc.status in (403, 404):  # waiting will not help: say so now
            return refuse(reply, texts.SALE_NOT_FOUND, f"sale_{exc.status}")
        raise
    forget_unread(ctx, pack_id)
    _sync_if_unmirrored(ctx, pack_id, messages, reply["message_id"])
    if status.get("status") == "blocked" and parts_sent == 0:
        return refuse(reply, texts.sale_blocked(status.get("substatus")), "blocked")
    mediated = is_agent_mediated({"conversation_status": status, "messages": messages},
                                 ctx.settings.ml_site_id)
    parts = split_message(text) if text else []
    if len(parts) > 1 and mediated and parts_sent == 0:
        return refuse(reply, texts.MEDIATED_TOO_LONG.format(length=len(text)), "too_long")
    if len(parts) > MAX_REPLY_PARTS:
        return refuse(reply, texts.SALE_TOO_LONG.format(length=len(text),
                                                         max=MAX_REPLY_PARTS
                                                         * SELLER_MESSAGE_MAX_CHARS), "too_long")
    if attachment_ids is None:
        attachment_ids, skipped = _upload_attachments(ctx, reply.get("attachments") or [],
                                                      job.attempt)
        store.record_attachments(ctx.conn, key, attachment_ids, skipped, ctx.now())
    if not parts and attachment_ids:
        parts = [texts.attachments_only_text(reply.get("attachments") or [])]
    if not parts:
        note = texts.attachments_all_skipped(skipped) if skipped else texts.EMPTY_REPLY
        return refuse(reply, note, "empty")
    sale = store.get_pack(ctx.conn, pack_id)
    recipient = reply_recipient(messages, ctx.settings.ml_seller_id, ctx.settings.ml_site_id,
                                sale.ml_buyer_id if sale else "")
    for index in range(parts_sent, len(parts)):
        attachments = attachment_ids if index == 0 else None
        sent = None
        if in_flight == index:
            # An earlier run (retried, crashed, or died and re-armed with a fresh attempt
            # count) may have lost Mercado Livre's answer after it accepted this part.
            sent = _lost_answer(ctx, messages, parts[index])
        try:
            if sent is None and reply_deleted(ctx, reply):
                # The buyer already has the first parts: the agent must know.
                note = note_follow_up(reply["conversation_id"], texts.DELETED_PARTLY_SENT.format(
                    sent=index, total=len(parts)), f"deleted:{reply['message_id']}")
                return {"status": "deleted", "parts_sent": index}, [note] if index else []
            if sent is None:
                store.start_reply_part(ctx.conn, key, index, ctx.now())
                sent = client.send_pack_message(pack_id, recipient, parts[index], attachments)
        except MercadoLivreError as exc:
            if not exc.may_have_reached:  # refused, or never sent: nothing to look for
                store.clear_in_flight(ctx.conn, key, ctx.now())
            if exc.retryable:
                raise
            note = texts.sale_refused(exc.code, short_error(exc), index, len(parts))
            return refuse(reply, note, exc.code or str(exc.status))
        store.record_part_sent(ctx.conn, key, index, str(sent.get("id") or ""), pack_id,
                               ctx.now())
    follow_ups = [FollowUp("chatwoot.mark_delivered", f"cw-delivered:{reply['message_id']}",
                           {"conversation_id": reply["conversation_id"],
                            "message_id": reply["message_id"]})]
    if skipped:
        follow_ups.append(note_follow_up(reply["conversation_id"],
                                         texts.attachment_skipped(skipped),
                                         f"attachments:{reply['message_id']}"))
    log.info("ml_sale_message_sent", extra={"ml_pack_id": pack_id, "parts": len(parts),
                                            "chatwoot_message_id": reply["message_id"]})
    return {"status": "sent", "parts": len(parts),
            "ml_message_ids": store.reply_ml_message_ids(ctx.conn, key)}, follow_ups


def _lost_answer(ctx, messages: list[dict], text: str) -> dict | None:
    """The newest message of the pack that ponte sent with this text but never recorded (its
    answer was lost), or None. Parts whose answer arrived are recorded with their Chatwoot
    message id; a sync may have marked a lost one `sent_by_ponte` without it."""
    for m in reversed(messages):
        if not _sent_by_ponte(ctx, m) or squash(message_text(m)) != squash(text):
            continue
        known = store.get_ml_message(ctx.conn, m.get("id"))
        if known is not None and known.chatwoot_message_id:
            continue
        return m
    return None


def _unmirrored(known: store.MlMessage | None) -> bool:
    """True for a Mercado Livre message (what ponte knows of it: `known`) not yet recorded
    in Chatwoot: unknown, or marked `posting` by a run that did not see Chatwoot's answer."""
    return known is None or known.posting


def _sync_if_unmirrored(ctx, pack_id: str, messages: list[dict], reason: int) -> None:
    """That read marked the buyer's messages as read, so the unread poll will not see any that
    arrived since the last sync: queue a sync for them."""
    seller = str(ctx.settings.ml_seller_id)
    known = store.get_ml_messages(ctx.conn, [m.get("id") for m in messages])
    if any(_unmirrored(known.get(str(m.get("id"))))
           and str((m.get("from") or {}).get("user_id")) != seller for m in messages):
        with db_manager.transaction(ctx.conn):
            outbox.enqueue_job(ctx.conn, "ml.sync_pack", f"ml-pack-sync:{pack_id}:reply:{reason}",
                               {"pack_id": pack_id}, ordering_key=pack_ordering_key(pack_id),
                               now=ctx.now())


def _upload_attachments(ctx, attachments: list[dict],
                        attempt: int = 1) -> tuple[list[str], list[str]]:
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
            # An unreachable data_url (wrong FRONTEND_URL) must not hold the text back forever.
            if exc.retryable and attempt < ATTACHMENT_DOWNLOAD_ATTEMPTS:
                raise
            skipped.append(f"{name} (não foi possível baixar do Chatwoot: {exc.detail[:80]}; "
                           "confira o FRONTEND_URL do Chatwoot)")
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
            skipped.append(f"{name} (recusado pelo Mercado Livre: {short_error(exc)[:120]})")
    return ids, skipped


def _sent_by_ponte(ctx, message: dict) -> bool:
    """Written by the seller through our application (ponte), not typed on Mercado Livre."""
    return str((message.get("from") or {}).get("user_id")) == str(ctx.settings.ml_seller_id) \
        and str(message.get("client_id")) == str(ctx.settings.ml_client_id)
