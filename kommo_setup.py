"""One-time Kommo setup from the command line (`./ponte kommo ...`).

Owns: creating the lead textarea field used by `KOMMO_REPLY_MODE=salesbot`, and registering
ponte's webhook URL in the Kommo account with the events it needs.
Must not: run as part of the service.
"""
from __future__ import annotations

import argparse
import sys

import config
import db_manager
import kommo_api
import kommo_auth
import ponte_logging

WEBHOOK_EVENTS = ["add_message", "note_lead"]
# Listed only in Kommo's changelog; not every plan accepts it, so it is opt-in.
OUTGOING_EVENT = "add_outgoing_message"


def _client(settings) -> kommo_api.KommoClient:
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    return kommo_auth.build_client(settings, conn)


def create_field(settings, name: str) -> int:
    """Create the textarea field and print the line to add to .env."""
    field = _client(settings).create_lead_textarea_field(name)
    print(f"Campo '{field.get('name', name)}' criado no Kommo (id {field['id']}).")
    print("Adicione ao seu .env:")
    print(f"KOMMO_REPLY_FIELD_ID={field['id']}")
    return 0


def register_webhook(settings, with_outgoing: bool = False) -> int:
    """Point the account webhook at ponte (Kommo updates it if the URL already exists)."""
    if not settings.public_base_url:
        print("Defina PUBLIC_BASE_URL (ex.: https://ponte.seudominio.com.br).", file=sys.stderr)
        return 2
    if not settings.kommo_webhook_secret:
        # Without it the URL would end in /webhooks/kommo/, which the ponte refuses (401).
        print("Defina KOMMO_WEBHOOK_SECRET (um texto longo e aleatório, ex.: saída de "
              "`python3 -c \"import secrets; print(secrets.token_urlsafe(32))\"`) e rode de "
              "novo.", file=sys.stderr)
        return 2
    base = f"{settings.public_base_url}/webhooks/kommo/"
    events = WEBHOOK_EVENTS + ([OUTGOING_EVENT] if with_outgoing else [])
    _client(settings).call("POST", "/api/v4/webhooks", json={
        "destination": base + settings.kommo_webhook_secret, "settings": events, "sort": 10})
    # The secret is a credential: the terminal may be shared or recorded.
    print(f"Webhook registrado no Kommo: {base}<KOMMO_WEBHOOK_SECRET>")
    print("Eventos: " + ", ".join(events))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="./ponte kommo",
                                     description="Configuração única do Kommo para a ponte.")
    sub = parser.add_subparsers(dest="command", required=True)
    field = sub.add_parser("create-field", help="cria o campo de texto 'Resposta IA' no lead")
    field.add_argument("--name", default="Resposta IA")
    hook = sub.add_parser("register-webhook", help="registra o webhook da ponte na conta Kommo")
    hook.add_argument("--com-mensagens-enviadas", dest="with_outgoing", action="store_true",
                      help="assina também add_outgoing_message (comandos digitados no chat)")
    args = parser.parse_args(argv)
    try:
        settings = config.load_settings(partial_bridges_ok=True)
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not settings.kommo_base_url or not config.kommo_credential_given(settings):
        print("Defina KOMMO_BASE_URL e KOMMO_ACCESS_TOKEN no .env (ou, em vez do token, "
              "KOMMO_CLIENT_ID e KOMMO_CLIENT_SECRET, e conecte pelo OAuth).", file=sys.stderr)
        return 2
    try:
        if args.command == "create-field":
            return create_field(settings, args.name)
        return register_webhook(settings, args.with_outgoing)
    except db_manager.DatabaseError as exc:
        print(f"ponte: {exc}", file=sys.stderr)
        return 2
    except kommo_api.KommoError as exc:
        # Kommo's answer may quote what it was sent, webhook URL (and its secret) included.
        print("O Kommo recusou: " + ponte_logging.scrub(str(exc), config.secret_values(settings)),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
