"""Benchmark of many customers at once with realistic peers (a script, not a test; loopback only).

n8n answers in 3 s (a real AI agent takes seconds) and Kommo accepts 7 requests in any sliding
second (429 above). ponte's REAL processes (Gunicorn web via gunicorn_conf.py +
`python poller.py`) run twice per scenario, each time on a fresh database: once from this
checkout ("esta versão", with POLLER_CONCURRENCY from the environment or --concurrency) and once
from a temporary `git worktree` of 0.2.0 (commit 9d9f3ad, the single-threaded poller), so every
figure has the 0.2.0 value of the same run beside it. The stand-ins (standins/kommo.py, n8n.py,
mercadolivre.py, chatwoot.py) run on threads of this process (but see `drain`); times are the
ones they record on arrival (server side), on the same clock as the moment the first webhook is
sent.

Scenarios (each bounded by --budget seconds; past it the figure is "> budget" and the run moves
on):
  burst20   20 customers at once (BOT_DEBOUNCE_SECONDS=0, one message each, own contact/talk):
            time from the first webhook to the first and the last reply reaching Kommo. One
            second after the webhooks, a Mercado Livre question appears (ML_POLL_QUESTIONS_SECONDS
            =1): time from the moment the stand-in has it to the moment Chatwoot has its message.
  burst100  100 customers at once: bounded by Kommo's 7/s.
  instant   n8n answering at once, Kommo at 7/s: webhook → n8n call, p50/p99, for messages one
            every 200–400 ms, then for messages sent right after a burst of 20.
  drain     instant peers with no rate limit (KOMMO_MAX_RPS=0): N webhooks recorded with the
            poller stopped, then the poller started: jobs done per second (the median of 3
            such runs, each on a fresh stack; 1 with --quick). Kommo and n8n run
            in processes of their own here (standins/serve.py, keep-alive), as real peers do:
            on threads of this process their own cost per call was most of what was measured.
  intake    the same recording, with a one-hour debounce: the poller applies the webhooks
            without calling any peer (ponte's own pace).
In every scenario: the most Kommo requests the stand-in saw in any 1-second window, the 429s,
and the peak summed VmRSS of web (master + workers) + poller.

    .venv/bin/python bench/bench_concurrency.py [--quick] [--no-doc] [--only new|old]
        [--budget S] [--concurrency N] [--json PATH]

Prints a Markdown table; writes the figures as JSON (--json, or docs/benchmarks-concurrency.json
unless --no-doc) and replaces the section below in docs/benchmarks.md (unless --no-doc).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import itertools
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import requests  # noqa: E402

from bench_bridge_a import SECRET, post_webhook  # noqa: E402
from benchlib import (Gunicorn, RssSampler, http_status, machine, max_in_window,  # noqa: E402
                      n, percentile, start_process, stop_process, update_doc, watchdog,
                      write_json)
from standins import demo_meli  # noqa: E402
from standins import kommo as kommo_standin  # noqa: E402
from standins import n8n as n8n_standin  # noqa: E402
from standins.support import RequestLog, ServedApp, free_port, wait_for  # noqa: E402

DOC_PATH = os.path.join(ROOT, "docs", "benchmarks.md")
JSON_PATH = os.path.join(ROOT, "docs", "benchmarks-concurrency.json")
SECTION = "## Muitos clientes ao mesmo tempo (concorrência)"
BASELINE_COMMIT = "9d9f3ad"  # 0.2.0: one job at a time
BASELINE_LABEL = "0.2.0"
N8N_KEY = "bench-n8n-shared-key-0123456789"
N8N_LATENCY_SECONDS = 3.0
KOMMO_LIMIT_PER_SECOND = 7
QUESTION_AFTER_SECONDS = 1.0  # the question appears while n8n is busy with the customers
HARD_DEADLINE_S = 40 * 60

GOAL_BURST20_LAST_S = 8.0
GOAL_QUESTION_S = 3.0
GOAL_E2E_P50_MS = 100.0
GOAL_E2E_P99_MS = 300.0
GOAL_DRAIN_JOBS_PER_S = 300.0
GOAL_RSS_MB = 150.0


def goal_burst_last_s(customers: int) -> float:
    """3 s of n8n + the customers at Kommo's 7/s + 2 s of slack."""
    return N8N_LATENCY_SECONDS + customers / KOMMO_LIMIT_PER_SECOND + 2.0


# --- the two checkouts ------------------------------------------------------------------------

class Side:
    """A checkout of ponte to run: this one, or a temporary worktree of the baseline."""

    def __init__(self, name: str, label: str, path: str, extra_env: dict, worktree: bool = False):
        self.name, self.label, self.path = name, label, path
        self.extra_env = extra_env
        self.worktree = worktree

    @classmethod
    def current(cls, concurrency: str | None) -> "Side":
        extra = {"POLLER_CONCURRENCY": concurrency} if concurrency else {}
        return cls("new", "esta versão", ROOT, extra)

    @classmethod
    def baseline(cls, tmp: str) -> "Side":
        path = os.path.join(tmp, f"ponte-{BASELINE_LABEL}")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, BASELINE_COMMIT],
                       check=True, capture_output=True)
        return cls("old", BASELINE_LABEL, path, {}, worktree=True)

    def remove(self) -> None:
        """Remove the temporary worktree (and git's record of it)."""
        if self.worktree:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", self.path],
                           capture_output=True)
            subprocess.run(["git", "-C", ROOT, "worktree", "prune"], capture_output=True)

    def settings(self) -> dict:
        """The settings of this checkout that shape the figures, as its own config.py reads
        them with this side's environment (KOMMO_MAX_RPS; POLLER_CONCURRENCY where it exists)."""
        code = ("import json, config; s = config.load_settings(dict(__import__('os').environ)); "
                "print(json.dumps({'kommo_max_rps': s.kommo_max_rps, "
                "'poller_concurrency': getattr(s, 'poller_concurrency', None)}))")
        env = {"PATH": os.environ.get("PATH", ""), **self.extra_env}
        out = subprocess.run([sys.executable, "-c", code], cwd=self.path, env=env,
                             capture_output=True, text=True, timeout=60)
        try:
            return json.loads(out.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"error": (out.stderr or out.stdout)[-300:]}

    def commit(self) -> str:
        out = subprocess.run(["git", "-C", self.path, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True)
        # The figures the benchmarks themselves wrote (docs/benchmarks*) are not code changes.
        dirty = subprocess.run(["git", "-C", self.path, "status", "--porcelain",
                                "--untracked-files=no", "--", ".", ":(exclude)docs/benchmarks*"],
                               capture_output=True, text=True)
        return out.stdout.strip() + ("+mudanças" if dirty.stdout.strip() else "")


# --- stand-ins and ponte's processes ----------------------------------------------------------

class SeparatePeer:
    """A Kommo or n8n stand-in in a process of its own (standins/serve.py: keep-alive, a pool of
    threads), read over HTTP: `url`, `stop()`."""

    def __init__(self, tmp: str, peer: str, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start_process([sys.executable, "-m", "standins.serve", peer, "--port",
                                   str(self.port), *args], ROOT, dict(os.environ),
                                  os.path.join(tmp, f"standin-{peer}.log"))
        def up():  # any answer (a 404 too); a stand-in that died fails at once
            if self.proc.poll() is not None:
                raise RuntimeError(f"o stand-in {peer} saiu (log: {tmp}/standin-{peer}.log)")
            return http_status(self.port, "/")

        try:
            wait_for(up, 15, interval=0.05, what=f"o stand-in {peer}")
        except BaseException:
            stop_process(self.proc, timeout=5)
            raise

    def get(self, path: str) -> dict:
        return requests.get(self.url + path, timeout=10).json()

    def stop(self) -> None:
        stop_process(self.proc, timeout=5)


class Peers:
    """The four stand-ins of one scenario, with what ponte needs to reach them (`env`) and the
    Kommo request log (time and status of every request). Mercado Livre and Chatwoot run on
    threads of this process; so do Kommo and n8n, unless `separate_dir` is given: then each
    runs in a process of its own (the drain, where their cost per call would otherwise be what
    is measured: this process's one GIL, and a TCP handshake per call to Werkzeug)."""

    def __init__(self, web_port: int, n8n_latency_seconds: float, kommo_max_rps: float,
                 separate_dir: str | None = None):
        self.separate = separate_dir is not None
        if self.separate:
            os.makedirs(separate_dir, exist_ok=True)
            self.kommo = SeparatePeer(separate_dir, "kommo", "--max-rps", str(kommo_max_rps))
            self.n8n = SeparatePeer(separate_dir, "n8n", "--api-key", N8N_KEY, "--latency",
                                    str(n8n_latency_seconds))
        else:
            self.kommo_app = kommo_standin.create_app(max_rps=kommo_max_rps)
            self.kommo_log = RequestLog(self.kommo_app.wsgi_app)
            self.kommo_app.wsgi_app = self.kommo_log
            self.n8n_app = n8n_standin.create_app(api_key=N8N_KEY, mode="sync",
                                                  latency_seconds=n8n_latency_seconds)
            self.kommo, self.n8n = ServedApp(self.kommo_app), ServedApp(self.n8n_app)
        self.meli = demo_meli.start(f"http://127.0.0.1:{web_port}")
        self.ml_url, self.cw_url = self.meli.ml_url, self.meli.cw_url
        by_name = {served.app.name: served.app for served in self.meli.servers}
        self.ml_state = by_name["standin_mercadolivre"].config["STANDIN_STATE"]
        self.cw_state = by_name["standin_chatwoot"].config["STANDIN_STATE"]
        requests.post(f"{self.ml_url}/_standin/items", timeout=5, json=[
            {"id": "MLB3737188005", "title": "Furadeira de Impacto 650W", "price": 289.9}])
        self.env = {**self.meli.env, "ML_POLL_QUESTIONS_SECONDS": "1",
                    "KOMMO_BASE_URL": self.kommo.url, "KOMMO_WEBHOOK_SECRET": SECRET,
                    "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN,
                    "N8N_WEBHOOK_URL": self.n8n.url + "/webhook/ponte", "N8N_API_KEY": N8N_KEY}

    @property
    def replies(self) -> list[dict]:
        """Messages that reached a Kommo talk (send_message accepted), with their time."""
        if self.separate:
            return self.kommo.get("/_standin/state")["sent"]
        return list(self.kommo_app.config["STATE"].sent)

    def sent_count(self) -> int:
        """How many messages reached a Kommo talk (cheaper to ask than `replies`)."""
        if self.separate:
            rate = self.kommo.get("/_standin/rate")
            return rate["requests"] - rate["rate_limited"]
        return len(self.kommo_app.config["STATE"].sent)

    @property
    def n8n_calls(self) -> list[dict]:
        if self.separate:
            return self.n8n.get("/_standin/calls")["calls"]
        return list(self.n8n_app.config["STATE"]["calls"])

    def kommo_figures(self) -> dict:
        if self.separate:
            rate = self.kommo.get("/_standin/rate")
            return {"kommo_requests": rate["requests"],
                    "kommo_max_in_1s": rate["max_in_any_window"],
                    "kommo_429": rate["rate_limited"]}
        entries = list(self.kommo_log.entries)
        return {"kommo_requests": len(entries),
                "kommo_max_in_1s": max_in_window([e["at"] for e in entries]),
                "kommo_429": sum(1 for e in entries if e["status"] == 429)}

    def stop(self) -> None:
        for served in (self.kommo, self.n8n):
            served.stop()
        demo_meli.stop(self.meli)


def stack_env(side: Side, tmp: str, port: int, peers: Peers, **extra) -> dict:
    """ponte's environment: nothing inherited that configures ponte (nor a PYTHONPATH that would
    mix the checkouts), both bridges pointed at the stand-ins."""
    prefixes = ("KOMMO_", "N8N_", "ML_", "CHATWOOT_", "BOT_", "JOB_", "POLLER_", "WEB_", "LOG_",
                "DATABASE_", "PONTE_")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(prefixes) and k != "PYTHONPATH"}
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "WEB_WORKERS": "2",
                "DATABASE_PATH": os.path.join(tmp, "ponte.db"),
                "LOG_DIR": os.path.join(tmp, "logs"), "LOG_LEVEL": "INFO",
                "PONTE_ENV_FILE": os.path.join(tmp, "no-such.env"), "PYTHONUNBUFFERED": "1",
                "BOT_DEBOUNCE_SECONDS": "0",
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})
    env.update(peers.env)
    env.update(side.extra_env)
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Stack:
    """ponte's web (Gunicorn) and poller from one checkout, on a fresh database."""

    def __init__(self, side: Side, tmp: str, env: dict, start_poller: bool = True):
        self.side, self.tmp, self.env = side, tmp, env
        os.makedirs(tmp, exist_ok=True)
        self.web = Gunicorn("webhook_server:create_app()", env, os.path.join(tmp, "web.log"),
                            "/", cwd=side.path)
        self.port = self.web.port
        self.poller = None
        if start_poller:
            self.start_poller()

    def start_poller(self) -> float:
        """Start `python poller.py`; returns when it beats (its first scheduled tasks ran)."""
        started_at = time.time()
        self.poller = start_process([sys.executable, "poller.py"], self.side.path, self.env,
                                    os.path.join(self.tmp, "poller.log"))
        wait_for(lambda: self.poller.poll() is None and self._beat_after(started_at), 30,
                 what=f"o poller de {self.side.label} (log: {self.tmp}/poller.log)")
        return started_at

    def _beat_after(self, t: float) -> bool:
        try:
            conn = sqlite3.connect(self.env["DATABASE_PATH"], timeout=1)
            try:
                row = conn.execute("SELECT beat_at FROM heartbeats WHERE process = 'poller'"
                                   ).fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return False
        return bool(row) and row[0] >= t - 1

    def pids(self) -> list[int]:
        poller = [self.poller.pid] if self.poller and self.poller.poll() is None else []
        return self.web.pids() + poller

    def rss_peaks_kb(self, rss: RssSampler) -> dict:
        """Each process's own peak (VmHWM) by role: where the stack's memory goes."""
        roles = {self.web.proc.pid: "web_master"}
        if self.poller is not None:
            roles[self.poller.pid] = "poller"
        return {roles.get(pid, f"web_worker_{pid}"): kb for pid, kb in sorted(rss.hwm_kb.items())}

    def jobs(self, sql: str, args=()) -> list:
        conn = sqlite3.connect(self.env["DATABASE_PATH"], timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.poller is not None:
            stop_process(self.poller, timeout=15)
        self.web.stop()


# --- customers --------------------------------------------------------------------------------

_customer_numbers = itertools.count(1)


def customer_body(tag: str, i: int, text: str = "qual o prazo de entrega?") -> tuple[str, bytes]:
    """One customer's message: its own message id and (numeric, as Kommo's) contact, talk and
    lead, never reused within a run."""
    mid, k = f"{tag}-{i:05d}", next(_customer_numbers)
    return mid, kommo_standin.message_form(
        f"{text} ({tag} {i})", message_id=mid, contact_id=str(7_000_000 + k),
        talk_id=str(60_000 + k), lead_id=str(40_000_000 + k)).encode()


def send_at_once(port: int, bodies: list[bytes]) -> dict:
    """POST every body at once (up to 32 in flight); when the first went out, when all were
    answered, and the statuses."""
    statuses: dict[int, int] = {}
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, len(bodies))) as pool:
        for status in pool.map(lambda b: post_webhook(port, b), bodies):
            statuses[status] = statuses.get(status, 0) + 1
    return {"t0": t0, "acked_s": time.time() - t0, "statuses": statuses}


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


# --- scenarios --------------------------------------------------------------------------------

def scenario_burst(side: Side, tmp: str, customers: int, budget_s: float,
                   with_question: bool) -> dict:
    """`customers` messages at once; first/last reply at Kommo; optionally a Mercado Livre
    question one second later, and how long it takes to reach Chatwoot."""
    port = free_port()
    peers = Peers(port, N8N_LATENCY_SECONDS, KOMMO_LIMIT_PER_SECOND)
    stack = None
    out: dict = {"customers": customers, "budget_s": budget_s}
    try:
        stack = Stack(side, tmp, stack_env(side, tmp, port, peers))
        wait_for(lambda: peers.ml_state.calls, 15, what="a primeira leitura de perguntas")
        tag = f"b{customers}"
        bodies = [customer_body(tag, i)[1] for i in range(customers)]
        question_text = "Boa tarde! Ela é bivolt? Vem com maleta?"
        with RssSampler(stack.pids) as rss:
            deadline = time.monotonic() + budget_s
            sent = send_at_once(port, bodies)
            t0 = sent["t0"]
            out.update(acked_s=sent["acked_s"], statuses=sent["statuses"])
            question_at = None
            if with_question:
                time.sleep(max(0.0, t0 + QUESTION_AFTER_SECONDS - time.time()))
                qid = requests.post(f"{peers.ml_url}/_standin/questions", timeout=5, json=[
                    {"text": question_text, "item_id": "MLB3737188005",
                     "buyer_id": 1944693439, "nickname": "COMPRADOR_BENCH"}]).json()["ids"][0]
                with peers.ml_state.lock:
                    question_at = dt.datetime.fromisoformat(
                        peers.ml_state.questions[qid]["date_created"]).timestamp()

            def question_in_chatwoot():
                with peers.cw_state.lock:
                    return min((m["created_at"] for m in peers.cw_state.messages.values()
                                if m["message_type"] == "incoming"
                                and question_text in (m["content"] or "")), default=None)

            def done():
                return len(peers.replies) >= customers and \
                    (not with_question or question_in_chatwoot() is not None)

            wait_for(done, remaining(deadline), interval=0.05)
            time.sleep(0.5)  # a duplicate would show up now
        replies = peers.replies
        times = sorted(r["at"] for r in replies)
        per_talk: dict[str, int] = {}
        for r in replies:
            per_talk[r["talk_id"]] = per_talk.get(r["talk_id"], 0) + 1
        complete = len(per_talk) >= customers
        out.update({
            "replies": len(replies), "complete": complete,
            "first_reply_s": times[0] - t0 if times else None,
            "last_reply_s": times[-1] - t0 if complete else None,
            "exactly_one_reply": complete and all(c == 1 for c in per_talk.values()),
            "n8n_calls": len(peers.n8n_calls),
            "rss_max_sum_kb": rss.max_sum_kb, "rss_peaks_kb": stack.rss_peaks_kb(rss),
            **peers.kommo_figures()})
        if with_question:
            reached = question_in_chatwoot()
            out["question_s"] = reached - question_at if reached is not None else None
        out["jobs"] = dict(stack.jobs("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
    finally:
        if stack is not None:
            stack.stop()
        peers.stop()
    return out


def scenario_instant(side: Side, tmp: str, spaced: int, burst: int, after: int,
                     budget_s: float, seed: int = 13) -> dict:
    """Webhook → n8n call with an instant n8n and Kommo at 7/s: messages one every 200–400 ms,
    then a burst of `burst` at once followed by `after` messages one every 100 ms."""
    port = free_port()
    peers = Peers(port, 0.0, KOMMO_LIMIT_PER_SECOND)
    rng = random.Random(seed)
    stack = None
    sent_at: dict[str, float] = {}
    out: dict = {"spaced": spaced, "burst": burst, "after": after, "budget_s": budget_s}
    try:
        stack = Stack(side, tmp, stack_env(side, tmp, port, peers))
        wait_for(lambda: peers.ml_state.calls, 15, what="a primeira leitura de perguntas")
        deadline = time.monotonic() + budget_s
        with RssSampler(stack.pids) as rss:
            for i in range(spaced):
                mid, body = customer_body("sp", i, "qual o valor do frete?")
                sent_at[mid] = time.time()
                post_webhook(port, body)
                time.sleep(rng.uniform(0.2, 0.4))
            # Let the spaced messages' replies go out, so the burst starts from a quiet queue.
            wait_for(lambda: len(peers.replies) >= spaced, remaining(deadline), interval=0.05)
            burst_bodies = [customer_body("bu", i)[1] for i in range(burst)]
            send_at_once(port, burst_bodies)
            for i in range(after):
                mid, body = customer_body("af", i, "qual o valor do frete?")
                sent_at[mid] = time.time()
                post_webhook(port, body)
                time.sleep(0.1)
            total = spaced + burst + after
            wait_for(lambda: len(peers.n8n_calls) >= total and len(peers.replies) >= total,
                     remaining(deadline), interval=0.05)
        arrived = {c["body"].get("message_id"): c["at"] for c in peers.n8n_calls}

        def stats(prefix: str, count: int) -> dict:
            lat = sorted(1000 * (arrived[m] - t) for m, t in sent_at.items()
                         if m.startswith(prefix) and m in arrived)
            return {"samples": len(lat), "missing": count - len(lat),
                    "p50_ms": percentile(lat, 50) if lat else None,
                    "p99_ms": percentile(lat, 99) if lat else None,
                    "max_ms": lat[-1] if lat else None}

        out.update({"spaced_e2e": stats("sp-", spaced), "after_burst_e2e": stats("af-", after),
                    "replies": len(peers.replies), "rss_max_sum_kb": rss.max_sum_kb,
                    "rss_peaks_kb": stack.rss_peaks_kb(rss),
                    **peers.kommo_figures()})
    finally:
        if stack is not None:
            stack.stop()
        peers.stop()
    return out


def peer_cost_ms(peers: Peers, count: int = 100) -> dict:
    """What one call to the scenario's instant n8n and Kommo stand-ins costs, one after another
    from this process: the ceiling a drain against them cannot pass, whatever ponte does.
    Called before the scenario; the Kommo stand-in forgets these calls afterwards."""
    session = requests.Session()
    t0 = time.perf_counter()
    for _ in range(count):
        session.post(peers.n8n.url + "/webhook/ponte", json={"message_text": "oi"}, timeout=10,
                     headers={"Authorization": f"Bearer {N8N_KEY}"})
    t1 = time.perf_counter()
    for _ in range(count):
        session.post(peers.kommo.url + "/api/v4/talks/1/send_message", json={"text": "oi"},
                     timeout=10,
                     headers={"Authorization": f"Bearer {kommo_standin.DEFAULT_TOKEN}"})
    t2 = time.perf_counter()
    session.post(peers.kommo.url + "/_standin/reset", timeout=10)
    return {"n8n_standin_ms_per_call": 1000 * (t1 - t0) / count,
            "kommo_standin_ms_per_call": 1000 * (t2 - t1) / count}


def scenario_drain(side: Side, tmp: str, messages: int, budget_s: float) -> dict:
    """`messages` webhooks recorded with the poller stopped; then the poller drains them
    against instant peers with no rate limit. Jobs per second from the jobs' finish times."""
    port = free_port()
    out: dict = {"messages": messages, "budget_s": budget_s}
    peers = Peers(port, 0.0, 0, separate_dir=os.path.join(tmp, "peers"))
    stack = None
    try:
        out.update(peer_cost_ms(peers))
        stack = Stack(side, tmp, stack_env(side, tmp, port, peers, KOMMO_MAX_RPS=0),
                      start_poller=False)
        sent = send_at_once(port, [customer_body("dr", i)[1] for i in range(messages)])
        out["statuses"] = sent["statuses"]
        with RssSampler(stack.pids) as rss:
            started_at = stack.start_poller()
            # (the figure comes from the jobs' own finish times: this only waits for the end)
            wait_for(lambda: peers.sent_count() >= messages, budget_s, interval=0.25)
            wait_for(lambda: not stack.jobs("SELECT 1 FROM jobs WHERE status IN "
                                            "('pending', 'running') LIMIT 1"), 5, interval=0.05)
        rows = stack.jobs("SELECT finished_at, kind FROM jobs WHERE status = 'done' AND "
                          "finished_at >= ? ORDER BY finished_at", (started_at - 1,))
        finished = [r[0] for r in rows]
        span = finished[-1] - finished[0] if len(finished) > 1 else 0
        by_kind: dict[str, list[float]] = {}
        for at, kind in rows:
            by_kind.setdefault(kind, []).append(at)
        # Per kind, each over its own first-to-last span (the kinds overlap in time).
        out["jobs_per_s_by_kind"] = {kind: (len(ts) - 1) / (ts[-1] - ts[0])
                                     for kind, ts in by_kind.items()
                                     if len(ts) > 1 and ts[-1] > ts[0]}
        out.update({"jobs_done": len(finished), "replies": len(peers.replies),
                    "complete": len(peers.replies) >= messages,
                    "drain_s": span, "jobs_per_s": (len(finished) - 1) / span if span else None,
                    "by_kind": dict(stack.jobs("SELECT kind, COUNT(*) FROM jobs GROUP BY kind")),
                    "rss_max_sum_kb": rss.max_sum_kb, "rss_peaks_kb": stack.rss_peaks_kb(rss),
            **peers.kommo_figures()})
    finally:
        if stack is not None:
            stack.stop()
        peers.stop()
    return out


def scenario_drain_repeated(side: Side, tmp: str, messages: int, budget_s: float,
                            runs: int) -> dict:
    """`scenario_drain` `runs` times, each on a fresh stack: the figures of the run with the
    median jobs/s, and every run's jobs/s. One run of a few seconds swung ±20 % on this shared
    machine; the median of a fixed number of runs, for both versions alike, swings less."""
    results = [scenario_drain(side, os.path.join(tmp, f"run-{i}"), messages, budget_s)
               for i in range(runs)]
    ranked = sorted(results, key=lambda r: r.get("jobs_per_s") or 0.0)
    median = dict(ranked[len(ranked) // 2])
    median["runs_jobs_per_s"] = [r.get("jobs_per_s") for r in results]
    median["rss_max_sum_kb"] = max(r.get("rss_max_sum_kb", 0) for r in results)
    return median


def log_tail(directory: str, lines: int = 4) -> dict:
    """The last lines of the web and poller logs of a scenario (why it failed)."""
    out = {}
    for name in ("web.log", "poller.log"):
        try:
            with open(os.path.join(directory, name), errors="replace") as fh:
                out[name] = [line[:400] for line in fh.read().splitlines()[-lines:]]
        except OSError:
            pass
    return out


def scenario_intake(side: Side, tmp: str, messages: int, budget_s: float) -> dict:
    """`messages` webhooks recorded with the poller stopped, then the poller applies them with
    a one-hour debounce, so no job calls a peer: ponte's own pace (`kommo.intake` jobs/s)."""
    port = free_port()
    peers = Peers(port, 0.0, 0)
    stack = None
    out: dict = {"messages": messages, "budget_s": budget_s}
    done_sql = "SELECT COUNT(*) FROM jobs WHERE kind = 'kommo.intake' AND status = 'done'"
    try:
        stack = Stack(side, tmp, stack_env(side, tmp, port, peers, BOT_DEBOUNCE_SECONDS=3600,
                                           BOT_DEBOUNCE_MAX_SECONDS=3600), start_poller=False)
        out["statuses"] = send_at_once(port, [customer_body("in", i)[1]
                                              for i in range(messages)])["statuses"]
        with RssSampler(stack.pids) as rss:
            started_at = stack.start_poller()
            wait_for(lambda: stack.jobs(done_sql)[0][0] >= messages, budget_s, interval=0.05)
        out["rss_max_sum_kb"] = rss.max_sum_kb
        out["rss_peaks_kb"] = stack.rss_peaks_kb(rss)
        finished = [r[0] for r in stack.jobs(
            "SELECT finished_at FROM jobs WHERE kind = 'kommo.intake' AND status = 'done' "
            "ORDER BY finished_at")]
        span = finished[-1] - finished[0] if len(finished) > 1 else 0
        out.update({"applied": len(finished), "complete": len(finished) >= messages,
                    "jobs_per_s": (len(finished) - 1) / span if span else None,
                    "from_poller_start_s": finished[-1] - started_at if finished else None,
                    "peer_calls": len(peers.n8n_calls) + len(peers.kommo_log.entries)})
    finally:
        if stack is not None:
            stack.stop()
        peers.stop()
    return out


def run_side(side: Side, tmp: str, sizes: dict, budget_s: float) -> dict:
    """Every scenario against one checkout; a scenario that fails is recorded, not fatal."""
    results: dict = {"commit": side.commit(), "env": side.extra_env,
                     "settings": side.settings()}
    plan = [
        ("burst20", lambda d: scenario_burst(side, d, sizes["burst_small"], budget_s, True)),
        ("burst100", lambda d: scenario_burst(side, d, sizes["burst_large"], budget_s, False)),
        ("instant", lambda d: scenario_instant(side, d, sizes["spaced"], sizes["instant_burst"],
                                               sizes["after"], budget_s)),
        ("drain", lambda d: scenario_drain_repeated(side, d, sizes["drain"], budget_s,
                                                    sizes.get("drain_runs", 1))),
        ("intake", lambda d: scenario_intake(side, d, sizes["intake"], budget_s)),
    ]
    for name, run in plan:
        print(f"  {side.label}: {name}...", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            results[name] = run(os.path.join(tmp, f"{side.name}-{name}"))
        except Exception as exc:  # one broken scenario must not hide the others' figures
            results[name] = {"error": f"{type(exc).__name__}: {exc}",
                             "log_tail": log_tail(os.path.join(tmp, f"{side.name}-{name}"))}
        results[name]["wall_s"] = time.monotonic() - t
        # Other sessions share this machine: how busy it was, for reading the figures.
        results[name]["loadavg_1min_after"] = os.getloadavg()[0]
        print(f"    {json.dumps(results[name], default=str)}", file=sys.stderr, flush=True)
    return results


# --- report -----------------------------------------------------------------------------------

def seconds(v, budget) -> str:
    return f"> {budget:.0f} s" if v is None else f"{n(v)} s"


def ms(v) -> str:
    return "—" if v is None else f"{n(v)} ms"


def cell(side: dict | None, key: str, fmt) -> str:
    """One figure of one side, or why there is none."""
    if side is None:
        return "não medido"
    if "error" in side:
        return "erro: " + side["error"][:80]
    return fmt(side)


def markdown(res: dict, m: dict, quick: bool) -> str:
    sizes, budget = res["sizes"], res["budget_s"]
    new, old = res.get("new", {}), res.get("old", {})
    small, large = sizes["burst_small"], sizes["burst_large"]
    rows = []

    def row(label, scenario, fmt, goal):
        rows.append(f"| {label} | {cell(new.get(scenario), scenario, fmt)} | "
                    f"{cell(old.get(scenario), scenario, fmt)} | {goal} |")

    def first_last(r):
        return (f"{seconds(r['first_reply_s'], budget)} / {seconds(r['last_reply_s'], budget)}"
                + ("" if r["complete"] else f" ({r['replies']} de {r['customers']} no prazo)"))

    def kommo(r):
        return f"{r['kommo_max_in_1s']} req / {r['kommo_429']} × 429 ({r['kommo_requests']} req)"

    def drain_cell(r):
        if not r.get("jobs_per_s"):
            return "—"
        runs = [v for v in r.get("runs_jobs_per_s") or [] if v]
        spread = (f"mediana de {len(runs)} rodadas: {', '.join(n(v, 0) for v in sorted(runs))}; "
                  if len(runs) > 1 else "")
        return (f"{n(r['jobs_per_s'], 0)} jobs/s ({spread}{r['jobs_done']} jobs; uma chamada, uma "
                f"após a outra, custa {n(r['n8n_standin_ms_per_call'])} ms ao dublê do n8n e "
                f"{n(r['kommo_standin_ms_per_call'])} ms ao do Kommo)")

    def e2e(key):
        return lambda r: f"{ms(r[key]['p50_ms'])} / {ms(r[key]['p99_ms'])}"

    row(f"{small} clientes ao mesmo tempo: webhooks → 1ª / última resposta no Kommo", "burst20",
        first_last, f"última ≤ {n(GOAL_BURST20_LAST_S, 0)} s")
    row("pergunta do Mercado Livre durante esses atendimentos → mensagem no Chatwoot", "burst20",
        lambda r: seconds(r.get("question_s"), budget), f"≤ {n(GOAL_QUESTION_S, 0)} s")
    row(f"{large} clientes ao mesmo tempo: webhooks → 1ª / última resposta no Kommo", "burst100",
        first_last, f"última ≤ {n(goal_burst_last_s(large))} s")
    row("webhook → chamada ao n8n (n8n instantâneo), p50 / p99, uma mensagem a cada 200–400 ms",
        "instant", e2e("spaced_e2e"), f"≤ {GOAL_E2E_P50_MS:.0f} / ≤ {GOAL_E2E_P99_MS:.0f} ms")
    row(f"idem, logo depois de uma rajada de {sizes['instant_burst']} mensagens", "instant",
        e2e("after_burst_e2e"), f"≤ {GOAL_E2E_P50_MS:.0f} / ≤ {GOAL_E2E_P99_MS:.0f} ms")
    row(f"fila esvaziando {sizes['drain']} mensagens contra parceiros instantâneos", "drain",
        drain_cell, f"≥ {GOAL_DRAIN_JOBS_PER_S:.0f} jobs/s")
    row(f"poller aplicando {sizes['intake']} webhooks gravados, sem chamar parceiro "
        "(debounce de 1 h)", "intake",
        lambda r: (f"{n(r['jobs_per_s'], 0)} webhooks/s" if r.get("jobs_per_s") else "—")
        + ("" if r.get("complete") else f" ({r.get('applied', 0)} aplicados no prazo)"), "—")
    for scenario, label in (("burst20", f"{small} clientes"), ("burst100", f"{large} clientes"),
                            ("instant", "n8n instantâneo")):
        row(f"Kommo ({label}): mais requisições em 1 s / respostas 429", scenario, kommo,
            f"≤ {KOMMO_LIMIT_PER_SECOND} / 0")
    rows.append(f"| pico de RSS da pilha (web: master + 2 workers; poller), maior soma | "
                f"{n(peak_rss_mb(new), 0)} MB | {n(peak_rss_mb(old), 0)} MB | "
                f"≤ {GOAL_RSS_MB:.0f} MB |")
    new_set, old_set = new.get("settings", {}), old.get("settings", {})
    return "\n".join([
        SECTION, "",
        f"Medido em {m['date']} — {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}"
        f"{', modo `--quick`' if quick else ''}. Esta versão: `{new.get('commit', '?')}` "
        f"(`POLLER_CONCURRENCY={new_set.get('poller_concurrency', '?')}`, "
        f"`KOMMO_MAX_RPS={new_set.get('kommo_max_rps', '?')}`); {BASELINE_LABEL}: "
        f"`{BASELINE_COMMIT}`, o poller de um job por vez "
        f"(`KOMMO_MAX_RPS={old_set.get('kommo_max_rps', '?')}`), na mesma execução, com os mesmos "
        "dublês. Carga da máquina (média de 1 min, outras sessões incluídas) ao fim de cada "
        f"cenário: {load_range(res)}.", "",
        "Para rodar de novo: `./ponte bench` (todos) ou "
        "`.venv/bin/python bench/bench_concurrency.py` (só este; `--quick` para uma rodada curta, "
        "`--no-doc` para não mexer neste arquivo).", "",
        f"| medida | esta versão | {BASELINE_LABEL} | meta |", "|---|---|---|---|", *rows, "",
        f"Como foi medido. Processos de verdade (Gunicorn com `gunicorn_conf.py`, 2 workers, e "
        f"`python poller.py`), um banco novo por cenário, `BOT_DEBOUNCE_SECONDS=0`, as duas "
        f"pontes configuradas. Dublês em threads do processo do benchmark: o n8n responde em "
        f"{n(N8N_LATENCY_SECONDS, 0)} s, o Kommo aceita {KOMMO_LIMIT_PER_SECOND} requisições "
        f"em qualquer janela de 1 s (429 acima), Mercado Livre e Chatwoot respondem na hora. "
        f"Cada cliente tem contato, conversa e lead próprios. Tempos: os registrados pelos "
        f"dublês na chegada, contados do instante em que o primeiro webhook sai. A pergunta "
        f"aparece no Mercado Livre {n(QUESTION_AFTER_SECONDS, 0)} s depois dos webhooks "
        f"(`ML_POLL_QUESTIONS_SECONDS=1`); conta-se da criação dela no dublê até a mensagem no "
        f"Chatwoot. Cada cenário tem {budget:.0f} s; o que passa disso aparece como "
        f"\"> {budget:.0f} s\". Fila: {sizes['drain']} webhooks gravados com o poller parado, "
        "depois o poller liga (Kommo sem limite, `KOMMO_MAX_RPS=0`; aqui os dublês do n8n e "
        "do Kommo rodam cada um no seu processo, com conexões mantidas abertas, como parceiros "
        "de verdade — `standins/serve.py`); jobs concluídos ÷ tempo entre o primeiro e o "
        "último `finished_at`, a mediana de 3 rodadas, cada uma com pilha nova (uma rodada "
        "de poucos segundos variava ±20 % nesta máquina compartilhada); os webhooks sem "
        "parceiro, do mesmo jeito "
        "com debounce de 1 h (nenhum job chama o n8n ou o Kommo).", ""])


def load_range(res: dict) -> str:
    loads = [r["loadavg_1min_after"] for side in ("new", "old")
             for r in res.get(side, {}).values()
             if isinstance(r, dict) and "loadavg_1min_after" in r]
    return f"{n(min(loads))}–{n(max(loads))}" if loads else "?"


def peak_rss_mb(side: dict) -> float:
    values = [r.get("rss_max_sum_kb", 0) for r in side.values() if isinstance(r, dict)]
    return max(values, default=0) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark de concorrência (muitos clientes).")
    parser.add_argument("--quick", action="store_true", help="menos clientes, rodada curta")
    parser.add_argument("--no-doc", action="store_true",
                        help="não atualiza docs/benchmarks.md nem docs/benchmarks-concurrency.json")
    parser.add_argument("--only", choices=("new", "old"), help="só esta versão ou só a 0.2.0")
    parser.add_argument("--budget", type=float, help="segundos por cenário (padrão 120; 60 "
                        "com --quick)")
    parser.add_argument("--concurrency", default=os.environ.get("POLLER_CONCURRENCY"),
                        help="POLLER_CONCURRENCY desta versão (padrão: o do ambiente ou o da "
                        "ponte)")
    parser.add_argument("--json", help="grava os números neste arquivo JSON")
    args, _unknown = parser.parse_known_args(argv)  # ./ponte bench passes its args to every script
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    budget = args.budget or (60.0 if args.quick else 120.0)
    sizes = ({"burst_small": 6, "burst_large": 20, "spaced": 10, "instant_burst": 10,
              "after": 8, "drain": 150, "intake": 300} if args.quick else
             {"burst_small": 20, "burst_large": 100, "spaced": 40, "instant_burst": 20,
              "after": 15, "drain": 600, "drain_runs": 3, "intake": 1500})
    results: dict = {"sizes": sizes, "budget_s": budget, "quick": args.quick,
                     "n8n_latency_seconds": N8N_LATENCY_SECONDS,
                     "kommo_limit_per_second": KOMMO_LIMIT_PER_SECOND,
                     "baseline_commit": BASELINE_COMMIT}
    sides: list[Side] = []
    m = machine()
    with tempfile.TemporaryDirectory(prefix="ponte-bench-conc-") as tmp:
        watchdog(HARD_DEADLINE_S, "bench_concurrency",
                 on_fire=lambda: [s.remove() for s in sides])
        try:
            if args.only != "old":
                sides.append(Side.current(args.concurrency))
            if args.only != "new":
                sides.append(Side.baseline(tmp))
            for side in sides:
                print(f"{side.label} ({side.path}):", file=sys.stderr, flush=True)
                results[side.name] = run_side(side, tmp, sizes, budget)
        finally:
            for side in sides:
                side.remove()
    results["machine"] = m
    section = markdown(results, m, args.quick)
    print(section)
    json_path = args.json or (None if args.no_doc else JSON_PATH)
    if json_path:
        write_json(json_path, results)
        print(f"gravado: {json_path}", file=sys.stderr)
    if not args.no_doc:
        update_doc(DOC_PATH, SECTION, section)
        print(f"atualizado: {os.path.relpath(DOC_PATH, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
