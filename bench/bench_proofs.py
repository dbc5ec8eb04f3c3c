"""The proof suites of issue 14 in their long variants: fuzz, chaos, outages, slow clients.

Owns: running tests/test_fuzz.py, tests/test_chaos.py, tests/test_outage.py and
tests/test_slow_clients.py with more examples and more kills than `./ponte test` gives them
(PONTE_FUZZ_EXAMPLES, PONTE_CHAOS_KILLS), timing each, collecting the figures the suites write
to PONTE_PROOF_REPORT, and the "Última rodada" section of docs/confiabilidade.md.
Must not: hold any check of its own (the suites are the proof; this only runs them longer).

    .venv/bin/python bench/bench_proofs.py            # long: 1000 examples, 120 kills
    .venv/bin/python bench/bench_proofs.py --quick    # what CI runs (40 examples, 32 kills)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib  # noqa: E402

DOC = os.path.join(benchlib.ROOT, "docs", "confiabilidade.md")
SECTION = "## Última rodada"
SUITES = [("fuzz", "tests/test_fuzz.py"), ("caos", "tests/test_chaos.py"),
          ("quedas", "tests/test_outage.py"), ("clientes lentos", "tests/test_slow_clients.py")]
HARD_DEADLINE_S = 3 * 3600


def run_suite(path: str, env: dict) -> dict:
    """pytest on one file: wall seconds, passed/failed counts and the last line."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider",
                             "-s", "--timeout", "3600"], cwd=benchlib.ROOT, env=env,
                            capture_output=True, text=True)
    seconds = time.monotonic() - started
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if re.search(r"\d+ (passed|failed)", line)),
                   lines[-1] if lines else "")
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|skipped)", summary)}
    if result.returncode != 0:
        sys.stdout.write(result.stdout[-6000:])
    return {"path": path, "seconds": seconds, "returncode": result.returncode,
            "summary": summary, **counts}


def section(results: dict, figures: dict, plan: dict, m: dict) -> str:
    n = benchlib.n
    rows = "".join(
        f"| {name} | `{r['path']}` | {r.get('passed', 0)} | {r.get('failed', 0) + r.get('error', 0)}"
        f" | {n(r['seconds'], 0)} s |\n" for name, r in results.items())
    text = (f"{SECTION}\n\n"
            f"Medido em {m['date']} — {m['nproc']} CPUs, {m['cpu']}, Python {m['python']}; "
            f"{plan['examples']} exemplos por propriedade no fuzz, {plan['kills']} kills no "
            f"caos (`.venv/bin/python bench/bench_proofs.py"
            f"{' --quick' if plan['quick'] else ''}`).\n\n"
            "| suíte | arquivo | testes ok | falhas | tempo |\n|---|---|---|---|---|\n" + rows)
    failed = [name for name, r in results.items() if r["returncode"] != 0]
    if failed:
        text += (f"\n**Falhou nesta rodada: {', '.join(failed)}** (a saída do pytest mostra a "
                 "entrada mínima; os números abaixo não valem como prova).\n")
    fuzz = figures.get("fuzz")
    if fuzz:
        text += (f"\nFuzz: {n(fuzz['requests'], 0)} requisições hostis pela HTTP (fora os casos "
                 "de protocolo no Gunicorn); "
                 f"{n(fuzz['refused_and_compared'], 0)} delas recusadas, cada uma com o banco "
                 "comparado antes e depois (contagem e checksum de cada tabela)"
                 + (": nenhum 5xx, e o banco igual em todas.\n" if "fuzz" not in failed
                    else ".\n"))
    chaos = figures.get("chaos")
    if chaos:
        text += (f"\nCaos: {chaos['kills_total']} `kill -9` ({chaos['kills']['poller']} do poller, "
                 f"{chaos['poller_kills_with_jobs_running']} deles com jobs rodando; "
                 f"{chaos['kills']['web_worker']} de workers web) em {n(chaos['chaos_seconds'])} s; "
                 f"confirmados: {chaos['acknowledged']['kommo']} mensagens de clientes (Kommo), "
                 f"{chaos['acknowledged']['chatwoot']} respostas de agentes (Chatwoot) e "
                 f"{chaos['acknowledged']['questions']} perguntas (Mercado Livre); "
                 f"{chaos['webhooks_cut_mid_request']} webhooks cortados ao meio (todos os "
                 "workers mortos com metade do corpo enviada) e "
                 f"{sum(chaos['webhook_errors_retried'].values())} outras entregas sem 2xx, "
                 "todos enviados de novo pelo remetente até o 2xx; "
                 f"{chaos['n8n_calls']} chamadas ao n8n. "
                 f"**Perdidos: {chaos['lost']}. Duplicados: {chaos['doubled']}. Jobs mortos: "
                 f"{chaos['dead_jobs']}.**\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI budget")
    parser.add_argument("--no-doc", action="store_true", help="leave docs/confiabilidade.md")
    parser.add_argument("--only", default="", help="suites by name, comma-separated")
    opts, _ = parser.parse_known_args(argv)  # ./ponte bench passes its arguments to every bench
    plan = {"quick": opts.quick, "examples": 40 if opts.quick else 1000,
            "kills": 32 if opts.quick else 120}
    benchlib.watchdog(HARD_DEADLINE_S, "bench_proofs")
    report = tempfile.NamedTemporaryFile(prefix="ponte-proofs-", suffix=".jsonl", delete=False)
    report.close()
    env = {**os.environ, "PONTE_PROOF_REPORT": report.name,
           "PONTE_FUZZ_EXAMPLES": str(plan["examples"]), "PONTE_CHAOS_KILLS": str(plan["kills"])}
    results = {}
    for name, path in SUITES:
        if opts.only and name not in opts.only.split(","):
            continue
        results[name] = run_suite(path, env)
        print(f"{name}: {results[name]['summary']} ({results[name]['seconds']:.0f} s)", flush=True)
    figures = {}
    with open(report.name, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            figures[row["suite"]] = row
    os.unlink(report.name)
    print(json.dumps(figures, ensure_ascii=False))
    if not opts.no_doc and not opts.only:
        benchlib.update_doc(DOC, SECTION, section(results, figures, plan, benchlib.machine()),
                            intro="# Confiabilidade\n")
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
