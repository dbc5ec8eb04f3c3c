"""A stateful stand-in for Mercado Livre's API and authorization page, for tests, the demo and
the benchmark. It follows ../shared/reference/mercadolivre.md: questions search/answers, items,
users, orders, packs, post-sale messages (unread, pack reads with mark_as_read, replies with the
350-character limit, blocked conversations, the MLB messaging agent), attachments, and OAuth with
single-use refresh tokens.

Inspection endpoints under `/_standin/...` seed data, inject failures and show what was received.
Must not: be imported by ponte's production modules.
"""
from __future__ import annotations

import base64
import copy
import itertools
import threading
import time
import uuid
from datetime import datetime, timezone

from flask import Flask, Response, g, jsonify, redirect, request

from standins.failures import add_rule, answer_after_apply, next_failure

AGENT_MLB = 3037675074
DEFAULT_SELLER = 779432305
DEFAULT_CLIENT_ID = "5503910054141466"
DEFAULT_CLIENT_SECRET = "standin-secret"
PUBLIC_PATHS = ("/oauth/token", "/authorization", "/users/", "/items", "/_standin")

# A 1x1 JPEG, served as item thumbnails.
TINY_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQEASABIAAD/2wBDAP//////////////////////////////////////////////////////"
    "////////////////////////////////wgALCAABAAEBAREA/8QAFBABAAAAAAAAAAAAAAAAAAAAAP/aAAgBAQAB"
    "PxA=")


def _iso(ts: float | None = None) -> str:
    return datetime.fromtimestamp(ts or time.time(), timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _err(status: int, error: str, message: str, **extra):
    response = jsonify({"message": message, "error": error, "status": status, "cause": [],
                        **extra})
    response.status_code = status
    return response


class State:
    """Everything the stand-in knows; one lock guards it."""

    def __init__(self):
        self.lock = threading.RLock()
        self.reset()

    def reset(self, seller_id: int = DEFAULT_SELLER, site_id: str = "MLB"):
        self.seller_id = int(seller_id)
        self.site_id = site_id
        self.client_id = DEFAULT_CLIENT_ID
        self.client_secret = DEFAULT_CLIENT_SECRET
        self.access_tokens: set[str] = {"APP_USR-standin-initial"}
        self.refresh_token = "TG-standin-initial"
        self.refresh_calls = 0
        self.token_calls: list[dict] = []
        self.codes: dict[str, dict] = {}
        self.questions: dict[int, dict] = {}
        self.items: dict[str, dict] = {}
        self.users: dict[int, dict] = {}
        self.orders: dict[int, dict] = {}
        self.packs: dict[int, dict] = {}
        self.pack_status: dict[str, dict] = {}
        self.pack_messages: dict[str, list[dict]] = {}
        self.attachments: dict[str, dict] = {}
        self.answers: list[dict] = []
        self.sent_messages: list[dict] = []
        self.calls: list[dict] = []
        self.failures: list[dict] = []
        self.question_ids = itertools.count(13_000_000_000)
        self.order_ids = itertools.count(2_000_010_000_000_000)
        self.auth_required = True
        self.normalize_answers = False
        self.normalize_messages = False
        # Mercado Livre may answer a list with fewer items than the limit asked (its documented
        # page is 10): list endpoints cap their page at this size when set.
        self.max_page_size: int | None = None

    def page_limit(self, asked: int) -> int:
        """The page size a list answers with for a request that asked for `asked`."""
        return min(asked, self.max_page_size) if self.max_page_size else asked


def create_app(seller_id: int = DEFAULT_SELLER) -> Flask:
    """The stand-in Mercado Livre as a Flask app."""
    app = Flask("standin_mercadolivre")
    state = State()
    state.reset(seller_id)
    app.config["STANDIN_STATE"] = state

    # --- plumbing -------------------------------------------------------------------------------

    @app.before_request
    def _before():
        if request.path.startswith("/_standin"):
            return None
        with state.lock:
            state.calls.append({"method": request.method, "path": request.path,
                                "query": {k: v for k, v in request.args.items()},
                                "at": time.time()})
            failure = next_failure(state.failures, request.method, request.path)
            if failure and failure.get("apply"):  # the call happens; only its answer is lost
                g.standin_lost_answer = failure
            elif failure:
                status = failure["status"]
                body = failure.get("body") or {"message": "standin failure", "error":
                                               "internal_error" if status >= 500
                                               else "local_rate_limited",
                                               "status": status, "cause": []}
                response = jsonify(body)
                response.status_code = status
                if failure.get("retry_after") is not None:
                    response.headers["Retry-After"] = str(failure["retry_after"])
                return response
        if state.auth_required and not request.path.startswith(PUBLIC_PATHS):
            header = request.headers.get("Authorization", "")
            if not header.startswith("Bearer ") or header[7:] not in state.access_tokens:
                return _err(401, "invalid_token", "invalid access token")
        return None

    @app.after_request
    def _after(response):
        failure = g.pop("standin_lost_answer", None)
        return answer_after_apply(response, failure, {
            "message": "standin failure after applying the request", "error": "internal_error",
            "status": failure and failure["status"], "cause": []})

    # --- OAuth ----------------------------------------------------------------------------------

    @app.get("/authorization")
    def authorization():
        """The consent page: approves at once and redirects back with a code."""
        args = request.args
        if args.get("client_id") != state.client_id or args.get("response_type") != "code":
            return _err(400, "invalid_request", "bad authorization request")
        code = "TG-code-" + uuid.uuid4().hex
        with state.lock:
            state.codes[code] = {"redirect_uri": args.get("redirect_uri"),
                                 "challenge": args.get("code_challenge"),
                                 "method": args.get("code_challenge_method")}
        sep = "&" if "?" in args.get("redirect_uri", "") else "?"
        return redirect(f"{args.get('redirect_uri')}{sep}code={code}&state={args.get('state')}")

    @app.post("/oauth/token")
    def oauth_token():
        form = request.form
        with state.lock:
            state.token_calls.append({"grant_type": form.get("grant_type")})
            if form.get("client_id") != state.client_id or \
                    form.get("client_secret") != state.client_secret:
                return _err(400, "invalid_client", "invalid client_id or client_secret")
            grant = form.get("grant_type")
            if grant == "refresh_token":
                state.refresh_calls += 1
                if form.get("refresh_token") != state.refresh_token:
                    return _invalid_grant()
            elif grant == "authorization_code":
                info = state.codes.pop(form.get("code", ""), None)
                if info is None or info["redirect_uri"] != form.get("redirect_uri"):
                    return _invalid_grant()
                if info.get("challenge"):
                    import hashlib
                    verifier = form.get("code_verifier", "")
                    digest = base64.urlsafe_b64encode(
                        hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
                    if digest != info["challenge"]:
                        return _invalid_grant()
            else:
                return _err(400, "unsupported_grant_type", "unsupported grant type")
            access = f"APP_USR-{state.client_id}-{uuid.uuid4().hex[:12]}-{state.seller_id}"
            state.refresh_token = f"TG-{uuid.uuid4().hex[:24]}-{state.seller_id}"
            state.access_tokens = {access}
            return jsonify({"access_token": access, "token_type": "Bearer", "expires_in": 21600,
                            "scope": "offline_access read write", "user_id": state.seller_id,
                            "refresh_token": state.refresh_token})

    def _invalid_grant():
        response = jsonify({"error_description": "Error validating grant. Your authorization "
                            "code or refresh token may be expired or it was already used",
                            "error": "invalid_grant", "status": 400, "cause": []})
        response.status_code = 400
        return response

    # --- questions ------------------------------------------------------------------------------

    @app.get("/questions/search")
    def questions_search():
        args = request.args
        if args.get("api_version") != "4":
            return _err(400, "bad_request", "use api_version=4 in this stand-in")
        seller = args.get("seller_id") or args.get("seller")
        status = args.get("status")
        limit = int(args.get("limit", 50))
        offset = int(args.get("offset", 0))
        if offset > 1000:
            return _err(400, "invalid_offset", "The offset maximum number is 1000")
        item, buyer = args.get("item") or args.get("item_id"), args.get("from")
        if not (seller or item):
            return _err(400, "bad_request", "seller_id or item is required")
        with state.lock:
            rows = [q for q in state.questions.values()
                    if (not seller or str(q["seller_id"]) == str(seller))
                    and (not item or q["item_id"] == item)
                    and (not buyer or str(q["from"]["id"]) == str(buyer))
                    and (not status or q["status"] == status)]
            reverse = args.get("sort_types", "ASC").upper() == "DESC"
            rows.sort(key=lambda q: (q["date_created"], q["id"]), reverse=reverse)
            limit = state.page_limit(limit)
            page = [_public_question(q) for q in rows[offset:offset + limit]]
            return jsonify({"total": len(rows), "limit": limit, "questions": page,
                            "filters": {"limit": limit, "offset": offset, "api_version": "4",
                                        "is_admin": False, "sorts": [],
                                        "caller": state.seller_id, "seller": seller},
                            "available_filters": [], "available_sorts": [
                                "item_id", "from_id", "date_created", "seller_id"]})

    @app.get("/questions/<int:question_id>")
    def question_get(question_id):
        with state.lock:
            q = state.questions.get(question_id)
            if q is None or q["status"] == "DELETED":
                return _err(404, "not_found", "question not found")
            return jsonify(_public_question(q))

    @app.post("/answers")
    def answers():
        body = request.get_json(silent=True)
        if not isinstance(body, dict) or "question_id" not in body or "text" not in body:
            return _err(400, "invalid_post_body",
                        "Invalid JSON. Valid attributes are: question_id, text")
        if not isinstance(body["question_id"], int):
            return _err(400, "invalid_question", "question_id must be an integer")
        text = body.get("text") or ""
        if not text.strip():
            return _err(400, "text_is_null", "The Attribute text is empty")
        if len(text) > 2000:
            return _err(400, "invalid_text", "The answer exceeds 2000 characters")
        with state.lock:
            q = state.questions.get(body["question_id"])
            if q is None or q["status"] == "DELETED":
                return _err(404, "not_found", "Question not found")
            if q["status"] != "UNANSWERED":
                return _err(400, "not_unanswered_question",
                            f"Question {q['id']} is not unanswered")
            item = state.items.get(q["item_id"], {})
            if item.get("status") in ("closed", "inactive"):
                return _err(400, "not_active_item", "Item is not active")
            if state.normalize_answers:  # stored as shown on the site
                text = " ".join(text.split())
            q["status"] = "ANSWERED"
            q["answer"] = {"text": text, "status": "ACTIVE", "date_created": _iso()}
            state.answers.append({"question_id": q["id"], "text": text, "at": time.time()})
            return jsonify(_public_question(q))

    # --- items, users, orders, packs ------------------------------------------------------------

    @app.get("/items/<item_id>")
    def item_get(item_id):
        with state.lock:
            item = state.items.get(item_id)
            if item is None:
                return _err(404, "not_found", f"Item with id {item_id} not found")
            return jsonify(_trim(item, request.args.get("attributes")))

    @app.get("/items/<item_id>/description")
    def item_description(item_id):
        with state.lock:
            item = state.items.get(item_id)
            if item is None:
                return _err(404, "not_found", f"Item with id {item_id} not found")
            text = item.get("description_text", "")
            return jsonify({"text": "", "plain_text": text, "last_updated": _iso(),
                            "date_created": _iso(), "snapshot": {"url": "", "width": 0,
                                                                 "height": 0, "status": ""}})

    @app.get("/items")
    def items_multiget():
        ids = [i for i in (request.args.get("ids") or "").split(",") if i]
        if len(ids) > 20:
            return _err(400, "bad_request", "max 20 ids")
        with state.lock:
            out = []
            for i in ids:
                item = state.items.get(i)
                out.append({"code": 200, "body": _trim(item, request.args.get("attributes"))}
                           if item else {"code": 404, "body": {"error": "not_found"}})
            return jsonify(out)

    @app.get("/users/<int:user_id>")
    def user_get(user_id):
        with state.lock:
            user = state.users.get(user_id)
            if user is None:
                return _err(404, "not_found", "user not found")
            return jsonify(user)

    @app.get("/orders/<int:order_id>")
    def order_get(order_id):
        with state.lock:
            order = state.orders.get(order_id)
            if order is None:
                return _err(404, "order_not_found", "Order not found")
            return jsonify(order)

    @app.get("/packs/<int:pack_id>")
    def pack_get(pack_id):
        with state.lock:
            pack = state.packs.get(pack_id)
            if pack is None:
                return _err(404, "not_found", "pack not found")
            return jsonify(pack)

    # --- messages -------------------------------------------------------------------------------

    @app.get("/messages/unread")
    def messages_unread():
        if request.args.get("role") not in ("seller", "buyer"):
            return _err(400, "bad_request", "role is required")
        with state.lock:
            results = []
            for pack_id, msgs in state.pack_messages.items():
                count = sum(1 for m in msgs if str(m["to"]["user_id"]) == str(state.seller_id)
                            and m["message_date"]["read"] is None)
                if count:
                    results.append({"resource": f"/packs/{pack_id}/sellers/{state.seller_id}",
                                    "count": count})
            return jsonify({"user_id": state.seller_id, "results": results[:500]})

    @app.get("/messages/packs/<pack_id>/sellers/<seller_id>")
    def pack_messages(pack_id, seller_id):
        if request.args.get("tag") != "post_sale":
            return _err(400, "bad_request", "tag is required")
        if str(seller_id) != str(state.seller_id):
            return _err(403, "forbidden", f"User access token invalid for resource {pack_id}")
        limit = int(request.args.get("limit", 10))
        offset = int(request.args.get("offset", 0))
        if limit <= 0:
            return _err(400, "bad_request", "The limit param must be greater than 0")
        mark = request.args.get("mark_as_read", "true").lower() != "false"
        with state.lock:
            if pack_id not in state.pack_messages:
                return _err(404, "not_found", "conversation not found")
            msgs = state.pack_messages[pack_id]
            limit = state.page_limit(limit)
            page = msgs[offset:offset + limit]
            if mark:
                for m in msgs:
                    if str(m["to"]["user_id"]) == str(state.seller_id) and \
                            m["message_date"]["read"] is None:
                        m["message_date"]["read"] = _iso()
            out = {"paging": {"limit": limit, "offset": offset, "total": len(msgs)},
                   "conversation_status": copy.deepcopy(state.pack_status[pack_id]),
                   "messages": copy.deepcopy(page),
                   "seller_max_message_length": 350, "buyer_max_message_length": 3500}
            return jsonify(out)

    @app.get("/messages/<message_id>")
    def message_get(message_id):
        with state.lock:
            for msgs in state.pack_messages.values():
                for m in msgs:
                    if m["id"] == message_id:
                        return jsonify({"paging": None, "conversation_status": None,
                                        "messages": [copy.deepcopy(m)]})
        return _err(404, "not_found", "message not found")

    @app.post("/messages/packs/<pack_id>/sellers/<seller_id>")
    def pack_reply(pack_id, seller_id):
        if request.args.get("tag") != "post_sale":
            return _err(400, "bad_request", "tag is required")
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            return _messaging_err(400, "bad_request", "A JSON body is required")
        sender = str((body.get("from") or {}).get("user_id") or "")
        recipient = str((body.get("to") or {}).get("user_id") or "")
        if not sender:
            return _messaging_err(400, "bad_request", "The field 'from' is required")
        if not recipient:
            return _messaging_err(400, "bad_request", "The field 'to.user_id' is required")
        text = body.get("text") or ""
        if any(ord(ch) > 0xFF and ord(ch) < 0x1F000 for ch in text):
            return _messaging_err(400, "bad_request",
                                  "The text has character/s that is/are not supported.")
        if len(text) > 350:
            return _messaging_err(400, "bad_request",
                                  "The message content is too long, max characters allowed "
                                  "are 350")
        with state.lock:
            if pack_id not in state.pack_messages or sender != str(state.seller_id) \
                    or str(seller_id) != str(state.seller_id):
                return _messaging_err(403, "forbidden",
                                      f"Access denied for user {sender} to order {pack_id}")
            status = state.pack_status[pack_id]
            if status["status"] == "blocked":
                return _messaging_err(403, "forbidden",
                                      "blocked_conversation_send_message_forbidden")
            allowed = {str(_buyer_of(state, pack_id))}
            if status.get("mediated"):
                allowed = {str(AGENT_MLB)}
            if recipient not in allowed:
                return _messaging_err(403, "forbidden",
                                      f"Receiver does not belong to order {pack_id}")
            attachment_ids = body.get("attachments") or []
            if state.normalize_messages:  # stored as shown on the site
                text = " ".join(text.split())
            metas = []
            for a in attachment_ids:
                if a not in state.attachments:
                    return _messaging_err(422, "unprocessable_entity",
                                          "Attachment key is invalid or not found")
                metas.append(state.attachments[a])
            message = _message(pack_id, state.seller_id, int(recipient), text,
                               client_id=int(state.client_id), site_id=state.site_id,
                               seller_id=state.seller_id,
                               attachments=[{"filename": m["id"],
                                             "original_filename": m["original_filename"],
                                             "type": m["type"], "size": len(m["data"]),
                                             "potential_security_threat": False,
                                             "creation_date": _iso()} for m in metas])
            message["message_date"]["read"] = _iso()
            state.pack_messages[pack_id].append(message)
            state.sent_messages.append({"pack_id": pack_id, "to": recipient, "text": text,
                                        "attachments": list(attachment_ids), "id": message["id"],
                                        "at": time.time()})
            return jsonify(copy.deepcopy(message)), 201

    @app.post("/messages/attachments")
    def attachment_upload():
        if not request.args.get("site_id"):
            return _messaging_err(400, "bad_request", "The queryparam 'site_id' is required")
        upload = request.files.get("file")
        if upload is None:
            return _messaging_err(400, "bad_request", "File attached is empty")
        data = upload.read()
        if not data:
            return _messaging_err(400, "bad_request", "File attached is empty")
        if len(data) > 25 * 1024 * 1024:
            return _messaging_err(400, "bad_request", "File attachment is bigger than 25 Mb.")
        name = upload.filename or "file"
        if "/" in name or "\\" in name:
            return _messaging_err(400, "bad_request",
                                  "File name cannot include characters like /, \\")
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else "bin"
        mime = upload.mimetype or "application/octet-stream"
        if mime not in ("image/jpeg", "image/png", "application/pdf", "text/plain"):
            return _messaging_err(400, "bad_request", f"File type {mime} is not allowed")
        attachment_id = f"{state.seller_id}_{uuid.uuid4()}.{ext}"
        with state.lock:
            state.attachments[attachment_id] = {"id": attachment_id, "data": data, "type": mime,
                                                "original_filename": name,
                                                "uploaded_by": "seller"}
        return jsonify({"id": attachment_id})

    @app.get("/messages/attachments/<attachment_id>")
    def attachment_download(attachment_id):
        if not request.args.get("site_id"):
            return _messaging_err(400, "bad_request", "invalid site_id")
        with state.lock:
            meta = state.attachments.get(attachment_id)
        if meta is None:
            return _err(404, "not_found", "attachment not found")
        return Response(meta["data"], mimetype=meta["type"])

    # --- inspection -----------------------------------------------------------------------------

    @app.get("/_standin/thumb/<item_id>.jpg")
    def thumb(item_id):
        return Response(TINY_JPEG, mimetype="image/jpeg")

    @app.post("/_standin/reset")
    def standin_reset():
        body = request.get_json(silent=True) or {}
        with state.lock:
            state.reset(body.get("seller_id", seller_id), body.get("site_id", "MLB"))
        return jsonify({"ok": True})

    @app.post("/_standin/tokens")
    def standin_tokens():
        """Set the valid access tokens and the current refresh token."""
        body = request.get_json(force=True)
        with state.lock:
            if "access_tokens" in body:
                state.access_tokens = set(body["access_tokens"])
            if "refresh_token" in body:
                state.refresh_token = body["refresh_token"]
            if "auth_required" in body:
                state.auth_required = bool(body["auth_required"])
        return jsonify({"ok": True})

    @app.post("/_standin/options")
    def standin_options():
        """Behaviour switches: {"normalize_answers": true} / {"normalize_messages": true}
        store answers / post-sale messages with their whitespace collapsed, so the stored
        text differs from the text sent; {"max_page_size": 10} makes every list answer at most
        10 items a page whatever limit was asked (null: the limit asked)."""
        body = request.get_json(force=True)
        with state.lock:
            if "max_page_size" in body:
                state.max_page_size = int(body["max_page_size"]) if body["max_page_size"] \
                    else None
            if "normalize_answers" in body:
                state.normalize_answers = bool(body["normalize_answers"])
            if "normalize_messages" in body:
                state.normalize_messages = bool(body["normalize_messages"])
        return jsonify({"ok": True})

    @app.post("/_standin/items")
    def standin_items():
        """Add items: [{id, title, price, ...}] (defaults fill the rest; `description_text` is
        what `/items/<id>/description` answers as plain_text)."""
        base = request.host_url.rstrip("/")
        with state.lock:
            for item in request.get_json(force=True):
                full = {"id": item["id"], "site_id": state.site_id, "title": "Produto",
                        "seller_id": state.seller_id, "price": 99.9, "currency_id": "BRL",
                        "permalink": f"https://produto.mercadolivre.com.br/{item['id']}",
                        "thumbnail": f"{base}/_standin/thumb/{item['id']}.jpg",
                        "secure_thumbnail": f"{base}/_standin/thumb/{item['id']}.jpg",
                        "status": "active", "available_quantity": 10, "condition": "new",
                        "attributes": [], "description_text": "", **item}
                state.items[item["id"]] = full
        return jsonify({"ok": True})

    @app.post("/_standin/users")
    def standin_users():
        with state.lock:
            for user in request.get_json(force=True):
                state.users[int(user["id"])] = {"id": int(user["id"]),
                                                "nickname": user.get("nickname", "COMPRADOR"),
                                                "site_id": state.site_id, **user}
        return jsonify({"ok": True})

    @app.post("/_standin/questions")
    def standin_questions():
        """Add questions: [{text, item_id, buyer_id, id?, date_created?, status?}]."""
        created = []
        with state.lock:
            for q in request.get_json(force=True):
                qid = int(q.get("id") or next(state.question_ids))
                buyer = int(q.get("buyer_id", 1944693439))
                state.questions[qid] = {
                    "id": qid, "seller_id": state.seller_id, "item_id": q.get("item_id"),
                    "status": q.get("status", "UNANSWERED"), "text": q.get("text", ""),
                    "date_created": q.get("date_created") or datetime.now(timezone.utc)
                    .astimezone().isoformat(timespec="milliseconds"),
                    "hold": False, "deleted_from_listing": False, "suspected_spam": False,
                    "answer": q.get("answer"), "from": {"id": buyer}}
                state.users.setdefault(buyer, {"id": buyer, "nickname": q.get("nickname",
                                                                              f"COMPRADOR{buyer}"),
                                               "site_id": state.site_id})
                created.append(qid)
        return jsonify({"ids": created})

    @app.post("/_standin/questions/<int:question_id>")
    def standin_question_update(question_id):
        """Change a question (e.g. {"status": "DELETED"} or a direct answer)."""
        body = request.get_json(force=True)
        with state.lock:
            q = state.questions[question_id]
            if "answer_text" in body:
                q["status"] = "ANSWERED"
                q["answer"] = {"text": body["answer_text"], "status": "ACTIVE",
                               "date_created": _iso()}
            for key in ("status", "text"):
                if key in body:
                    q[key] = body[key]
        return jsonify({"ok": True})

    @app.post("/_standin/sales")
    def standin_sales():
        """Create a sale: {buyer_id, nickname?, items:[{id,title,quantity,unit_price}],
        pack: bool (default true), mediated: bool, order_id?, pack_id?} → ids."""
        body = request.get_json(force=True)
        with state.lock:
            buyer = int(body.get("buyer_id", 6427433))
            order_id = int(body.get("order_id") or next(state.order_ids))
            pack_id = None
            if body.get("pack", True):
                pack_id = int(body.get("pack_id") or order_id + 7)
            items = body.get("items") or [{"id": "MLB3737188005", "title": "Produto",
                                           "quantity": 1, "unit_price": 10.0}]
            total = round(sum(i.get("quantity", 1) * i.get("unit_price", 0) for i in items), 2)
            buyer_obj = {"id": buyer}
            if body.get("nickname_in_order", True):
                buyer_obj["nickname"] = body.get("nickname", f"COMPRADOR{buyer}")
            state.users.setdefault(buyer, {"id": buyer,
                                           "nickname": body.get("nickname", f"COMPRADOR{buyer}"),
                                           "site_id": state.site_id})
            state.orders[order_id] = {
                "id": order_id, "date_created": datetime.now(timezone.utc).isoformat(),
                "pack_id": pack_id, "status": "paid", "total_amount": total,
                "paid_amount": total, "currency_id": "BRL",
                "order_items": [{"item": {"id": i["id"], "title": i.get("title", "Produto"),
                                          "variation_id": None, "seller_sku": i.get("sku")},
                                 "quantity": i.get("quantity", 1),
                                 "unit_price": i.get("unit_price", 0), "currency_id": "BRL"}
                                for i in items],
                "buyer": buyer_obj, "seller": {"id": state.seller_id},
                "shipping": {"id": 44028792542}, "tags": ["paid"],
                "context": {"channel": "marketplace", "site": state.site_id, "flows": []}}
            if pack_id:
                state.packs[pack_id] = {"id": pack_id, "status": "released",
                                        "buyer": {"id": buyer}, "orders": [{"id": order_id}],
                                        "shipment": {"id": 44028792542},
                                        "date_created": _iso(), "last_updated": _iso()}
            conv_id = str(pack_id or order_id)
            state.pack_messages[conv_id] = []
            mediated = bool(body.get("mediated"))
            path = f"/packs/{conv_id}/sellers/{state.seller_id}"
            state.pack_status[conv_id] = {
                "path": path + ("/conversations/post_sale" if mediated else ""),
                "status": "active", "substatus": None, "status_date": _iso(),
                "status_update_allowed": False, "claim_ids": None, "shipping_id": 44028792542,
                "mediated": mediated}
        return jsonify({"order_id": order_id, "pack_id": pack_id, "conversation_id": conv_id})

    @app.post("/_standin/packs/<pack_id>/read")
    def standin_pack_read(pack_id):
        """The seller opens the conversation on Mercado Livre's site: every message to them
        is read (the pack leaves /messages/unread)."""
        with state.lock:
            for m in state.pack_messages[pack_id]:
                if m["message_date"]["read"] is None:
                    m["message_date"]["read"] = _iso()
        return jsonify({"ok": True})

    @app.post("/_standin/packs/<pack_id>/status")
    def standin_pack_status(pack_id):
        body = request.get_json(force=True)
        with state.lock:
            state.pack_status[pack_id].update(body)
        return jsonify({"ok": True})

    @app.post("/_standin/packs/<pack_id>/messages")
    def standin_buyer_message(pack_id):
        """A message in a sale: {text, from: "buyer"|"seller", attachments:[{filename, type,
        data_b64}]}. Buyer messages come from the agent when the sale is mediated."""
        body = request.get_json(force=True)
        with state.lock:
            status = state.pack_status[pack_id]
            buyer = _buyer_of(state, pack_id)
            metas = []
            for a in body.get("attachments") or []:
                data = base64.b64decode(a["data_b64"])
                ext = a["filename"].rsplit(".", 1)[-1]
                attachment_id = f"{buyer}_{uuid.uuid4()}.{ext}"
                state.attachments[attachment_id] = {"id": attachment_id, "data": data,
                                                    "type": a.get("type", "image/jpeg"),
                                                    "original_filename": a["filename"]}
                metas.append({"filename": attachment_id, "original_filename": a["filename"],
                              "type": a.get("type", "image/jpeg"), "size": len(data),
                              "potential_security_threat": False, "creation_date": _iso()})
            if body.get("from", "buyer") == "seller":
                sender, recipient = state.seller_id, (AGENT_MLB if status.get("mediated")
                                                      else buyer)
                client_id = int(body.get("client_id", 1))  # typed on the site, not our app
            else:
                sender = AGENT_MLB if status.get("mediated") else buyer
                recipient, client_id = state.seller_id, 123456789
            message = _message(pack_id, sender, recipient, body.get("text", ""),
                               client_id=client_id, site_id=state.site_id,
                               seller_id=state.seller_id, attachments=metas or None,
                               created=body.get("created"))
            if sender == state.seller_id:
                message["message_date"]["read"] = _iso()
            state.pack_messages[pack_id].append(message)
            state.pack_messages[pack_id].sort(key=lambda m: m["message_date"]["created"])
        return jsonify({"id": message["id"]})

    @app.get("/_standin/state")
    def standin_state():
        with state.lock:
            return jsonify({
                "refresh_calls": state.refresh_calls, "token_calls": state.token_calls,
                "refresh_token": state.refresh_token,
                "access_tokens": sorted(state.access_tokens),
                "answers": state.answers, "sent_messages": state.sent_messages,
                "calls": state.calls,
                "questions": {str(k): v for k, v in state.questions.items()},
                "uploaded": {k: {"type": v["type"], "size": len(v["data"]),
                                 "original_filename": v["original_filename"],
                                 "data_b64": base64.b64encode(v["data"]).decode()}
                             for k, v in state.attachments.items()
                             if v.get("uploaded_by") == "seller"},
                "pack_messages": state.pack_messages})

    @app.post("/_standin/calls/clear")
    def standin_calls_clear():
        with state.lock:
            state.calls.clear()
        return jsonify({"ok": True})

    @app.post("/_standin/fail")
    def standin_fail():
        """Make the next `count` calls under `path_prefix` fail with `status` (and optionally
        `retry_after`, `body`, `method`, `after`). With `apply: true` the call is processed and
        only its answer is lost: replaced by `status`, or, with `sleep` seconds, delayed past
        the client's timeout. `{"clear": true}` removes every failure."""
        body = request.get_json(force=True)
        with state.lock:
            add_rule(state.failures, body)
        return jsonify({"ok": True})

    @app.post("/_standin/notify")
    def standin_notify():
        """Send a notification like Mercado Livre does: {url, topic, resource}."""
        import requests as _requests
        body = request.get_json(force=True)
        payload = {"_id": str(uuid.uuid4()), "resource": body["resource"],
                   "user_id": state.seller_id, "topic": body["topic"],
                   "application_id": int(state.client_id), "attempts": 1, "sent": _iso(),
                   "received": _iso()}
        answer = _requests.post(body["url"], json=payload, timeout=5)
        return jsonify({"status": answer.status_code, "payload": payload})

    return app


def _buyer_of(state: State, pack_id: str) -> int:
    pid = int(pack_id)
    if pid in state.packs:
        return int(state.packs[pid]["buyer"]["id"])
    return int(state.orders[pid]["buyer"]["id"])


def _messaging_err(status: int, code: str, message: str):
    response = jsonify({"status_code": status, "code": code, "message": message})
    response.status_code = status
    return response


def _public_question(q: dict) -> dict:
    out = copy.deepcopy(q)
    if out["status"] in ("BANNED",):
        out["text"] = ""
    return out


def _trim(item: dict, attributes: str | None) -> dict:
    if not attributes:
        return copy.deepcopy(item)
    keys = [a.strip() for a in attributes.split(",")]
    return {k: item[k] for k in keys if k in item}


def _message(pack_id, sender, recipient, text, *, client_id, site_id, seller_id,
             attachments=None, created=None) -> dict:
    now = created or _iso()
    return {"id": uuid.uuid4().hex, "site_id": site_id, "client_id": client_id,
            "from": {"user_id": int(sender)}, "to": {"user_id": int(recipient)},
            "status": "available", "subject": None, "text": text,
            "message_date": {"received": now, "available": now, "notified": now,
                             "created": now, "read": None},
            "message_moderation": {"status": "clean", "reason": None, "source": "online",
                                   "moderation_date": now},
            "message_attachments": attachments,
            "message_resources": [{"id": str(pack_id), "name": "packs"},
                                  {"id": str(seller_id), "name": "sellers"}],
            "conversation_first_message": False}


if __name__ == "__main__":  # pragma: no cover - manual use: python -m standins.mercadolivre
    import sys

    create_app().run(host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8081,
                     threaded=True)
