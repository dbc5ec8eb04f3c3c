"""The terminal commands: ./ponte status | jobs | bot | backup, --help and unknown commands."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

import db_manager
import outbox
import ponte_cli
import whatsapp_store
from tests.conftest import venv_bin

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_780_000_000.0


@pytest.fixture
def db(settings):
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    yield conn
    conn.close()


def _ponte(tmp_path, *args, database=None):
    env = {**os.environ, "PONTE_ENV_FILE": str(tmp_path / "none.env"),
           "DATABASE_PATH": str(database or tmp_path / "none" / "ponte.db"),
           "PONTE_RUN_DIR": str(tmp_path / "run")}
    return subprocess.run(["./ponte", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], []])
def test_help_exits_0_and_lists_every_command(tmp_path, args):
    result = _ponte(tmp_path, *args)
    assert result.returncode == 0
    for command in ("run", "demo", "status", "jobs", "bot", "backup", "test"):
        assert f"./ponte {command}" in result.stdout


def test_an_unknown_command_is_named_and_exits_2(tmp_path):
    result = _ponte(tmp_path, "statsu")
    assert result.returncode == 2
    assert result.stderr.startswith("ponte: comando desconhecido: 'statsu'")
    direct = subprocess.run([str(venv_bin() / "python"), "ponte_cli.py", "frob"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert direct.returncode == 2 and "comando desconhecido: 'frob'" in direct.stderr


def test_status_without_a_database_says_where_it_looked(tmp_path):
    result = _ponte(tmp_path, "status")
    assert result.returncode == 1
    assert f"não há banco em {tmp_path / 'none' / 'ponte.db'}" in result.stderr
    assert not (tmp_path / "none").exists()  # looking created nothing


def test_status_shows_bridges_poller_queue_and_paused_bots(settings, db):
    # GIVEN a poller beat 5 s ago, a job due, a dead job and a paused contact
    db_manager.beat(db, "poller", now=NOW - 5)
    with db_manager.transaction(db):
        outbox.enqueue_job(db, "kommo.add_note", "a", {}, now=NOW - 40)
        outbox.enqueue_job(db, "n8n.call", "b", {}, now=NOW - 10)
        db.execute("UPDATE jobs SET status = 'dead', last_error = 'n8n 500' WHERE dedupe_key='b'")
        whatsapp_store.set_paused(db, "93589657", "Ana", "seller", "cliente VIP", NOW - 60, None)
    # WHEN the operator asks
    code, lines = ponte_cli.run(["status"], settings=settings, now=NOW, supervisor_pid=4242)
    text = "\n".join(lines)
    # THEN
    assert code == 0
    assert "pontes: whatsapp desligada · mercadolivre desligada" in text
    assert "Supervisor: rodando (pid 4242)" in text
    assert "poller: vivo (último sinal há 5 s" in text
    assert "fila: 1 pendente(s) (1 para agora, o mais antigo espera há 40 s)" in text
    assert "1 morto(s)" in text and "./ponte jobs --estado morto" in text
    assert "bots pausados: 1" in text and "contato 93589657: por Ana" in text
    assert "cliente VIP" in text
    stale = ponte_cli.run(["status"], settings=settings, now=NOW + 600)[1]
    assert any("poller: SEM SINAL (último sinal há 10 min" in line for line in stale)


def test_jobs_filters_by_state_and_shows_the_last_error_but_no_payload(settings, db):
    with db_manager.transaction(db):
        outbox.enqueue_job(db, "kommo.send_reply", "a", {"text": "segredo do cliente"}, now=NOW)
        outbox.enqueue_job(db, "n8n.call", "b", {"text": "outro"}, now=NOW)
        db.execute("UPDATE jobs SET status = 'dead', attempts = 12,"
                   " last_error = 'Kommo 402: conta sem pagamento' WHERE dedupe_key = 'b'")
    code, lines = ponte_cli.run(["jobs", "--estado", "morto"], settings=settings, now=NOW)
    text = "\n".join(lines)
    assert code == 0 and "n8n.call" in text and "kommo.send_reply" not in text
    assert "morto" in text and "12 tentativa(s)" in text
    assert "erro: Kommo 402: conta sem pagamento" in text and "outro" not in text
    every = "\n".join(ponte_cli.run(["jobs", "--limite", "5"], settings=settings, now=NOW)[1])
    assert "kommo.send_reply" in every and "segredo do cliente" not in every
    assert ponte_cli.run(["jobs", "--estado", "pending"], settings=settings, now=NOW)[0] == 0
    assert ponte_cli.run(["jobs", "--tipo", "x.y"], settings=settings,
                         now=NOW)[1] == ["nenhum job do tipo x.y."]


@pytest.mark.parametrize("args, named", [
    (["jobs", "--estado", "perdido"], "estado desconhecido: 'perdido'"),
    (["jobs", "--limite", "zero"], "--limite precisa ser um número"),
    (["jobs", "--cor"], "opção desconhecida para jobs: '--cor'"),
    (["jobs", "--tipo"], "falta o valor de --tipo"),
    (["bot", "parar", "1"], "use: ./ponte bot status|pausar|voltar"),
    (["bot", "pausar", "maria"], "'maria' não é o id numérico"),
    (["bot", "pausar", "１２"], "'１２' não é o id numérico"),  # int() reads it as 12
    (["bot", "status", "²"], "'²' não é o id numérico"),
    (["status", "agora"], "status não aceita 'agora'"),
])
def test_a_wrong_command_line_is_named_and_exits_2(settings, db, args, named):
    code, lines = ponte_cli.run(args, settings=settings, now=NOW)
    assert code == 2 and named in lines[0]


def test_the_terminal_and_the_jobs_check_ids_without_loading_flask(tmp_path):
    # ids.py is the one id check; web_common re-exports it for the routes, but importing
    # web_common (Flask, werkzeug) from the CLI or a job would slow every ./ponte command.
    code = ("import sys, ponte_cli, meli_ai, poller; "
            "print(sorted(m for m in ('flask', 'werkzeug', 'web_common') if m in sys.modules))")
    env = {"PATH": "/usr/bin:/bin", "PONTE_ENV_FILE": str(tmp_path / "none.env"),
           "DATABASE_PATH": str(tmp_path / "p.db"), "LOG_DIR": str(tmp_path / "logs")}
    out = subprocess.run([str(venv_bin() / "python"), "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_bot_pause_and_resume_from_the_terminal_reach_the_seller_like_the_api(settings, db):
    # GIVEN a contact whose conversation ponte knows (its lead gets the confirmation note)
    with db_manager.transaction(db):
        whatsapp_store.upsert_conversation(db, "93589657", "5501", "1874", "chat-1", "Maria",
                                           "kommo", NOW)
    # WHEN the operator pauses it from the terminal, with a reason
    code, lines = ponte_cli.run(["bot", "pausar", "93589657", "troca", "de", "produto"],
                                settings=settings, now=NOW)
    # THEN the bot is paused, as by POST /bot/pause, and the note waits for the poller
    assert code == 0 and lines[0] == "🤖 Bot pausado. Vendedor assumindo conversa."
    assert "Motivo: troca de produto" in lines
    state = whatsapp_store.get_bot_state(db, "93589657")
    assert (state["status"], state["changed_by"], state["reason"]) == \
        ("paused", "terminal", "troca de produto")
    [note] = outbox.list_jobs(db, kind="kommo.add_note")
    assert note["payload"]["lead_id"] == "5501" and "Bot pausado" in note["payload"]["text"]
    status = ponte_cli.run(["bot", "status", "93589657"], settings=settings, now=NOW)[1]
    assert status[0] == "🤖 Status: bot PAUSADO para este contato."
    # WHEN it is given back
    code, lines = ponte_cli.run(["bot", "voltar", "93589657"], settings=settings, now=NOW + 60)
    assert code == 0 and lines == ["🤖 Bot reativado. Assumindo atendimento automático."]
    assert whatsapp_store.get_bot_state(db, "93589657")["status"] == "active"
    assert len(outbox.list_jobs(db, kind="kommo.add_note")) == 2


def test_backup_is_a_consistent_single_file_copy_while_ponte_writes(settings, db, tmp_path):
    # GIVEN a writer that keeps adding jobs two at a time, in one transaction each
    stop, written = threading.Event(), []

    def writer():
        conn = db_manager.connect(settings.database_path)
        n = 0
        while not stop.is_set():
            with db_manager.transaction(conn):
                outbox.enqueue_job(conn, "kommo.add_note", f"w{n}a", {"n": n}, now=NOW)
                outbox.enqueue_job(conn, "kommo.add_note", f"w{n}b", {"n": n}, now=NOW)
            n += 1
            written.append(n)
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 50:
            stop.wait(0.01)
        # WHEN the operator makes a backup in the middle of it
        code, lines = ponte_cli.run(["backup", f"{tmp_path / 'copias'}/"], settings=settings,
                                    now=NOW)
        during = len(written)
    finally:
        stop.set()
        thread.join()
    # THEN the copy is one file, verified, with whole transactions only
    assert code == 0, lines
    [copy_path] = (tmp_path / "copias").iterdir()
    assert copy_path.name == "ponte-" + \
        __import__("time").strftime("%Y%m%d-%H%M%S", __import__("time").localtime(NOW)) + ".db"
    assert f"cópia consistente do banco em {copy_path}" in lines[0]
    copy = sqlite3.connect(copy_path)
    assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = copy.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert rows % 2 == 0 and 100 <= rows <= 2 * during
    assert copy.execute("PRAGMA user_version").fetchone()[0] == db_manager.schema_version(db)
    copy.close()
    # a second backup to the same file is refused rather than overwriting it
    code, lines = ponte_cli.run(["backup", str(copy_path)], settings=settings, now=NOW)
    assert code == 1 and "já existe" in lines[0]


def test_backup_by_default_goes_beside_the_database_through_the_ponte_script(tmp_path):
    database = tmp_path / "data" / "ponte.db"
    conn = db_manager.connect(str(database))
    db_manager.migrate(conn)
    conn.close()
    result = _ponte(tmp_path, "backup", database=database)
    assert result.returncode == 0, result.stderr
    [copy] = (tmp_path / "data" / "backups").glob("ponte-*.db")
    assert str(copy) in result.stdout and "Para restaurar: pare a ponte" in result.stdout
    assert not list((tmp_path / "data" / "backups").glob("*.partial"))


def test_commands_never_migrate_and_a_backup_keeps_an_older_schema(settings, db, tmp_path):
    # GIVEN a database left by an older ponte (one migration behind)
    current = db_manager.schema_version(db)
    db.execute(f"PRAGMA user_version = {current - 1}")
    # WHEN the operator asks for the status, and makes a backup before updating
    code, lines = ponte_cli.run(["status"], settings=settings, now=NOW)
    assert code == 1
    assert f"o banco está na versão {current - 1} do esquema, de uma ponte anterior" in lines[0]
    assert "./ponte run" in lines[0]
    code, lines = ponte_cli.run(["backup", f"{tmp_path / 'antes'}/"], settings=settings, now=NOW)
    # THEN nothing was migrated, and the copy is the old database as it was
    assert code == 0, lines
    assert db_manager.schema_version(db) == current - 1
    [copy] = (tmp_path / "antes").iterdir()
    assert sqlite3.connect(copy).execute("PRAGMA user_version").fetchone()[0] == current - 1
