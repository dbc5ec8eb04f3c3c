"""Issue 14, proof suite 2 — chaos: `kill -9` of the poller and of the web workers at random
moments while both bridges carry a mixed stream, then: 0 lost, 0 doubled.

Real processes, as in production: Gunicorn with gunicorn_conf.py (2 workers; its master starts
a new worker for each one killed) and `python poller.py` (started again by this test after each
kill, as Supervisor does). Stand-ins for Kommo, n8n (an AI that takes 0.3 s), Mercado Livre and
Chatwoot on loopback. The stream, from three sender threads:

- customers writing on WhatsApp (Kommo's form webhook), several contacts;
- agents replying in Chatwoot to Mercado Livre sales (Chatwoot's signed webhook);
- buyers asking questions on Mercado Livre (its notification);
- Kommo delivering again what it already delivered, without pause (it retries for hours): the
  busiest sender, so that a worker killed is often in the middle of a request.

Now and then every web worker is killed while a Kommo webhook is half sent (its headers and
half its body in, the rest after the kill). A sender behaves as the peer does: a webhook that got no 2xx (a worker killed mid-request, a
reset connection) is sent again until it does; only a 2xx counts as acknowledged.

Afterwards, with the poller left alone until the queue is empty:
- lost: every acknowledged customer message is answered in its Kommo chat; every acknowledged
  agent reply reached its Mercado Livre pack; every question notified is one Chatwoot
  conversation;
- doubled (where the peer lets us check): no customer message in two Kommo replies; no agent
  reply twice in a pack; no question in two conversations; n8n may be asked again after a
  kill, but always with the same Idempotency-Key for the same message.

Budget: PONTE_CHAOS_KILLS kills (default 32, ~60-80 s on 2 cores). A longer run:
`PONTE_CHAOS_KILLS=150 ./ponte test tests/test_chaos.py -s` (bench/bench_proofs.py does it).
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

import db_manager
import outbox
from standins import chatwoot as standin_chatwoot
from standins import kommo as kommo_standin
from standins import mercadolivre as standin_ml
from standins import n8n as n8n_standin
from standins.support import free_port, wait_for
from tests.meli_support import QUESTIONS_INBOX, SALES_INBOX, SELLER, bridge_env

ROOT = Path(__file__).resolve().parent.parent
KILLS = int(os.environ.get("PONTE_CHAOS_KILLS") or 32)
SEED = int(os.environ.get("PONTE_CHAOS_SEED") or 14)
SECRET = "chaos-kommo-hook-secret-0123456789"
N8N_KEY = "chaos-n8n-key-0123456789"
CONTACTS = 6
SALES = 4


def _children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return kids


class Sender:
    """Sends webhooks as a peer does: again and again until one is answered 2xx."""

    def __init__(self):
        self.attempts = 0
        self.errors = 0
        self._lock = threading.Lock()  # one Sender may serve several threads

    def deliver(self, send) -> requests.Response:
        while True:
            try:
                answer = send()
            except requests.RequestException:
                answer = None
            ok = answer is not None and 200 <= answer.status_code < 300
            with self._lock:
                self.attempts += 1
                self.errors += not ok
            if ok:
                return answer
            time.sleep(0.05)  # a peer's retry is not instant either


class Install:
    """ponte's two processes and the four stand-ins, and the kills."""

    def __init__(self, tmp_path: Path, serve):
        self.kommo = serve(kommo_standin.create_app(max_rps=0))
        self.n8n = serve(n8n_standin.create_app(api_key=N8N_KEY, latency_seconds=0.3))
        self.ml = serve(standin_ml.create_app(SELLER))
        self.cw = serve(standin_chatwoot.create_app())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **{k: str(v) for k, v in {
            **bridge_env(self.ml.url, self.cw.url),
            "DATABASE_PATH": tmp_path / "ponte.db", "LOG_DIR": tmp_path / "logs",
            "ENVIRONMENT": "test", "PONTE_ENV_FILE": tmp_path / "none.env",
            "ADMIN_TOKEN": "chaos-admin-token-0123456789", "LOG_LEVEL": "WARNING",
            "HOST": "127.0.0.1", "PORT": self.port, "WEB_WORKERS": 2,
            "KOMMO_BASE_URL": self.kommo.url, "KOMMO_WEBHOOK_SECRET": SECRET,
            "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN, "KOMMO_MAX_RPS": 0,
            "N8N_WEBHOOK_URL": self.n8n.url + "/webhook/ponte", "N8N_API_KEY": N8N_KEY,
            "N8N_TIMEOUT_SECONDS": 5, "BOT_DEBOUNCE_SECONDS": 0,
            # a job whose poller was killed is taken again soon (production: 120 s)
            "JOB_LEASE_SECONDS": 4, "POLLER_CONCURRENCY": 4,
            "ML_POLL_QUESTIONS_SECONDS": 1, "ML_POLL_MESSAGES_SECONDS": 1}.items()}}
        self.logs = open(tmp_path / "processes.log", "ab")
        self.web = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn_conf.py",
             "webhook_server:create_app()"], cwd=ROOT, env=self.env, stdout=self.logs,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.poller = None
        self.kills = {"poller": 0, "web_worker": 0}
        self.killed_with_jobs_running = 0
        wait_for(lambda: requests.get(self.url + "/", timeout=1).ok, 30, what="gunicorn",
                 ignoring=(requests.RequestException,))
        self.db = db_manager.connect(str(tmp_path / "ponte.db"))
        requests.post(f"{self.cw.url}/_standin/inboxes", json=[
            {"id": QUESTIONS_INBOX, "webhook_url": f"{self.url}/webhooks/chatwoot"},
            {"id": SALES_INBOX, "webhook_url": f"{self.url}/webhooks/chatwoot"}], timeout=5)
        self.start_poller()

    def start_poller(self):
        self.poller = subprocess.Popen([sys.executable, "poller.py"], cwd=ROOT, env=self.env,
                                       stdout=self.logs, stderr=subprocess.STDOUT)

    def kill_one(self, rng: random.Random) -> str:
        """kill -9 the poller (then start another, as Supervisor does) or one web worker (its
        master starts another)."""
        workers = _children_of(self.web.pid)
        if rng.random() < 0.5 or not workers:
            if rng.random() < 0.5:  # half the time, at a random moment while jobs run
                wait_for(lambda: outbox.queue_stats(self.db)["running"] > 0, 1.5, interval=0.02)
                time.sleep(rng.uniform(0, 0.3))
            running = outbox.queue_stats(self.db)["running"]
            self.poller.send_signal(signal.SIGKILL)
            self.poller.wait(10)
            self.kills["poller"] += 1
            self.killed_with_jobs_running += running > 0
            self.start_poller()
            return "poller"
        os.kill(rng.choice(workers), signal.SIGKILL)
        self.kills["web_worker"] += 1
        return "web_worker"

    def kill_workers_mid_request(self, form: str) -> bool:
        """Send a Kommo webhook's headers and half its body, kill -9 every web worker, then
        send the rest. True when the sender got a 2xx all the same (the request was still in
        the listen queue and a new worker took it), False when it saw the error."""
        body = form.encode()
        head = (f"POST /webhooks/kommo/{SECRET} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(head + body[:len(body) // 2])
            time.sleep(0.1)  # a worker has taken the connection and waits for the rest
            for pid in _children_of(self.web.pid):
                os.kill(pid, signal.SIGKILL)
                self.kills["web_worker"] += 1
            try:
                sock.sendall(body[len(body) // 2:])
                answer = sock.recv(64)
            except OSError:
                answer = b""
        return answer.startswith(b"HTTP/1.1 2")

    def idle(self) -> bool:
        stats = outbox.queue_stats(self.db)
        return stats["pending"] == stats["running"] == stats["staged"] == 0

    def stop(self):
        for proc in (self.poller, self.web):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.db.close()
        self.logs.close()

    # --- the peers' views ----------------------------------------------------------------------
    def state(self, served) -> dict:
        return requests.get(served.url + "/_standin/state", timeout=10).json()


def _contact(n: int) -> dict:
    return {"contact_id": str(8100 + n), "lead_id": str(8200 + n), "talk_id": str(8300 + n)}


def test_kill_9_of_poller_and_web_workers_during_a_mixed_stream_loses_and_doubles_nothing(
        tmp_path, serve):
    rng = random.Random(SEED)
    ponte = Install(tmp_path, serve)
    started_at = time.monotonic()
    try:
        # GIVEN sales whose buyers wrote, already in Chatwoot (the agents will answer them)
        packs = []
        for i in range(SALES):
            pack = requests.post(f"{ponte.ml.url}/_standin/sales", json={"buyer_id": 9500 + i},
                                 timeout=5).json()["conversation_id"]
            requests.post(f"{ponte.ml.url}/_standin/packs/{pack}/messages",
                          json={"text": f"Oi, comprei o pacote {pack}"}, timeout=5)
            packs.append(pack)
        requests.post(f"{ponte.ml.url}/_standin/items",
                      json=[{"id": "MLB3737188005", "title": "Serra circular"}], timeout=5)
        conversations = wait_for(lambda: _sale_conversations(ponte, packs), 30,
                                 what="the sales in Chatwoot")

        # WHEN three peers send a mixed stream while the kills go on
        stop, kills_done = threading.Event(), threading.Event()
        acked = {"kommo": [], "chatwoot": [], "questions": []}
        senders = {name: Sender() for name in [*acked, "kommo_again"]}
        forms: list[str] = []

        def rounds():
            """Round numbers until the kills are over: the stream lasts as long as the chaos."""
            r = 0
            while not kills_done.is_set():
                yield r
                r += 1

        def customers():
            for r in rounds():
                for n in range(CONTACTS):
                    text = f"pergunta {r} do cliente {n}"
                    form = kommo_standin.message_form(text, message_id=f"chaos-{r}-{n}",
                                                      created_at=int(time.time()), **_contact(n))
                    senders["kommo"].deliver(lambda: requests.post(
                        f"{ponte.url}/webhooks/kommo/{SECRET}", data=form, timeout=5,
                        headers={"Content-Type": "application/x-www-form-urlencoded"}))
                    acked["kommo"].append((_contact(n)["talk_id"], text))
                    forms.append(form)
                time.sleep(rng.uniform(0.5, 1.5))

        def kommo_retries():
            """Kommo delivers again what it already delivered (it retries for hours): the
            busiest sender, so that a killed worker is often in the middle of a request."""
            while not stop.is_set():
                if forms:
                    form = forms[rng.randrange(len(forms))]
                    senders["kommo_again"].deliver(lambda: requests.post(
                        f"{ponte.url}/webhooks/kommo/{SECRET}", data=form, timeout=5,
                        headers={"Content-Type": "application/x-www-form-urlencoded"}))
                time.sleep(0.005)

        def agents():
            for r in rounds():
                for pack, conversation_id in conversations.items():
                    text = f"Resposta {r} ao pacote {pack}"
                    hook = requests.post(f"{ponte.cw.url}/_standin/agent_reply", json={
                        "conversation_id": conversation_id, "content": text, "deliver": False},
                        timeout=10).json()
                    senders["chatwoot"].deliver(lambda: requests.post(
                        f"{ponte.url}/webhooks/chatwoot", data=hook["raw_body"].encode(),
                        headers=hook["headers"], timeout=5))
                    acked["chatwoot"].append((pack, text))
                time.sleep(rng.uniform(0.8, 2.0))

        def buyers():
            for r in rounds():
                text = f"Pergunta {r}: serve para madeira?"
                (qid,) = requests.post(f"{ponte.ml.url}/_standin/questions", json=[
                    {"text": text, "item_id": "MLB3737188005", "buyer_id": 9700 + r}],
                    timeout=5).json()["ids"]
                body = {"_id": f"chaos-q-{qid}", "resource": f"/questions/{qid}",
                        "user_id": str(SELLER), "topic": "questions", "attempts": 1,
                        "application_id": 1, "sent": "2026-03-10T18:22:32.464Z"}
                senders["questions"].deliver(lambda: requests.post(
                    f"{ponte.url}/webhooks/mercadolivre", json=body, timeout=5))
                acked["questions"].append((str(qid), text))
                time.sleep(rng.uniform(0.8, 2.0))

        threads = [threading.Thread(target=f, daemon=True) for f in (customers, agents, buyers)]
        noise = [threading.Thread(target=kommo_retries, daemon=True) for _ in range(2)]
        for t in [*threads, *noise]:
            t.start()
        cut_mid_request = cuts_tried = 0
        while sum(ponte.kills.values()) < KILLS:
            time.sleep(rng.uniform(0.3, 1.4))
            if acked["kommo"] and (cuts_tried == 0 or rng.random() < 0.2):
                # a webhook half sent when every worker dies: Kommo sees an error, sends again
                cuts_tried += 1
                n = cuts_tried % CONTACTS
                text = f"mensagem cortada {cuts_tried} do cliente {n}"
                form = kommo_standin.message_form(text, message_id=f"cut-{cuts_tried}",
                                                  created_at=int(time.time()), **_contact(n))
                if not ponte.kill_workers_mid_request(form):
                    cut_mid_request += 1
                    senders["kommo"].deliver(lambda: requests.post(
                        f"{ponte.url}/webhooks/kommo/{SECRET}", data=form, timeout=5,
                        headers={"Content-Type": "application/x-www-form-urlencoded"}))
                acked["kommo"].append((_contact(n)["talk_id"], text))
            else:
                ponte.kill_one(rng)
        kills_done.set()
        for t in threads:
            t.join(120)
            assert not t.is_alive(), "a sender never got its webhook acknowledged"
        stop.set()
        for t in noise:
            t.join(30)
        chaos_seconds = time.monotonic() - started_at

        # THEN, the poller left alone: everything acknowledged delivered, nothing twice
        wait_for(ponte.idle, 90, interval=0.25, what="the queue to empty")
        kommo = ponte.state(ponte.kommo)
        replies_by_talk: dict[str, str] = {}
        for m in kommo["sent"]:
            replies_by_talk[m["talk_id"]] = replies_by_talk.get(m["talk_id"], "") + "\n" + m["text"]
        lost, doubled = [], []
        for talk_id, text in acked["kommo"]:
            seen = replies_by_talk.get(talk_id, "").count(f"{text}")
            (lost if seen == 0 else doubled if seen > 1 else []).append(("kommo", text))
        n8n_keys: dict[str, set] = {}
        for call in requests.get(ponte.n8n.url + "/_standin/calls", timeout=10).json()["calls"]:
            for line in call["body"].get("message_text", "").splitlines():
                n8n_keys.setdefault(line, set()).add(call["idempotency_key"])
        n8n_key_mismatch = {t: k for t, k in n8n_keys.items() if len(k) != 1 or None in k}

        sent = ponte.state(ponte.ml)["sent_messages"]
        for pack, text in acked["chatwoot"]:
            seen = [m for m in sent if str(m["pack_id"]) == pack and m["text"] == text]
            (lost if not seen else doubled if len(seen) > 1 else []).append(("chatwoot", text))
        for pack in packs:  # and in the order the agent wrote them
            wrote = [t for p, t in acked["chatwoot"] if p == pack]
            assert [m["text"] for m in sent if str(m["pack_id"]) == pack] == wrote

        questions = [c for c in ponte.state(ponte.cw)["conversations"]
                     if c["inbox_id"] == QUESTIONS_INBOX]
        for qid, text in acked["questions"]:
            seen = [c for c in questions
                    if c["custom_attributes"].get("meli_question_id") == qid]
            (lost if not seen else doubled if len(seen) > 1 else []).append(("question", qid))
        dead = outbox.list_jobs(ponte.db, status="dead")
        figures = {
            "kills": ponte.kills, "kills_total": sum(ponte.kills.values()),
            "poller_kills_with_jobs_running": ponte.killed_with_jobs_running,
            "acknowledged": {k: len(v) for k, v in acked.items()},
            "webhook_attempts": {k: s.attempts for k, s in senders.items()},
            "webhook_errors_retried": {k: s.errors for k, s in senders.items()},
            "webhooks_cut_mid_request": cut_mid_request,
            "n8n_calls": sum(len(k) for k in n8n_keys.values()),
            "lost": len(lost), "doubled": len(doubled), "dead_jobs": len(dead),
            "chaos_seconds": round(chaos_seconds, 1),
            "total_seconds": round(time.monotonic() - started_at, 1), "seed": SEED}
        print("\nchaos:", json.dumps(figures, ensure_ascii=False))
        if os.environ.get("PONTE_PROOF_REPORT"):
            with open(os.environ["PONTE_PROOF_REPORT"], "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"suite": "chaos", **figures}) + "\n")
        assert sum(ponte.kills.values()) >= 30 or KILLS < 30
        assert ponte.kills["poller"] >= 5 and ponte.kills["web_worker"] >= 5
        # the kills landed where they hurt: jobs running, requests half answered
        assert ponte.killed_with_jobs_running >= 3
        assert cut_mid_request >= 1
        assert lost == [] and doubled == [], (lost, doubled)
        assert n8n_key_mismatch == {}
        assert dead == [], [(j["kind"], j["last_error"]) for j in dead]
    finally:
        ponte.stop()


def _sale_conversations(ponte: Install, packs: list[str]) -> dict[str, int] | None:
    """{pack: Chatwoot conversation id} once every sale has its conversation."""
    found = {c["custom_attributes"].get("meli_pack_id"): c["id"]
             for c in ponte.state(ponte.cw)["conversations"] if c["inbox_id"] == SALES_INBOX}
    return {p: found[p] for p in packs} if all(p in found for p in packs) else None
