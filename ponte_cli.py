"""Terminal commands for operators: `./ponte status | jobs | bot | backup` (pt-BR output).

Owns: reading and presenting ponte's state for a terminal, the bot commands given from a
terminal (the same path as `POST /bot/pause`: whatsapp_intake.api_command, so the seller gets
the same note on the lead), and the online backup of the SQLite database.
Must not: call a peer (notes are jobs the poller sends), write SQL of its own on bridge tables
(the stores own them), or start or stop processes (ponte_start does).
Exit codes: 0 done, 1 the command failed (e.g. no database yet), 2 a wrong command line.
"""
from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import bot_control
import config
import db_manager
import ids
import outbox
import whatsapp_intake
import whatsapp_store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
USAGE = """uso: ./ponte status
       ./ponte jobs [--estado pendente|executando|morto|concluido] [--tipo TIPO] [--limite N]
       ./ponte bot status|pausar|voltar CONTATO [motivo]
       ./ponte backup [DESTINO]   (arquivo, ou pasta terminada em /; padrão: backups/ ao
                                  lado do banco)"""
STATUS_NAMES = {"pending": "pendente", "running": "executando", "done": "concluido",
                "dead": "morto"}
BOT_ACTIONS = {"status": "status", "pausar": "pausar", "voltar": "voltar"}
BACKUP_FOLDER = "backups"
ERROR_WIDTH = 100  # characters of a job's last error shown per line


class UsageError(Exception):
    """A wrong command line; the message names what is wrong (in Portuguese)."""


class CommandFailed(Exception):
    """The command could not be done; the message says why (in Portuguese)."""


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def open_database(settings, any_schema: bool = False) -> sqlite3.Connection:
    """The database as it is: CommandFailed when there is none yet (no ponte has run with this
    DATABASE_PATH) or, unless `any_schema`, when its schema is not the one this code knows.
    Never migrates: a backup taken before an update must be of the old database, and a ponte
    still running an older version must not find its tables changed under it."""
    path = Path(settings.database_path)
    if not path.exists():
        raise CommandFailed(f"não há banco em {path}: a ponte ainda não rodou com este "
                            "DATABASE_PATH (confira o .env, ou rode no contêiner da ponte).")
    try:
        conn = db_manager.connect(str(path))
        version = db_manager.schema_version(conn)
    except (db_manager.DatabaseError, sqlite3.Error) as exc:
        raise CommandFailed(str(exc)) from exc
    expected = len(db_manager.MIGRATIONS)
    if version != expected and not any_schema:
        conn.close()
        newer = "mais nova" if version > expected else "anterior"
        raise CommandFailed(f"o banco está na versão {version} do esquema, de uma ponte {newer}; "
                            f"este código conhece a {expected}. "
                            + ("Suba a ponte (./ponte run) para atualizá-lo."
                               if version < expected else "Use a versão mais nova da ponte."))
    return conn


def status_lines(settings, conn, now: float, supervisor_pid: int | None) -> list[str]:
    """`./ponte status`: bridges, Supervisor, poller heartbeat, queue and paused bots."""
    size = Path(settings.database_path).stat().st_size
    bridges = " · ".join(f"{name} {'ligada' if settings.bridge_enabled(name) else 'desligada'}"
                         for name in config.BRIDGE_REQUIRED)
    lines = [f"ponte {config.VERSION} · banco {settings.database_path} ({size // 1024} KB)",
             f"pontes: {bridges}",
             "Supervisor: " + (f"rodando (pid {supervisor_pid})" if supervisor_pid
                               else "não está rodando a partir desta pasta")]
    beat = db_manager.last_beat(conn, "poller")
    if beat is None:
        lines.append("poller: nunca rodou com este banco")
    else:
        age = now - beat["beat_at"]
        alive = age <= settings.poller_heartbeat_max_age_seconds
        lines.append(f"poller: {'vivo' if alive else 'SEM SINAL'} (último sinal há {_ago(age)}, "
                     f"pid {beat['pid']})")
    q = outbox.queue_stats(conn, now)
    lines.append(f"fila: {q['pending']} pendente(s) ({q['due']} para agora"
                 + (f", o mais antigo espera há {_ago(q['oldest_due_seconds'])}"
                    if q["due"] else "")
                 + f"), {q['running']} executando, {q['dead']} morto(s), "
                 f"{q['done']} concluído(s)")
    if q["held_back"]:
        lines.append(f"  {q['held_back']} aguardando nova tentativa (o mais antigo criado há "
                     f"{_ago(q['oldest_held_back_seconds'])})")
    if q["dead"]:
        lines.append("  veja os mortos: ./ponte jobs --estado morto")
    paused = whatsapp_store.paused_states(conn)
    lines.append(f"bots pausados: {len(paused)}")
    for state in paused[:10]:
        lines.append(f"  contato {state['kommo_contact_id']}: por {state['changed_by'] or '?'} "
                     f"desde {bot_control.format_time(state['since_at'])}"
                     + (f" — {state['reason']}" if state["reason"] else ""))
    if len(paused) > 10:
        lines.append(f"  ... e mais {len(paused) - 10} (veja /admin/contatos)")
    return lines


def _parse_jobs_args(args: list[str]) -> dict:
    options = {"status": None, "kind": None, "limit": 20}
    names = {"--estado": "status", "--tipo": "kind", "--limite": "limit"}
    i = 0
    while i < len(args):
        name = args[i]
        if name not in names:
            raise UsageError(f"opção desconhecida para jobs: '{name}'")
        if i + 1 >= len(args):
            raise UsageError(f"falta o valor de {name}")
        value = args[i + 1]
        if name == "--estado":
            by_name = {**{v: k for k, v in STATUS_NAMES.items()}, **{k: k for k in STATUS_NAMES}}
            if value.lower() not in by_name:
                raise UsageError(f"estado desconhecido: '{value}' (use "
                                 + ", ".join(STATUS_NAMES.values()) + ")")
            value = by_name[value.lower()]
        elif name == "--limite":
            if not value.isdigit() or int(value) < 1:
                raise UsageError(f"--limite precisa ser um número ≥ 1, não '{value}'")
            value = int(value)
        options[names[name]] = value
        i += 2
    return options


def jobs_lines(conn, now: float, status: str | None, kind: str | None, limit: int) -> list[str]:
    """`./ponte jobs`: one line per job, newest first (no payloads: they hold customers'
    words; the console shows them)."""
    jobs = outbox.list_jobs(conn, status=status, kind=kind, limit=limit, now=now)
    if not jobs:
        return ["nenhum job" + (f" {STATUS_NAMES[status]}" if status else "")
                + (f" do tipo {kind}" if kind else "") + "."]
    lines = []
    for job in jobs:
        line = (f"#{job['id']:<6} {STATUS_NAMES.get(job['status'], job['status']):<10} "
                f"{job['kind']:<24} {job['attempts']} tentativa(s)  criado "
                f"{bot_control.format_time(job['created_at'])}")
        if "next_attempt_in_seconds" in job:
            line += f"  próxima em {_ago(job['next_attempt_in_seconds'])}"
        if job.get("last_error"):
            error = " ".join(job["last_error"].split())
            line += "\n        erro: " + (error[:ERROR_WIDTH] + "…"
                                          if len(error) > ERROR_WIDTH else error)
        lines.append(line)
    return lines


def bot_lines(settings, conn, args: list[str], now: float) -> list[str]:
    """`./ponte bot status|pausar|voltar CONTATO [motivo]`, as `POST /bot/*` does it (the
    seller gets the same note on the lead)."""
    if len(args) < 2 or args[0] not in BOT_ACTIONS:
        raise UsageError("use: ./ponte bot status|pausar|voltar CONTATO [motivo]")
    action, contact_id, reason = args[0], args[1].strip(), " ".join(args[2:]).strip()
    if ids.ascii_id(contact_id) is None:
        raise UsageError(f"'{contact_id}' não é o id numérico de um contato do Kommo")
    if action == "status":
        return bot_control.status_text(whatsapp_store.get_bot_state(conn, contact_id)).splitlines()
    command = bot_control.command_from_name(BOT_ACTIONS[action], reason)
    with db_manager.transaction(conn):
        result = whatsapp_intake.api_command(conn, settings, contact_id, command, "terminal",
                                             now)
    return result["message"].splitlines()


def backup(settings, destination: str | None, now: float) -> Path:
    """A consistent copy of the live database (SQLite's online backup API, in one step: one
    read transaction, while web and poller keep writing), checked with `integrity_check` and
    left as one self-contained file. Returns its path."""
    source_path = Path(settings.database_path)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    name = f"ponte-{stamp}.db"
    target = Path(destination) if destination else source_path.parent / BACKUP_FOLDER / name
    if target.is_dir() or (destination or "").endswith(os.sep):
        target = target / name
    if target.exists():
        raise CommandFailed(f"{target} já existe; escolha outro destino.")
    source = open_database(settings, any_schema=True)
    partial = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.unlink(missing_ok=True)
        copy = sqlite3.connect(str(partial))
        try:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")  # one file, no -wal beside it
            check = copy.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            copy.close()
        if check != "ok":
            raise CommandFailed(f"a cópia não passou na verificação ({check}); tente de novo.")
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        partial.replace(target)
    except (OSError, sqlite3.Error) as exc:
        raise CommandFailed(f"não consegui gravar a cópia em {target} ({exc}).") from exc
    finally:
        source.close()
        partial.unlink(missing_ok=True)
    return target


def run(argv: list[str], settings=None, now: float | None = None,
        supervisor_pid: int | None = None) -> tuple[int, list[str]]:
    """Run one command; (exit code, lines to print). Messages are for people, in Portuguese."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        return EXIT_OK, USAGE.splitlines()
    command, args = argv[0], argv[1:]
    if command not in ("status", "jobs", "bot", "backup"):
        return EXIT_USAGE, [f"ponte: comando desconhecido: '{command}'", *USAGE.splitlines()]
    if args[:1] in (["-h"], ["--help"]):
        return EXIT_OK, USAGE.splitlines()
    now = time.time() if now is None else now
    try:
        if settings is None:
            settings = config.load_settings(partial_bridges_ok=True)
        if command == "backup":
            if len(args) > 1:
                raise UsageError("backup aceita um destino só")
            target = backup(settings, args[0] if args else None, now)
            return EXIT_OK, [
                f"✓ cópia consistente do banco em {target} "
                f"({target.stat().st_size // 1024} KB, verificada).",
                "  Para restaurar: pare a ponte, copie este arquivo para "
                f"{settings.database_path}, apague {Path(settings.database_path).name}-wal e "
                f"{Path(settings.database_path).name}-shm ao lado dele, e suba a ponte."]
        options = _parse_jobs_args(args) if command == "jobs" else None
        if command == "status" and args:
            raise UsageError(f"status não aceita '{args[0]}'")
        conn = open_database(settings)
        try:
            if command == "status":
                return EXIT_OK, status_lines(settings, conn, now, supervisor_pid)
            if command == "jobs":
                return EXIT_OK, jobs_lines(conn, now, **options)
            return EXIT_OK, bot_lines(settings, conn, args, now)
        finally:
            conn.close()
    except UsageError as exc:
        return EXIT_USAGE, [f"ponte {command}: {exc}", *USAGE.splitlines()]
    except config.ConfigError as exc:
        return EXIT_USAGE, [f"ponte: {exc}"]
    except CommandFailed as exc:
        return EXIT_FAILED, [f"ponte {command}: {exc}"]


def main(argv: list[str] | None = None) -> int:
    import ponte_start
    argv = sys.argv[1:] if argv is None else argv
    code, lines = run(argv, supervisor_pid=ponte_start.running_pid(ponte_start.run_dir()))
    print("\n".join(lines), file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
