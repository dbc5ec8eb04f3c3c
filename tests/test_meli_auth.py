"""Mercado Livre OAuth: start/callback without Postman (state, PKCE), single-flight refresh of
the single-use refresh token across processes, invalid_grant → disconnected in /health."""
from __future__ import annotations

import multiprocessing
import urllib.parse

import pytest
import requests

import credentials
import db_manager
import meli_auth
from mercado_livre_api import MercadoLivreError
from tests.meli_support import Bridge, bridge, bridge_env  # noqa: F401


def _tokens(b: Bridge, **body):
    requests.post(f"{b.ml.url}/_standin/tokens", json=body, timeout=5).raise_for_status()


def _store(b: Bridge, access: str, refresh: str, expires_at: float | None):
    credentials.store(b.conn, meli_auth.PROVIDER, access, refresh, expires_at, b.clock())


def test_oauth_start_and_callback_store_the_tokens_with_pkce(make_settings, serve, clock):
    b = Bridge(make_settings, serve, clock, ML_USE_PKCE="true", ML_ACCESS_TOKEN="",
               ML_REFRESH_TOKEN="")
    settings = b.settings.replace(ml_redirect_uri=f"{b.web.url}/oauth/mercadolivre/callback")
    b.app.config["PONTE_SETTINGS"] = settings
    # WHEN the operator starts the authorization (ADMIN_TOKEN; the console's button does the same)
    start = requests.get(f"{b.web.url}/oauth/mercadolivre/start", allow_redirects=False,
                         headers={"Authorization": "Bearer admin-token-for-tests-123"},
                         timeout=5)
    assert start.status_code == 302
    url = urllib.parse.urlparse(start.headers["Location"])
    query = dict(urllib.parse.parse_qsl(url.query))
    assert url.path == "/authorization" and query["client_id"] == settings.ml_client_id
    assert query["code_challenge_method"] == "S256" and len(query["state"]) >= 24
    # ... approves on Mercado Livre, which redirects back to our callback
    consent = requests.get(start.headers["Location"], allow_redirects=False, timeout=5)
    callback = requests.get(consent.headers["Location"], timeout=10)
    # THEN the pair is stored and the page says so in Portuguese
    assert callback.status_code == 200 and "Mercado Livre conectado" in callback.text
    row = credentials.get(b.conn, meli_auth.PROVIDER)
    assert row.status == "ok" and row.access_token.startswith("APP_USR-")
    assert row.expires_at == pytest.approx(clock() + 21600)
    assert row.refresh_token == b.ml_state()["refresh_token"]
    # a replayed callback (same state) is refused
    again = requests.get(consent.headers["Location"], timeout=10)
    assert again.status_code == 400 and "expirado" in again.text


def test_callback_with_unknown_state_is_refused(bridge):
    answer = requests.get(f"{bridge.web.url}/oauth/mercadolivre/callback",
                          params={"code": "TG-x", "state": "forged"}, timeout=5)
    assert answer.status_code == 400
    assert credentials.get(bridge.conn, meli_auth.PROVIDER) is None


def test_401_refreshes_once_and_retries_the_call(bridge):
    # GIVEN the stored access token was revoked on Mercado Livre's side
    bridge.ask("Funciona?")
    _store(bridge, "APP_USR-revoked", "TG-standin-initial", bridge.clock() + 9999)
    # WHEN the poller needs Mercado Livre
    bridge.poll()
    # THEN one refresh, the new pair is stored, the question got through
    state = bridge.ml_state()
    assert state["refresh_calls"] == 1
    row = credentials.get(bridge.conn, meli_auth.PROVIDER)
    assert row.refresh_token == state["refresh_token"] != "TG-standin-initial"
    assert len(bridge.conversations()) == 1


def test_token_near_expiry_is_refreshed_before_use(bridge):
    _store(bridge, "APP_USR-standin-initial", "TG-standin-initial", bridge.clock() + 60)
    bridge.poll()
    assert bridge.ml_state()["refresh_calls"] == 1
    assert all(c["path"] != "/oauth/token" for c in bridge.ml_state()["calls"][1:])


def test_invalid_grant_rereads_once_then_marks_disconnected_and_health_says_so(bridge):
    _store(bridge, "APP_USR-expired", "TG-already-used", bridge.clock() - 10)
    _tokens(bridge, refresh_token="TG-someone-else", access_tokens=["APP_USR-other"])
    source = meli_auth.MeliTokenSource(bridge.settings, bridge.conn, bridge.clock)
    with pytest.raises(MercadoLivreError) as err:
        source.access_token()
    assert err.value.code == "disconnected"
    assert bridge.ml_state()["refresh_calls"] == 1  # no hammering with a dead token
    row = credentials.get(bridge.conn, meli_auth.PROVIDER)
    assert row.status == "disconnected" and "invalid_grant" in row.detail
    health = requests.get(f"{bridge.web.url}/health", timeout=5).json()
    assert health["accounts"]["mercadolivre"] == "disconnected"
    # later calls do not try again until the seller re-authorizes
    with pytest.raises(MercadoLivreError):
        source.access_token()
    assert bridge.ml_state()["refresh_calls"] == 1


def test_invalid_grant_uses_a_pair_stored_meanwhile(bridge):
    """Someone (the OAuth callback) stored a new pair while our refresh was in flight."""
    _store(bridge, "APP_USR-expired", "TG-old", bridge.clock() - 10)

    class CallbackRacesUs:
        def refresh_token(self, refresh_token):
            _store(bridge, "APP_USR-from-callback", "TG-from-callback", bridge.clock() + 21600)
            raise MercadoLivreError(400, "invalid_grant", False, code="invalid_grant")

    source = meli_auth.MeliTokenSource(bridge.settings, bridge.conn, bridge.clock,
                                       token_client=CallbackRacesUs())
    assert source.access_token() == "APP_USR-from-callback"
    assert credentials.get(bridge.conn, meli_auth.PROVIDER).status == "ok"


def _refresh_in_process(args):
    env, start_at, queue = args
    import time as _time

    import config
    import db_manager as dbm
    import meli_auth as auth

    settings = config.load_settings(env)
    conn = dbm.connect(settings.database_path)
    while _time.time() < start_at:  # line up the four processes
        pass
    token = auth.MeliTokenSource(settings, conn).access_token()
    queue.put(token)
    conn.close()


def test_four_processes_needing_a_refresh_make_exactly_one_refresh_call(make_settings, serve,
                                                                         clock, tmp_path):
    import time

    b = Bridge(make_settings, serve, clock)
    _store(b, "APP_USR-standin-initial", "TG-standin-initial", time.time() - 1)
    env = {k: str(v) for k, v in bridge_env(b.ml.url, b.cw.url).items()}
    env.update(DATABASE_PATH=b.settings.database_path, LOG_DIR=str(tmp_path / "logs"),
               ENVIRONMENT="test")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 1.5
    processes = [ctx.Process(target=_refresh_in_process, args=((env, start_at, queue),))
                 for _ in range(4)]
    for p in processes:
        p.start()
    tokens = [queue.get(timeout=60) for _ in processes]
    for p in processes:
        p.join(30)
        assert p.exitcode == 0
    state = b.ml_state()
    assert state["refresh_calls"] == 1
    assert len(set(tokens)) == 1 and tokens[0] in state["access_tokens"]
    row = credentials.get(b.conn, meli_auth.PROVIDER)
    assert row.access_token == tokens[0] and row.refresh_token == state["refresh_token"]


def test_environment_pair_never_overwrites_a_rotated_pair(bridge):
    # GIVEN another process already seeded and rotated the pair
    _store(bridge, "APP_USR-rotated", "TG-rotated", bridge.clock() + 21600)
    # WHEN this process starts with the (now used) pair still in its environment
    source = meli_auth.MeliTokenSource(bridge.settings, bridge.conn, bridge.clock)
    # THEN it uses the stored pair
    assert source.access_token() == "APP_USR-rotated"
    assert credentials.get(bridge.conn, meli_auth.PROVIDER).refresh_token == "TG-rotated"


def test_first_start_seeds_the_environment_pair(bridge):
    source = meli_auth.MeliTokenSource(bridge.settings, bridge.conn, bridge.clock)
    assert source.access_token() == "APP_USR-standin-initial"
    row = credentials.get(bridge.conn, meli_auth.PROVIDER)
    assert row.refresh_token == "TG-standin-initial" and row.expires_at is None


def test_state_older_than_15_minutes_is_refused(bridge):
    url = meli_auth.start_authorization(bridge.settings, bridge.conn, bridge.clock())
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(url).query))["state"]
    bridge.clock.advance(901)
    with pytest.raises(meli_auth.OAuthError) as err:
        meli_auth.complete_authorization(bridge.settings, bridge.conn, "TG-code", state,
                                         bridge.clock())
    assert "expirado" in err.value.message
    assert bridge.ml_state()["token_calls"] == []  # no code exchange attempted


def test_seller_who_denies_access_sees_a_page_in_portuguese(bridge):
    answer = requests.get(f"{bridge.web.url}/oauth/mercadolivre/callback",
                          params={"error": "access_denied",
                                  "error_description": "o usuário negou"}, timeout=5)
    assert answer.status_code == 400 and "Autorização cancelada" in answer.text


def test_authorizing_another_account_is_refused(bridge):
    url = meli_auth.start_authorization(bridge.settings, bridge.conn, bridge.clock())
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(url).query))["state"]

    class OtherAccount:
        def exchange_code(self, code, redirect_uri, verifier):
            return {"access_token": "APP_USR-x", "refresh_token": "TG-x", "expires_in": 21600,
                    "user_id": 1234}

    with pytest.raises(meli_auth.OAuthError) as err:
        meli_auth.complete_authorization(bridge.settings, bridge.conn, "TG-code", state,
                                         bridge.clock(), client=OtherAccount())
    assert err.value.status == 409 and "ML_SELLER_ID" in err.value.message
    assert credentials.get(bridge.conn, meli_auth.PROVIDER) is None


def test_disconnected_account_never_calls_the_token_endpoint(bridge):
    # GIVEN an account marked disconnected (its refresh token was refused)
    _store(bridge, "APP_USR-dead", "TG-dead", None)
    credentials.mark_disconnected(bridge.conn, meli_auth.PROVIDER, "refresh token recusado",
                                  bridge.clock())
    before = len(bridge.ml_state()["token_calls"])
    # WHEN the poller's schedules run and a job calls Mercado Livre
    import meli_jobs
    for _ in range(3):
        for _interval, task in meli_jobs.SCHEDULES:
            task(bridge.ctx)
    with pytest.raises(MercadoLivreError) as err:
        bridge.ctx.clients.meli.get_question(1)
    source = meli_auth.MeliTokenSource(bridge.settings, bridge.conn, bridge.clock)
    with pytest.raises(MercadoLivreError):
        source.refresh("APP_USR-dead")
    # THEN the token endpoint is never called: only a new authorization helps
    assert err.value.code == "disconnected"
    assert len(bridge.ml_state()["token_calls"]) == before


def test_oauth_states_are_pruned_with_the_other_short_lived_mappings(bridge):
    meli_auth.start_authorization(bridge.settings, bridge.conn, bridge.clock())
    count = "SELECT COUNT(*) FROM mappings WHERE namespace = ?"
    assert bridge.conn.execute(count, (meli_auth.STATE_NAMESPACE,)).fetchone()[0] == 1
    bridge.poller.prune(older_than=bridge.clock() + 1)
    assert bridge.conn.execute(count, (meli_auth.STATE_NAMESPACE,)).fetchone()[0] == 0


def test_refresh_that_waited_for_the_lock_does_not_refresh_a_disconnected_account(
        bridge, monkeypatch):
    # GIVEN an expired token, and another process marks the account disconnected
    # (invalid_grant) while this one waits for the refresh lock
    _store(bridge, "APP_USR-old", "TG-old", bridge.clock() - 10)
    real_acquire = db_manager.acquire_lock

    def acquire_after_the_other_gave_up(conn, *args, **kw):
        credentials.mark_disconnected(conn, meli_auth.PROVIDER, "invalid_grant", bridge.clock())
        return real_acquire(conn, *args, **kw)

    monkeypatch.setattr(db_manager, "acquire_lock", acquire_after_the_other_gave_up)
    source = meli_auth.MeliTokenSource(bridge.settings, bridge.conn, bridge.clock)
    # WHEN this process gets the lock
    with pytest.raises(MercadoLivreError) as raised:
        source.access_token()
    # THEN it reports the disconnection and does not spend the refresh token
    assert raised.value.code == "disconnected"
    assert bridge.ml_state()["refresh_calls"] == 0
