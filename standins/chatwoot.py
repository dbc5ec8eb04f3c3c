"""A stateful stand-in for a Chatwoot account's Application API (API-channel inboxes), for tests,
the demo and the benchmark. It follows ../shared/reference/chatwoot.md (v4.13 shapes): contacts
(unique identifier → 422), contact inboxes, conversations (display ids), messages as JSON or
multipart `attachments[]`, message lists like Chatwoot's MessageFinder (the latest 20, or the 20
before `?before=<id>`), message status PATCH, labels and custom attributes (both replace),
toggle_status, and attachment `data_url`s (file name URL-encoded, as Rails writes it) that
redirect to the stored bytes.

Every request body is validated against Chatwoot's OpenAPI spec (shared/reference/
chatwoot-openapi.json) when the file is present; a request that does not match is refused with
422 and listed in `/_standin/state` under `spec_violations`.

`/_standin/...` endpoints configure inboxes, simulate an agent reply (building the signed
`message_created` webhook Chatwoot would send, and optionally delivering it) or an agent deleting
a message (`message_updated` with `content_attributes.deleted`), and show state.
Must not: be imported by ponte's production modules.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import os
import re
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone

from flask import Flask, Response, g, jsonify, redirect, request

from standins.failures import add_rule, answer_after_apply, next_failure

DEFAULT_TOKEN = "standin-chatwoot-token"
DEFAULT_ACCOUNT = 1
MESSAGE_TYPES = {"incoming": 0, "outgoing": 1, "activity": 2, "template": 3}
MESSAGE_TYPE_NAMES = {v: k for k, v in MESSAGE_TYPES.items()}
SPEC_CANDIDATES = (
    os.environ.get("CHATWOOT_OPENAPI_PATH", ""),
    # Chatwoot v4.15.1's swagger.json (MIT), kept beside this file; see tests/fixtures/README.md
    os.path.join(os.path.dirname(__file__), "chatwoot-openapi.json"),
)
# The spec lacks the message status update that the server has (README-specs.md).
PATCH_MESSAGE_SCHEMA = {"type": "object", "required": ["status"], "additionalProperties": False,
                        "properties": {"status": {"enum": ["sent", "delivered", "read", "failed"]},
                                       "external_error": {"type": "string"}}}


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts or time.time(), timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class SpecValidator:
    """Validates request bodies against the OpenAPI document's `requestBody` schemas."""

    def __init__(self, path: str | None = None):
        self.spec = None
        for candidate in ([path] if path else []) + list(SPEC_CANDIDATES):
            if candidate and os.path.exists(candidate):
                with open(candidate, encoding="utf-8") as fh:
                    self.spec = json.load(fh)
                self.path = candidate
                break
        self.routes = []
        if self.spec:
            for template, ops in self.spec["paths"].items():
                regex = "^" + re.sub(r"\\\{[^}]+\\\}", r"[^/]+", re.escape(template)) + "$"
                self.routes.append((re.compile(regex), template, ops))
            self.routes.sort(key=lambda r: r[1].count("{"))  # literal segments win

    @property
    def available(self) -> bool:
        return self.spec is not None

    def operation(self, method: str, path: str):
        """(template, operation) for a request, or (None, None) when the spec lacks it."""
        for regex, template, ops in self.routes:
            if regex.match(path) and method.lower() in ops:
                return template, ops[method.lower()]
        return None, None

    def validate(self, method: str, path: str, content_type: str, body) -> list[str]:
        """Problems with this request body (empty list when it matches)."""
        if not self.available:
            return []
        import jsonschema  # a dev dependency: only needed when a spec is there to check
        if method == "PATCH" and re.match(r"^/api/v1/accounts/[^/]+/conversations/[^/]+/"
                                          r"messages/[^/]+$", path):
            schema = PATCH_MESSAGE_SCHEMA
        else:
            template, op = self.operation(method, path)
            if op is None:
                return [f"{method} {path}: operation not in the OpenAPI spec"]
            if method in ("GET", "DELETE") or "requestBody" not in op:
                return []
            media = "multipart/form-data" if content_type.startswith("multipart/") \
                else "application/json"
            content = op["requestBody"].get("content", {})
            if media not in content:
                return [f"{method} {template}: media type {media} not in the spec"]
            schema = {"components": self.spec["components"], **content[media]["schema"]}
        validator = jsonschema.Draft202012Validator(schema)
        return [f"{method} {path}: {e.message} at {list(e.absolute_path)}"
                for e in validator.iter_errors(body)]


class State:
    """Everything the stand-in knows."""

    def __init__(self):
        self.lock = threading.RLock()
        self.reset()

    def reset(self):
        self.token = DEFAULT_TOKEN
        self.account_id = DEFAULT_ACCOUNT
        self.inboxes = {7: {"id": 7, "name": "Mercado Livre - Perguntas", "webhook_url": "",
                            "secret": "standin-webhook-secret", "channel_type": "Channel::Api"},
                        8: {"id": 8, "name": "Mercado Livre - Vendas", "webhook_url": "",
                            "secret": "standin-webhook-secret", "channel_type": "Channel::Api"}}
        self.contacts: dict[int, dict] = {}
        self.contact_inboxes: list[dict] = []
        self.conversations: dict[int, dict] = {}
        self.messages: dict[int, dict] = {}
        self.blobs: dict[str, dict] = {}
        self.requests: list[dict] = []
        self.spec_violations: list[str] = []
        self.failures: list[dict] = []
        self.contact_ids = itertools.count(321)
        self.conversation_ids = itertools.count(42)
        self.message_ids = itertools.count(9870)
        self.attachment_ids = itertools.count(555)
        self.contact_inbox_ids = itertools.count(455)


def create_app(spec_path: str | None = None) -> Flask:
    """The stand-in Chatwoot as a Flask app."""
    app = Flask("standin_chatwoot")
    state = State()
    spec = SpecValidator(spec_path)
    app.config["STANDIN_STATE"] = state
    app.config["STANDIN_SPEC"] = spec

    def base_url() -> str:
        return request.host_url.rstrip("/")

    @app.before_request
    def _before():
        if request.path.startswith("/_standin"):
            return None
        with state.lock:
            failure = next_failure(state.failures, request.method, request.path)
        if failure and failure.get("apply"):  # the call happens; only its answer is lost
            g.standin_lost_answer = failure
        elif failure:
            return jsonify({"error": "standin failure"}), failure["status"]
        if not request.path.startswith("/api/"):
            return None
        body = _request_body()
        with state.lock:
            state.requests.append({"method": request.method, "path": request.path,
                                   "body": _loggable(body), "at": time.time()})
        token = request.headers.get("Api-Access-Token") or ""
        if token != state.token:
            return jsonify({"error": "Invalid Access Token"}), 401
        problems = spec.validate(request.method, request.path, request.content_type or "",
                                 body)
        if problems:
            with state.lock:
                state.spec_violations.extend(problems)
            return jsonify({"error": "; ".join(problems)}), 422
        return None

    @app.after_request
    def _after(response):
        return answer_after_apply(response, g.pop("standin_lost_answer", None),
                                  {"error": "standin failure after applying the request"})

    def account_ok(account_id) -> bool:
        return str(account_id) == str(state.account_id)

    # --- contacts -------------------------------------------------------------------------------

    @app.post("/api/v1/accounts/<account_id>/contacts")
    def contact_create(account_id):
        if not account_ok(account_id):
            return jsonify({"error": "You are not authorized to do this action"}), 401
        body = request.get_json()
        with state.lock:
            identifier = body.get("identifier")
            if identifier and any(c["identifier"] == identifier for c in state.contacts.values()):
                return jsonify({"message": "Identifier has already been taken",
                                "attributes": ["identifier"]}), 422
            if int(body["inbox_id"]) not in state.inboxes:
                return jsonify({"error": "Resource could not be found"}), 404
            cid = next(state.contact_ids)
            contact = {"id": cid, "name": body.get("name", ""), "identifier": identifier,
                       "email": body.get("email"), "phone_number": body.get("phone_number"),
                       "custom_attributes": body.get("custom_attributes") or {},
                       "additional_attributes": body.get("additional_attributes") or {},
                       "thumbnail": "", "blocked": False}
            state.contacts[cid] = contact
            source_id = body.get("source_id") or str(uuid.uuid4())
            ci = _add_contact_inbox(state, cid, int(body["inbox_id"]), source_id)
            inbox = state.inboxes[ci["inbox_id"]]
            return jsonify({"payload": {
                "contact": {**contact, "contact_inboxes": [{"source_id": source_id,
                                                            "inbox": inbox}]},
                "contact_inbox": {"inbox": inbox, "source_id": source_id}}})

    @app.post("/api/v1/accounts/<account_id>/contacts/filter")
    def contact_filter(account_id):
        body = request.get_json()
        with state.lock:
            rows = list(state.contacts.values())
            for f in body.get("payload") or []:
                values = [str(v) for v in f.get("values") or []]
                key = f.get("attribute_key")
                rows = [c for c in rows if str(c.get(key) or "").lower() in values]
            return jsonify({"meta": {"count": len(rows), "current_page": 1}, "payload": rows})

    @app.post("/api/v1/accounts/<account_id>/contacts/<int:contact_id>/contact_inboxes")
    def contact_inbox_create(account_id, contact_id):
        body = request.get_json()
        with state.lock:
            if contact_id not in state.contacts:
                return jsonify({"error": "Resource could not be found"}), 404
            ci = _add_contact_inbox(state, contact_id, int(body["inbox_id"]),
                                    body.get("source_id") or str(uuid.uuid4()))
            if ci is None:
                return jsonify({"message": "Source has already been taken"}), 422
            return jsonify({"source_id": ci["source_id"], "inbox": state.inboxes[ci["inbox_id"]]})

    # --- conversations --------------------------------------------------------------------------

    @app.post("/api/v1/accounts/<account_id>/conversations")
    def conversation_create(account_id):
        body = request.get_json()
        with state.lock:
            ci = next((c for c in state.contact_inboxes if c["source_id"] == body["source_id"]
                       and (not body.get("inbox_id") or c["inbox_id"] == int(body["inbox_id"]))),
                      None)
            if ci is None:
                return jsonify({"error": "Resource could not be found"}), 404
            if body.get("contact_id") and int(body["contact_id"]) != ci["contact_id"]:
                return jsonify({"error": "contact does not match source_id"}), 422
            display_id = next(state.conversation_ids)
            conv = {"id": display_id, "account_id": state.account_id,
                    "uuid": str(uuid.uuid4()), "inbox_id": ci["inbox_id"],
                    "contact_id": ci["contact_id"], "contact_inbox": ci,
                    "status": body.get("status") or "open", "labels": [],
                    "custom_attributes": body.get("custom_attributes") or {},
                    "additional_attributes": body.get("additional_attributes") or {},
                    "created_at": int(time.time()), "message_ids": []}
            state.conversations[display_id] = conv
            return jsonify(_conversation_json(state, conv))

    @app.get("/api/v1/accounts/<account_id>/contacts/<int:contact_id>/conversations")
    def contact_conversations(account_id, contact_id):
        with state.lock:
            if contact_id not in state.contacts:
                return jsonify({"error": "Resource could not be found"}), 404
            rows = [c for c in state.conversations.values() if c["contact_id"] == contact_id]
            rows.sort(key=lambda c: c["id"], reverse=True)
            return jsonify({"payload": [_conversation_json(state, c) for c in rows[:20]]})

    @app.get("/api/v1/accounts/<account_id>/conversations/<int:conv_id>")
    def conversation_get(account_id, conv_id):
        with state.lock:
            conv = state.conversations.get(conv_id)
            if conv is None:
                return jsonify({"error": "Resource could not be found"}), 404
            return jsonify(_conversation_json(state, conv))

    @app.post("/api/v1/accounts/<account_id>/conversations/<int:conv_id>/toggle_status")
    def toggle_status(account_id, conv_id):
        body = request.get_json()
        with state.lock:
            conv = state.conversations.get(conv_id)
            if conv is None:
                return jsonify({"error": "Resource could not be found"}), 404
            conv["status"] = body["status"]
            return jsonify({"meta": {}, "payload": {"success": True, "conversation_id": conv_id,
                                                    "current_status": conv["status"],
                                                    "snoozed_until": None}})

    @app.route("/api/v1/accounts/<account_id>/conversations/<int:conv_id>/labels",
               methods=["GET", "POST"])
    def labels(account_id, conv_id):
        with state.lock:
            conv = state.conversations.get(conv_id)
            if conv is None:
                return jsonify({"error": "Resource could not be found"}), 404
            if request.method == "POST":
                conv["labels"] = list(request.get_json()["labels"])
            return jsonify({"payload": conv["labels"]})

    @app.post("/api/v1/accounts/<account_id>/conversations/<int:conv_id>/custom_attributes")
    def custom_attributes(account_id, conv_id):
        with state.lock:
            conv = state.conversations.get(conv_id)
            if conv is None:
                return jsonify({"error": "Resource could not be found"}), 404
            conv["custom_attributes"] = dict(request.get_json()["custom_attributes"])
            return jsonify({"custom_attributes": conv["custom_attributes"]})

    # --- messages -------------------------------------------------------------------------------

    @app.route("/api/v1/accounts/<account_id>/conversations/<int:conv_id>/messages",
               methods=["GET", "POST"])
    def messages(account_id, conv_id):
        with state.lock:
            conv = state.conversations.get(conv_id)
            if conv is None:
                return jsonify({"error": "Resource could not be found"}), 404
            if request.method == "GET":
                # Chatwoot's MessageFinder: the latest 20, or the 20 before ?before=<id>.
                ids = sorted(conv["message_ids"])
                before = request.args.get("before")
                if before:
                    ids = [m for m in ids if m < int(before)]
                return jsonify({"meta": {}, "payload": [
                    _message_json(state, state.messages[m]) for m in ids[-20:]]})
            files = []
            if request.content_type and request.content_type.startswith("multipart/"):
                body = _form_body()
                files = [(f.filename, f.read(), f.mimetype) for f in
                         request.files.getlist("attachments[]")]
            else:
                body = request.get_json()
            msg_type = body.get("message_type", "outgoing")
            if msg_type == "incoming" and state.inboxes[conv["inbox_id"]]["channel_type"] \
                    != "Channel::Api":
                return jsonify({"error": "incoming only on API inboxes"}), 422
            if len(files) > 15:
                return jsonify({"error": "Too many attachments"}), 422
            msg = _create_message(state, conv, content=body.get("content"),
                                  message_type=msg_type, private=bool(body.get("private")),
                                  source_id=body.get("source_id"),
                                  content_attributes=body.get("content_attributes") or {},
                                  sender={"id": 1, "name": "Integração ponte", "type": "user",
                                          "email": "integracao@loja.example"}
                                  if msg_type != "incoming" else None,
                                  files=files, base=base_url())
            return jsonify(_message_json(state, msg))

    @app.patch("/api/v1/accounts/<account_id>/conversations/<int:conv_id>/messages/<int:msg_id>")
    def message_update(account_id, conv_id, msg_id):
        body = request.get_json()
        with state.lock:
            msg = state.messages.get(msg_id)
            conv = state.conversations.get(conv_id)
            if msg is None or conv is None or msg["conversation_id"] != conv_id:
                return jsonify({"error": "Resource could not be found"}), 404
            if state.inboxes[conv["inbox_id"]]["channel_type"] != "Channel::Api":
                return jsonify({"error": "Message status update is only allowed for API "
                                         "inboxes"}), 403
            if not (msg["status"] == "read" and body["status"] == "delivered"):
                msg["status"] = body["status"]
            if body.get("external_error"):
                msg["content_attributes"]["external_error"] = body["external_error"]
            return jsonify(_message_json(state, msg))

    # --- attachments (ActiveStorage-like) -------------------------------------------------------

    @app.get("/rails/active_storage/blobs/redirect/<key>/<filename>")
    def blob_redirect(key, filename):
        if key not in state.blobs:
            return Response("not found", status=404)
        return redirect(f"/_storage/{key}", code=302)

    @app.get("/_storage/<key>")
    def storage(key):
        blob = state.blobs.get(key)
        if blob is None:
            return Response("not found", status=404)
        return Response(blob["data"], mimetype=blob["content_type"])

    # --- inspection -----------------------------------------------------------------------------

    @app.post("/_standin/reset")
    def standin_reset():
        with state.lock:
            state.reset()
        return jsonify({"ok": True})

    @app.post("/_standin/inboxes")
    def standin_inboxes():
        """Configure inboxes: [{id, name?, webhook_url?, secret?}]."""
        with state.lock:
            for inbox in request.get_json(force=True):
                current = state.inboxes.setdefault(int(inbox["id"]), {
                    "id": int(inbox["id"]), "name": f"Inbox {inbox['id']}", "webhook_url": "",
                    "secret": "", "channel_type": "Channel::Api"})
                current.update({k: v for k, v in inbox.items() if k != "id"})
        return jsonify({"ok": True})

    @app.post("/_standin/fail")
    def standin_fail():
        """Make the next `count` calls under `path_prefix` (and `method`, when given; after
        letting `after` of them through) fail with `status`; with `apply: true` the call is processed and only its answer is lost
        (replaced by `status`, or delayed `sleep` seconds past the client's timeout)."""
        body = request.get_json(force=True)
        with state.lock:
            add_rule(state.failures, body)
        return jsonify({"ok": True})

    @app.post("/_standin/agent_reply")
    def standin_agent_reply():
        """An agent types in a conversation: {conversation_id, content, private?,
        attachments:[{filename, content_type, data_b64}], deliver?: bool,
        sender_type?: "user"}. Returns the webhook Chatwoot would send (payload, raw body,
        headers) and, with deliver, the status our endpoint answered."""
        body = request.get_json(force=True)
        with state.lock:
            conv = state.conversations[int(body["conversation_id"])]
            files = [(a["filename"], base64.b64decode(a["data_b64"]),
                      a.get("content_type", "application/octet-stream"))
                     for a in body.get("attachments") or []]
            sender = {"id": 3, "name": "Ana Souza", "email": "ana@loja.example",
                      "type": body.get("sender_type", "user")}
            msg = _create_message(state, conv, content=body.get("content"),
                                  message_type=body.get("message_type", "outgoing"),
                                  private=bool(body.get("private")), source_id=None,
                                  content_attributes={}, sender=sender, files=files,
                                  base=base_url())
        return jsonify(_webhook_for(state, msg["id"], body.get("event", "message_created"),
                                    deliver=bool(body.get("deliver")),
                                    timestamp=body.get("timestamp")))

    @app.post("/_standin/delete/<int:msg_id>")
    def standin_delete(msg_id):
        """An agent deletes a message (Chatwoot's DELETE …/messages/<id>): content replaced,
        attachments removed, `content_attributes.deleted` set, and the `message_updated`
        webhook built (and delivered with {"deliver": true}; {"timestamp": ...} signs it)."""
        body = request.get_json(silent=True) or {}
        with state.lock:
            msg = state.messages.get(msg_id)
            if msg is None:
                return jsonify({"error": "Resource could not be found"}), 404
            msg["content"] = "This message was deleted"
            msg["attachments"] = []
            msg["content_attributes"] = {**msg["content_attributes"], "deleted": True}
        return jsonify(_webhook_for(state, msg_id, "message_updated",
                                    deliver=bool(body.get("deliver")),
                                    timestamp=body.get("timestamp")))

    @app.post("/_standin/webhook/<int:msg_id>")
    def standin_webhook(msg_id):
        """Build (and optionally deliver) the webhook of any stored message, e.g. the echo of
        a message the bridge created: {event?, deliver?, timestamp?}."""
        body = request.get_json(silent=True) or {}
        return jsonify(_webhook_for(state, msg_id, body.get("event", "message_created"),
                                    deliver=bool(body.get("deliver")),
                                    timestamp=body.get("timestamp")))

    @app.get("/_standin/state")
    def standin_state():
        with state.lock:
            return jsonify({
                "contacts": list(state.contacts.values()),
                "contact_inboxes": state.contact_inboxes,
                "conversations": [_conversation_json(state, c, with_messages=True)
                                  for c in state.conversations.values()],
                "requests": state.requests,
                "spec_violations": state.spec_violations,
                "spec_available": spec.available})

    @app.get("/_standin/blob/<int:attachment_id>")
    def standin_blob(attachment_id):
        """The bytes stored for an attachment id (tests compare them)."""
        with state.lock:
            for blob in state.blobs.values():
                if blob["attachment_id"] == attachment_id:
                    return Response(blob["data"], mimetype=blob["content_type"])
        return Response("not found", status=404)

    return app


# --- helpers ------------------------------------------------------------------------------------

def _request_body():
    if request.method in ("GET", "DELETE"):
        return None
    if request.content_type and request.content_type.startswith("multipart/"):
        return _form_body()
    return request.get_json(silent=True)


def _form_body() -> dict:
    """Multipart fields as the server casts them (booleans and JSON objects)."""
    body: dict = {}
    for key, value in request.form.items():
        if value in ("true", "false"):
            body[key] = value == "true"
        elif key == "content_attributes":
            try:
                body[key] = json.loads(value)
            except ValueError:
                body[key] = value
        else:
            body[key] = value
    files = request.files.getlist("attachments[]")
    if files:
        body["attachments[]"] = [f.filename for f in files]
    return body


def _loggable(body):
    return body if isinstance(body, (dict, list)) or body is None else str(body)[:200]


def _add_contact_inbox(state: State, contact_id: int, inbox_id: int, source_id: str):
    for ci in state.contact_inboxes:
        if ci["inbox_id"] == inbox_id and ci["source_id"] == source_id:
            return ci if ci["contact_id"] == contact_id else None
    now = _iso()
    ci = {"id": next(state.contact_inbox_ids), "contact_id": contact_id, "inbox_id": inbox_id,
          "source_id": source_id, "created_at": now, "updated_at": now, "hmac_verified": False,
          "pubsub_token": uuid.uuid4().hex[:24]}
    state.contact_inboxes.append(ci)
    return ci


def _create_message(state: State, conv: dict, *, content, message_type, private, source_id,
                    content_attributes, sender, files, base) -> dict:
    mid = next(state.message_ids)
    attachments = []
    for filename, data, mime in files:
        key = base64.urlsafe_b64encode(hashlib.sha256(f"{mid}:{filename}:{len(attachments)}"
                                                      .encode()).digest()).decode().rstrip("=")
        aid = next(state.attachment_ids)
        state.blobs[key] = {"data": data, "content_type": mime, "attachment_id": aid}
        ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else None
        file_type = "image" if mime.startswith("image/") else (
            "audio" if mime.startswith("audio/") else (
                "video" if mime.startswith("video/") else "file"))
        attachments.append({"id": aid, "message_id": mid, "file_type": file_type,
                            "account_id": state.account_id, "extension": ext,
                            "content_type": mime,
                            "data_url": f"{base}/rails/active_storage/blobs/redirect/{key}/"
                                        f"{urllib.parse.quote(filename)}",
                            "thumb_url": "", "file_size": len(data), "width": None,
                            "height": None, "filename": filename})
    if isinstance(content_attributes, str):
        content_attributes = json.loads(content_attributes or "{}")
    msg = {"id": mid, "content": content, "conversation_id": conv["id"],
           "inbox_id": conv["inbox_id"], "message_type": message_type, "private": private,
           "source_id": source_id, "content_attributes": dict(content_attributes),
           "content_type": "text", "status": "sent", "sender": sender,
           "created_at": time.time(), "attachments": attachments}
    state.messages[mid] = msg
    conv["message_ids"].append(mid)
    if message_type == "incoming" and conv["status"] in ("resolved", "snoozed"):
        conv["status"] = "open"
    return msg


def _message_json(state: State, msg: dict) -> dict:
    out = {"id": msg["id"], "content": msg["content"], "inbox_id": msg["inbox_id"],
           "conversation_id": msg["conversation_id"],
           "message_type": MESSAGE_TYPES[msg["message_type"]],
           "content_type": msg["content_type"], "status": msg["status"],
           "content_attributes": msg["content_attributes"],
           "created_at": int(msg["created_at"]), "private": msg["private"],
           "source_id": msg["source_id"], "sender": msg["sender"]}
    if msg["attachments"]:
        out["attachments"] = [{k: v for k, v in a.items() if k != "filename"}
                              for a in msg["attachments"]]
    return out


def _conversation_json(state: State, conv: dict, with_messages: bool = False) -> dict:
    contact = state.contacts[conv["contact_id"]]
    public = [state.messages[m] for m in conv["message_ids"]
              if not state.messages[m]["private"]]
    out = {"id": conv["id"], "account_id": conv["account_id"], "uuid": conv["uuid"],
           "inbox_id": conv["inbox_id"], "status": conv["status"], "labels": conv["labels"],
           "custom_attributes": conv["custom_attributes"],
           "additional_attributes": conv["additional_attributes"],
           "channel": "Channel::Api", "can_reply": True,
           "contact_inbox": conv["contact_inbox"],
           "meta": {"sender": {**contact, "type": "contact"}, "assignee": None,
                    "assignee_type": None, "team": None, "hmac_verified": False},
           "messages": [_message_json(state, public[-1])] if public else [],
           "created_at": conv["created_at"], "timestamp": conv["created_at"],
           "unread_count": 0, "waiting_since": 0, "priority": None, "snoozed_until": None}
    if with_messages:
        out["all_messages"] = [{**_message_json(state, state.messages[m]),
                                "message_type_name": state.messages[m]["message_type"]}
                               for m in conv["message_ids"]]
    return out


def _webhook_for(state: State, msg_id: int, event: str, deliver: bool,
                 timestamp: int | None = None) -> dict:
    import requests as _requests

    with state.lock:
        msg = state.messages[msg_id]
        conv = state.conversations[msg["conversation_id"]]
        contact = state.contacts[conv["contact_id"]]
        inbox = state.inboxes[conv["inbox_id"]]
        sender = msg["sender"]
        if msg["message_type"] == "incoming":
            sender = {"account": {"id": state.account_id, "name": "Loja Exemplo"},
                      "additional_attributes": contact["additional_attributes"], "avatar": "",
                      "custom_attributes": contact["custom_attributes"], "email": None,
                      "id": contact["id"], "identifier": contact["identifier"],
                      "name": contact["name"], "phone_number": None, "thumbnail": "",
                      "blocked": False}
        conv_json = _conversation_json(state, conv)
        conv_json.pop("account_id", None)
        conv_json.pop("uuid", None)
        payload = {"account": {"id": state.account_id, "name": "Loja Exemplo"},
                   "additional_attributes": {}, "content_attributes": msg["content_attributes"],
                   "content_type": "text", "content": msg["content"],
                   "conversation": conv_json, "created_at": _iso(msg["created_at"]),
                   "id": msg["id"], "inbox": {"id": inbox["id"], "name": inbox["name"]},
                   "message_type": msg["message_type"], "private": msg["private"],
                   "sender": sender, "source_id": msg["source_id"]}
        if msg["attachments"]:
            payload["attachments"] = [{k: v for k, v in a.items() if k != "filename"}
                                      for a in msg["attachments"]]
        payload["event"] = event
        secret, url = inbox.get("secret", ""), inbox.get("webhook_url", "")
    raw = json.dumps(payload, ensure_ascii=False).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "X-Chatwoot-Delivery": str(uuid.uuid4())}
    if secret:
        ts = str(int(timestamp if timestamp is not None else time.time()))
        headers["X-Chatwoot-Timestamp"] = ts
        headers["X-Chatwoot-Signature"] = "sha256=" + hmac.new(
            secret.encode(), ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
    out = {"payload": payload, "raw_body": raw.decode(), "headers": headers,
           "message_id": msg_id, "delivered_status": None}
    if deliver and url:
        try:
            answer = _requests.post(url, data=raw, headers=headers, timeout=5)
            out["delivered_status"] = answer.status_code
        except _requests.RequestException as exc:
            out["delivered_status"] = f"error: {type(exc).__name__}"
        if out["delivered_status"] != 200 and event in ("message_created", "message_updated"):
            with state.lock:  # Chatwoot marks the message failed when the webhook fails
                state.messages[msg_id]["status"] = "failed"
    return out


if __name__ == "__main__":  # pragma: no cover - manual use: python -m standins.chatwoot
    import sys

    create_app().run(host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8082,
                     threaded=True)
