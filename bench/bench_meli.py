"""Benchmark of bridge B (not a test): API calls per idle poll cycle, time to turn 1,000 new
questions into Chatwoot conversations against instant local stand-ins, and the ack latency of
POST /webhooks/chatwoot under 32 concurrent senders against Gunicorn with 2 workers.

Run: `./ponte bench` (all benchmarks) or `.venv/bin/python bench/bench_meli.py [--questions N]
[--senders N] [--requests-per-sender N] [--write docs/benchmarks-meli.md]`. Everything runs on
loopback; the stand-ins run in their own process so they do not share ponte's interpreter.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

import chatwoot_api  # noqa: E402
import config  # noqa: E402
import db_manager  # noqa: E402
import meli_jobs  # noqa: E402
import outbox  # noqa: E402
from benchlib import machine, percentile  # noqa: E402
from standins.support import free_port, wait_for  # noqa: E402

SELLER = 779432305
SECRET = "bench-webhook-secret"

STANDINS_SERVER = """
import logging, sys, threading
sys.path.insert(0, {root!r})
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from werkzeug.serving import make_server
from standins import mercadolivre, chatwoot
servers = [make_server("127.0.0.1", 0, mercadolivre.create_app({seller}), threaded=True),
           make_server("127.0.0.1", 0, chatwoot.create_app(), threaded=True)]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print(servers[0].server_port, servers[1].server_port, flush=True)
sys.stdin.read()
"""


def env_for(ml_url: str, cw_url: str, db_path: str, log_dir: str) -> dict:
    import standins.chatwoot as scw
    import standins.mercadolivre as sml

    return {"DATABASE_PATH": db_path, "LOG_DIR": log_dir, "LOG_LEVEL": "WARNING",
            "ENVIRONMENT": "test", "ML_CLIENT_ID": sml.DEFAULT_CLIENT_ID,
            "ML_CLIENT_SECRET": sml.DEFAULT_CLIENT_SECRET, "ML_SELLER_ID": str(SELLER),
            "ML_API_BASE_URL": ml_url, "ML_ACCESS_TOKEN": "APP_USR-standin-initial",
            "ML_REFRESH_TOKEN": "TG-standin-initial", "CHATWOOT_BASE_URL": cw_url,
            "CHATWOOT_API_TOKEN": scw.DEFAULT_TOKEN, "CHATWOOT_ACCOUNT_ID": "1",
            "CHATWOOT_QUESTIONS_INBOX_ID": "7", "CHATWOOT_SALES_INBOX_ID": "8",
            "CHATWOOT_WEBHOOK_SECRET": SECRET}


def start_standins():
    proc = subprocess.Popen([sys.executable, "-c", STANDINS_SERVER.format(root=str(ROOT),
                                                                          seller=SELLER)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ml_port, cw_port = proc.stdout.readline().split()
    return proc, f"http://127.0.0.1:{ml_port}", f"http://127.0.0.1:{cw_port}"


def make_poller(env: dict):
    import logging

    from poller import Poller

    settings = config.load_settings(env)
    logging.disable(logging.INFO)
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    return Poller(settings, conn), conn


def calls(ml_url: str, cw_url: str) -> tuple[int, int]:
    ml = len(requests.get(f"{ml_url}/_standin/state").json()["calls"])
    cw = len(requests.get(f"{cw_url}/_standin/state").json()["requests"])
    return ml, cw


def bench_idle_and_questions(n_questions: int, workdir: str) -> dict:
    proc, ml_url, cw_url = start_standins()
    try:
        env = env_for(ml_url, cw_url, os.path.join(workdir, "q.db"), os.path.join(workdir, "l"))
        poller, conn = make_poller(env)
        ctx = poller.ctx
        # idle cycle: nothing new anywhere
        meli_jobs.poll_questions(ctx)
        meli_jobs.poll_messages(ctx)
        before = calls(ml_url, cw_url)
        cycles = 5
        for _ in range(cycles):
            meli_jobs.poll_questions(ctx)
            meli_jobs.poll_messages(ctx)
            poller.drain()
        after = calls(ml_url, cw_url)
        idle_ml = (after[0] - before[0]) / cycles
        idle_cw = (after[1] - before[1]) / cycles
        # 1,000 new questions from 1,000 buyers on 50 items
        requests.post(f"{ml_url}/_standin/items", json=[
            {"id": f"MLB{i:06d}", "title": f"Produto {i}", "price": 10 + i} for i in range(50)])
        requests.post(f"{ml_url}/_standin/questions", json=[
            {"text": f"Pergunta {n}?", "item_id": f"MLB{n % 50:06d}", "buyer_id": 5_000_000 + n,
             "date_created": f"2026-03-10T{10 + n // 3600:02d}:{(n // 60) % 60:02d}:"
                             f"{n % 60:02d}.000-04:00"} for n in range(n_questions)])
        before = calls(ml_url, cw_url)
        started = time.perf_counter()
        polled = 0
        while True:  # like the poller: poll, drain, poll again until nothing is new
            result = meli_jobs.poll_questions(ctx)
            polled += 1
            ran = poller.drain()
            if result["enqueued"] == 0 and ran == 0:
                break
        elapsed = time.perf_counter() - started
        after = calls(ml_url, cw_url)
        conversations = len(requests.get(f"{cw_url}/_standin/state").json()["conversations"])
        dead = outbox.queue_stats(conn)["dead"]
        # idle again, now with every one of those questions open (unanswered) on Mercado Livre
        backlog_before = calls(ml_url, cw_url)
        for _ in range(cycles):
            meli_jobs.poll_questions(ctx)
            meli_jobs.poll_messages(ctx)
            poller.drain()
        backlog_after = calls(ml_url, cw_url)
        idle_backlog = (backlog_after[0] - backlog_before[0]) / cycles
        return {"idle_ml_calls_per_cycle": idle_ml, "idle_chatwoot_calls_per_cycle": idle_cw,
                "idle_ml_calls_per_cycle_with_backlog": idle_backlog,
                "questions": n_questions, "conversations": conversations, "dead_jobs": dead,
                "seconds": round(elapsed, 2),
                "questions_per_second": round(n_questions / elapsed, 1),
                "ml_calls": after[0] - before[0], "chatwoot_calls": after[1] - before[1],
                "poll_rounds": polled}
    finally:
        proc.kill()
        proc.wait()


def bench_ack(senders: int, per_sender: int, workdir: str) -> dict:
    """Ack latency of both webhooks (Chatwoot replies, then Mercado Livre notifications)."""
    env = {**os.environ, **env_for("http://127.0.0.1:9", "http://127.0.0.1:9",
                                   os.path.join(workdir, "ack.db"), os.path.join(workdir, "la")),
           "PONTE_ENV_FILE": os.path.join(workdir, "none.env"), "WEB_WORKERS": "2"}
    port = free_port()
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    proc = subprocess.Popen([gunicorn, "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level",
                             "warning", "webhook_server:create_app()"], cwd=str(ROOT), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{base}/", timeout=1), 30, what="gunicorn",
                 ignoring=(requests.RequestException,))
        template = json.loads((ROOT / "tests" / "fixtures" / "payloads" / "chatwoot" /
                               "message_created_outgoing_with_attachment.json").read_text())
        out = {"chatwoot_single": _load(1, 200, f"{base}/webhooks/chatwoot",
                                        lambda i, n: _chatwoot_request(template, 900_000 + n)),
               "chatwoot": _load(senders, per_sender, f"{base}/webhooks/chatwoot",
                                 lambda i, n: _chatwoot_request(template, i * per_sender + n)),
               "mercadolivre": _load(senders, per_sender, f"{base}/webhooks/mercadolivre",
                                     lambda i, n: _ml_request(i * per_sender + n))}
        conn = db_manager.connect(env["DATABASE_PATH"])
        out["jobs_recorded"] = outbox.queue_stats(conn)["pending"]
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _chatwoot_request(template: dict, n: int) -> tuple[bytes, dict]:
    raw = json.dumps(dict(template, id=1_000_000 + n)).encode()
    ts = int(time.time())
    return raw, {"Content-Type": "application/json", "X-Chatwoot-Timestamp": str(ts),
                 "X-Chatwoot-Signature": chatwoot_api.sign_chatwoot_body(SECRET, ts, raw)}


def _ml_request(n: int) -> tuple[bytes, dict]:
    body = {"_id": f"bench-{n}", "resource": f"/questions/{13_100_000_000 + n}",
            "user_id": str(SELLER), "topic": "questions", "application_id": 1, "attempts": 1,
            "sent": "2026-03-10T18:22:32.464Z", "received": "2026-03-10T18:22:32.438Z"}
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def _load(senders: int, per_sender: int, url: str, make) -> dict:
    """`senders` threads each POST `per_sender` requests built by `make`; latency stats."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(senders)

    def sender(index: int):
        session = requests.Session()
        local, codes = [], {}
        barrier.wait()
        for n in range(per_sender):
            raw, headers = make(index, n)
            t0 = time.perf_counter()
            answer = session.post(url, data=raw, headers=headers, timeout=30)
            local.append(time.perf_counter() - t0)
            codes[answer.status_code] = codes.get(answer.status_code, 0) + 1
        with lock:
            latencies.extend(local)
            for k, v in codes.items():
                statuses[k] = statuses.get(k, 0) + v

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(senders)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p):
        return round(percentile(latencies, p * 100) * 1000, 1)

    return {"senders": senders, "requests": len(latencies), "statuses": statuses,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99), "max_ms": round(latencies[-1] * 1000, 1),
            "mean_ms": round(statistics.mean(latencies) * 1000, 1),
            "requests_per_second": round(len(latencies) / elapsed, 1)}


def markdown(q: dict, acks: dict) -> str:
    ack, note, one = acks["chatwoot"], acks["mercadolivre"], acks["chatwoot_single"]
    m = machine()
    return f"""# Benchmarks — ponte B (Mercado Livre ⇄ Chatwoot)

Gerado por `bench/bench_meli.py` em {m['date']},
máquina de {m['nproc']} núcleos, Python {m['python']}. Tudo em loopback,
contra os simuladores (`standins/`) rodando em outro processo, que respondem na hora.

| medida | resultado | meta |
|---|---|---|
| chamadas ao Mercado Livre por ciclo ocioso do poller (perguntas + mensagens) | {q['idle_ml_calls_per_cycle']:g} | ≤ 3 |
| idem, com as {q['questions']} perguntas abaixo importadas e ainda sem resposta no ML | {q['idle_ml_calls_per_cycle_with_backlog']:g} | ≤ 3 |
| chamadas ao Chatwoot por ciclo ocioso | {q['idle_chatwoot_calls_per_cycle']:g} | 0 |
| {q['questions']} perguntas novas → conversas no Chatwoot | {q['seconds']} s ({q['questions_per_second']} perguntas/s) | — |
| conversas criadas / jobs mortos | {q['conversations']} / {q['dead_jobs']} | {q['questions']} / 0 |
| chamadas ao ML / ao Chatwoot nessas {q['questions']} perguntas | {q['ml_calls']} / {q['chatwoot_calls']} | — |
| ack do `POST /webhooks/chatwoot`, {ack['senders']} remetentes simultâneos, Gunicorn 2 workers | p50 {ack['p50_ms']} ms · p95 {ack['p95_ms']} ms · **p99 {ack['p99_ms']} ms** · máx {ack['max_ms']} ms | p99 ≪ 5 s (prazo do Chatwoot) |
| vazão do webhook | {ack['requests_per_second']} req/s ({ack['requests']} requisições, status {ack['statuses']}) | — |
| ack do `POST /webhooks/mercadolivre` (notificação `questions`), {note['senders']} remetentes | p50 {note['p50_ms']} ms · p95 {note['p95_ms']} ms · **p99 {note['p99_ms']} ms** · máx {note['max_ms']} ms | p99 < 500 ms (prazo do ML) |
| ack do `POST /webhooks/chatwoot` com 1 remetente (custo por requisição, sem fila) | p50 {one['p50_ms']} ms · p99 {one['p99_ms']} ms | milissegundos |
| jobs gravados na fila (respostas + notificações) | {acks['jobs_recorded']} de {ack['requests'] + note['requests'] + one['requests']} | todos |

Como ler:

- O ciclo ocioso faz 1 `GET /questions/search` (nada novo) e 1 `GET /messages/unread`; uma
  venda com mensagens ainda não lidas só é relida quando a contagem de não lidas muda. As
  perguntas são listadas da mais nova para a mais antiga e a leitura para na primeira página sem
  novidade, então o custo não cresce com o número de perguntas abertas; uma vez por hora a
  varredura completa (até 20 páginas) confere tudo.
- Cada pergunta nova custa, no ML, a leitura do apelido do comprador (`/users`) e a miniatura do
  anúncio (os anúncios vêm em lote, 20 por chamada, e ficam 1 h em cache); no Chatwoot, contato,
  conversa e mensagem (com a miniatura em anexo). O tempo é dominado por essas idas e voltas HTTP
  feitas em sequência pelo único poller — de propósito: a ordem e a ausência de duplicatas
  importam mais que a vazão.
- O ack mede só o que o webhook faz: verificar o HMAC, gravar evento + job numa transação SQLite
  e responder. O cliente de carga roda na mesma máquina de {m['nproc']} núcleos e disputa CPU
  com o Gunicorn, então os números reais tendem a ser melhores.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=32)
    parser.add_argument("--requests-per-sender", type=int, default=50)
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks-meli.md"))
    args, _unknown = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        q = bench_idle_and_questions(args.questions, workdir)
        print("meli questions:", json.dumps(q), flush=True)
        ack = bench_ack(args.senders, args.requests_per_sender, workdir)
        print("meli webhook ack:", json.dumps(ack), flush=True)
    if args.write:
        Path(args.write).write_text(markdown(q, ack), encoding="utf-8")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
