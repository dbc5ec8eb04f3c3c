"""A stand-in for a Kommo account (REST v4 subset of ../shared/reference/kommo.md), stateful.

Serves: `POST /api/v4/talks/{id}/send_message` (202; 422 when the talk is closed; 402 past the
add-on quota), `POST /api/v4/leads/{id}/notes`, the read-backs `GET /api/v4/talks/{id}/messages`
(what was sent into the talk, and the Salesbot runs of the lead seeded with that `talk_id`) and
`GET /api/v4/leads/{id}/notes`, `PATCH /api/v4/leads/{id}`, `GET
/api/v4/leads/{id}?with=contacts`, `POST /api/v4/bots/{id}/run` (202), `POST
/api/v4/leads/custom_fields`, `POST /oauth2/access_token` (single-use refresh tokens), Bearer
auth, and Kommo's limit: more than `max_rps` (7) requests in any one-second window → 429.
Inspection under `/_standin/...`: state, rate (the most requests seen in any one-second window,
and the 429s), seed leads/talks, inject failures (optionally with `retry_after`), reset.
Also builds Kommo's form-encoded webhook bodies (`message_form`, `note_form`) for tests and the
demo.
"""
from __future__ import annotations

import collections
import itertools
import secrets
import threading
import time
import urllib.parse
import uuid

from flask import Flask, jsonify, request

from standins.failures import add_rule, next_failure

DEFAULT_TOKEN = "kommo-standin-long-lived-token"
ACCOUNT_ID = "31257294"
SUBDOMAIN = "minhaloja"


class KommoState:
    def __init__(self, access_token: str, quota: int | None, max_rps: float):
        self.lock = threading.Lock()
        self.valid_tokens = {access_token} if access_token else set()
        self.refresh_tokens: set[str] = set()
        self.client = {"client_id": "standin-client", "client_secret": "standin-secret"}
        self.quota = quota
        self.max_rps = max_rps
        self.sent: list[dict] = []
        self.notes: list[dict] = []
        self.lead_fields: dict[str, dict] = collections.defaultdict(dict)
        self.bot_runs: list[dict] = []
        self.leads: dict[str, dict] = {}
        self.closed_talks: set[str] = set()
        self.custom_fields: list[dict] = []
        self.webhooks: dict[str, list] = {}
        self.failures: list[dict] = []
        self.requests: list[dict] = []
        self.token_calls: list[dict] = []
        self.recent = collections.deque()
        # Arrival time of every API request (monotonic), for `/_standin/rate`.
        self.arrivals: collections.deque[float] = collections.deque(maxlen=100_000)
        self.rate_limited = 0
        self.ids = itertools.count(1)

    def snapshot(self) -> dict:
        return {"sent": self.sent, "notes": self.notes, "lead_fields": self.lead_fields,
                "bot_runs": self.bot_runs, "leads": self.leads,
                "closed_talks": sorted(self.closed_talks), "custom_fields": self.custom_fields, "webhooks": self.webhooks,
                "requests": self.requests[-500:], "token_calls": self.token_calls,
                "request_count": len(self.requests)}


def _problem(status: int, title: str, detail: str = "", **extra):
    response = jsonify({"title": title, "type": f"https://httpstatus.es/{status}",
                        "status": status, "detail": detail, **extra})
    response.status_code = status
    response.mimetype = "application/problem+json"
    return response


def create_app(access_token: str = DEFAULT_TOKEN, quota: int | None = None,
               max_rps: float = 7.0) -> Flask:
    """A fresh Kommo stand-in. `quota` limits send_message calls (then 402)."""
    app = Flask("kommo-standin")
    state = KommoState(access_token, quota, max_rps)
    app.config["STATE"] = state

    @app.before_request
    def gatekeeper():
        if request.path.startswith("/_standin"):
            return None
        with state.lock:
            state.requests.append({"method": request.method, "path": request.path,
                                   "at": time.time()})
            now = time.monotonic()
            state.arrivals.append(now)
            # A sliding window: every request of the last second counts, refused ones too.
            state.recent.append(now)
            while state.recent and now - state.recent[0] > 1.0:
                state.recent.popleft()
            if state.max_rps and len(state.recent) > state.max_rps:
                state.rate_limited += 1
                return _problem(429, "Too Many Requests", "too many requests per second")
            failure = next_failure(state.failures, request.method, request.path)
            if failure:
                answer = _problem(failure["status"], "Injected failure")
                if failure.get("retry_after") is not None:
                    answer.headers["Retry-After"] = str(failure["retry_after"])
                if failure["status"] == 429:
                    state.rate_limited += 1
                return answer
        if request.path == "/oauth2/access_token":
            return None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in state.valid_tokens:
            return _problem(401, "Unauthorized", "invalid token")
        return None

    @app.post("/api/v4/talks/<talk_id>/send_message")
    def send_message(talk_id):
        body = request.get_json(silent=True) or {}
        if not isinstance(body.get("text"), str) or not body["text"]:
            return _problem(400, "Bad Request", "text is required")
        with state.lock:
            if talk_id in state.closed_talks:
                return _problem(422, "Unprocessable Entity", "Talk is closed")
            if state.quota is not None and len(state.sent) >= state.quota:
                return _problem(402, "Payment Required", "Over chat API limit")
            message_id = str(uuid.uuid4())
            state.sent.append({"id": message_id, "talk_id": talk_id, "text": body["text"],
                               "at": time.time()})
        return jsonify({"id": message_id}), 202

    @app.post("/api/v4/leads/<lead_id>/notes")
    def add_notes(lead_id):
        body = request.get_json(silent=True)
        if not isinstance(body, list) or not body:
            return _problem(400, "Bad Request", "array of notes expected")
        created = []
        with state.lock:
            for note in body:
                text = ((note or {}).get("params") or {}).get("text")
                if note.get("note_type") != "common" or not text:
                    return _problem(400, "Bad Request", "common note with params.text expected")
                note_id = next(state.ids)
                state.notes.append({"id": note_id, "lead_id": lead_id, "text": text,
                                    "created_by": 0, "at": time.time()})
                created.append({"id": note_id, "entity_id": int(lead_id)})
        return jsonify({"_embedded": {"notes": created}})

    # Read-backs of what was written, shaped as Kommo lists them (204 when nothing matches).
    @app.get("/api/v4/talks/<talk_id>/messages")
    def talk_messages(talk_id):
        since = int(request.args.get("filter[created_at][from]") or 0)
        with state.lock:
            messages = [{"id": m["id"], "type": "outgoing", "message_type": "text",
                         "origin": "waba", "text": m["text"], "created_at": int(m["at"]),
                         "author": {"id": "ponte-integration", "type": "bot", "name": "Bot"}}
                        for m in state.sent if m["talk_id"] == talk_id]
            # A Salesbot's "Send message" step with the lead's field, in the lead's talk.
            leads = {lead for lead, row in state.leads.items() if row.get("talk_id") == talk_id}
            messages += [{"id": f"bot-run-{i}", "type": "outgoing", "message_type": "text",
                          "origin": "waba", "text": text, "created_at": int(run["at"]),
                          "author": {"id": "salesbot", "type": "bot", "name": "Salesbot"}}
                         for i, run in enumerate(state.bot_runs) if run["lead_id"] in leads
                         for text in run["text"].values()]
        messages = [m for m in messages if m["created_at"] >= since]
        if not messages:
            return "", 204
        messages.sort(key=lambda m: -m["created_at"])
        return jsonify({"_embedded": {"messages": messages}})

    @app.get("/api/v4/leads/<lead_id>/notes")
    def lead_notes(lead_id):
        since = int(request.args.get("filter[updated_at][from]") or 0)
        with state.lock:
            notes = [{"id": n["id"], "entity_id": int(lead_id), "created_by": n["created_by"],
                      "created_at": int(n["at"]), "updated_at": int(n["at"]),
                      "note_type": "common", "params": {"text": n["text"]}}
                     for n in state.notes if n["lead_id"] == lead_id and int(n["at"]) >= since]
        if not notes:
            return "", 204
        return jsonify({"_embedded": {"notes": notes[::-1]}})

    @app.route("/api/v4/leads/<lead_id>", methods=["GET", "PATCH"])
    def lead(lead_id):
        with state.lock:
            if request.method == "PATCH":
                body = request.get_json(silent=True) or {}
                for cf in body.get("custom_fields_values", []):
                    values = cf.get("values") or [{}]
                    state.lead_fields[lead_id][str(cf["field_id"])] = values[0].get("value")
                return jsonify({"id": int(lead_id), "updated_at": int(time.time())})
            lead_row = state.leads.get(lead_id)
            if lead_row is None:
                return _problem(404, "Not Found", "Requested entity not found")
            return jsonify({"id": int(lead_id), "name": f"Lead #{lead_id}", "_embedded": {
                "contacts": [{"id": int(c), "is_main": i == 0}
                             for i, c in enumerate(lead_row["contacts"])]}})

    @app.post("/api/v4/bots/<bot_id>/run")
    def run_bot(bot_id):
        body = request.get_json(silent=True) or {}
        if body.get("entity_type") != "leads" or not body.get("entity_id"):
            return _problem(400, "Bad Request", "InvalidType")
        with state.lock:
            lead_id = str(body["entity_id"])
            state.bot_runs.append({"bot_id": bot_id, "lead_id": lead_id,
                                   "text": state.lead_fields[lead_id].copy(), "at": time.time()})
        return "Accepted", 202, {"Content-Type": "text/html"}

    @app.post("/api/v4/leads/custom_fields")
    def custom_fields():
        body = request.get_json(silent=True)
        if not isinstance(body, list) or not body or not body[0].get("name"):
            return _problem(400, "Bad Request", "array of fields expected")
        with state.lock:
            created = [{"id": 2990000 + next(state.ids), "name": f["name"], "type": f["type"]}
                       for f in body]
            state.custom_fields += created
        return jsonify({"_embedded": {"custom_fields": created}})

    @app.post("/api/v4/webhooks")
    def webhooks():
        body = request.get_json(silent=True) or {}
        if not str(body.get("destination", "")).startswith("https://") or \
                not isinstance(body.get("settings"), list):
            # Like Kommo's validation errors, the detail quotes the value it refused.
            return _problem(400, "Bad Request", "destination (https) and settings required, "
                            f"got destination={body.get('destination')!r}")
        with state.lock:
            state.webhooks[body["destination"]] = body["settings"]
        return jsonify({"destination": body["destination"], "settings": body["settings"],
                        "sort": body.get("sort", 1), "id": next(state.ids)}), 201

    @app.post("/oauth2/access_token")
    def token():
        body = request.get_json(silent=True) or {}
        with state.lock:
            state.token_calls.append({"grant_type": body.get("grant_type"), "at": time.time()})
            if body.get("client_id") != state.client["client_id"] or \
                    body.get("client_secret") != state.client["client_secret"]:
                return _problem(400, "Bad Request", "invalid client")
            if body.get("grant_type") == "refresh_token":
                if body.get("refresh_token") not in state.refresh_tokens:
                    return _problem(401, "Token has been revoked", hint="Token has been revoked")
                state.refresh_tokens.discard(body["refresh_token"])
            elif body.get("grant_type") != "authorization_code" or not body.get("code"):
                return _problem(400, "Bad Request", "invalid grant")
            access, refresh = secrets.token_hex(16), secrets.token_hex(16)
            state.valid_tokens.add(access)
            state.refresh_tokens.add(refresh)
        return jsonify({"token_type": "Bearer", "expires_in": 86400,
                        "server_time": int(time.time()), "access_token": access,
                        "refresh_token": refresh})

    # --- inspection ---------------------------------------------------------------------------
    @app.get("/_standin/state")
    def standin_state():
        with state.lock:
            return jsonify(state.snapshot())

    @app.get("/_standin/rate")
    def standin_rate():
        """The most API requests that arrived within any one-second window (`?window=` to
        change it), how many there were and how many got a 429."""
        window = float(request.args.get("window") or 1.0)
        with state.lock:
            arrivals = list(state.arrivals)
            answer = {"max_rps": state.max_rps, "requests": len(arrivals),
                      "rate_limited": state.rate_limited, "window_seconds": window}
        answer["max_in_any_window"] = max_in_window(arrivals, window)
        return jsonify(answer)

    @app.post("/_standin/leads")
    def standin_leads():
        body = request.get_json(force=True)
        with state.lock:
            state.leads[str(body["lead_id"])] = {"contacts": [str(c) for c in body["contacts"]],
                                                 "talk_id": str(body.get("talk_id") or "")}
        return jsonify(ok=True)

    @app.post("/_standin/close_talk")
    def standin_close():
        with state.lock:
            state.closed_talks.add(str(request.get_json(force=True)["talk_id"]))
        return jsonify(ok=True)

    @app.post("/_standin/fail")
    def standin_fail():
        """{"path_prefix": "/api/v4/talks", "status": 503, "count": 3} (see standins.failures);
        `"retry_after": "2"` adds that Retry-After header to the answer."""
        body = request.get_json(force=True)
        with state.lock:
            add_rule(state.failures, body)
        return jsonify(ok=True)

    @app.post("/_standin/reset")
    def standin_reset():
        with state.lock:
            state.__init__(next(iter(state.valid_tokens), DEFAULT_TOKEN), state.quota,
                           state.max_rps)
        return jsonify(ok=True)

    return app


def max_in_window(times: list[float], window_seconds: float) -> int:
    """The most of `times` (sorted) within any closed interval `window_seconds` long."""
    best, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] > window_seconds:
            first += 1
        best = max(best, last - first + 1)
    return best


# --- webhook bodies as Kommo sends them -------------------------------------------------------

def _encode(fields: list[tuple[str, str]]) -> str:
    return urllib.parse.urlencode(fields)


def _account() -> list[tuple[str, str]]:
    return [("account[subdomain]", SUBDOMAIN), ("account[id]", ACCOUNT_ID),
            ("account[_links][self]", f"https://{SUBDOMAIN}.amocrm.com")]


def message_form(text: str, *, contact_id: str = "93589657", lead_id: str = "28455849",
                 talk_id: str = "1874", message_id: str | None = None, name: str = "Maria Souza",
                 created_at: int | None = None, origin: str = "waba",
                 attachment: dict | None = None, index: int = 0) -> str:
    """An `add_message` webhook body (incoming customer message), form-encoded."""
    p = f"message[add][{index}]"
    fields = _account() + [
        (f"{p}[id]", message_id or str(uuid.uuid4())),
        (f"{p}[chat_id]", "54caee02-e383-46d8-a9b7-1fb43f07cffe"), (f"{p}[talk_id]", talk_id),
        (f"{p}[contact_id]", contact_id), (f"{p}[text]", text),
        (f"{p}[created_at]", str(created_at or int(time.time()))), (f"{p}[element_type]", "2"),
        (f"{p}[entity_type]", "lead"), (f"{p}[element_id]", lead_id),
        (f"{p}[entity_id]", lead_id), (f"{p}[type]", "incoming"),
        (f"{p}[author][id]", "1db2f5cc-aea4-4f96-8d4f-a256ead5b7b0"),
        (f"{p}[author][type]", "external"), (f"{p}[author][name]", name), (f"{p}[origin]", origin)]
    if attachment:
        fields += [(f"{p}[message_type]", attachment["type"]),
                   (f"{p}[attachment][type]", attachment["type"]),
                   (f"{p}[attachment][link]", attachment["link"]),
                   (f"{p}[attachment][file_name]", attachment.get("file_name", ""))]
    return _encode(fields)


def note_form(text: str, *, lead_id: str = "28455849", note_id: str | None = None,
              created_by: str = "9040358") -> str:
    """A `note_lead` webhook body (a seller wrote a note on the lead), form-encoded."""
    p = "leads[note][0][note]"
    now = int(time.time())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    return _encode([
        (f"{p}[text]", text), (f"{p}[note_type]", "4"), (f"{p}[element_type]", "2"),
        (f"{p}[element_id]", lead_id), (f"{p}[account_id]", ACCOUNT_ID),
        (f"{p}[date_create]", stamp), (f"{p}[timestamp_x]", stamp),
        (f"{p}[created_by]", created_by), (f"{p}[modified_by]", created_by),
        (f"{p}[main_user_id]", created_by), (f"{p}[group_id]", "0"),
        (f"{p}[id]", note_id or str(int(time.time() * 1000) % 10**9)),
        (f"{p}[created_at]", str(now)), (f"{p}[updated_at]", str(now))] + _account())


def outgoing_form(text: str, *, contact_id: str = "93589657", lead_id: str = "28455849",
                  talk_id: str = "1874", user_id: str = "9040358", name: str = "Vendedor João",
                  message_id: str | None = None) -> str:
    """An `outgoing_message[add]` body (a Kommo user wrote in the chat), form-encoded."""
    p = "outgoing_message[add][0]"
    return _encode(_account() + [
        (f"{p}[id]", message_id or str(uuid.uuid4())), (f"{p}[chat_id]", "54caee02"),
        (f"{p}[talk_id]", talk_id), (f"{p}[contact_id]", contact_id), (f"{p}[text]", text),
        (f"{p}[created_at]", str(int(time.time()))), (f"{p}[type]", "outgoing"),
        (f"{p}[entity_type]", "lead"), (f"{p}[entity_id]", lead_id), (f"{p}[origin]", "waba"),
        (f"{p}[author][id]", str(uuid.uuid4())), (f"{p}[author][type]", "internal"),
        (f"{p}[author][user_id]", user_id), (f"{p}[author][name]", name)])
