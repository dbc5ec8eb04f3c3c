"""Benchmark of the seller's AI agent on Mercado Livre questions (not a test): the time from a
question imported into Chatwoot to its answer on Mercado Livre, with ML_AI_MODE=automatico and
an AI that answers at once — so what is measured is ponte's own path (the workflow's job, the
answer's job, the Chatwoot message, POST /answers). Side by side, in the same run, the simplest
alternative: a loop that asks the workflow and posts the answer, with no Chatwoot, no queue and
no rules.

Run: `.venv/bin/python bench/bench_meli_ai.py [--sequential N] [--burst N]
[--write docs/benchmarks-meli-ai.md]`. Everything runs on loopback; the stand-ins (Mercado
Livre, Chatwoot, n8n) run in their own process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import requests  # noqa: E402

import meli_jobs  # noqa: E402
import outbox  # noqa: E402
from bench_meli import SELLER, env_for, make_poller  # noqa: E402
from benchlib import machine, percentile  # noqa: E402

AI_KEY = "bench-ml-ai-key"
ITEMS = 20

STANDINS_SERVER = """
import logging, sys, threading
sys.path.insert(0, {root!r})
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from werkzeug.serving import make_server
from standins import mercadolivre, chatwoot, n8n
servers = [make_server("127.0.0.1", 0, mercadolivre.create_app({seller}), threaded=True),
           make_server("127.0.0.1", 0, chatwoot.create_app(), threaded=True),
           make_server("127.0.0.1", 0, n8n.create_app(api_key={key!r}), threaded=True)]
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print(*(s.server_port for s in servers), flush=True)
sys.stdin.read()
"""


def start_standins():
    proc = subprocess.Popen([sys.executable, "-c", STANDINS_SERVER.format(
        root=str(ROOT), seller=SELLER, key=AI_KEY)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    ports = proc.stdout.readline().split()
    return proc, *(f"http://127.0.0.1:{p}" for p in ports)


def _summary(latencies_ms: list[float]) -> dict:
    values = sorted(latencies_ms)
    return {"count": len(values), "p50_ms": round(percentile(values, 50), 1),
            "p99_ms": round(percentile(values, 99), 1), "max_ms": round(values[-1], 1)}


def _ask(ml_url: str, n: int, start: int) -> list[int]:
    return requests.post(f"{ml_url}/_standin/questions", json=[
        {"text": f"Tem em estoque? ({start + i})", "item_id": f"MLB{(start + i) % ITEMS:06d}",
         "buyer_id": 7_000_000 + start + i} for i in range(n)]).json()["ids"]


def _latencies(conn, ml_url: str, question_ids: list[int]) -> list[float]:
    """Question imported (its import job done) → answer recorded by Mercado Livre, in ms."""
    answered = {a["question_id"]: a["at"] for a in
                requests.get(f"{ml_url}/_standin/state").json()["answers"]}
    out = []
    for qid in question_ids:
        job = outbox.get_job(conn, dedupe_key=f"ml-question:{qid}")
        if job and job["status"] == "done" and qid in answered:
            out.append((answered[qid] - job["finished_at"]) * 1000)
    return out


def bench_ponte(sequential: int, burst: int, workdir: str) -> dict:
    proc, ml_url, cw_url, n8n_url = start_standins()
    try:
        requests.post(f"{ml_url}/_standin/items", json=[
            {"id": f"MLB{i:06d}", "title": f"Produto {i}", "price": 10 + i,
             "available_quantity": 5 + i, "description_text": f"Produto {i}, novo."}
            for i in range(ITEMS)])
        env = {**env_for(ml_url, cw_url, os.path.join(workdir, "ai.db"),
                         os.path.join(workdir, "logs")),
               "ML_AI_MODE": "automatico", "ML_AI_WEBHOOK_URL": f"{n8n_url}/webhook/perguntas",
               "ML_AI_API_KEY": AI_KEY}
        poller, conn = make_poller(env)
        ctx = poller.ctx
        # one question at a time: the path alone, no queue in front of it
        seq_ids = []
        for n in range(sequential):
            seq_ids += _ask(ml_url, 1, n)
            meli_jobs.poll_questions(ctx)
            poller.drain()
        sequential_ms = _latencies(conn, ml_url, seq_ids)
        # a burst: every question arrives at once (the queue, lanes and ordering keys at work)
        burst_ids = _ask(ml_url, burst, sequential)
        started = time.perf_counter()
        while True:
            result = meli_jobs.poll_questions(ctx)
            ran = poller.drain()
            if result["enqueued"] == 0 and ran == 0:
                break
        burst_seconds = time.perf_counter() - started
        burst_ms = _latencies(conn, ml_url, burst_ids)
        answers = len(requests.get(f"{ml_url}/_standin/state").json()["answers"])
        dead = outbox.queue_stats(conn)["dead"]
        baseline_ms = _baseline(ml_url, n8n_url, sequential)
        return {"sequential": _summary(sequential_ms), "burst": _summary(burst_ms),
                "burst_seconds": round(burst_seconds, 2), "answers": answers,
                "questions": sequential + burst, "dead_jobs": dead,
                "baseline": _summary(baseline_ms),
                "concurrency": ctx.settings.poller_concurrency}
    finally:
        proc.kill()
        proc.wait()


def _baseline(ml_url: str, n8n_url: str, count: int) -> list[float]:
    """The simplest alternative: for each question, ask the workflow and post its answer —
    the same two peers, nothing in between (no Chatwoot, no queue, no rules)."""
    ids = _ask(ml_url, count, 100_000)
    token = {"Authorization": "Bearer APP_USR-standin-initial"}
    n8n = requests.Session()
    ml = requests.Session()
    out = []
    for qid in ids:
        started = time.time()
        answer = n8n.post(f"{n8n_url}/webhook/perguntas", timeout=10,
                          headers={"Authorization": f"Bearer {AI_KEY}"},
                          json={"chat_type": "mercadolivre_question",
                                "message_text": "Tem em estoque?", "item": {}}).json()
        ml.post(f"{ml_url}/answers", headers=token, timeout=10,
                json={"question_id": qid, "text": answer["output"]}).raise_for_status()
        out.append((time.time() - started) * 1000)
    return out


def markdown(r: dict) -> str:
    m = machine()
    s, b, base = r["sequential"], r["burst"], r["baseline"]
    return f"""# Benchmark — agente de IA nas perguntas do Mercado Livre

Gerado por `bench/bench_meli_ai.py` em {m['date']}, máquina de {m['nproc']} núcleos
({m['cpu']}), Python {m['python']}. Tudo em loopback, contra os simuladores (`standins/`) em
outro processo; a IA (simulador do n8n) responde na hora, então o que se mede é o caminho da
ponte: job do fluxo n8n → job da resposta → mensagem no Chatwoot → `POST /answers`
(`ML_AI_MODE=automatico`, `POLLER_CONCURRENCY={r['concurrency']}`).

| medida | p50 | p99 | máx |
|---|---|---|---|
| pergunta importada → resposta no Mercado Livre, uma por vez ({s['count']} perguntas) | {s['p50_ms']} ms | {s['p99_ms']} ms | {s['max_ms']} ms |
| idem, {b['count']} perguntas chegando juntas (fila) | {b['p50_ms']} ms | {b['p99_ms']} ms | {b['max_ms']} ms |
| alternativa mais simples (laço: pergunta ao n8n → `POST /answers`, sem Chatwoot nem fila), {base['count']} perguntas | {base['p50_ms']} ms | {base['p99_ms']} ms | {base['max_ms']} ms |

- {r['questions']} perguntas, {r['answers']} respostas no Mercado Livre (cada uma uma vez),
  {r['dead_jobs']} jobs mortos; a rajada inteira (importar + responder) levou
  {r['burst_seconds']} s.
- Na rajada, a resposta de cada pergunta espera a sua vez na fila: os jobs saem em ordem de
  chegada, então as {b['count']} importações entram antes das chamadas à IA e das publicações
  que elas geram, e cada pergunta custa uns 15 pedidos HTTP (importar, IA, publicar, etiquetas)
  contra simuladores que dividem os {m['nproc']} núcleos com a ponte. O p50 da rajada mede essa
  fila, não o caminho de uma pergunta (que é a primeira linha).
- A diferença para o laço simples é o preço do que o laço não faz: a mensagem da IA no Chatwoot
  com a etiqueta `ia-respondeu`, as regras (dado de contato, tamanho, pergunta fechada), a
  resposta do atendente sempre vencendo e os reenvios duráveis. Com uma IA de verdade (segundos
  por resposta) esse custo some no tempo da IA, que roda na faixa `n8n` do poller sem segurar as
  respostas dos atendentes.
- O tempo da importação (ler a pergunta, criar contato, conversa e mensagem) não entra: ele é o
  mesmo com ou sem IA e está em [benchmarks-meli.md](benchmarks-meli.md).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sequential", type=int, default=100)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--write", default=str(ROOT / "docs" / "benchmarks-meli-ai.md"))
    args, _unknown = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        result = bench_ponte(args.sequential, args.burst, workdir)
    print("meli ai:", json.dumps(result), flush=True)
    if args.write:
        Path(args.write).write_text(markdown(result), encoding="utf-8")
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
