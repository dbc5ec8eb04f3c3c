"""The per-contact bot state machine of bridge A and the sellers' commands.

Owns: recognising `#pausar` / `#voltar` / `#status` / `#help` (and aliases), applying them to a
contact's persisted state, and the Portuguese confirmations the seller reads on the lead.
Must not: call a peer (confirmations are delivered by jobs), parse webhooks.
"""
from __future__ import annotations

import datetime as dt
import re
import unicodedata
from dataclasses import dataclass

import whatsapp_store

COMMAND_WORDS = {
    "pausar": "pause", "pause": "pause", "parar": "pause",
    "voltar": "resume", "resume": "resume", "ativar": "resume",
    "status": "status",
    "help": "help", "ajuda": "help",
}
# Brazil has had no daylight saving time since 2019; a fixed offset avoids needing tzdata.
BRT = dt.timezone(dt.timedelta(hours=-3), "BRT")

TEXT_PAUSED = "🤖 Bot pausado. Vendedor assumindo conversa."
TEXT_RESUMED = "🤖 Bot reativado. Assumindo atendimento automático."
TEXT_PAUSED_BY_AI = "🤖 O assistente pediu um humano: bot pausado. Vendedor, assuma a conversa."
TEXT_PAUSED_BY_HUMAN_REPLY = ("🤖 Bot pausado porque um vendedor respondeu no chat. "
                              "Escreva #voltar numa nota para reativar.")
TEXT_HELP = ("🤖 Comandos do bot (escreva numa nota do lead):\n"
             "#pausar [motivo] — pausa o bot para este contato (você assume)\n"
             "#voltar — reativa o bot\n"
             "#status — mostra se o bot está ativo ou pausado\n"
             "#help — esta ajuda\n"
             "Também valem: #pause, #parar, #resume, #ativar, #ajuda.")

_COMMAND = re.compile(r"^\s*#(\S+)\s*(.*)$", re.S)

KIND_LABEL = {"seller": "vendedor", "ai": "assistente de IA", "api": "API",
              "human_reply": "resposta humana no chat", "auto": "automático"}


@dataclass(frozen=True)
class Command:
    """A recognised command: `name` is pause/resume/status/help; `reason` is the text after it."""

    name: str
    word: str
    reason: str


def may_answer(state: dict, asked_under_pause_count: int, handoff_farewell: bool = False) -> bool:
    """Never talk over the human: an AI answer goes out (or a question goes to the AI) only
    with the bot active and under the same pause count as when it was asked — a pause since
    then, even one already undone by #voltar, makes it stale. The one exception is the AI's own
    handoff farewell, sent while the bot is paused by the AI in that very handoff."""
    if state["pause_count"] != asked_under_pause_count:
        return False
    if state["status"] == "active":
        return True
    return handoff_farewell and state["paused_by_kind"] == "ai"


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).lower()


def parse_command(text: str) -> Command | None:
    """The command in `text`, if it starts with one: exact word, case- and accent-insensitive,
    optional reason after it (`#Pausar cliente quer desconto`). `#pausarbot` is not a command."""
    match = _COMMAND.match(text or "")
    if not match:
        return None
    word, rest = match.group(1), match.group(2)
    name = COMMAND_WORDS.get(_fold(word))
    if name is None:
        return None
    return Command(name=name, word=word, reason=rest.strip()[:500])


def command_from_name(name: str, reason: str = "") -> Command | None:
    """A command given by name through the HTTP API (`pausar`, `#voltar`, `status`...)."""
    return parse_command("#" + name.strip().lstrip("#") + (" " + reason if reason else ""))


def format_time(epoch: float | None) -> str:
    """Epoch seconds as Brazilian local time, e.g. `23/11/2026 14:05`."""
    if not epoch:
        return "—"
    return dt.datetime.fromtimestamp(epoch, BRT).strftime("%d/%m/%Y %H:%M")


def apply_command(conn, contact_id: str, command: Command, by: str, by_kind: str, now: float,
                  auto_resume_hours: float) -> str:
    """Apply `command` to the contact's state (inside the caller's transaction) and return the
    confirmation for the seller."""
    if command.name == "pause":
        until = now + auto_resume_hours * 3600 if auto_resume_hours > 0 else None
        whatsapp_store.set_paused(conn, contact_id, by, by_kind, command.reason, now, until)
        if by_kind == "ai":
            return TEXT_PAUSED_BY_AI
        if by_kind == "human_reply":
            return TEXT_PAUSED_BY_HUMAN_REPLY
        text = TEXT_PAUSED
        if command.reason:
            text += f"\nMotivo: {command.reason}"
        if until:
            text += f"\nReativação automática: {format_time(until)}."
        return text
    if command.name == "resume":
        whatsapp_store.set_active(conn, contact_id, by, now)
        return TEXT_RESUMED
    if command.name == "status":
        return status_text(whatsapp_store.get_bot_state(conn, contact_id))
    return TEXT_HELP


def not_applied_text(command: Command, state: dict) -> str:
    """The seller's answer to a pause or resume that a newer change of the bot overrode."""
    return (f"🤖 Comando #{command.word or command.name} não aplicado: o bot mudou de estado "
            "depois dele.\n" + status_text(state))


def status_text(state: dict) -> str:
    """`#status` answer: active/paused, by whom, since when, auto-resume time."""
    if state["status"] == "active":
        text = "🤖 Status: bot ATIVO para este contato."
        if state.get("since_at"):
            text += f"\nReativado em {format_time(state['since_at'])}"
            if state.get("changed_by"):
                text += f" por {state['changed_by']}"
            text += "."
        return text
    kind = KIND_LABEL.get(state.get("paused_by_kind", ""), state.get("paused_by_kind", ""))
    who = state.get("changed_by") or "?"
    text = (f"🤖 Status: bot PAUSADO para este contato.\nPausado por: {who} ({kind})\n"
            f"Desde: {format_time(state.get('since_at'))}")
    if state.get("reason"):
        text += f"\nMotivo: {state['reason']}"
    text += ("\nReativação automática: " + format_time(state["until_at"])
             if state.get("until_at") else "\nReativação automática: não (use #voltar)")
    return text


def state_json(state: dict) -> dict:
    """The state as the HTTP API shows it."""
    return {"contact_id": state["kommo_contact_id"], "status": state["status"],
            "paused": state["status"] == "paused",
            "paused_by": (state.get("changed_by") or None) if state["status"] == "paused" else None,
            "changed_by": state.get("changed_by") or None,
            "paused_by_kind": state.get("paused_by_kind") or None,
            "reason": state.get("reason") or None, "since_at": state.get("since_at"),
            "auto_resume_at": state.get("until_at"), "pause_count": state.get("pause_count", 0)}
