"""`./ponte demo`: ponte under Supervisor, pointed at local stand-ins of Kommo, n8n, Mercado
Livre and Chatwoot, with a narrated scenario in Portuguese. No accounts needed.

Usage: python -m standins.demo [--once] [--port 8000]
  --once   run the scenario and exit (used by the tests); default: keep everything running.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from standins import kommo as kommo_standin
from standins import n8n as n8n_standin
from standins.support import ServedApp, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEMO_LOG_DIR = ROOT / "logs" / "demo"  # apart from the logs of `./ponte run`
ADMIN_TOKEN = "demo-admin-token"
KOMMO_SECRET = "demo-kommo-secret-0123456789"
STEP_TIMEOUT_SECONDS = 15.0  # each step of the script waits at most this for ponte
N8N_KEY = "demo-n8n-key"


def say(text: str = "") -> None:
    print(text, flush=True)


def start_ponte(env: dict, workdir: Path) -> subprocess.Popen:
    conf = (ROOT / "supervisord.conf").read_text()
    conf = conf.replace("%(here)s", str(ROOT))
    conf_path = workdir / "supervisord-demo.conf"
    conf_path.write_text(conf)
    bin_dir = Path(sys.executable).parent
    # Supervisor's socket and pid file in the demo's own folder: a `./ponte run` of the same
    # checkout may be up at the same time.
    full_env = {**os.environ, **env, "PONTE_RUN_DIR": str(workdir),
                "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    return subprocess.Popen([str(bin_dir / "supervisord"), "-c", str(conf_path)], env=full_env,
                            cwd=ROOT, stdout=open(workdir / "ponte.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def whatsapp_scenario(ponte: str, kommo: ServedApp, n8n: ServedApp) -> bool:
    state = lambda: requests.get(kommo.url + "/_standin/state", timeout=5).json()  # noqa: E731
    calls = lambda: requests.get(n8n.url + "/_standin/calls", timeout=5).json()["calls"]  # noqa

    def post(body: str):
        r = requests.post(f"{ponte}/webhooks/kommo/{KOMMO_SECRET}", data=body, timeout=5,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        r.raise_for_status()

    say("━━ Ponte A: WhatsApp (Kommo) ⇄ agente de IA (n8n) ━━")
    say("1) A cliente Maria escreve no WhatsApp: “Olá, vocês entregam em Campinas?”")
    say("   O Kommo chama o webhook da ponte (form-urlencoded, como o Kommo real).")
    post(kommo_standin.message_form("Olá, vocês entregam em Campinas?"))
    call = wait_for(calls, STEP_TIMEOUT_SECONDS)
    if not call:
        say("   ✗ o n8n não recebeu a mensagem"); return False
    say(f"   → n8n recebeu: message_text=“{call[0]['body']['message_text']}”, "
        f"conversation_id={call[0]['body']['conversation_id']}, chat_type="
        f"{call[0]['body']['chat_type']}")
    sent = wait_for(lambda: state()["sent"], STEP_TIMEOUT_SECONDS)
    if not sent:
        say("   ✗ a resposta não chegou ao chat"); return False
    say(f"   → resposta no chat do WhatsApp (talk {sent[0]['talk_id']}): “{sent[0]['text']}”")
    say()
    say("2) O vendedor escreve a nota “#pausar” no lead (a nota nunca chega ao cliente).")
    post(kommo_standin.note_form("#pausar", note_id="1001"))
    note = wait_for(lambda: state()["notes"], STEP_TIMEOUT_SECONDS)
    say(f"   → nota de confirmação no lead: “{note[0]['text']}”" if note else "   ✗ sem nota")
    say("3) Maria escreve de novo: “Alguém aí?” — o bot está pausado, então nada vai ao n8n.")
    post(kommo_standin.message_form("Alguém aí?"))
    time.sleep(1.0)
    paused_ok = len(calls()) == 1
    say("   → o n8n não foi chamado (a mensagem ficou registrada na ponte)." if paused_ok
        else "   ✗ o n8n foi chamado com o bot pausado!")
    say("4) O vendedor escreve “#voltar” numa nota.")
    post(kommo_standin.note_form("#voltar", note_id="1002"))
    notes = wait_for(lambda: len(state()["notes"]) >= 2 and state()["notes"],
                     STEP_TIMEOUT_SECONDS)
    say(f"   → “{notes[-1]['text']}”" if notes else "   ✗ sem nota")
    say()
    return bool(paused_ok and notes)


def console_scenario(ponte: str) -> bool:
    """The console shows what the scenario did: log in as the seller would, read the pages."""
    say("━━ Painel da ponte (/admin) ━━")
    browser = requests.Session()
    login = browser.post(f"{ponte}/admin/login", data={"token": ADMIN_TOKEN}, timeout=5)
    pages = {path: browser.get(f"{ponte}/admin{path}", timeout=5)
             for path in ("", "/contatos", "/fila", "/conversas", "/conexoes")}
    if login.status_code != 200 or any(r.status_code != 200 or "/admin/login" in r.url
                                       for r in pages.values()):
        say("   ✗ o painel não abriu"); return False
    contacts = pages["/contatos"].text.count('id="contato-')
    questions = pages["/conversas"].text.count('id="pergunta-')
    say(f"   → {ponte}/admin com o token {ADMIN_TOKEN}: Visão geral, Contatos ({contacts}), "
        f"Fila, Conversas ({questions} pergunta(s) do Mercado Livre) e Conexões")
    say()
    return contacts > 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Demonstração da ponte com parceiros simulados")
    parser.add_argument("--once", action="store_true", help="roda o roteiro e sai")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    args = parser.parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the stand-ins' access logs are noise

    import socket
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:
            say(f"✗ a porta {args.port} já está em uso; rode com outra: ./ponte demo --port 8010")
            return 2
    kommo = ServedApp(kommo_standin.create_app())
    n8n = ServedApp(n8n_standin.create_app(api_key=N8N_KEY))
    workdir = Path(tempfile.mkdtemp(prefix="ponte-demo-"))
    data_dir = ROOT / "data" / "demo"
    shutil.rmtree(data_dir, ignore_errors=True)
    env = {"PORT": str(args.port), "HOST": "127.0.0.1", "ENVIRONMENT": "demo",
           "DATABASE_PATH": str(data_dir / "ponte.db"), "LOG_DIR": str(DEMO_LOG_DIR),
           "PONTE_ENV_FILE": str(workdir / "no.env"), "ADMIN_TOKEN": ADMIN_TOKEN,
           "PUBLIC_BASE_URL": f"http://127.0.0.1:{args.port}",
           "KOMMO_BASE_URL": kommo.url, "KOMMO_ACCESS_TOKEN": kommo_standin.DEFAULT_TOKEN,
           "KOMMO_WEBHOOK_SECRET": KOMMO_SECRET, "KOMMO_ACCOUNT_ID": kommo_standin.ACCOUNT_ID,
           "N8N_WEBHOOK_URL": n8n.url + "/webhook/ponte", "N8N_API_KEY": N8N_KEY,
           "BOT_DEBOUNCE_SECONDS": "0.5"}
    ponte_url = f"http://127.0.0.1:{args.port}"
    meli = None
    try:
        meli = importlib.import_module("standins.demo_meli")
    except ModuleNotFoundError:
        pass
    meli_parts = meli.start(ponte_url) if meli else None
    if meli_parts:
        env.update(meli_parts.env)
    n8n.app.config["STATE"]["ponte_url"] = ponte_url

    say(f"Subindo a ponte (web + poller sob o Supervisor) em {ponte_url} ...")
    proc = start_ponte(env, workdir)
    ok = False
    try:
        healthy = wait_for(lambda: _health(ponte_url), timeout=30, interval=0.3)
        if not healthy:
            say(f"✗ a ponte não respondeu /health; veja {workdir / 'ponte.log'}")
            return 1
        say(f"✓ ponte no ar: {ponte_url}/health → {healthy}")
        say()
        ok = whatsapp_scenario(ponte_url, kommo, n8n)
        if meli_parts:
            ok = meli.scenario(meli_parts, ponte_url, say) and ok
        ok = console_scenario(ponte_url) and ok
        say("✓ roteiro concluído." if ok else "✗ o roteiro encontrou problemas (veja acima).")
        if args.once:
            return 0 if ok else 1
        say()
        say("Tudo continua no ar para você explorar (Ctrl+C para sair):")
        say(f"  painel:         {ponte_url}/admin  (entre com o token {ADMIN_TOKEN})")
        say(f"  ponte:          {ponte_url}/  ·  {ponte_url}/health")
        say(f"  config:         curl -H 'Authorization: Bearer {ADMIN_TOKEN}' {ponte_url}/config")
        say(f"  Kommo simulado: {kommo.url}/_standin/state")
        say(f"  n8n simulado:   {n8n.url}/_standin/calls")
        if meli_parts:
            for line in meli_parts.urls:
                say("  " + line)
        say(f"  logs:           tail -f {DEMO_LOG_DIR}/app-$(date +%Y%m%d).log")
        say("  mandar mensagem como cliente:")
        say(f"    curl -X POST {ponte_url}/webhooks/kommo/{KOMMO_SECRET} "
            "--data-urlencode \"message[add][0][id]=m-$RANDOM\" "
            "--data-urlencode 'message[add][0][contact_id]=93589657' "
            "--data-urlencode 'message[add][0][talk_id]=1874' "
            "--data-urlencode 'message[add][0][type]=incoming' "
            "--data-urlencode 'message[add][0][author][type]=external' "
            "--data-urlencode 'message[add][0][text]=Qual o preço?' "
            f"--data-urlencode 'account[id]={kommo_standin.ACCOUNT_ID}'")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while proc.poll() is None:
            time.sleep(0.5)
        return proc.returncode or 0
    except KeyboardInterrupt:
        say("\nEncerrando a demonstração...")
        return 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if meli_parts:
            meli.stop(meli_parts)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)


def _health(url: str):
    try:
        r = requests.get(url + "/health", timeout=2)
        return r.json().get("status") if r.status_code == 200 else None
    except requests.RequestException:
        return None


if __name__ == "__main__":
    sys.exit(main())
