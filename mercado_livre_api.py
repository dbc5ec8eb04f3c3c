"""Everything about Mercado Livre's wire format, both ways.

Owns: `MercadoLivreClient` (questions, answers, items, users, orders, packs, post-sale messages,
attachments, OAuth token calls), `MercadoLivreError`, and pure helpers: `parse_notification`,
`parse_pack_resource`, `authorization_url`, `split_message`, the messaging-agent ids and the
blocked-conversation substatuses in words.
Must not: import db_manager, outbox, flask or another peer module; decide what to do with a failure
(that is meli_jobs). The access token comes from a `token_source` object supplied by the caller.
"""
from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from peer_http import PeerClient, PeerError, SharedRateLimiter, shared_limiter

# Mercado Livre's AI messaging agents (2026): for MLB/MLC post-sale replies go `to` this id.
AGENT_IDS = {
    "MLC": 3020819166, "MCO": 3037204123, "MLM": 3037204279, "MLA": 3037674934,
    "MLB": 3037675074, "MLU": 3037204685,
}
AGENT_MEDIATED_SITES = ("MLB", "MLC")

AUTH_HOSTS = {
    "MLA": "https://auth.mercadolibre.com.ar", "MLB": "https://auth.mercadolivre.com.br",
    "MCO": "https://auth.mercadolibre.com.co", "MLM": "https://auth.mercadolibre.com.mx",
    "MLU": "https://auth.mercadolibre.com.uy", "MLC": "https://auth.mercadolibre.cl",
    "MEC": "https://auth.mercadolibre.com.ec", "MPE": "https://auth.mercadolibre.com.pe",
}

# Each messaging pool (GETs; POST/PUTs) allows 500 calls a minute (reference §2.1).
MESSAGING_CALLS_PER_MINUTE = 500
ANSWER_MAX_CHARS = 2000
SELLER_MESSAGE_MAX_CHARS = 350
ATTACHMENT_MAX_BYTES = 25 * 1024 * 1024
ATTACHMENT_TYPES = {"image/jpeg": "jpg", "image/png": "png", "application/pdf": "pdf",
                    "text/plain": "txt"}
ATTACHMENT_EXTENSIONS = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png",
                         "pdf": "application/pdf", "txt": "text/plain"}

BLOCKED_SUBSTATUS_PT = {
    "blocked_by_time": "a conversa expirou por tempo (o comprador precisa escrever de novo)",
    "blocked_by_buyer": "o comprador bloqueou a conversa",
    "blocked_by_mediation": "há uma mediação em andamento",
    "blocked_by_mediation_fbm": "há uma mediação em andamento (Full)",
    "blocked_by_fulfillment": "venda Full ainda não entregue",
    "blocked_by_payment": "o pagamento ainda não foi concluído",
    "blocked_by_conversation_initiated_by_seller": "o vendedor não pode iniciar esta conversa",
    "blocked_by_conversation_use_message_api": "a conversa foi iniciada pelo guia de ações",
    "blocked_by_conversation_initiated_by_seller_limited":
        "é preciso escolher um motivo de contato no Mercado Livre",
    "blocked_by_cancelled_order": "a venda foi cancelada",
    "blocked_by_cancelled_order_by_fraud": "a venda foi cancelada por suspeita de fraude",
    "blocked_by_cancelled_order_hidden": "a venda foi cancelada",
    "blocked_by_conversation_expired": "a conversa expirou (mais de 18 meses)",
    "blocked_by_refund": "a venda foi reembolsada",
    "blocked_by_claim_change_closed": "a reclamação de troca foi encerrada",
    "blocked_by_claim_change_open": "há uma reclamação de troca aberta",
    "blocked_by_deactivated_account": "a conta do comprador foi desativada",
    "blocked_by_restrictions": "há restrições na conta",
    "blocked_by_message_pending_review": "há uma mensagem em revisão pelo Mercado Livre",
    "blocked_by_return_to_buyer_fulfillment": "devolução ao comprador em andamento (Full)",
    "blocked_by_ai_assistant": "a conversa está com o agente de IA do Mercado Livre",
    "blocked_by_ai_assistant_expired":
        "o prazo de 48 horas úteis do agente de IA do Mercado Livre expirou",
    "blocked_by_ai_assistant_contact_closed": "o agente de IA do Mercado Livre encerrou o contato",
    "block_by_ai_assistant_initiated_by_seller_expired":
        "o prazo do contato iniciado pelo vendedor expirou",
    "blocked_by_resale": "venda de revenda",
    "blocked_by_proximity_groceries": "venda de supermercado por proximidade",
    "blocked_by_guest_shops": "compra como convidado",
}


# The token source's own refusals: a refresh cannot help until the seller authorizes again.
NO_REFRESH_CODES = ("disconnected", "not_connected")


class MercadoLivreError(PeerError):
    """A failed call to Mercado Livre; `code` is its machine error (`invalid_grant`, ...)."""

    peer = "mercadolivre"

    def __init__(self, status, detail, retryable, retry_after_seconds=None, body=None,
                 code: str = ""):
        super().__init__(status, detail, retryable, retry_after_seconds, body)
        self.code = code or _error_code(body)


def _error_code(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "code"):
            if isinstance(body.get(key), str) and body[key]:
                # messaging errors put the useful word in `message` ("blocked_conversation_...")
                if body[key] in ("forbidden", "bad_request") and isinstance(body.get("message"),
                                                                             str):
                    return body["message"]
                return body[key]
        if isinstance(body.get("message"), str):
            return body["message"]
    return ""


def _before_resending(token_call, *args):
    """The token refresh between a 401 and the retry: if it fails (its own POST timed out, say),
    the retry never left. (A token call before the first send is peer_http's.)"""
    try:
        return token_call(*args)
    except PeerError as exc:
        exc.may_have_reached = False
        raise


class TokenSource(Protocol):
    """Where the client gets its access token (meli_auth implements it over the database)."""

    def access_token(self) -> str: ...

    def refresh(self, stale_access_token: str) -> str: ...


# What the bridge reads and shows of an item.
ITEM_FIELDS = ("id", "title", "price", "currency_id", "permalink", "thumbnail",
               "secure_thumbnail", "status")
# What an AI answering a question reads of an item (its description comes apart).
AI_ITEM_FIELDS = ("id", "title", "price", "currency_id", "available_quantity", "permalink",
                  "status", "condition", "attributes")


class MercadoLivreClient(PeerClient):
    """Thin client of api.mercadolibre.com. A 401 asks the token source for a fresh token once."""

    peer = "mercadolivre"
    error_class = MercadoLivreError

    def __init__(self, base_url: str, *, client_id: str = "", client_secret: str = "",
                 seller_id: str = "", site_id: str = "MLB",
                 token_source: TokenSource | None = None, timeout_seconds: float = 15.0,
                 messaging_rpm: int = MESSAGING_CALLS_PER_MINUTE, session=None,
                 rate_limit_path: str = "", clock=time.time,
                 max_block_seconds: float | None = None):
        # No published number outside messaging: the general pool only honours 429s.
        super().__init__(base_url, timeout_seconds=timeout_seconds, session=session,
                         rate_limit_path=rate_limit_path, clock=clock,
                         max_block_seconds=max_block_seconds)
        self.client_id = str(client_id)
        self.client_secret = client_secret
        self.seller_id = str(seller_id)
        self.site_id = site_id or "MLB"
        self.token_source = token_source
        # Only messaging has a published limit: GETs share 500 a minute, POST/PUTs another 500
        # (reference §2.1), for the whole application, so for every process of ponte.
        self.messaging_limiters = {
            kind: shared_limiter(rate_limit_path, f"mercadolivre-messages-{kind}",
                                 int(messaging_rpm), 60.0, block_clock=clock)
            for kind in ("read", "write")}
        self._current_token = ""

    # --- plumbing -------------------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        if self.token_source is None:
            return {}
        self._current_token = self.token_source.access_token()
        return {"Authorization": f"Bearer {self._current_token}"}

    def _limiter_for(self, method: str, path: str) -> SharedRateLimiter:
        if path.startswith("/messages"):
            return self.messaging_limiters["read" if method.upper() in ("GET", "HEAD")
                                           else "write"]
        return self.limiter

    def _request(self, method: str, path: str, **kwargs) -> Any:
        try:
            return super()._request(method, path, **kwargs)
        except MercadoLivreError as exc:
            if exc.status != 401 or not kwargs.get("auth", True) or self.token_source is None \
                    or exc.code in NO_REFRESH_CODES:
                raise
            _before_resending(self.token_source.refresh, self._current_token)
            return super()._request(method, path, **kwargs)

    def _error_from_response(self, response) -> PeerError:
        err = super()._error_from_response(response)
        code = _error_code(err.body)
        retryable = err.retryable
        if response.status_code == 401:
            retryable = True  # the token is refreshed and the job tried again
        return MercadoLivreError(err.status, err.detail, retryable, err.retry_after_seconds,
                                 err.body, code=code)

    # --- questions ------------------------------------------------------------------------------

    def search_questions(self, status: str = "UNANSWERED", offset: int = 0,
                         limit: int = 50, newest_first: bool = False) -> dict:
        """One page of the seller's questions by creation date, oldest first unless
        `newest_first` (api_version=4)."""
        params = {"seller_id": self.seller_id, "status": status, "api_version": 4,
                  "sort_fields": "date_created", "sort_types": "DESC" if newest_first else "ASC",
                  "limit": limit, "offset": offset}
        return self._request("GET", "/questions/search", params=params) or {}

    def get_question(self, question_id: int | str) -> dict:
        """One question (api_version=4)."""
        return self._request("GET", f"/questions/{int(question_id)}",
                             params={"api_version": 4}) or {}

    def answer_question(self, question_id: int | str, text: str) -> dict:
        """Publish the answer to a question (≤ 2,000 characters)."""
        return self._request("POST", "/answers",
                             json={"question_id": int(question_id), "text": text}) or {}

    # --- items, users, orders -------------------------------------------------------------------

    def get_item(self, item_id: str) -> dict:
        """An item's title, price, link and thumbnail."""
        return self._request("GET", f"/items/{item_id}",
                             params={"attributes": ",".join(ITEM_FIELDS)}) or {}

    def get_items(self, item_ids: list[str]) -> dict[str, dict]:
        """Multiget (≤ 20 ids a call); returns {item_id: item} for the ids found."""
        out: dict[str, dict] = {}
        ids = list(dict.fromkeys(i for i in item_ids if i))
        for start in range(0, len(ids), 20):
            chunk = ids[start:start + 20]
            rows = self._request("GET", "/items", params={
                "ids": ",".join(chunk), "attributes": ",".join(ITEM_FIELDS)}) or []
            for row in rows:
                body = row.get("body") if isinstance(row, dict) and "body" in row else row
                if isinstance(body, dict) and body.get("id") and row.get("code", 200) == 200:
                    out[body["id"]] = body
        return out

    def get_item_details(self, item_id: str) -> dict:
        """What an AI answering a question reads of an item: AI_ITEM_FIELDS."""
        return self._request("GET", f"/items/{item_id}",
                             params={"attributes": ",".join(AI_ITEM_FIELDS)}) or {}

    def get_item_description(self, item_id: str) -> str:
        """The item's description as plain text ('' when it has none)."""
        try:
            body = self._request("GET", f"/items/{item_id}/description") or {}
        except MercadoLivreError as exc:
            if exc.status == 404:
                return ""
            raise
        return str(body.get("plain_text") or body.get("text") or "") if isinstance(body, dict) \
            else ""

    def search_buyer_questions(self, item_id: str, buyer_id: int | str,
                               limit: int = 50) -> list[dict]:
        """One buyer's questions on one item, oldest first (`item` + `from` filters)."""
        params = {"item": item_id, "from": buyer_id, "api_version": 4,
                  "sort_fields": "date_created", "sort_types": "ASC", "limit": limit}
        return list((self._request("GET", "/questions/search", params=params) or {})
                    .get("questions") or [])

    def get_user(self, user_id: int | str) -> dict:
        """A user's public profile (nickname)."""
        return self._request("GET", f"/users/{int(user_id)}") or {}

    def get_order(self, order_id: int | str) -> dict:
        """One order."""
        return self._request("GET", f"/orders/{int(order_id)}") or {}

    def get_pack(self, pack_id: int | str) -> dict:
        """One pack (its orders and buyer)."""
        return self._request("GET", f"/packs/{int(pack_id)}") or {}

    # --- post-sale messages ---------------------------------------------------------------------

    def unread_messages(self) -> dict:
        """Conversations with unread buyer messages (`role=seller` is mandatory)."""
        return self._request("GET", "/messages/unread",
                             params={"role": "seller", "tag": "post_sale"}) or {}

    def get_pack_messages(self, pack_id: int | str, offset: int = 0, limit: int = 50,
                          mark_as_read: bool = False) -> dict:
        """One page of a sale's conversation. `pack_id` may be an order id (pack_id null)."""
        params: dict[str, Any] = {"tag": "post_sale", "limit": limit, "offset": offset}
        if not mark_as_read:
            params["mark_as_read"] = "false"
        return self._request("GET", f"/messages/packs/{pack_id}/sellers/{self.seller_id}",
                             params=params) or {}

    def get_message(self, message_id: str) -> dict:
        """One post-sale message (the `resource` of a `messages` notification)."""
        return self._request("GET", f"/messages/{message_id}", params={"tag": "post_sale"}) or {}

    def send_pack_message(self, pack_id: int | str, to_user_id: int | str, text: str,
                          attachment_ids: list[str] | None = None) -> dict:
        """Reply in a sale's conversation (≤ 350 characters)."""
        body: dict[str, Any] = {"from": {"user_id": self.seller_id},
                                "to": {"user_id": str(to_user_id)}, "text": text}
        if attachment_ids:
            body["attachments"] = list(attachment_ids)
        return self._request("POST", f"/messages/packs/{pack_id}/sellers/{self.seller_id}",
                             params={"tag": "post_sale"}, json=body) or {}

    def upload_attachment(self, filename: str, data: bytes, content_type: str) -> str:
        """Upload a file for a post-sale message; returns its attachment id."""
        body = self._request("POST", "/messages/attachments",
                             params={"tag": "post_sale", "site_id": self.site_id},
                             files={"file": (filename, data, content_type)},
                             timeout_seconds=max(self.timeout_seconds, 60))
        if not isinstance(body, dict) or not body.get("id"):
            raise MercadoLivreError(None, "attachment upload answered without id", True)
        return str(body["id"])

    def download_attachment(self, attachment_id: str) -> tuple[bytes, str]:
        """The bytes of a buyer's attachment and the Content-Type the server gave."""
        response = self._request("GET", f"/messages/attachments/{attachment_id}",
                                 params={"tag": "post_sale", "site_id": self.site_id},
                                 expect_json=False, timeout_seconds=max(self.timeout_seconds, 60))
        return response.content, response.headers.get("Content-Type", "")

    def download_public(self, url: str, max_bytes: int = 2 * 1024 * 1024) -> tuple[bytes, str]:
        """A public file (item thumbnail) without our token; refuses files over `max_bytes`."""
        response = super()._request("GET", url, auth=False, expect_json=False, stream=True)
        data = response.raw.read(max_bytes + 1, decode_content=True)
        response.close()
        if len(data) > max_bytes:
            raise MercadoLivreError(413, "public file too large", False)
        return data, response.headers.get("Content-Type", "")

    # --- OAuth ----------------------------------------------------------------------------------

    def exchange_code(self, code: str, redirect_uri: str, code_verifier: str = "") -> dict:
        """Trade an authorization code for the token pair."""
        form = {"grant_type": "authorization_code", "client_id": self.client_id,
                "client_secret": self.client_secret, "code": code, "redirect_uri": redirect_uri}
        if code_verifier:
            form["code_verifier"] = code_verifier
        return self._token_call(form)

    def refresh_token(self, refresh_token: str) -> dict:
        """Trade the (single-use) refresh token for a new pair."""
        return self._token_call({"grant_type": "refresh_token", "client_id": self.client_id,
                                 "client_secret": self.client_secret,
                                 "refresh_token": refresh_token})

    def _token_call(self, form: dict) -> dict:
        try:
            body = super()._request("POST", "/oauth/token", data=form, auth=False,
                                    headers={"Accept": "application/json"})
        except MercadoLivreError as exc:
            if exc.code in ("invalid_grant", "invalid_client", "unauthorized_client",
                            "unauthorized_application", "invalid_scope"):
                exc.retryable = False
            raise
        if not isinstance(body, dict) or not body.get("access_token"):
            raise MercadoLivreError(None, "token answer without access_token", True)
        return body


# --- pure helpers -------------------------------------------------------------------------------

def auth_base_url(site_id: str, override: str = "") -> str:
    """The authorization page host of a site (ML_AUTH_BASE_URL wins when set)."""
    return (override or AUTH_HOSTS.get((site_id or "MLB").upper(), AUTH_HOSTS["MLB"])).rstrip("/")


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge)."""
    verifier = secrets.token_urlsafe(48)[:96]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge.decode().rstrip("=")


def authorization_url(auth_base: str, client_id: str, redirect_uri: str, state: str,
                      code_challenge: str = "") -> str:
    """The URL that sends the seller to Mercado Livre's consent page."""
    params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
              "state": state}
    if code_challenge:
        params.update(code_challenge=code_challenge, code_challenge_method="S256")
    return f"{auth_base.rstrip('/')}/authorization?{urllib.parse.urlencode(params)}"


@dataclass(frozen=True)
class MLNotification:
    """A Mercado Livre notification we act on. `resource_id` is the question id, message id or
    order id, already extracted from `resource`."""

    notification_id: str
    topic: str
    resource: str
    resource_id: str
    user_id: str
    sent: str


# [0-9], not \d: \d matches any Unicode digit, and int("１２") is 12 — another question's id.
_TOPICS = {"questions": r"^/questions/([0-9]{1,19})\Z", "orders_v2": r"^/orders/([0-9]{1,19})\Z",
           "orders": r"^/orders/([0-9]{1,19})\Z",
           "messages": r"^/?(?:messages/)?([0-9a-fA-F]{8,64})\Z"}


def parse_notification(body: Any) -> MLNotification | None:
    """Parse a notification POST; None for topics we ignore or malformed bodies."""
    if not isinstance(body, dict):
        return None
    topic = str(body.get("topic") or "")
    resource = str(body.get("resource") or "").strip()
    pattern = _TOPICS.get(topic)
    if not pattern:
        return None
    match = re.match(pattern, resource)
    if not match:
        return None
    notification_id = str(body.get("_id") or body.get("id") or "")
    if not notification_id:
        notification_id = hashlib.sha256(
            f"{topic}|{resource}|{body.get('sent')}".encode()).hexdigest()[:32]
    return MLNotification(notification_id=notification_id,
                          topic="orders_v2" if topic == "orders" else topic,
                          resource=resource, resource_id=match.group(1),
                          user_id=str(body.get("user_id") or ""), sent=str(body.get("sent") or ""))


def parse_pack_resource(resource: str) -> tuple[str, str] | None:
    """`/packs/{pack}/sellers/{seller}` (or `/seller/`, or with `/conversations/...`) →
    (pack_id, seller_id)."""
    match = re.match(r"^/?packs/([0-9]+)/sellers?/([0-9]+)", resource or "")
    return (match.group(1), match.group(2)) if match else None


def pack_id_of_message(message: dict) -> str | None:
    """The pack (or order) id a message belongs to, from `message_resources`."""
    for res in message.get("message_resources") or []:
        if res.get("name") in ("packs", "orders") and res.get("id"):
            return str(res["id"])
    return None


def buyer_id_of_question(question: dict) -> str:
    """The asker: `from.id`, or `buyer_id` in the by-id v4 shape."""
    return str((question.get("from") or {}).get("id") or question.get("buyer_id") or "")


def is_agent_mediated(pack_page: dict, site_id: str) -> bool:
    """True when the conversation goes through Mercado Livre's AI messaging agent."""
    path = str((pack_page.get("conversation_status") or {}).get("path") or "")
    if "/conversations/" in path:
        return True
    agent = AGENT_IDS.get(site_id)
    return any(str((m.get("from") or {}).get("user_id")) == str(agent)
               for m in pack_page.get("messages") or [])


def reply_recipient(messages: list[dict], seller_id: str, site_id: str,
                    buyer_id: str = "") -> str:
    """Who a seller reply goes `to`: the sender of the latest non-seller message (the agent when
    mediated, else the buyer); without one, the agent on MLB/MLC, else the buyer."""
    for m in sorted(messages, key=message_sort_key, reverse=True):
        sender = str((m.get("from") or {}).get("user_id") or "")
        if sender and sender != str(seller_id):
            return sender
    if site_id in AGENT_MEDIATED_SITES or not buyer_id:
        return str(AGENT_IDS.get(site_id) or buyer_id)
    return str(buyer_id)


def parse_date(raw) -> datetime | None:
    """A Mercado Livre ISO date ("Z" or an offset, often -04:00; none means UTC) as an aware
    datetime, or None when it is missing or not a date."""
    try:
        moment = datetime.fromisoformat(str(raw or "").replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def question_sort_key(question: dict) -> tuple:
    """Questions sort by creation instant (their dates carry local offsets), then id."""
    moment = parse_date(question.get("date_created"))
    return (moment.timestamp() if moment else 0.0), int(question.get("id") or 0)


def message_sort_key(message: dict) -> str:
    """Messages sort by creation time (UTC ISO strings compare in order), then id."""
    dates = message.get("message_date") or {}
    return f"{dates.get('created') or dates.get('received') or message.get('date_created') or ''}" \
           f"|{message.get('id', '')}"


def split_message(text: str, limit: int = SELLER_MESSAGE_MAX_CHARS) -> list[str]:
    """Split `text` into ordered parts of at most `limit` characters, at paragraph, sentence or
    word boundaries when possible."""
    text = text.strip()
    parts: list[str] = []
    while len(text) > limit:
        window = text[:limit + 1]
        cut = -1
        for sep in ("\n\n", "\n", ". ", "! ", "? ", "; ", ", ", " "):
            pos = window.rfind(sep, 0, limit)
            if pos >= limit // 3:
                cut = pos + (len(sep.rstrip()) if sep.strip() else 0)
                break
        if cut <= 0:
            cut = limit
        parts.append(text[:cut].strip())
        text = text[cut:].strip()
    if text:
        parts.append(text)
    return parts


_TYPOGRAPHY = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'",
                             "\u2019": "'", "\u2013": "-", "\u2014": "-", "\u2022": "-",
                             "\u2026": "...", "\u00a0": " ", "\u2009": " ", "\u200b": ""})


def message_text(message: dict) -> str:
    """The text of a post-sale message (`text` is a string, or `{"plain": ...}` in the older
    shape)."""
    text = message.get("text") or ""
    return (text.get("plain") or "") if isinstance(text, dict) else str(text)


def plain_post_sale_text(text: str) -> str:
    """Post-sale messages accept ISO-8859-1 plus some emoji: replace the typographic characters
    editors insert (curly quotes, dashes, ellipsis, bullets) by their plain forms."""
    return text.translate(_TYPOGRAPHY)


def attachment_mime(filename: str, declared: str = "") -> str | None:
    """The MIME type Mercado Livre accepts for this file, or None when it does not accept it."""
    declared = (declared or "").split(";")[0].strip().lower()
    if declared == "image/jpg":
        declared = "image/jpeg"
    if declared in ATTACHMENT_TYPES:
        return declared
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if not declared or declared in ("application/octet-stream", "binary/octet-stream"):
        return ATTACHMENT_EXTENSIONS.get(ext)
    return None
