"""Benchmark of the job outbox and of the poller's wake-up latency (a script, not a test).

Measures, on a temporary SQLite file (loopback and local files only):
  (a) outbox throughput: enqueue, then claim+complete, in one process; then two processes
      claiming from the same database at once, checking every job ran exactly once;
  (b) wake-up latency: a real `poller.Poller.run_forever()` in its own process, idle, while this
      process enqueues one job every 50-200 ms; the handler records now - enqueued_at;
  (c) peak RSS (VmHWM) and CPU of that poller process.
Prints a Markdown table and replaces the section `## Fila (outbox)` of docs/benchmarks.md.

    .venv/bin/python bench/bench_outbox.py [--quick] [--no-doc]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import config  # noqa: E402
from benchlib import (cpu_seconds, machine, n, percentile, proc_status,  # noqa: E402
                      update_doc)
import db_manager  # noqa: E402
import outbox  # noqa: E402
from standins.support import wait_for  # noqa: E402

DOC_PATH = os.path.join(ROOT, "docs", "benchmarks.md")
SECTION = "## Fila (outbox)"
LEASE_SECONDS = 120


def make_settings(tmp: str):
    return config.load_settings({"DATABASE_PATH": os.path.join(tmp, "ponte.db"),
                                 "LOG_DIR": os.path.join(tmp, "logs"),
                                 "ENVIRONMENT": "test"})


# --- (a) throughput ---------------------------------------------------------------------------

def enqueue_many(conn, n: int, prefix: str) -> float:
    """Enqueue n jobs, one transaction each (as a webhook does). Returns elapsed seconds."""
    started = time.perf_counter()
    for i in range(n):
        with db_manager.transaction(conn):
            outbox.enqueue_job(conn, "bench.noop", f"{prefix}:{i}", {"i": i})
    return time.perf_counter() - started


def drain(conn, worker: str) -> list[int]:
    """Claim and complete until nothing is due; the ids this worker completed."""
    done = []
    while True:
        job = outbox.claim_next_job(conn, time.time(), LEASE_SECONDS, worker=worker)
        if job is None:
            return done
        if outbox.complete_job(conn, job, {"ok": True}):
            done.append(job.id)


def bench_single(tmp: str, n: int) -> dict:
    conn = db_manager.connect(os.path.join(tmp, "single.db"))
    db_manager.migrate(conn)
    enqueue_s = enqueue_many(conn, n, "single")
    started = time.perf_counter()
    done = drain(conn, "bench-single")
    cycle_s = time.perf_counter() - started
    assert len(done) == n == len(set(done)), (len(done), n)
    # Steady state: the queue never holds more than one job (enqueue → claim → complete).
    steady_n = max(1, n // 5)
    started = time.perf_counter()
    for i in range(steady_n):
        with db_manager.transaction(conn):
            outbox.enqueue_job(conn, "bench.noop", f"steady:{i}", {"i": i})
        job = outbox.claim_next_job(conn, time.time(), LEASE_SECONDS, worker="bench-steady")
        assert job is not None and outbox.complete_job(conn, job)
    steady_s = time.perf_counter() - started
    conn.close()
    return {"n": n, "enqueue_per_s": n / enqueue_s, "cycle_per_s": n / cycle_s,
            "enqueue_s": enqueue_s, "cycle_s": cycle_s,
            "steady_n": steady_n, "steady_per_s": steady_n / steady_s}


def _claimer(db_path: str, name: str, start, out_path: str) -> None:
    conn = db_manager.connect(db_path)
    start.wait()
    started = time.perf_counter()
    ids = drain(conn, name)
    elapsed = time.perf_counter() - started
    with open(out_path, "w") as fh:
        json.dump({"ids": ids, "elapsed": elapsed}, fh)


def bench_two_processes(tmp: str, n: int) -> dict:
    db_path = os.path.join(tmp, "multi.db")
    conn = db_manager.connect(db_path)
    db_manager.migrate(conn)
    enqueue_many(conn, n, "multi")
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    outs = [os.path.join(tmp, f"claimer-{k}.json") for k in range(2)]
    procs = [ctx.Process(target=_claimer, args=(db_path, f"bench-{k}", start, outs[k]))
             for k in range(2)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let both children import and open the database
    started = time.perf_counter()
    start.set()
    for p in procs:
        p.join(timeout=600)
        if p.is_alive():
            p.kill()
            raise RuntimeError("claimer process did not finish")
        if p.exitcode != 0:
            raise RuntimeError(f"claimer process failed (exit {p.exitcode})")
    wall = time.perf_counter() - started
    results = [json.load(open(path)) for path in outs]
    a, b = (set(r["ids"]) for r in results)
    overlap = a & b
    stats = outbox.queue_stats(conn)
    attempts = conn.execute("SELECT MAX(attempts), SUM(attempts) FROM jobs").fetchone()
    all_ids = {r[0] for r in conn.execute("SELECT id FROM jobs")}
    conn.close()
    assert not overlap, f"{len(overlap)} jobs ran in both processes: {sorted(overlap)[:10]}"
    assert stats["done"] == n, f"done={stats['done']} expected {n}"
    assert a | b == all_ids and len(results[0]["ids"]) + len(results[1]["ids"]) == n
    assert attempts[0] == 1 and attempts[1] == n, f"attempts max/sum={tuple(attempts)}"
    return {"n": n, "per_s": n / wall, "wall_s": wall,
            "split": [len(r["ids"]) for r in results], "overlap": len(overlap)}


# --- (b)+(c) wake-up latency of a real poller ---------------------------------------------------

def _poller_main(tmp: str, results_path: str) -> None:
    import ponte_logging
    import poller

    settings = make_settings(tmp)
    ponte_logging.setup_logging(settings, "poller", to_stdout=False)
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    out = open(results_path, "a", buffering=1)

    def ping(ctx, job):
        latency = time.time() - job.payload["enqueued_at"]
        out.write(f"{job.id} {latency:.6f} {int(job.payload.get('warmup', False))}\n")
        return {"latency_s": latency}

    p = poller.Poller(settings, conn, handlers={"bench.ping": ping}, on_dead={})
    signal.signal(signal.SIGTERM, p.request_stop)
    p.run_forever()
    out.close()


def _read_results(path: str) -> dict[int, tuple[float, bool]]:
    rows = {}
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 3:
                    rows[int(parts[0])] = (float(parts[1]), parts[2] == "1")
    return rows


def bench_latency(tmp: str, samples: int, seed: int = 7) -> dict:
    settings = make_settings(tmp)
    results_path = os.path.join(tmp, "latency.txt")
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    ctx = mp.get_context("spawn")  # a fresh interpreter, so its RSS is that of a real poller
    proc = ctx.Process(target=_poller_main, args=(tmp, results_path))
    proc.start()
    rng = random.Random(seed)
    not_idle = 0
    try:
        wait_for(lambda: db_manager.last_beat(conn, "poller") is not None, 30, interval=0.005,
                 what="poller start")
        ids = []
        warmup = 5
        cpu_start = None
        for i in range(warmup + samples):
            if i == warmup:
                cpu_start, wall_start = cpu_seconds(proc.pid), time.monotonic()
            # The case measured: the poller is idle when the job arrives.
            if ids and outbox.get_job(conn, ids[-1])["status"] != "done":
                not_idle += 1
            with db_manager.transaction(conn):
                job_id = outbox.enqueue_job(
                    conn, "bench.ping", f"ping:{i}",
                    {"enqueued_at": time.time(), "warmup": i < warmup})
            ids.append(job_id)
            time.sleep(rng.uniform(0.05, 0.2))
        wait_for(lambda: len(_read_results(results_path)) >= len(ids), 30, interval=0.005,
                 what="last jobs")
        cpu_s = cpu_seconds(proc.pid) - cpu_start
        wall_s = time.monotonic() - wall_start
        mem = proc_status(proc.pid)
        stop_started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(timeout=15)
        stop_s = time.monotonic() - stop_started
        if proc.is_alive():
            raise RuntimeError("poller did not stop on SIGTERM")
        rows = _read_results(results_path)
        latencies = sorted(rows[j][0] * 1000 for j in ids if not rows[j][1])
        stats = outbox.queue_stats(conn)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
    return {"samples": len(latencies), "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90), "p99": percentile(latencies, 99),
            "max": latencies[-1], "min": latencies[0], "mean": sum(latencies) / len(latencies),
            "not_idle": not_idle, "vm_hwm_kb": mem["VmHWM"], "vm_rss_kb": mem["VmRSS"],
            "cpu_pct": 100 * cpu_s / wall_s, "stop_s": stop_s, "exitcode": proc.exitcode,
            "done": stats["done"], "dead": stats["dead"]}


# --- report ---------------------------------------------------------------------------------

def markdown(single: dict, multi: dict, lat: dict, m: dict, quick: bool) -> str:
    f = lambda v: n(v, 0)  # noqa: E731
    ms = n
    lines = [
        SECTION,
        "",
        f"Medido em {m['date']} — {m['nproc']} CPUs ({m['cpu']}), Python {m['python']}, "
        f"SQLite {m['sqlite']}{', modo --quick' if quick else ''}. Arquivo SQLite temporário "
        "em WAL, `synchronous=NORMAL`, como em produção; sem logs de job em (a).",
        "",
        "| medida | resultado |",
        "|---|---|",
        f"| enfileirar ({f(single['n'])} jobs, 1 transação cada) | {f(single['enqueue_per_s'])} jobs/s |",
        f"| pegar + concluir, 1 processo (fila com {f(single['n'])} jobs) | "
        f"{f(single['cycle_per_s'])} jobs/s |",
        f"| enfileirar → pegar → concluir, fila sempre vazia ({f(single['steady_n'])} jobs) | "
        f"{f(single['steady_per_s'])} jobs/s |",
        f"| pegar + concluir, 2 processos concorrentes ({f(multi['n'])} jobs) | "
        f"{f(multi['per_s'])} jobs/s (divisão {multi['split'][0]}/{multi['split'][1]}; "
        f"cada job concluído exatamente 1 vez) |",
        f"| latência de despertar do poller ocioso, p50 / p90 / p99 / máx ({lat['samples']} jobs) | "
        f"{ms(lat['p50'])} / {ms(lat['p90'])} / {ms(lat['p99'])} / {ms(lat['max'])} ms |",
        f"| pico de memória do poller (VmHWM) | {n(lat['vm_hwm_kb'] / 1024)} MiB |",
        f"| CPU do poller durante (b) (ocioso na maior parte do tempo) | "
        f"{ms(lat['cpu_pct'])} % de 1 núcleo |",
        "",
        "Latência = do instante logo antes do `INSERT` (processo que enfileira) até o início do "
        "handler no poller (outro processo): inclui o commit, a espera do laço ocioso "
        "(`PRAGMA data_version` a cada 20 ms) e o `claim`. Um job a cada 50–200 ms "
        f"(aleatório); o poller estava ocioso na chegada de "
        f"{lat['samples'] + 5 - lat['not_idle']} de {lat['samples'] + 5} jobs (5 de aquecimento "
        "descartados). O poller para com SIGTERM "
        f"em {ms(lat['stop_s'] * 1000)} ms.",
        "",
        "Leitura: o `claim` faz consultas separadas que seguem a ordem dos índices (jobs com "
        "lease vencido, depois pendentes vencidos dos tipos urgentes, depois os demais), então o "
        "custo por job não cresce com o tamanho da fila (antes, com uma condição `OR`, 5.000 "
        "jobs na fila davam 1.595 jobs/s). Com 2 processos o total não sobe (o SQLite tem um "
        "único escritor); como a espera pelo lock de escrita tenta de novo a cada 50 µs–2 ms "
        "(e não nos 1–100 ms do *busy handler* do SQLite), a divisão entre eles fica "
        "equilibrada.",
        "",
    ]
    return "\n".join(lines)


INTRO = """# Benchmarks da ponte

Números medidos nesta máquina pelos scripts de `bench/`. Para rodar de novo (cada script atualiza
a sua seção deste arquivo):

```sh
./ponte bench                            # todos os benchmarks
.venv/bin/python bench/bench_outbox.py   # só a fila (outbox); --quick para uma rodada curta
```

Máquina: {nproc} CPUs (`nproc`), {cpu}, Python {python}; medido em {date}.

"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark da fila (outbox) e do poller.")
    parser.add_argument("--quick", action="store_true", help="rodada curta")
    parser.add_argument("--no-doc", action="store_true", help="não atualiza docs/benchmarks.md")
    args, _unknown = parser.parse_known_args(argv)  # ./ponte bench passes its args to every script
    n = 1000 if args.quick else 5000
    samples = 60 if args.quick else 300
    m = machine(sqlite=db_manager.sqlite3.sqlite_version)
    with tempfile.TemporaryDirectory(prefix="ponte-bench-") as tmp:
        print(f"(a) throughput, {n} jobs, 1 processo...", file=sys.stderr)
        single = bench_single(tmp, n)
        print(f"(a) throughput, {n} jobs, 2 processos...", file=sys.stderr)
        multi = bench_two_processes(tmp, n)
        print(f"(b) latência de despertar, {samples} amostras...", file=sys.stderr)
        lat = bench_latency(os.path.join(tmp, "latency"), samples)
    section = markdown(single, multi, lat, m, args.quick)
    print(section)
    if not args.no_doc:
        update_doc(DOC_PATH, SECTION, section, intro=INTRO.format(**m))
        print(f"atualizado: {os.path.relpath(DOC_PATH, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
