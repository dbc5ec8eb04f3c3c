"""Everything about Kommo's wire format, both ways.

Owns: `KommoClient` (REST v4: send into a talk, notes, lead fields, Salesbot runs, lead lookup,
custom-field creation, OAuth token exchange, read-backs of a talk's messages and a lead's notes),
`KommoError`, the pure parsers of those read-backs (`parse_talk_messages`, `parse_lead_notes`),
and the pure parser of Kommo's
form-encoded account webhooks (`parse_kommo_webhook`) with the small event dataclasses it returns.
Must not: import db_manager, outbox, flask or another peer module. Tokens come from a `token_source`
object (see kommo_auth) so this module never stores anything.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import unquote_plus

import config
from peer_http import PeerClient, PeerError, parse_retry_after

READBACK_LIMIT = 50  # items per read-back: a talk or a lead rarely gets more while we retry


class KommoError(PeerError):
    """A failed Kommo call."""

    peer = "kommo"


class KommoClient(PeerClient):
    """Kommo REST v4 client. `token_source.access_token()` gives the current token and
    `token_source.refresh_after_401()` one refresh when Kommo says 401."""

    peer = "kommo"
    error_class = KommoError

    def __init__(self, base_url: str, token_source, max_rps: float = 5.0, timeout_seconds=15.0,
                 session=None, **rate_limit):
        """`rate_limit`: `rate_limit_path` (the database path, so every process shares the
        limit) and `clock`; `max_rps` above Kommo's 7 is lowered to 7."""
        super().__init__(base_url, timeout_seconds=timeout_seconds,
                         max_rps=min(max_rps, config.KOMMO_RPS_LIMIT), session=session,
                         **rate_limit)
        self.token_source = token_source

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_source.access_token()}"}

    def _error_from_response(self, response) -> PeerError:
        # 402 (add-on quota), 422 (talk closed), 403 (scope, blocked account) are not in
        # peer_http's retryable statuses: retrying cannot fix them, the seller must act.
        error = super()._error_from_response(response)
        if response.status_code == 429 and error.retry_after_seconds is None:
            body = error.body if isinstance(error.body, dict) else {}
            error.retry_after_seconds = parse_retry_after(body.get("retry_after")) or 2.0
        return error

    def call(self, method: str, path: str, **kwargs) -> Any:
        """One authenticated call; on 401 refreshes the token once and tries again."""
        try:
            return self._request(method, path, **kwargs)
        except KommoError as exc:
            if exc.status != 401 or not self.token_source.refresh_after_401():
                raise
            return self._request(method, path, **kwargs)

    def send_talk_message(self, talk_id: str | int, text: str) -> dict:
        """Send text into an open WhatsApp talk (Chats API add-on). 202 → `{"id": ...}`."""
        return self.call("POST", f"/api/v4/talks/{int(talk_id)}/send_message",
                         json={"text": text}) or {}

    def add_lead_note(self, lead_id: str | int, text: str) -> Any:
        """Add a common (internal) note to a lead; never reaches the customer."""
        return self.call("POST", f"/api/v4/leads/{int(lead_id)}/notes",
                         json=[{"note_type": "common", "params": {"text": text}}])

    def set_lead_text_field(self, lead_id: str | int, field_id: str | int, text: str) -> Any:
        """Write `text` into a textarea custom field of a lead."""
        return self.call("PATCH", f"/api/v4/leads/{int(lead_id)}", json={
            "custom_fields_values": [{"field_id": int(field_id), "values": [{"value": text}]}]})

    def run_salesbot(self, bot_id: str | int, lead_id: str | int) -> Any:
        """Launch a Salesbot for a lead (202 = queued)."""
        return self.call("POST", f"/api/v4/bots/{int(bot_id)}/run",
                         json={"entity_id": int(lead_id), "entity_type": "leads"},
                         expect_json=False)

    def get_lead(self, lead_id: str | int) -> dict:
        """A lead with its contacts (`_embedded.contacts[]`)."""
        return self.call("GET", f"/api/v4/leads/{int(lead_id)}", params={"with": "contacts"}) or {}

    def create_lead_textarea_field(self, name: str) -> dict:
        """Create a lead custom field of type textarea (for KOMMO_REPLY_MODE=salesbot)."""
        answer = self.call("POST", "/api/v4/leads/custom_fields",
                           json=[{"type": "textarea", "name": name}]) or {}
        fields = (answer.get("_embedded") or {}).get("custom_fields") or [answer]
        return fields[0]

    # Read-backs: only used when an earlier attempt of a write may have reached Kommo (see
    # whatsapp_resend), never on a first attempt.

    def talk_messages(self, talk_id: str | int, since_at: float,
                      limit: int = READBACK_LIMIT) -> list["KommoWritten"]:
        """The messages of a talk from `since_at` on (`GET /api/v4/talks/{id}/messages`; needs
        the "External chat history" scope, else 403). Kommo's filter is best effort: callers
        check `created_at` themselves."""
        answer = self.call("GET", f"/api/v4/talks/{int(talk_id)}/messages",
                           params={"limit": limit, "filter[created_at][from]": int(since_at)})
        return parse_talk_messages(answer)

    def lead_notes(self, lead_id: str | int, since_at: float,
                   limit: int = READBACK_LIMIT) -> list["KommoWritten"]:
        """The common notes of a lead changed from `since_at` on, newest first
        (`GET /api/v4/leads/{id}/notes`)."""
        answer = self.call("GET", f"/api/v4/leads/{int(lead_id)}/notes",
                           params={"limit": limit, "filter[note_type]": "common",
                                   "filter[updated_at][from]": int(since_at),
                                   "order[updated_at]": "desc"})
        return parse_lead_notes(answer)

    def exchange_token(self, payload: dict) -> dict:
        """POST /oauth2/access_token (authorization_code or refresh_token grant)."""
        return self._request("POST", "/oauth2/access_token", json=payload, auth=False) or {}


def main_contact_id(lead: dict) -> str | None:
    """The main contact id of a lead returned by `get_lead`."""
    contacts = (lead.get("_embedded") or {}).get("contacts") or []
    for contact in contacts:
        if contact.get("is_main"):
            return str(contact["id"])
    return str(contacts[0]["id"]) if contacts else None


# --- read-backs (what is already in Kommo) ------------------------------------------------------

@dataclass(frozen=True)
class KommoWritten:
    """A chat message or a note as Kommo lists it, reduced to what a read-back compares.
    `author_type`: "bot" (Salesbot and API sends), "internal" (a Kommo user), "external"
    (the customer); "" for notes. `created_at` is 0 when Kommo did not say."""

    item_id: str
    direction: str  # "incoming" | "outgoing" | "note"
    author_type: str
    text: str
    created_at: int


def _embedded(answer: Any, key: str) -> list[dict]:
    """`_embedded.<key>` of a Kommo list answer; [] for 204 (None) and for anything else."""
    if not isinstance(answer, dict):
        return []
    items = (answer.get("_embedded") or {}).get(key) if isinstance(answer.get("_embedded"),
                                                                    dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _int_or_zero(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def parse_talk_messages(answer: Any) -> list[KommoWritten]:
    """The messages of `GET /api/v4/talks/{id}/messages` (`_embedded.messages[]`)."""
    out = []
    for m in _embedded(answer, "messages"):
        author = m.get("author") if isinstance(m.get("author"), dict) else {}
        out.append(KommoWritten(item_id=str(m.get("id") or ""),
                                direction=str(m.get("type") or ""),
                                author_type=str(author.get("type") or ""),
                                text=m["text"] if isinstance(m.get("text"), str) else "",
                                created_at=_int_or_zero(m.get("created_at"))))
    return out


def parse_lead_notes(answer: Any) -> list[KommoWritten]:
    """The notes of `GET /api/v4/leads/{id}/notes` (`_embedded.notes[]`, text in
    `params.text`)."""
    out = []
    for n in _embedded(answer, "notes"):
        params = n.get("params") if isinstance(n.get("params"), dict) else {}
        out.append(KommoWritten(item_id=str(n.get("id") or ""), direction="note",
                                author_type="",
                                text=params["text"] if isinstance(params.get("text"), str)
                                else "",
                                created_at=_int_or_zero(n.get("created_at"))))
    return out


# --- inbound webhook parsing ----------------------------------------------------------------

@dataclass(frozen=True)
class KommoAttachment:
    type: str
    link: str
    file_name: str = ""


@dataclass(frozen=True)
class KommoMessage:
    """A chat message from `message[add]` or `outgoing_message[add]`."""

    message_id: str
    direction: str  # "incoming" | "outgoing"
    author_type: str  # "external" (customer) | "internal" (Kommo user) | "bot" | ...
    author_name: str
    author_user_id: str
    contact_id: str
    lead_id: str
    talk_id: str
    chat_id: str
    text: str
    created_at: int
    origin: str
    message_type: str
    attachments: tuple[KommoAttachment, ...] = ()

    @property
    def from_customer(self) -> bool:
        return self.direction == "incoming" and self.author_type == "external"


@dataclass(frozen=True)
class KommoNote:
    """A note added to a lead (`leads[note]`)."""

    note_id: str
    lead_id: str
    text: str
    note_type: str
    created_by: str
    created_at: int


@dataclass(frozen=True)
class KommoIgnored:
    """A part of the webhook we do not act on (recorded so operators can see it)."""

    key: str
    reason: str


@dataclass
class KommoWebhook:
    account_id: str
    account_subdomain: str
    messages: list[KommoMessage] = field(default_factory=list)
    notes: list[KommoNote] = field(default_factory=list)
    ignored: list[KommoIgnored] = field(default_factory=list)


class KommoParseError(ValueError):
    """The body is not a Kommo account webhook."""


_KEY = re.compile(r"^([A-Za-z_]+)((?:\[[^\[\]]*\])*)$")
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
# Kommo sends the same few dozen keys in every webhook; splitting a key (percent-decoding and a
# regex) is most of the parsing time, so split keys are remembered. Bounded in count and key
# size: a flood of made-up keys cannot grow it.
_KEY_PARTS_CACHE: dict[str, tuple[str, ...]] = {}
_KEY_PARTS_CACHE_MAX = 4096
_KEY_CACHED_MAX_CHARS = 200


def key_parts(key: str) -> tuple[str, ...]:
    """Split a PHP-style form key: `message[add][0][text]` → ('message', 'add', '0', 'text').
    Raises KommoParseError on keys that are not of that shape."""
    match = _KEY.match(key)
    if not match:
        raise KommoParseError(f"malformed key {key[:60]!r}")
    return (match.group(1), *_BRACKETS.findall(match.group(2)))


def form_fields(raw: bytes) -> list[tuple[tuple[str, ...], str]]:
    """Decode an `application/x-www-form-urlencoded` body into (key parts, value) pairs, in
    order. Decoding as browsers, werkzeug and `urllib.parse.parse_qsl` do: `&` separates pairs,
    `+` is a space, `%XX` escapes are UTF-8 (invalid bytes replaced), a pair without `=` has an
    empty value, empty pairs are skipped."""
    fields = []
    for chunk in raw.decode("utf-8", "replace").split("&"):
        if not chunk:
            continue
        key, _, value = chunk.partition("=")
        parts = _KEY_PARTS_CACHE.get(key)
        if parts is None:
            parts = key_parts(unquote_plus(key))
            if len(_KEY_PARTS_CACHE) < _KEY_PARTS_CACHE_MAX and len(key) <= _KEY_CACHED_MAX_CHARS:
                _KEY_PARTS_CACHE[key] = parts
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        fields.append((parts, value))
    return fields


def nest_form(fields: Iterable[tuple[tuple[str, ...], str]]) -> dict:
    """Turn (key parts, value) pairs into nested dicts. Raises KommoParseError on keys that
    contradict each other (`a[b]=1` and `a[b][c]=2`)."""
    root: dict = {}
    for parts, value in fields:
        node = root
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise KommoParseError(f"conflicting key {'/'.join(parts)[:60]!r}")
            node = child
        if isinstance(node.get(parts[-1]), dict):
            raise KommoParseError(f"conflicting key {'/'.join(parts)[:60]!r}")
        node[parts[-1]] = value
    return root


def _indexed(block: Any) -> list[tuple[str, dict]]:
    if not isinstance(block, dict):
        return []
    items = [(k, v) for k, v in block.items() if isinstance(v, dict)]
    for key, _ in items:
        if not _is_number(key):
            raise KommoParseError(f"index {key[:20]!r} is not a number")
    return sorted(items, key=lambda kv: int(kv[0]))


def _is_number(text: str) -> bool:
    # str.isdigit() also accepts "²", which int() refuses.
    return text.isascii() and text.isdigit()


_MAX_EPOCH = 4_102_444_800  # 2100-01-01: anything later is not a Kommo timestamp


def _str(item: dict, key: str) -> str:
    """A scalar field; a nested value where Kommo sends a string means a forged body."""
    value = item.get(key, "")
    if isinstance(value, dict):
        raise KommoParseError(f"field {key!r} must be a value, not a structure")
    return value


def _epoch(item: dict, key: str) -> int:
    text = _str(item, key).strip()
    if not text:
        return 0
    if not _is_number(text) or int(text) > _MAX_EPOCH:
        raise KommoParseError(f"field {key!r} is not a Unix timestamp")
    return int(text)


def _message(item: dict, default_direction: str) -> KommoMessage:
    author = item.get("author") if isinstance(item.get("author"), dict) else {}
    attachments = []
    att = item.get("attachment")
    if isinstance(att, dict) and att.get("link"):
        attachments.append(KommoAttachment(type=_str(att, "type") or "file",
                                           link=_str(att, "link"),
                                           file_name=_str(att, "file_name") or _str(att, "name")))
    lead_id = ""
    if _str(item, "entity_type") in ("lead", "leads", "") or _str(item, "element_type") == "2":
        lead_id = _str(item, "entity_id") or _str(item, "element_id")
    return KommoMessage(
        message_id=_str(item, "id"), direction=_str(item, "type") or default_direction,
        author_type=_str(author, "type"), author_name=_str(author, "name"),
        author_user_id=_str(author, "user_id"), contact_id=_str(item, "contact_id"),
        lead_id=lead_id, talk_id=_str(item, "talk_id"), chat_id=_str(item, "chat_id"),
        text=_str(item, "text"), created_at=_epoch(item, "created_at"),
        origin=_str(item, "origin"),
        message_type=_str(item, "message_type") or (attachments[0].type if attachments
                                                     else "text"),
        attachments=tuple(attachments))


def parse_kommo_webhook(raw: bytes) -> KommoWebhook:
    """Parse a Kommo account webhook body (`application/x-www-form-urlencoded` bytes).

    Returns every chat message (`message[add]`, Kommo's documented variant without the `message`
    wrapper, and `outgoing_message[add]`), every lead note, and what was ignored. Raises
    KommoParseError when the body is not a Kommo webhook at all.
    """
    data = nest_form(form_fields(raw))
    if not data:
        raise KommoParseError("empty body")
    account = data.get("account") if isinstance(data.get("account"), dict) else {}
    hook = KommoWebhook(account_id=str(account.get("id", "")),
                        account_subdomain=str(account.get("subdomain", "")))
    for entity, block in data.items():
        if entity == "account":
            continue
        if not isinstance(block, dict):
            hook.ignored.append(KommoIgnored(entity, "not an entity block"))
            continue
        if entity in ("message", "outgoing_message") or (entity == "add" and _looks_like_message(block)):
            actions = {"add": block} if entity == "add" else block
            direction = "outgoing" if entity == "outgoing_message" else "incoming"
            for action, items in actions.items():
                if action != "add":
                    hook.ignored.append(KommoIgnored(f"{entity}[{action}]", "action not handled"))
                    continue
                for _, item in _indexed(items):
                    hook.messages.append(_message(item, direction))
            continue
        if entity == "leads" and "note" in block:
            for _, wrapper in _indexed(block["note"]):
                note = wrapper.get("note") if isinstance(wrapper.get("note"), dict) else wrapper
                hook.notes.append(KommoNote(
                    note_id=_str(note, "id"), lead_id=_str(note, "element_id"),
                    text=_str(note, "text"), note_type=_str(note, "note_type"),
                    created_by=_str(note, "created_by"), created_at=_epoch(note, "created_at")))
            for action in block:
                if action != "note":
                    hook.ignored.append(KommoIgnored(f"leads[{action}]", "event not handled"))
            continue
        for action in block:
            hook.ignored.append(KommoIgnored(f"{entity}[{action}]", "event not handled"))
    if not account and not hook.messages and not hook.notes:
        raise KommoParseError("no account block and no message")
    return hook


def _looks_like_message(block: dict) -> bool:
    return any(isinstance(v, dict) and "chat_id" in v for v in block.values())
