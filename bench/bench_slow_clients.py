"""Benchmark of the web tier against slow clients (a script, not a test; loopback only; it stops
by itself, past HARD_DEADLINE_S whatever happens).

Side by side in one run, for each Gunicorn design below, ponte's real web app and a trivial Flask
app (`/ok`) under the same server (gunicorn_conf.py with only the worker class changed, 2
workers):
  - throughput and ack p50/p99 at 32 concurrent senders (the ingest goal: ≥ 70 % of the trivial
    app, p99 ≤ 20 ms), the same load as bench_bridge_a.py (real `add_message` bodies);
  - the same webhook load while slow, unauthenticated clients trickle: half of them send their
    headers a byte at a time, half send whole headers and then their body a byte at a time
    (one byte per second each; a connection the server closes is opened again, as an attacker
    would). Acks p50/p99 counting every webhook that got no 200 within 10 s as a failure;
  - peak RSS of the web (master + workers) during the slow-client runs.

Designs: `buffering` (web_worker.BufferingWorker — what gunicorn_conf.py uses now), `sync`
(Gunicorn's sync worker, ponte ≤ 0.2.x), `gthread` (2 workers × 32 threads) and `gevent`
(measured only when gevent imports, e.g. `pip install --target DIR gevent` and `--gevent-path
DIR`). Prints a Markdown table and replaces the section `## Clientes lentos` of
docs/benchmarks.md (everything else is kept).

    .venv/bin/python bench/bench_slow_clients.py [--quick] [--no-doc] [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchlib import (Gunicorn, RssSampler, cpu_seconds, http_status,  # noqa: E402
                      kill_started, machine, n, percentile, update_doc, watchdog)
from bench_bridge_a import (CONCURRENCY, SECRET, TRIVIAL_APP, clean_env,  # noqa: E402
                            run_load, trivial_request_factory,
                            webhook_request_factory)
from standins.support import free_port, wait_for  # noqa: E402

DOC_PATH = os.path.join(ROOT, "docs", "benchmarks.md")
SECTION = "## Clientes lentos"
HARD_DEADLINE_S = 20 * 60
ACK_TIMEOUT_S = 10.0  # a webhook without an answer after this counts as failed
TRICKLE_EVERY_S = 1.0
GOAL_RATIO = 0.70
GOAL_P99_MS = 20.0

DESIGNS = {
    "buffering": [],  # gunicorn_conf.py as it is
    "sync": ["-k", "sync"],
    "gthread": ["-k", "gthread", "--threads", "32"],
    "gevent": ["-k", "gevent", "--worker-connections", "1000"],
}


class SlowClients:
    """`count` unauthenticated connections to 127.0.0.1:`port` that never finish a request:
    even ones trickle a header line, odd ones send whole headers (Content-Length 4096) and then
    trickle the body; one byte per connection every TRICKLE_EVERY_S. One thread, non-blocking
    sockets. A connection the server closes is counted and opened again."""

    def __init__(self, port: int, count: int):
        self.port, self.count = port, count
        self.reopened = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", self.port))
            if i % 2 == 0:
                s.send(b"POST /webhooks/kommo/not-the-secret HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            else:
                s.send(b"POST /webhooks/kommo/not-the-secret HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: 4096\r\n\r\nleads")
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        return s

    def _run(self):
        socks = [self._open(i) for i in range(self.count)]
        while not self.stopping.wait(TRICKLE_EVERY_S):
            for i, s in enumerate(socks):
                if s is None:
                    socks[i] = self._open(i)
                    continue
                try:
                    closed = s.recv(4096) == b""  # an answer (408) or end of stream
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if not closed:
                    try:
                        s.send(b"a")
                    except OSError:
                        closed = True
                if closed:
                    s.close()
                    self.reopened += 1
                    socks[i] = self._open(i)
        for s in socks:
            if s is not None:
                s.close()

    def __enter__(self):
        self.thread.start()
        time.sleep(1.5)  # every slow connection open and trickling before the load starts
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(10)


def measure(server: Server, make_request, duration: float) -> dict:
    """32 requests in flight for `duration` s. Latencies of the 200s, count of attempts that got
    no 200 within ACK_TIMEOUT_S, wall time and the server's CPU seconds."""
    pids = server.pids()
    cpu0 = sum(cpu_seconds(p) for p in pids)
    run = run_load(server.port, make_request, CONCURRENCY, duration, timeout=ACK_TIMEOUT_S)
    failures = sum(c for code, c in run["statuses"].items() if code != 200) + \
        sum(run["socket_errors"].values())
    return {"latencies": run["latencies"], "failures": failures, "wall": run["wall"],
            "server_cpu_s": sum(cpu_seconds(p) for p in pids) - cpu0}


class Design:
    """ponte's web app and the trivial Flask app, each under Gunicorn with this design's
    arguments; request factories that never repeat a Kommo message id."""

    def __init__(self, name: str, args: list[str], tmp: str, pythonpath_extra: str | None):
        self.name = name
        base = os.path.join(tmp, name)
        os.makedirs(os.path.join(base, "trivial"))
        with open(os.path.join(base, "trivial", "bench_trivial_app.py"), "w") as fh:
            fh.write(TRIVIAL_APP)
        unused = free_port()
        common = {"KOMMO_BASE_URL": f"http://127.0.0.1:{unused}",
                  "KOMMO_WEBHOOK_SECRET": SECRET,
                  "KOMMO_ACCESS_TOKEN": "bench-kommo-token-0123456789",
                  "N8N_WEBHOOK_URL": f"http://127.0.0.1:{unused}/wh",
                  "N8N_API_KEY": "bench-n8n-shared-key-0123456789",
                  "BOT_DEBOUNCE_SECONDS": 3600, "BOT_DEBOUNCE_MAX_SECONDS": 3600}
        env_p = clean_env(os.path.join(base, "ponte"), PORT=free_port(), **common)
        env_t = clean_env(os.path.join(base, "trivial"), PORT=free_port(), **common)
        if pythonpath_extra:
            for env in (env_p, env_t):
                env["PYTHONPATH"] = pythonpath_extra
        self.trivial = Gunicorn("bench_trivial_app:app", env_t,
                                os.path.join(base, "trivial.log"), "/ok",
                                pythonpath=os.path.join(base, "trivial"), args=tuple(args))
        try:
            self.ponte = Gunicorn("webhook_server:create_app()", env_p,
                                  os.path.join(base, "ponte.log"), "/", args=tuple(args))
        except BaseException:
            self.trivial.stop()
            raise
        self._make_p = webhook_request_factory(self.ponte.port, name[:3])
        self.make_t = trivial_request_factory(self.trivial.port)
        self._next_id = 0

    def make_p(self, duration: float):
        """A request factory for one measurement, with ids no earlier one used."""
        base = self._next_id
        self._next_id += 1_000_000
        return lambda i: self._make_p(base + i)

    def stop(self) -> None:
        self.trivial.stop()
        self.ponte.stop()


def pooled(runs: list[dict]) -> dict:
    """Several measurements as one: throughput, p50/p99 over every attempt (one that got no 200
    counts as slower than any answer), server CPU per 200."""
    ok = sorted(x for r in runs for x in r["latencies"])
    failures = sum(r["failures"] for r in runs)
    every = ok + [float("inf")] * failures
    wall = sum(r["wall"] for r in runs)
    return {"ok": len(ok), "failures": failures, "rps": len(ok) / wall,
            "p50": percentile(every, 50) * 1000, "p99": percentile(every, 99) * 1000,
            "server_ms_per_req": 1000 * sum(r["server_cpu_s"] for r in runs) / max(1, len(ok))}


def reader_cost_us(requests: int = 20_000, passes: int = 5) -> float:
    """CPU per request of what the buffering worker adds in Python (RequestReader over a real
    `add_message` request, the copy, BufferedClient handing it to the parser), in µs: best of
    `passes`, in this process, no sockets."""
    import web_worker

    class _Sink:
        def send(self, data):
            return len(data)

    make = webhook_request_factory(8000, "rdr")
    raw = [make(i) for i in range(requests)]
    best = float("inf")
    for _ in range(passes):
        t0 = time.process_time()
        for request in raw:
            reader = web_worker.RequestReader(1_048_576)
            reader.feed(request)
            client = web_worker.BufferedClient(_Sink(), bytes(reader.buffer), False)
            while client.recv(8192):
                pass
        best = min(best, (time.process_time() - t0) / requests)
    return best * 1e6


def spread_of(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"med": ordered[len(ordered) // 2] if len(ordered) % 2 else
            (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2,
            "min": ordered[0], "max": ordered[-1]}


def bench(designs: dict, tmp: str, slices: int, slice_s: float, slow_counts: list[int],
          slow_s: float, rounds: int, gevent_path: str | None) -> dict:
    """Every design's two servers up at once; the clean load alternates between them in short
    slices (trivial then ponte, the designs in a rotating order), so a machine shared with
    other work weighs on all of them alike; then the slow-client runs, also alternated."""
    servers: dict[str, Design] = {}
    clean = {name: {"trivial": [], "ponte": [], "ratios": []} for name in designs}
    slow = {name: {count: [] for count in slow_counts} for name in designs}
    try:
        for name, args in designs.items():
            servers[name] = Design(name, args, tmp, gevent_path if name == "gevent" else None)
        for design in servers.values():  # warm-up
            measure(design.ponte, design.make_p(1.0), 1.0)
            measure(design.trivial, design.make_t, 1.0)
        names = list(servers)
        for k in range(slices):
            print(f"  carga sem clientes lentos, fatia {k + 1}/{slices}", file=sys.stderr)
            for name in names[k % len(names):] + names[:k % len(names)]:
                design = servers[name]
                t = measure(design.trivial, design.make_t, slice_s)
                p = measure(design.ponte, design.make_p(slice_s), slice_s)
                clean[name]["trivial"].append(t)
                clean[name]["ponte"].append(p)
                clean[name]["ratios"].append(len(p["latencies"]) / p["wall"] /
                                             max(1e-9, len(t["latencies"]) / t["wall"]))
        for r in range(rounds):
            for count in slow_counts:
                print(f"  {count} clientes lentos, rodada {r + 1}/{rounds}", file=sys.stderr)
                for name in names[r % len(names):] + names[:r % len(names)]:
                    design = servers[name]
                    with RssSampler(design.ponte.pids) as rss, \
                            SlowClients(design.ponte.port, count) as slow_clients:
                        run = measure(design.ponte, design.make_p(slow_s), slow_s)
                    run["reopened"] = slow_clients.reopened
                    run["rss_max_kb"] = rss.max_sum_kb
                    slow[name][count].append(run)
                    # a design the slow clients stalled gets its workers back first
                    wait_for(lambda: http_status(design.ponte.port, "/health",
                                                 timeout=ACK_TIMEOUT_S) is not None,
                             60, what=f"{name} answering again")
    finally:
        for design in servers.values():
            design.stop()
    results = {}
    for name in servers:
        c = clean[name]
        results[name] = {
            "trivial": pooled(c["trivial"]), "ponte": pooled(c["ponte"]),
            "ratio": spread_of(c["ratios"]),
            "slice_p99": spread_of([pooled([x])["p99"] for x in c["ponte"]]),
            "slow": {count: {**pooled(runs), "reopened": sum(x["reopened"] for x in runs),
                             "rss_mib": max(x["rss_max_kb"] for x in runs) / 1024,
                             "slice_p99": spread_of([pooled([x])["p99"] for x in runs])}
                     for count, runs in slow[name].items()}}
    return results


def ms(v: float) -> str:
    if v == float("inf"):
        return "> 10 s"
    return f"{n(v / 1000, 2)} s" if v >= 1000 else f"{n(v)} ms"


METHOD = """Como foi medido. A mesma carga de `bench_bridge_a.py` (um cliente epoll de um só processo, 32 \
requisições em voo, cada uma numa conexão nova com um corpo `add_message` real e id próprio). Os \
clientes lentos não se autenticam (`/webhooks/kommo/not-the-secret`): metade manda o início dos \
cabeçalhos e depois um byte por segundo de um cabeçalho que nunca termina; a outra metade manda os \
cabeçalhos inteiros (`Content-Length: 4096`) e depois um byte do corpo por segundo; uma conexão que \
o servidor fecha é aberta de novo, como faria um atacante. Entram 1,5 s antes da carga. p50/p99 \
contam todas as tentativas: um webhook sem 200 em 10 s conta como mais lento que qualquer \
resposta ("> 10 s"). Vazão e p99 dependem muito do que mais roda nesta máquina (outras sessões \
rodavam testes ao mesmo tempo); a comparação que vale é entre colunas da mesma execução, e a CPU \
por requisição é a medida menos sensível a isso. Desenhos: `buffering` = `web_worker.py` (o que \
`gunicorn_conf.py` usa agora); `sync` = o worker `sync` do Gunicorn (a ponte até 0.2.x); \
`gthread` = 2 workers × 32 threads; `gevent` = worker `gevent` (gevent instalado à parte, só \
para esta medida).
"""

DECISION = """Decisão (issue 14: dois clientes lentos seguravam os dois workers `sync` e o ack do Kommo ia \
a ~30 s). O web usa agora `web_worker.BufferingWorker`: o worker `sync` do Gunicorn com uma frente \
não bloqueante dentro do próprio processo. Cada worker aceita as conexões e lê cada requisição \
inteira (cabeçalhos e corpo) num laço `epoll`, muitas ao mesmo tempo; só uma requisição completa \
chega ao app, que continua rodando uma por vez por processo, pelo mesmo caminho do `sync` (mesmo \
parser, mesmo environ WSGI, mesmo log de acesso, mesmos hooks). Um cliente lento ocupa um buffer, \
não um worker. Limites: cabeçalhos em até 10 s e o corpo em até mais 20 s (senão 408); cabeçalhos \
até 64 KiB (431); corpo até `MAX_BODY_BYTES` (413 — o app responde quando o tamanho é declarado, o \
worker quando o corpo vem *chunked*); até `worker_connections` (1.000) conexões pendentes e 16 MiB \
guardados por worker: além disso, a conexão pendente mais antiga (ou a que guarda mais bytes) \
recebe 503. Quem conecta e não manda nada fica no kernel (`TCP_DEFER_ACCEPT`, 5 s) e nem chega ao \
worker. Os descartes aparecem no log como `slow_clients_dropped`, no máximo uma linha por minuto, \
com as contagens. Nada novo para instalar: vale igual no contêiner e no `./ponte run` sem \
Docker. A prova roda com os testes: `tests/test_slow_clients.py` sobe o Gunicorn de verdade, abre \
16 clientes lentos (8 vezes os workers) e exige os 240 webhooks com 200, p99 < 1 s e nenhum acima \
dos 2 s do Kommo (com o `sync` eles esperam o `WORKER TIMEOUT`).

Nas cinco execuções de 01–02/12/2026, com 256 clientes lentos: `buffering`, nenhum webhook sem \
resposta e ack p99 de 0,24 a 0,61 s (a mesma faixa do p99 sem clientes lentos nesta máquina \
ocupada); `sync` e `gthread`, nenhum webhook respondido em 10 s. Com 2 clientes lentos, o \
`sync` ficou em ~2 s por ack em todas.

Por que este e não os outros (colunas da tabela acima, mesma execução):

- `sync` (até 0.2.x): 2 clientes lentos já levam o ack a ~2 s — o que manda o corpo devagar prende \
um worker a cada conexão (o app responde 401 e o Gunicorn espera até 2 s o cliente fechar), o que \
para no meio dos cabeçalhos prende o outro até o `WORKER TIMEOUT` de 30 s; com 256, nenhum webhook \
recebe resposta.
- `gthread` (2 × 32 threads): aguenta poucos clientes lentos, mas cada conexão que já mandou o \
primeiro byte prende uma thread (o Gunicorn 27 só espera o primeiro byte fora das threads): com 256 \
clientes lentos, nenhum ack. Sem clientes lentos ficou na faixa dos outros nestas execuções com a \
máquina ocupada; com 4 threads e a máquina quieta tinha feito 66 % do trivial, p99 41 ms (seção \
Ponte A).
- `gevent`: aguenta os 256, mas gasta o dobro ou mais de CPU por webhook, ~30 MiB a mais, é uma \
dependência com extensão em C, e o *monkey patching* faz da *thread* que faz o checkpoint do WAL um \
greenlet: o I/O do checkpoint voltaria a bloquear o worker inteiro, justo a cauda que a seção \
Ponte A tirou do ack.
- nginx na frente (um proxy que lê a requisição inteira antes de passá-la ao Gunicorn, o desenho \
que a documentação do Gunicorn recomenda): não medido. Seria um terceiro programa no Supervisor, \
um pacote no Dockerfile e — para quem usa `./ponte run` sem Docker — na máquina do vendedor, e um \
salto a mais por requisição numa máquina de 2 núcleos. Para este tráfego (requisições e respostas \
pequenas) o worker daqui dá a mesma proteção sem nada disso.
- um proxy assíncrono em Python na frente (h11/asyncio): o mesmo salto a mais, em Python — mais CPU \
por requisição do que o próprio webhook custa dentro do processo (0,09 ms, seção Ponte A).
- só configuração do Gunicorn (mais workers, `timeout` menor): cada worker continua preso por um \
cliente lento; um `timeout` menor só encurta a espera, e mata requisições legítimas mais lentas.

O que custa — medido, com a máquina ocupada por outras sessões (carga média de 5 a 13 em 2 \
núcleos durante estas execuções; o app trivial fez 170–800 req/s, contra ~3.400 na seção Ponte A \
com a máquina quieta). Por isso as metas de ingestão, que são absolutas (p99 ≤ 20 ms), não puderam \
ser conferidas aqui: o p99 do `sync` também ficou entre 200 e 480 ms nelas. Comparando as duas \
colunas na mesma execução, em cinco execuções de 01–02/12/2026 (`buffering` × `sync`; a última \
é a da tabela acima):

- vazão da ponte: 520 × 419, 266 × 393, 287 × 249, 182 × 154, 229 × 175 req/s — a ponte não ficou \
mais lenta;
- CPU do servidor por webhook: 1,36 × 1,43, 1,63 × 1,34, 1,65 × 1,78, 1,75 × 2,04, 1,53 × 2,07 ms \
— igual, dentro da variação; dentro do processo o worker acrescenta 7–13 µs por requisição \
(acima), 2–3 % da CPU de um webhook;
- ack p99: 160 × 205, 302 × 281, 256 × 288, 348 × 328, 314 × 477 ms — igual, dentro da variação;
- ponte ÷ trivial (mediana das fatias): 69 × 83, 72 × 81, 69 × 81, 74 × 89, 95 × 69 % — em quatro \
das cinco, **~10 pontos abaixo**, na divisa da meta de 70 %; na quinta, 26 acima. Não porque a \
ponte ficou mais lenta: nas quatro, o app trivial é que ficou mais rápido (vazão do trivial \
763 × 528, 378 × 293, 235 × 170 req/s em três delas). A explicação \
mais provável: o `sync`, depois de cada resposta, espera o cliente fechar a conexão (até 2 s — o mesmo que prende um worker por \
cliente lento); o `buffering` já leu a requisição inteira e fecha na hora. Essa espera pesa mais \
numa requisição que custa menos, então a razão cai sem que o webhook custe mais.

A troca que fica registrada: a meta "≥ 70 % do trivial no mesmo servidor" ficou na divisa na \
maioria das execuções porque o denominador melhorou; a vazão, a CPU e o p99 do webhook ficaram \
iguais aos do `sync`, e o ack deixou de depender de quem mais está conectado. Falta medir de novo com a máquina quieta \
(`bench_bridge_a.py` já mede com este worker, porque usa o `gunicorn_conf.py`).

Limites do desenho: o app continua rodando uma requisição por vez por worker, então uma requisição \
lenta *dentro* do app (não do cliente) ainda ocupa o worker, como antes; uma resposta grande para \
um cliente que não a lê espera até 10 s (as do webhook têm poucos bytes e cabem no buffer do \
socket); e quem abre mais de 1.000 conexões lentas por worker empurra as mais antigas para fora \
(503) — um webhook legítimo chega inteiro num instante e é atendido antes de ficar entre as mais \
antigas.
"""


def spread(d: dict, fmt) -> str:
    if d["min"] == d["max"]:
        return fmt(d["med"])
    return f"{fmt(d['med'])} ({fmt(d['min'])}–{fmt(d['max'])})"


def markdown(results: dict, m: dict, opts: dict, slow_counts: list[int]) -> str:
    names = list(results)
    head = "| medida | " + " | ".join(f"`{x}`" for x in names) + " |\n|---|" + \
        "---|" * len(names) + "\n"
    pct = lambda v: f"{100 * v:.0f} %"  # noqa: E731
    rps = lambda v: f"{n(v, 0)} req/s"  # noqa: E731
    cpu = lambda v: f"{n(v, 2)}"  # noqa: E731
    rows = [
        ("app trivial (`/ok`): vazão; ack p99", lambda r: f"{rps(r['trivial']['rps'])}; "
         f"{ms(r['trivial']['p99'])}"),
        ("webhook do Kommo na ponte: vazão", lambda r: rps(r["ponte"]["rps"])),
        ("ponte ÷ trivial, mediana das fatias (menor–maior) — meta ≥ 70 %",
         lambda r: spread(r["ratio"], pct)),
        ("ack do webhook p50 / p99, sem clientes lentos (p99 por fatia: menor–maior) — meta "
         "p99 ≤ 20 ms", lambda r: f"{ms(r['ponte']['p50'])} / {ms(r['ponte']['p99'])} "
         f"({ms(r['slice_p99']['min'])}–{ms(r['slice_p99']['max'])})"),
        ("CPU do servidor por requisição, ponte / trivial (ms)",
         lambda r: f"{cpu(r['ponte']['server_ms_per_req'])} / "
                   f"{cpu(r['trivial']['server_ms_per_req'])}")]
    for count in slow_counts:
        rows += [
            (f"com {count} clientes lentos: ack p50 / p99 (p99 por rodada: menor–maior)",
             lambda r, c=count: f"{ms(r['slow'][c]['p50'])} / {ms(r['slow'][c]['p99'])} "
                                f"({ms(r['slow'][c]['slice_p99']['min'])}–"
                                f"{ms(r['slow'][c]['slice_p99']['max'])})"),
            (f"com {count} clientes lentos: webhooks com 200 / sem 200 em 10 s",
             lambda r, c=count: f"{n(r['slow'][c]['ok'], 0)} / "
                                f"{n(r['slow'][c]['failures'], 0)}"),
            (f"com {count} clientes lentos: conexões lentas que o servidor fechou",
             lambda r, c=count: n(r["slow"][c]["reopened"], 0)),
            (f"com {count} clientes lentos: maior RSS da web (master + 2 workers)",
             lambda r, c=count: f"{n(r['slow'][c]['rss_mib'])} MiB")]
    body = "".join(f"| {label} | " + " | ".join(fn(results[x]) for x in names) + " |\n"
                   for label, fn in rows)
    return (f"{SECTION}\n\n"
            f"Medido em {m['date']} — {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}, "
            f"Gunicorn {m['gunicorn']}, 2 workers. Os {len(names)} desenhos no ar ao mesmo "
            "tempo, cada um com a ponte e o app trivial; a carga sem clientes lentos alterna "
            f"entre eles em {opts['slices']} fatias de {opts['slice_s']:.0f} s por app (trivial, "
            "depois ponte; a ordem dos desenhos gira a cada fatia), para que outras sessões "
            "nesta máquina pesem igual em todos; depois, com clientes lentos, "
            f"{opts['rounds']} rodada(s) de {opts['slow_s']:.0f} s por desenho, também "
            "alternadas.\n\n"
            "Para rodar de novo: `.venv/bin/python bench/bench_slow_clients.py` (`--quick` para "
            "uma rodada curta, `--no-doc` para não mexer neste arquivo; o `gevent` entra com "
            "`--gevent-path DIR` depois de `pip install --target DIR gevent`).\n\n"
            + head + body + "\n"
            f"O que o `buffering` acrescenta em Python a cada requisição (`RequestReader` sobre um "
            f"`add_message` real, a cópia e o `BufferedClient` que o entrega ao parser), medido "
            f"dentro do processo, sem sockets: {n(opts['reader_us'])} µs de CPU — contra ~460 µs "
            "de CPU do servidor por webhook na seção Ponte A (máquina quieta).\n\n"
            + METHOD + "\n" + DECISION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--gevent-path", default=os.environ.get("BENCH_GEVENT_PATH"),
                        help="folder with gevent installed (pip install --target)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--slices", type=int, default=None,
                        help="slices of the load without slow clients (default 8; --quick 2)")
    opts = parser.parse_args(argv)
    plan = {"slices": 2, "slice_s": 2.0, "rounds": 1, "slow_s": 3.0} if opts.quick else \
        {"slices": 8, "slice_s": 2.0, "rounds": 2, "slow_s": 4.0}
    plan["slices"] = opts.slices or plan["slices"]
    slow_counts = [2, 256]
    watchdog(HARD_DEADLINE_S, "bench_slow_clients")
    names = [d for d in opts.designs.split(",") if d]
    if "gevent" in names:
        probe = subprocess.run([sys.executable, "-c", "import gevent"], capture_output=True,
                               env={**os.environ, "PYTHONPATH": opts.gevent_path or ""})
        if probe.returncode != 0:
            print("  gevent não está instalado: fica fora desta execução", file=sys.stderr)
            names.remove("gevent")
    try:
        with tempfile.TemporaryDirectory(prefix="ponte-bench-slow-") as tmp:
            results = bench({name: DESIGNS[name] for name in names}, tmp, plan["slices"],
                            plan["slice_s"], slow_counts, plan["slow_s"], plan["rounds"],
                            opts.gevent_path)
    finally:
        kill_started()
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
    import gunicorn

    plan["reader_us"] = reader_cost_us()
    text = markdown(results, machine(gunicorn=gunicorn.__version__), plan, slow_counts)
    print(text)
    if not opts.no_doc and not opts.quick:
        update_doc(DOC_PATH, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
