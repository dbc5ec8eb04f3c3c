"""Shared fixtures: settings on a temporary database, an injectable clock, and real local HTTP
servers for the stand-in peers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAYLOADS = ROOT / "tests" / "fixtures" / "payloads"
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
import db_manager  # noqa: E402
from standins.support import ServedApp  # noqa: E402


class FakeClock:
    """A clock tests move by hand: `clock()` → epoch seconds, `clock.advance(s)`."""

    def __init__(self, start: float = 1_790_000_000.0):
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_settings(tmp_path):
    """Build Settings from an environment dict on top of test defaults (temporary DB and logs)."""

    def build(**env):
        base = {"DATABASE_PATH": str(tmp_path / "ponte.db"), "LOG_DIR": str(tmp_path / "logs"),
                "ENVIRONMENT": "test", "ADMIN_TOKEN": "admin-token-for-tests-123"}
        base.update({k: str(v) for k, v in env.items()})
        return config.load_settings(base)

    return build


@pytest.fixture
def settings(make_settings):
    return make_settings()


@pytest.fixture
def db(settings):
    conn = db_manager.connect(settings.database_path)
    db_manager.migrate(conn)
    yield conn
    conn.close()


@pytest.fixture
def serve():
    """`serve(app)` → ServedApp with `.url`; every server is stopped at teardown."""
    served: list[ServedApp] = []

    def start(app) -> ServedApp:
        s = ServedApp(app)
        served.append(s)
        return s

    yield start
    for s in served:
        s.stop()


def venv_bin() -> Path:
    """The bin/ folder of the interpreter running the tests (where gunicorn etc. live)."""
    return Path(sys.executable).parent


def payload_text(relative: str) -> str:
    return (PAYLOADS / relative).read_text(encoding="utf-8")
