"""Everything about the n8n side: the request we send to the seller's workflow and the answers
it gives back.

Owns: `N8nClient.send()` (POST to `N8N_WEBHOOK_URL` with `Authorization: Bearer N8N_API_KEY` and
an `Idempotency-Key` header stable across the retries of one burst),
`N8nError`, `extract_answer()` for synchronous answers ("Respond to Webhook") and
`parse_send_response()` for asynchronous ones (`POST /send-response`).
Must not: import db_manager, outbox, flask or another peer module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from peer_http import PeerClient, PeerError

IDEMPOTENCY_HEADER = "Idempotency-Key"
ANSWER_KEYS = ("output", "answer", "text", "response", "response_text", "message")
# What n8n itself answers when the workflow does not (Webhook "onReceived" mode, or a last node
# without data): status words, never something to send to a customer.
N8N_STATUS_MESSAGES = ("Workflow was started", "Workflow got started",
                       "Workflow executed successfully")


class N8nError(PeerError):
    """A failed call to the n8n workflow."""

    peer = "n8n"


class N8nClient(PeerClient):
    """Calls the seller's n8n workflow webhook."""

    peer = "n8n"
    error_class = N8nError

    def __init__(self, webhook_url: str, api_key: str, timeout_seconds: float = 60.0,
                 session=None, max_block_seconds: float | None = None):
        super().__init__(webhook_url, timeout_seconds=timeout_seconds, session=session,
                         max_block_seconds=max_block_seconds)
        self.api_key = api_key

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _error_from_response(self, response) -> PeerError:
        error = super()._error_from_response(response)
        # 404: workflow inactive or path wrong — the seller can fix it, so keep retrying
        # (bounded by the outbox) instead of dropping the customer's message.
        if response.status_code in (404,) or response.status_code >= 500:
            error.retryable = True
        return error

    def send(self, body: dict, idempotency_key: str | None = None) -> Any:
        """POST `body` to the workflow; returns its decoded answer (dict, list, str or None).
        `idempotency_key` (the same on every retry of one burst) goes in the
        `Idempotency-Key` header, so a workflow can tell a repeat from a new question."""
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key else None
        return self._request("POST", "", json=body, headers=headers)


def extract_answer(answer: Any) -> list[str] | None:
    """The texts of a synchronous n8n answer: a string, or a list of strings (several
    messages), under one of ANSWER_KEYS, at the top level or in a one-item list. None when the
    workflow answered nothing (it will call /send-response later)."""
    if isinstance(answer, list):
        if answer and all(isinstance(a, str) for a in answer):
            return [a for a in answer if a.strip()] or None
        if len(answer) == 1:
            answer = answer[0]
        else:
            texts = [t for item in answer for t in (extract_answer(item) or [])]
            return texts or None
    if isinstance(answer, str):
        return [answer] if answer.strip() else None
    if not isinstance(answer, dict):
        return None
    if set(answer) == {"message"} and isinstance(answer["message"], str) and \
            answer["message"].startswith(N8N_STATUS_MESSAGES):
        return None
    for key in ANSWER_KEYS:
        value = answer.get(key)
        texts = _texts(value)
        if texts:
            return texts
        if isinstance(value, dict):
            nested = extract_answer(value)
            if nested:
                return nested
    return None


def _texts(value: Any) -> list[str]:
    """A non-blank string as one text, or the non-blank strings of a list; else []."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


@dataclass(frozen=True)
class N8nAsyncAnswer:
    """An answer posted by the workflow to `/send-response`."""

    conversation_id: str
    contact_id: str
    texts: tuple[str, ...]
    should_send: bool
    should_handoff: bool
    correlation_id: str


def _truthy(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "sim")
    return bool(value)


def parse_send_response(body: Any) -> N8nAsyncAnswer:
    """Validate a `/send-response` body. Raises ValueError with a pt-BR message when it cannot
    be used (no target, or no text while `should_send` is true)."""
    if not isinstance(body, dict):
        raise ValueError("o corpo precisa ser um objeto JSON")
    conversation_id = str(body.get("conversation_id") or "").strip()
    contact_id = str(body.get("contact_id") or "").strip()
    if not conversation_id and not contact_id:
        raise ValueError("informe conversation_id ou contact_id")
    # The documented key first, then whatever a synchronous answer may use (nested included).
    texts = _texts(body.get("response_text")) or extract_answer(body) or []
    should_send = _truthy(body.get("should_send"), True)
    should_handoff = _truthy(body.get("should_handoff"), False)
    if should_send and not texts and not should_handoff:
        wrong = next((k for k in ANSWER_KEYS if body.get(k) is not None
                      and not isinstance(body[k], (str, list, dict))), None)
        if wrong:
            raise ValueError(f"{wrong} deve ser um texto ou uma lista de textos")
        raise ValueError("response_text vazio")
    correlation_id = str(body.get("correlation_id") or body.get("bridge_correlation_id") or "")
    return N8nAsyncAnswer(conversation_id, contact_id, tuple(texts), should_send,
                          should_handoff, correlation_id)
