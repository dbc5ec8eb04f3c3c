"""The one test of what ponte takes as a numeric id: ASCII digits only.

Owns: `ascii_id()`, `ascii_int()` — used by the web routes (through web_common), the `./ponte`
terminal commands, the admin console, the jobs and chatwoot_api's webhook parsers alike, so a
contact, question, inbox id or timestamp is judged the same way wherever it comes in.
Must not: import Flask, requests or anything of ours (the CLI, the poller's jobs and the peer
modules import it and must stay light); touch the database.
"""
from __future__ import annotations

import re

_ASCII_ID = re.compile(r"[0-9]{1,20}\Z")


def ascii_id(value) -> str | None:
    """`value` as an id of ASCII digits (1 to 20 of them, nothing around; a JSON integer
    too), or None.
    `str.isdigit()` is not this test: it accepts "²" (which int() refuses) and "１２" (which
    int() reads as 12 — another contact's id)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    return value if _ASCII_ID.match(value) else None


def ascii_int(value: str | None) -> int | None:
    """A header or parameter holding a non-negative integer in ASCII digits (surrounding
    spaces allowed), or None for anything else — "²", "１２", "+5", "1e3", ""."""
    if value is None:
        return None
    text = ascii_id(value.strip())
    return int(text) if text is not None else None
