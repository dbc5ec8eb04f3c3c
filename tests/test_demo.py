"""`./ponte demo` works with no accounts: its scripted scenario passes end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from standins.support import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_demo_scenario_runs_end_to_end():
    result = subprocess.run([sys.executable, "-m", "standins.demo", "--once", "--port",
                             str(free_port())], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "resposta no chat do WhatsApp" in out and "Bot pausado" in out
    assert "o n8n não foi chamado" in out and "✓ roteiro concluído." in out
    # the questions' AI: answered by itself, held as a suggestion, sent with #ok
    assert "etiqueta ia-respondeu" in out and "contém um telefone" in out
    assert "(o “#ok” não sai)" in out
    assert "/admin com o token" in out and "Contatos (1)" in out  # the console shows it
