"""Everything about Chatwoot's wire format, both ways (Application API of an API-channel inbox).

Owns: `ChatwootClient` (contacts, contact inboxes, conversations, messages with multipart
attachments, message status, labels, custom attributes, status), `ChatwootError`, and the pure
webhook functions `verify_chatwoot_signature` and `classify_chatwoot_event` (an agent's reply
or a deleted message, each read from the body once).
Must not: import db_manager, outbox, flask or another peer module; decide what to do with an event.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from ids import ascii_int
from peer_http import PeerClient, PeerError

ECHO_PREFIX = "meli:"
BRIDGE_ORIGIN_KEY = "ponte_origin"
SIGNATURE_TOLERANCE_SECONDS = 300
FORWARDED_SENDER_TYPES = ("user", "agent_bot", "captain_assistant")


class ChatwootError(PeerError):
    """A failed call to Chatwoot."""

    peer = "chatwoot"


class ChatwootClient(PeerClient):
    """Client of one Chatwoot account's Application API."""

    peer = "chatwoot"
    error_class = ChatwootError

    def __init__(self, base_url: str, api_token: str, account_id: str | int,
                 timeout_seconds: float = 15.0, session=None,
                 max_block_seconds: float | None = None):
        super().__init__(base_url, timeout_seconds=timeout_seconds, session=session,
                         max_block_seconds=max_block_seconds)
        self.api_token = api_token
        self.account_id = str(account_id)

    @classmethod
    def from_settings(cls, settings) -> "ChatwootClient":
        """The client configured by CHATWOOT_* settings (a 429 blocks it for
        RETRY_AFTER_MAX_SECONDS at most)."""
        return cls(settings.chatwoot_base_url, settings.chatwoot_api_token,
                   settings.chatwoot_account_id,
                   max_block_seconds=settings.retry_after_max_seconds)

    def _auth_headers(self) -> dict[str, str]:
        # Dash form: nginx (and Werkzeug) drop headers with underscores; Rails reads both.
        return {"Api-Access-Token": self.api_token}

    def _acct(self, path: str) -> str:
        return f"/api/v1/accounts/{self.account_id}{path}"

    # --- contacts -------------------------------------------------------------------------------

    def create_contact(self, inbox_id: int, name: str, identifier: str, source_id: str,
                       custom_attributes: dict | None = None,
                       additional_attributes: dict | None = None) -> dict:
        """Create a contact with its contact inbox; returns `{"contact": ..., "source_id": ...}`.
        A taken identifier raises ChatwootError(422)."""
        body = {"inbox_id": int(inbox_id), "name": name, "identifier": identifier,
                "source_id": source_id, "custom_attributes": custom_attributes or {},
                "additional_attributes": additional_attributes or {}}
        answer = self._request("POST", self._acct("/contacts"), json=body) or {}
        payload = answer.get("payload", answer)
        contact = payload.get("contact", payload)
        inbox = payload.get("contact_inbox") or {}
        return {"contact": contact, "source_id": inbox.get("source_id") or source_id}

    def find_contact_by_identifier(self, identifier: str) -> dict | None:
        """Exact lookup by identifier (contacts/filter), or None."""
        body = {"payload": [{"attribute_key": "identifier", "filter_operator": "equal_to",
                             "values": [identifier]}]}
        answer = self._request("POST", self._acct("/contacts/filter"), json=body) or {}
        for contact in answer.get("payload") or []:
            if str(contact.get("identifier") or "").lower() == identifier.lower():
                return contact
        return None

    def create_contact_inbox(self, contact_id: int, inbox_id: int, source_id: str) -> dict:
        """Attach a contact to an inbox under `source_id` (idempotent in Chatwoot)."""
        return self._request("POST", self._acct(f"/contacts/{int(contact_id)}/contact_inboxes"),
                             json={"inbox_id": int(inbox_id), "source_id": source_id}) or {}

    # --- conversations --------------------------------------------------------------------------

    def create_conversation(self, inbox_id: int, contact_id: int, source_id: str,
                            custom_attributes: dict | None = None,
                            additional_attributes: dict | None = None,
                            status: str = "open") -> dict:
        """Open a conversation; returns it (`id` is the display id)."""
        body = {"source_id": source_id, "inbox_id": int(inbox_id), "contact_id": int(contact_id),
                "status": status, "custom_attributes": custom_attributes or {},
                "additional_attributes": additional_attributes or {}}
        return self._request("POST", self._acct("/conversations"), json=body) or {}

    def list_contact_conversations(self, contact_id: int) -> list[dict]:
        """The contact's conversations (Chatwoot returns its most recent ones)."""
        answer = self._request("GET",
                               self._acct(f"/contacts/{int(contact_id)}/conversations")) or {}
        payload = answer.get("payload") if isinstance(answer, dict) else answer
        return [c for c in payload or [] if isinstance(c, dict)]

    def get_conversation(self, conversation_id: int) -> dict:
        """One conversation."""
        return self._request("GET", self._acct(f"/conversations/{int(conversation_id)}")) or {}

    def list_messages(self, conversation_id: int, before: int | None = None) -> list[dict]:
        """One page of the conversation's messages, oldest first: the latest 20, or with
        `before` the 20 whose ids come before that message id (Chatwoot's MessageFinder)."""
        params = {"before": int(before)} if before is not None else None
        answer = self._request("GET",
                               self._acct(f"/conversations/{int(conversation_id)}/messages"),
                               params=params) or {}
        payload = answer.get("payload") if isinstance(answer, dict) else None
        return [m for m in payload or [] if isinstance(m, dict)]

    def messages_back(self, conversation_id: int, max_pages: int):
        """The conversation's messages from the newest back, page by page (`list_messages`
        with `before`), at most `max_pages` pages: yields each page's messages, newest first."""
        before = None
        for _ in range(max_pages):
            page = self.list_messages(conversation_id, before=before)
            ids = [m["id"] for m in page if isinstance(m.get("id"), int)
                   and not isinstance(m.get("id"), bool)]
            yield sorted(page, key=lambda m: m.get("id") if isinstance(m.get("id"), int) else 0,
                         reverse=True)
            if not ids or (before is not None and min(ids) >= before):
                return
            before = min(ids)

    def toggle_status(self, conversation_id: int, status: str) -> dict:
        """Set the conversation's status (open/resolved/pending/snoozed)."""
        return self._request(
            "POST", self._acct(f"/conversations/{int(conversation_id)}/toggle_status"),
            json={"status": status}) or {}

    def get_labels(self, conversation_id: int) -> list[str]:
        """The conversation's labels."""
        answer = self._request("GET",
                               self._acct(f"/conversations/{int(conversation_id)}/labels")) or {}
        return list(answer.get("payload") or [])

    def set_labels(self, conversation_id: int, labels: list[str]) -> list[str]:
        """Replace the conversation's labels (send the merged list)."""
        answer = self._request("POST",
                               self._acct(f"/conversations/{int(conversation_id)}/labels"),
                               json={"labels": list(labels)}) or {}
        return list(answer.get("payload") or [])

    def set_custom_attributes(self, conversation_id: int, attributes: dict) -> dict:
        """Replace the conversation's custom attributes (send the merged dict)."""
        return self._request(
            "POST", self._acct(f"/conversations/{int(conversation_id)}/custom_attributes"),
            json={"custom_attributes": attributes}) or {}

    # --- messages -------------------------------------------------------------------------------

    def create_message(self, conversation_id: int, content: str, *,
                       message_type: str = "outgoing", private: bool = False,
                       source_id: str | None = None, content_attributes: dict | None = None,
                       attachments: list[tuple[str, bytes, str]] | None = None) -> dict:
        """Post a message; with `attachments` [(filename, bytes, mime)] it goes as multipart
        `attachments[]`. `message_type` "incoming" is what the customer said."""
        path = self._acct(f"/conversations/{int(conversation_id)}/messages")
        if attachments:
            form: dict[str, Any] = {"content": content or "", "message_type": message_type,
                                    "private": "true" if private else "false"}
            if source_id:
                form["source_id"] = source_id
            if content_attributes:
                form["content_attributes"] = json.dumps(content_attributes, ensure_ascii=False)
            files = [("attachments[]", (name, data, mime)) for name, data, mime in attachments]
            return self._request("POST", path, data=form, files=files,
                                 timeout_seconds=max(self.timeout_seconds, 60)) or {}
        body: dict[str, Any] = {"content": content, "message_type": message_type,
                                "private": private}
        if source_id:
            body["source_id"] = source_id
        if content_attributes:
            body["content_attributes"] = content_attributes
        return self._request("POST", path, json=body) or {}

    def create_private_note(self, conversation_id: int, content: str) -> dict:
        """A note only agents see."""
        return self.create_message(conversation_id, content, message_type="outgoing",
                                   private=True, content_attributes={BRIDGE_ORIGIN_KEY: "ponte"})

    def update_message_status(self, conversation_id: int, message_id: int, status: str,
                              external_error: str = "") -> dict:
        """Mark a message sent/delivered/read/failed (API inboxes only)."""
        body = {"status": status}
        if external_error:
            body["external_error"] = external_error
        return self._request(
            "PATCH", self._acct(f"/conversations/{int(conversation_id)}/messages/{int(message_id)}"),
            json=body) or {}

    def download(self, url: str, max_bytes: int) -> tuple[bytes, str]:
        """Fetch an attachment's `data_url` (unauthenticated, follows redirects). Raises
        ChatwootError(413, retryable=False) past `max_bytes`."""
        response = self._request("GET", url, auth=False, expect_json=False, stream=True,
                                 allow_redirects=True,
                                 timeout_seconds=max(self.timeout_seconds, 60))
        chunks, size = [], 0
        for chunk in response.iter_content(65536):
            size += len(chunk)
            if size > max_bytes:
                response.close()
                raise ChatwootError(413, f"attachment larger than {max_bytes} bytes", False)
            chunks.append(chunk)
        return b"".join(chunks), response.headers.get("Content-Type", "")


# --- webhooks (pure) ----------------------------------------------------------------------------

def verify_chatwoot_signature(secret: str, timestamp: str | None, raw_body: bytes,
                              signature: str | None, now: float,
                              tolerance_seconds: int = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """True when `signature` is `sha256=HMAC_SHA256(secret, "<timestamp>.<raw body>")` and the
    timestamp is within `tolerance_seconds` of `now` (both ways)."""
    if not secret or not timestamp or not signature:
        return False
    timestamp = timestamp.strip()
    seconds = ascii_int(timestamp)
    if seconds is None or abs(now - seconds) > tolerance_seconds:
        return False
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + raw_body, hashlib.sha256)
    return hmac.compare_digest("sha256=" + mac.hexdigest(), signature.strip().lower())


def sign_chatwoot_body(secret: str, timestamp: int, raw_body: bytes) -> str:
    """The `X-Chatwoot-Signature` Chatwoot sends for this body (used by the stand-in)."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + raw_body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


@dataclass(frozen=True)
class ChatwootAttachment:
    """An agent's attachment, to be fetched from `data_url`."""

    id: int
    data_url: str
    file_type: str
    content_type: str
    extension: str
    file_size: int | None
    filename: str


@dataclass(frozen=True)
class AgentReply:
    """A public reply typed by an agent in a Chatwoot conversation: the only event we forward."""

    message_id: int
    conversation_id: int
    inbox_id: int
    account_id: int | None
    content: str
    attachments: tuple[ChatwootAttachment, ...] = ()
    sender_type: str = "user"
    sender_name: str = ""
    custom_attributes: dict = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    created_at: str = ""

    def to_payload(self) -> dict:
        """JSON-ready form for a job payload."""
        return {"message_id": self.message_id, "conversation_id": self.conversation_id,
                "inbox_id": self.inbox_id, "account_id": self.account_id,
                "content": self.content, "sender_type": self.sender_type,
                "sender_name": self.sender_name, "custom_attributes": self.custom_attributes,
                "labels": list(self.labels), "created_at": self.created_at,
                "attachments": [a.__dict__ for a in self.attachments]}


@dataclass(frozen=True)
class DeletedMessage:
    """An agent's public message deleted in Chatwoot (`message_updated` whose
    `content_attributes.deleted` is true): if its forward has not run, it must not."""

    message_id: int
    conversation_id: int


MAX_ID = 2**63 - 1  # what SQLite (and Chatwoot's bigint ids) can hold


def _id(value: Any) -> int | None:
    """A positive integer id (a JSON number or a string of ASCII digits), or None. Booleans and
    fractional numbers are not ids."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        number = ascii_int(value)
    else:
        return None
    return number if number is not None and 0 < number <= MAX_ID else None


def _obj(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _content_attributes(body: dict) -> dict:
    """The message's `content_attributes`: Chatwoot sends an object, or that object as a JSON
    string; {} for anything else."""
    value = body.get("content_attributes") or {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return _obj(value)


def _in_inboxes(inbox_id: int, inbox_ids: tuple | list | set | None) -> bool:
    """True when `inbox_ids` is empty (every inbox) or holds `inbox_id`."""
    return not inbox_ids or inbox_id in {int(i) for i in inbox_ids if str(i).strip()}


def classify_chatwoot_event(body: Any, inbox_ids: tuple | list | set | None = None
                            ) -> tuple[AgentReply | DeletedMessage | None, str]:
    """What one webhook body is, read once: (reply, "forward") for an agent's public reply in
    one of `inbox_ids`; (deleted, "message_deleted") for a `message_updated` that marks such a
    public message deleted; otherwise (None, reason) — private notes, incoming, activity,
    template, other message_updated, our own echoes (`source_id` prefix `meli:`), other
    inboxes, other events, and "malformed" for a body whose fields do not have Chatwoot's
    types."""
    if not isinstance(body, dict):
        return None, "not_an_object"
    event = body.get("event")
    if event == "message_updated":
        deleted = _deleted_message(body, inbox_ids)
        return (deleted, "message_deleted") if deleted else (None, "event:message_updated")
    if event != "message_created":
        return None, f"event:{str(event)[:40]}"
    if body.get("private") is not False:  # private notes are outgoing+private: check first
        return None, "private"
    message_type = body.get("message_type")
    if message_type != "outgoing":
        return None, f"message_type:{str(message_type)[:40]}"
    source_id = str(body.get("source_id") or "")
    content_attributes = _content_attributes(body)
    if source_id.startswith(ECHO_PREFIX) or content_attributes.get(BRIDGE_ORIGIN_KEY):
        return None, "echo"
    if not isinstance(body.get("sender") or {}, dict) or \
            not isinstance(body.get("conversation") or {}, dict) or \
            not isinstance(body.get("inbox") or {}, dict) or \
            not isinstance(body.get("account") or {}, dict) or \
            not isinstance(body.get("attachments") or [], list) or \
            not isinstance(body.get("content") or "", str):
        return None, "malformed"
    sender = _obj(body.get("sender"))
    if sender.get("type") not in FORWARDED_SENDER_TYPES:
        return None, f"sender:{str(sender.get('type'))[:40]}"
    conversation = _obj(body.get("conversation"))
    raw_inbox = _obj(body.get("inbox")).get("id") or conversation.get("inbox_id")
    raw_ids = (raw_inbox, conversation.get("id"), body.get("id"))
    inbox_id, conversation_id, message_id = (_id(v) for v in raw_ids)
    if inbox_id is None or conversation_id is None or message_id is None:
        return None, "missing_ids" if None in raw_ids else "malformed"
    if not _in_inboxes(inbox_id, inbox_ids):
        return None, "other_inbox"
    if content_attributes.get("deleted"):
        return None, "deleted"
    if content_attributes.get("automation_rule_id"):
        # An automation's greeting would become the question's one public, final answer.
        return None, "automation"
    attachments = []
    for a in body.get("attachments") or []:
        if not isinstance(a, dict) or not isinstance(a.get("data_url"), str) \
                or not a["data_url"]:
            continue
        size = a.get("file_size")
        attachments.append(ChatwootAttachment(
            id=_id(a.get("id")) or 0, data_url=a["data_url"],
            file_type=str(a.get("file_type") or "file"),
            content_type=str(a.get("content_type") or ""),
            extension=str(a.get("extension") or ""),
            file_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
            filename=_attachment_name(a)))
    content = body.get("content") or ""
    if not content.strip() and not attachments:
        return None, "empty"
    labels = conversation.get("labels")
    return AgentReply(
        message_id=message_id, conversation_id=conversation_id, inbox_id=inbox_id,
        account_id=_id(_obj(body.get("account")).get("id")), content=content,
        attachments=tuple(attachments), sender_type=str(sender.get("type")),
        sender_name=str(sender.get("name") or ""),
        custom_attributes=_obj(conversation.get("custom_attributes")),
        labels=tuple(x for x in labels if isinstance(x, str)) if isinstance(labels, list)
        else (),
        created_at=str(body.get("created_at") or "")), "forward"


def _deleted_message(body: dict, inbox_ids: tuple | list | set | None
                     ) -> DeletedMessage | None:
    """The DeletedMessage of a `message_updated` body for a public outgoing message in one of
    `inbox_ids` that Chatwoot marked deleted; None for anything else."""
    if body.get("private") is not False or body.get("message_type") != "outgoing":
        return None
    if not _content_attributes(body).get("deleted"):
        return None
    conversation = _obj(body.get("conversation"))
    inbox_id = _id(_obj(body.get("inbox")).get("id") or conversation.get("inbox_id"))
    conversation_id, message_id = _id(conversation.get("id")), _id(body.get("id"))
    if inbox_id is None or conversation_id is None or message_id is None:
        return None
    if not _in_inboxes(inbox_id, inbox_ids):
        return None
    return DeletedMessage(message_id=message_id, conversation_id=conversation_id)


def _attachment_name(attachment: dict) -> str:
    """The file name the agent uploaded: the last segment of `data_url`, which Rails writes
    URL-encoded ("Nota%20fiscal.pdf" is "Nota fiscal.pdf")."""
    url = str(attachment.get("data_url") or "")
    name = url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    name = urllib.parse.unquote(name, errors="replace")
    name = re.sub(r"[\\/\x00-\x1f\x7f]", "_", name).strip()[:200]
    if "." not in name and attachment.get("extension"):
        name = f"{name or 'anexo'}.{attachment['extension']}"
    return name or f"anexo-{attachment.get('id', '')}"


def markdown_to_text(content: str) -> str:
    """Chatwoot's editor writes markdown; Mercado Livre shows plain text."""
    text = content.replace("\r\n", "\n")
    text = re.sub(r"\\\n", "\n", text)
    text = re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", r"\1 (\2)", text)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    text = re.sub(r"`([^`]+)`", r"\1", text)
    text = re.sub(r"^\s{0,3}#{1,6}\s+", "", text, flags=re.M)
    text = re.sub(r"^\s*[-*+]\s+", "- ", text, flags=re.M)
    return text.strip()
