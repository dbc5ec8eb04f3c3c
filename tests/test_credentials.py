"""credentials: one store and one refresh for Kommo and Mercado Livre — a single token call for
N threads in M processes, the re-read inside the lock, a refused refresh marks the account
disconnected, and a disconnected account sends nothing to the peer (neither the token endpoint
nor the API) until a new authorization, while the jobs that need it wait without dying."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.parse

import pytest
import requests

import credentials
import db_manager
import kommo_auth
import meli_jobs
import outbox
import whatsapp_intake
from credentials import CredentialStatus
from tests.bridge_a_harness import N8N_KEY, SECRET, BridgeA
from tests.conftest import ROOT
from tests.meli_support import Bridge, bridge_env

KOMMO_OAUTH = {"KOMMO_ACCESS_TOKEN": "", "KOMMO_CLIENT_ID": "standin-client",
               "KOMMO_CLIENT_SECRET": "standin-secret",
               "KOMMO_REDIRECT_URI": "https://ponte.example.com.br/oauth/callback"}
WAIT = credentials.DISCONNECTED_RETRY_SECONDS + 1


class Refused(Exception):
    """What a peer's token endpoint raises for a refresh token it will never accept."""

    def __init__(self, status: int, code: str = ""):
        self.status, self.code = status, code
        super().__init__(f"{status} {code}")


class TokenEndpoint:
    """An `exchange` callable that counts its calls."""

    def __init__(self, answer=None, error: Exception | None = None):
        self.calls: list[str] = []
        self.answer, self.error = answer, error

    def __call__(self, refresh_token: str) -> dict:
        self.calls.append(refresh_token)
        if self.error:
            raise self.error
        return self.answer or {"access_token": f"access-{len(self.calls)}",
                               "refresh_token": f"refresh-{len(self.calls)}",
                               "expires_in": 3600}


def _refresh(conn, clock, stale: str, exchange, **kw):
    return credentials.refresh(conn, "kommo", stale, exchange, clock,
                               default_expires_in=3600, refused_detail="recusado ({reason})",
                               no_refresh_detail="sem refresh token", **kw)


# --- the refresh routine --------------------------------------------------------------------------

def test_refresh_persists_the_rotated_pair_before_returning_it(db, settings, clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    endpoint = TokenEndpoint()
    fresh = _refresh(db, clock, "access-0", endpoint)
    assert endpoint.calls == ["refresh-0"]
    assert (fresh.access_token, fresh.refresh_token) == ("access-1", "refresh-1")
    other = db_manager.connect(settings.database_path)  # what every other process reads
    stored = credentials.get(other, "kommo")
    assert (stored.access_token, stored.refresh_token, stored.status) == \
        ("access-1", "refresh-1", CredentialStatus.OK)
    assert stored.expires_at == clock() + 3600
    assert db.execute("SELECT COUNT(*) FROM locks").fetchone()[0] == 0  # released


def test_a_pair_rotated_by_someone_else_is_used_without_a_token_call(db, clock):
    # GIVEN the caller read "access-0", and another process has rotated it since
    credentials.store(db, "kommo", "access-9", "refresh-9", clock() + 3600, clock())
    endpoint = TokenEndpoint()
    # WHEN the caller asks to refresh the token it read
    fresh = _refresh(db, clock, "access-0", endpoint, margin_seconds=600)
    # THEN it gets the other process's pair, and the single-use refresh token is not spent
    assert fresh.access_token == "access-9" and endpoint.calls == []


def test_refused_refresh_marks_the_account_disconnected_and_stops_asking(db, clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    endpoint = TokenEndpoint(error=Refused(400, "invalid_grant"))
    with pytest.raises(credentials.CredentialUnavailable) as first:
        _refresh(db, clock, "access-0", endpoint)
    stored = credentials.get(db, "kommo")
    assert stored.status == CredentialStatus.DISCONNECTED
    assert stored.detail == "recusado (invalid_grant)" == first.value.detail
    with pytest.raises(credentials.CredentialUnavailable):
        _refresh(db, clock, "access-0", endpoint)
    assert endpoint.calls == ["refresh-0"]  # the revoked refresh token is never sent again


@pytest.mark.parametrize("status", [401, 400])
def test_any_refusal_status_disconnects(db, clock, status):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    with pytest.raises(credentials.CredentialUnavailable) as err:
        _refresh(db, clock, "access-0", TokenEndpoint(error=Refused(status)))
    assert err.value.detail == f"recusado (HTTP {status})"


def test_a_failure_that_may_pass_keeps_the_account_connected(db, clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    with pytest.raises(Refused):
        _refresh(db, clock, "access-0", TokenEndpoint(error=Refused(503)))
    assert credentials.get(db, "kommo").status == CredentialStatus.OK


def test_a_refusal_after_a_new_authorization_keeps_the_new_pair(db, clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())

    def callback_races_us(refresh_token):
        credentials.store(db, "kommo", "access-new", "refresh-new", clock() + 3600, clock())
        raise Refused(400, "invalid_grant")

    assert _refresh(db, clock, "access-0", callback_races_us).access_token == "access-new"
    assert credentials.get(db, "kommo").status == CredentialStatus.OK


def test_a_refresh_without_a_refresh_token_disconnects(db, clock):
    credentials.store(db, "kommo", "long-lived", "", None, clock())
    endpoint = TokenEndpoint()
    with pytest.raises(credentials.CredentialUnavailable):
        _refresh(db, clock, "long-lived", endpoint)
    assert credentials.get(db, "kommo").detail == "sem refresh token" and endpoint.calls == []


def test_a_lock_held_too_long_is_a_busy_error_not_a_second_token_call(db, clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    assert db_manager.acquire_lock(db, "token-refresh:kommo", "someone-else", 60, now=clock())
    waited = [0.0]
    endpoint = TokenEndpoint()
    with pytest.raises(credentials.RefreshBusy):
        _refresh(db, clock, "access-0", endpoint, lock_wait_seconds=1,
                 sleep=lambda s: waited.__setitem__(0, waited[0] + s),
                 monotonic=lambda: waited[0])
    assert endpoint.calls == [] and waited[0] > 1


# --- seeding from the environment -----------------------------------------------------------------

def test_an_authoritative_seed_stays_disconnected_until_the_environment_changes(db, clock):
    seed = dict(authoritative=True, origin="https://a.kommo.com")
    credentials.seed(db, "kommo", "token-1", "", clock(), **seed)
    credentials.mark_disconnected(db, "kommo", "recusado", clock())
    # a restart with the same token: still disconnected
    assert credentials.seed(db, "kommo", "token-1", "", clock(), **seed).status == "disconnected"
    # another account (base URL) or another token: connected again
    assert credentials.seed(db, "kommo", "token-1", "", clock(), authoritative=True,
                            origin="https://b.kommo.com").ok
    credentials.mark_disconnected(db, "kommo", "recusado", clock())
    again = credentials.seed(db, "kommo", "token-2", "", clock(), authoritative=True,
                             origin="https://b.kommo.com")
    assert again.ok and again.access_token == "token-2"


def test_an_authoritative_seed_replaces_a_stored_oauth_pair(db, clock):
    credentials.store(db, "kommo", "oauth-access", "oauth-refresh", clock() + 60, clock())
    seeded = credentials.seed(db, "kommo", "long-lived", "", clock(), authoritative=True)
    assert (seeded.access_token, seeded.refresh_token, seeded.expires_at) == \
        ("long-lived", "", None)


def test_an_initial_pair_never_overwrites_its_rotation_but_a_new_pair_does(db, clock):
    seed = dict(authoritative=False)
    credentials.seed(db, "mercadolivre", "APP-1", "TG-1", clock(), **seed)
    credentials.store(db, "mercadolivre", "APP-2", "TG-2", clock() + 60, clock())  # rotated
    assert credentials.seed(db, "mercadolivre", "APP-1", "TG-1", clock(),
                            **seed).refresh_token == "TG-2"
    credentials.mark_disconnected(db, "mercadolivre", "recusado", clock())
    assert credentials.seed(db, "mercadolivre", "APP-1", "TG-1", clock(), **seed).status == \
        "disconnected"
    pasted = credentials.seed(db, "mercadolivre", "APP-3", "TG-3", clock(), **seed)
    assert pasted.ok and pasted.refresh_token == "TG-3"


def test_a_pair_stored_before_seeds_were_recorded_is_kept(db, clock):
    credentials.store(db, "mercadolivre", "APP-rotated", "TG-rotated", clock() + 60, clock())
    kept = credentials.seed(db, "mercadolivre", "APP-1", "TG-1", clock(), authoritative=False)
    assert kept.refresh_token == "TG-rotated"
    assert credentials.seed(db, "mercadolivre", "APP-1", "TG-1", clock(),
                            authoritative=False).refresh_token == "TG-rotated"


def test_a_credential_never_shows_its_tokens_in_repr(clock):
    shown = repr(credentials.Credential("kommo", "secret-access", "secret-refresh", None, "ok",
                                        "", clock()))
    assert "secret" not in shown and "kommo" in shown


# --- N threads × M processes --------------------------------------------------------------------

ASKER = textwrap.dedent("""
    import json, sys, threading
    sys.path.insert(0, {root!r})
    import config, db_manager, kommo_auth, meli_auth
    settings = config.load_settings({env!r})
    barrier = threading.Barrier({threads} + 1)
    tokens, errors = [], []

    def ask():
        conn = db_manager.connect(settings.database_path)
        source = (kommo_auth.TokenSource if {provider!r} == "kommo"
                  else meli_auth.MeliTokenSource)(settings, conn)
        barrier.wait()
        try:
            tokens.append(source.access_token())
        except Exception as exc:
            errors.append(repr(exc))
        conn.close()

    threads = [threading.Thread(target=ask) for _ in range({threads})]
    for t in threads:
        t.start()
    print("ready", flush=True)
    sys.stdin.readline()
    barrier.wait()
    for t in threads:
        t.join()
    print(json.dumps({{"tokens": tokens, "errors": errors}}), flush=True)
""")


def _ask_at_once(env: dict, provider: str, processes: int = 2, threads: int = 8) -> list[str]:
    """`threads` threads in each of `processes` processes ask for the token at the same
    moment (a barrier in each process, released when every process is ready)."""
    script = ASKER.format(root=str(ROOT), env={k: str(v) for k, v in env.items()},
                          threads=threads, provider=provider)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    tokens = []
    for p in procs:
        out = json.loads(p.stdout.readline())
        assert p.wait(30) == 0 and out["errors"] == []
        tokens += out["tokens"]
    assert len(tokens) == processes * threads
    return tokens


def test_kommo_sixteen_askers_in_two_processes_make_one_refresh(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, **KOMMO_OAUTH)
    db_manager.migrate(bridge.db)
    bridge.kommo_app.config["STATE"].refresh_tokens.add("refresh-0")
    credentials.store(bridge.db, "kommo", "access-0", "refresh-0", time.time() - 1, time.time())
    env = {"DATABASE_PATH": bridge.settings.database_path, "LOG_DIR": bridge.settings.log_dir,
           "ENVIRONMENT": "test", "KOMMO_BASE_URL": bridge.kommo.url, **KOMMO_OAUTH,
           "KOMMO_WEBHOOK_SECRET": SECRET, "N8N_WEBHOOK_URL": bridge.settings.n8n_webhook_url,
           "N8N_API_KEY": N8N_KEY}
    tokens = _ask_at_once(env, "kommo")
    standin = bridge.kommo_state()
    assert [c["grant_type"] for c in standin["token_calls"]] == ["refresh_token"]
    stored = credentials.get(bridge.db, "kommo")
    assert set(tokens) == {stored.access_token} and stored.access_token != "access-0"
    assert bridge.kommo_app.config["STATE"].refresh_tokens == {stored.refresh_token}


def test_meli_sixteen_askers_in_two_processes_make_one_refresh(make_settings, serve, clock,
                                                               tmp_path):
    b = Bridge(make_settings, serve, clock, ML_ACCESS_TOKEN="", ML_REFRESH_TOKEN="")
    credentials.store(b.conn, "mercadolivre", "APP_USR-standin-initial", "TG-standin-initial",
                      time.time() - 1, time.time())
    env = {**bridge_env(b.ml.url, b.cw.url, ML_ACCESS_TOKEN="", ML_REFRESH_TOKEN=""),
           "DATABASE_PATH": b.settings.database_path, "LOG_DIR": str(tmp_path / "logs"),
           "ENVIRONMENT": "test"}
    tokens = _ask_at_once(env, "mercadolivre")
    standin = b.ml_state()
    assert standin["refresh_calls"] == 1
    stored = credentials.get(b.conn, "mercadolivre")
    assert set(tokens) == {stored.access_token} and tokens[0] in standin["access_tokens"]
    assert stored.refresh_token == standin["refresh_token"]


# --- a disconnected account: nothing reaches the peer, the jobs wait -------------------------

def _kommo_requests(bridge) -> int:
    return bridge.kommo_state()["request_count"]


def _reply_jobs(bridge) -> list[dict]:
    return outbox.list_jobs(bridge.db, kind=whatsapp_intake.SEND_REPLY)


@pytest.mark.parametrize("expires_in, first_requests", [
    (10, 1),  # near expiry: refreshed before use, so only the refused token call
    (86_400, 2),  # revoked early: Kommo answers 401, then the refresh is refused
])
def test_kommo_refused_refresh_then_no_call_until_the_oauth_callback(make_settings, serve, clock,
                                                                      expires_in,
                                                                      first_requests):
    bridge = BridgeA(make_settings, serve, clock, **KOMMO_OAUTH)
    # GIVEN an OAuth pair whose tokens Kommo no longer accepts
    db_manager.migrate(bridge.db)
    credentials.store(bridge.db, "kommo", "old-access", "revoked-refresh", clock() + expires_in,
                      clock())
    # WHEN a customer writes and the assistant answers
    bridge.customer_says("oi", message_id="m1")
    bridge.run_jobs()
    # THEN one token call (refused), the account is disconnected, the answer waits
    assert [c["grant_type"] for c in bridge.kommo_state()["token_calls"]] == ["refresh_token"]
    assert _kommo_requests(bridge) == first_requests
    stored = credentials.get(bridge.db, "kommo")
    assert stored.status == CredentialStatus.DISCONNECTED and "/oauth/status" in stored.detail
    [reply] = _reply_jobs(bridge)
    assert reply["status"] == "pending" and reply["attempts"] == 0
    # WHEN other customers write, the assistant answers them, and the jobs come back retry
    # window after retry window
    for i in (2, 3, 4):
        bridge.customer_says(f"mensagem {i}", message_id=f"m{i}", contact_id=f"9000{i}",
                             lead_id=f"5000{i}", talk_id=f"18{i}0")
        clock.advance(WAIT)
        bridge.run_jobs()
    # THEN Kommo hears nothing more: no token call with the revoked refresh token, no API call,
    # no note about the failure; no attempt is spent and nothing dies
    assert len(bridge.n8n_calls()) == 4
    assert _kommo_requests(bridge) == first_requests
    assert [(j["status"], j["attempts"]) for j in _reply_jobs(bridge)] == [("pending", 0)] * 4
    assert outbox.list_jobs(bridge.db, kind=whatsapp_intake.ADD_NOTE) == []
    assert outbox.list_jobs(bridge.db, status="dead") == []
    status = bridge.api("get", "/oauth/status").get_json()
    assert status["connected"] is False and status["status"] == "disconnected"
    health = bridge.web.get("/health").get_json()
    assert health["accounts"]["kommo"] == "disconnected"
    # WHEN the seller reconnects through the OAuth callback
    state = urllib.parse.parse_qs(urllib.parse.urlparse(status["authorize_url"]).query)["state"]
    assert bridge.web.get(f"/oauth/callback?code=abc&state={state[0]}").status_code == 200
    clock.advance(WAIT)
    bridge.run_jobs()
    # THEN every answer goes out, and the revoked refresh token was never sent again
    assert len(bridge.chat_messages()) == 1 and "“oi”" in bridge.chat_messages()[0]
    for i in (2, 3, 4):
        [answer] = bridge.chat_messages(talk_id=f"18{i}0")
        assert f"“mensagem {i}”" in answer
    assert [c["grant_type"] for c in bridge.kommo_state()["token_calls"]] == \
        ["refresh_token", "authorization_code"]
    assert bridge.kommo_state()["notes"] == []
    assert credentials.get(bridge.db, "kommo").ok


RECHECK = kommo_auth.LONG_LIVED_401_RECHECK_SECONDS


def test_kommo_refused_long_lived_token_waits_for_a_new_kommo_access_token(make_settings, serve,
                                                                           clock):
    bridge = BridgeA(make_settings, serve, clock)
    # GIVEN Kommo no longer accepts KOMMO_ACCESS_TOKEN
    standin = bridge.kommo_app.config["STATE"]
    standin.valid_tokens.clear()
    bridge.customer_says("oi", message_id="m1")
    bridge.run_jobs()
    # THEN one 401 is not taken for a revocation: still connected, the answer waits without
    # spending an attempt, and nothing more is sent for a while
    assert _kommo_requests(bridge) == 1 and credentials.get(bridge.db, "kommo").ok
    assert [(j["status"], j["attempts"]) for j in _reply_jobs(bridge)] == [("pending", 0)]
    first_401_at = clock()
    clock.advance(RECHECK - 1)
    bridge.run_jobs()
    assert _kommo_requests(bridge) == 1
    # WHEN Kommo goes on refusing it, each time the answer is tried again
    clock.advance(1)
    while credentials.get(bridge.db, "kommo").ok:
        assert clock() - first_401_at <= kommo_auth.LONG_LIVED_401_MIN_SPAN_SECONDS
        bridge.run_jobs()
        clock.advance(RECHECK)
    # THEN the account is disconnected once the 401s have lasted 10 minutes, one call each time
    assert clock() - RECHECK - first_401_at == kommo_auth.LONG_LIVED_401_MIN_SPAN_SECONDS
    refused_calls = _kommo_requests(bridge)
    assert refused_calls == kommo_auth.LONG_LIVED_401_MIN_SPAN_SECONDS // RECHECK + 1
    assert "KOMMO_ACCESS_TOKEN" in credentials.get(bridge.db, "kommo").detail
    assert [(j["status"], j["attempts"]) for j in _reply_jobs(bridge)] == [("pending", 0)]
    assert bridge.api("get", "/oauth/status").get_json()["connected"] is False
    bridge.customer_says("mais uma", message_id="m2")
    clock.advance(WAIT)
    bridge.run_jobs()
    bridge.poller = type(bridge.poller)(bridge.settings, bridge.db, clock=clock)  # a restart
    clock.advance(WAIT)
    bridge.run_jobs()
    assert _kommo_requests(bridge) == refused_calls
    assert bridge.kommo_state()["token_calls"] == []
    assert outbox.list_jobs(bridge.db, status="dead") == []
    # WHEN the operator puts a new token in the environment and restarts
    standin.valid_tokens.add("novo-token-de-longa-duracao")
    bridge.settings = bridge.settings.replace(kommo_access_token="novo-token-de-longa-duracao")
    bridge.poller = type(bridge.poller)(bridge.settings, bridge.db, clock=clock)
    clock.advance(WAIT)
    bridge.run_jobs()
    # THEN both answers go out
    assert len(bridge.chat_messages()) == 2 and bridge.lead_notes() == []
    assert credentials.get(bridge.db, "kommo").ok


def test_kommo_a_long_lived_token_answered_again_forgets_its_401s(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock)
    standin = bridge.kommo_app.config["STATE"]
    token = next(iter(standin.valid_tokens))
    # GIVEN Kommo answers 401 to KOMMO_ACCESS_TOKEN for a while (an incident on its side)
    standin.valid_tokens.clear()
    bridge.customer_says("oi", message_id="m1")
    bridge.run_jobs()
    clock.advance(RECHECK)
    bridge.run_jobs()
    assert _kommo_requests(bridge) == 2 and bridge.chat_messages() == []
    # WHEN Kommo takes it again
    standin.valid_tokens.add(token)
    clock.advance(RECHECK)
    bridge.run_jobs()
    # THEN the answer goes out, and the 401s before are forgotten
    assert len(bridge.chat_messages()) == 1
    assert credentials.token_refusals(bridge.db, "kommo", token) is None
    # WHEN, later, Kommo refuses it again for less than 10 minutes
    standin.valid_tokens.clear()
    bridge.customer_says("voltei", message_id="m2", contact_id="90002", lead_id="50002",
                         talk_id="1820")
    second_401s_from = clock()
    while clock() - second_401s_from < kommo_auth.LONG_LIVED_401_MIN_SPAN_SECONDS:
        bridge.run_jobs()
        # THEN the count started again: 401s from the first incident do not add up
        assert credentials.get(bridge.db, "kommo").ok
        clock.advance(RECHECK)
    bridge.run_jobs()
    assert not credentials.get(bridge.db, "kommo").ok


def test_refusals_far_apart_start_a_new_count(db, clock):
    credentials.store(db, "kommo", "long-lived", "", None, clock())
    rule = dict(detail="recusado", strikes=3, min_span_seconds=600, forget_after_seconds=1800)

    def refused_at(offset):
        return credentials.record_refusal(db, "kommo", "long-lived", clock() + offset, **rule)

    assert not refused_at(0)
    assert not refused_at(2000)  # 33 minutes later: a new count
    assert not refused_at(2300)
    assert not refused_at(2500)  # three in a row, but only 500 s apart
    assert refused_at(2600)
    assert credentials.get(db, "kommo").detail == "recusado"


def _meli_tasks(b: Bridge) -> None:
    """The poller's Mercado Livre schedules (question and message polls, token refresh)."""
    for _interval, task in meli_jobs.SCHEDULES:
        task(b.ctx)


def test_meli_refused_refresh_then_no_call_until_the_oauth_callback(make_settings, serve, clock):
    b = Bridge(make_settings, serve, clock, ML_ACCESS_TOKEN="", ML_REFRESH_TOKEN="")
    settings = b.settings.replace(ml_redirect_uri=f"{b.web.url}/oauth/mercadolivre/callback")
    b.app.config["PONTE_SETTINGS"] = settings
    # GIVEN a pair Mercado Livre revoked before it expired (the seller changed the password)
    credentials.store(b.conn, "mercadolivre", "APP_USR-revoked", "TG-used", clock() + 20_000,
                      clock())
    question_id = b.ask("Tem na cor azul?")
    # WHEN the poller polls and a notification asks for the question
    _meli_tasks(b)
    b.notify_ml("questions", f"/questions/{question_id}")
    b.drain()
    # THEN one call answered 401, one refused refresh, nothing else; the account is disconnected
    calls = [c["path"] for c in b.ml_state()["calls"]]
    assert calls == ["/questions/search", "/oauth/token"]
    assert credentials.get(b.conn, "mercadolivre").status == CredentialStatus.DISCONNECTED
    waiting = outbox.list_jobs(b.conn, kind="ml.fetch_question")
    assert [(j["status"], j["attempts"]) for j in waiting] == [("pending", 0)]
    # WHEN time passes: polls and the job come back
    for _ in range(3):
        clock.advance(WAIT)
        _meli_tasks(b)
        b.drain()
    # THEN Mercado Livre hears nothing more, and nothing dies
    assert len(b.ml_state()["calls"]) == 2
    assert outbox.list_jobs(b.conn, status="dead") == []
    # WHEN the seller authorizes again through /oauth/mercadolivre/start
    start = requests.get(f"{b.web.url}/oauth/mercadolivre/start", allow_redirects=False,
                         headers={"Authorization": "Bearer admin-token-for-tests-123"},
                         timeout=5)
    consent = requests.get(start.headers["Location"], allow_redirects=False, timeout=5)
    assert requests.get(consent.headers["Location"], timeout=10).status_code == 200
    clock.advance(WAIT)
    _meli_tasks(b)
    b.drain()
    # THEN the question reaches Chatwoot, once
    assert len(b.conversations()) == 1
    assert credentials.get(b.conn, "mercadolivre").ok
    assert b.ml_state()["refresh_calls"] == 1
