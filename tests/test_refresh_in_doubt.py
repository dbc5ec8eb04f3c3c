"""A token refresh whose answer was lost (5xx, timeout, reset) may have rotated the single-use
refresh token: the waiter that takes the refresh lock next does not send it again; it is sent
once more only after credentials.REFRESH_IN_DOUBT_WAIT_SECONDS, and a second lost or refused
answer marks the account for reconnection. Across HTTP with the Kommo and Mercado Livre
stand-ins' token endpoints, two threads waiting on the same refresh."""
from __future__ import annotations

import threading
import time

import pytest
import requests

import credentials
import db_manager
import kommo_auth
import meli_auth
from credentials import CredentialStatus
from kommo_api import KommoError
from mercado_livre_api import MercadoLivreError
from tests.bridge_a_harness import BridgeA
from tests.meli_support import Bridge

WAIT = credentials.REFRESH_IN_DOUBT_WAIT_SECONDS
KOMMO_OAUTH = {"KOMMO_ACCESS_TOKEN": "", "KOMMO_CLIENT_ID": "standin-client",
               "KOMMO_CLIENT_SECRET": "standin-secret",
               "KOMMO_REDIRECT_URI": "https://ponte.example.com.br/oauth/callback"}


def _two_waiters(make_source) -> dict:
    """Threads "a" and "b", each with its own connection and token source, ask for the token
    at once: a's token call starts only once b is waiting for the refresh lock a holds.
    Returns what each got (a token or the exception)."""
    a_calling, b_waiting = threading.Event(), threading.Event()
    outcomes: dict = {}

    def b_sleep(_seconds):
        b_waiting.set()
        time.sleep(0.002)  # polling a lock another thread holds: real time must pass

    def ask(name, sleep):
        conn = db_manager.connect(make_source.database_path)
        source = make_source(conn, sleep)
        if name == "a":
            real = source._exchange

            def exchange_once_b_waits(refresh_token):
                a_calling.set()
                assert b_waiting.wait(10)
                return real(refresh_token)

            source._exchange = exchange_once_b_waits
        try:
            outcomes[name] = source.access_token()
        except Exception as exc:  # what the job would see
            outcomes[name] = exc
        finally:
            conn.close()

    a = threading.Thread(target=ask, args=("a", time.sleep))
    a.start()
    assert a_calling.wait(10)
    b = threading.Thread(target=ask, args=("b", b_sleep))
    b.start()
    a.join(20)
    b.join(20)
    return outcomes


def _kommo(make_settings, serve, clock):
    bridge = BridgeA(make_settings, serve, clock, **KOMMO_OAUTH)
    db_manager.migrate(bridge.db)
    bridge.kommo_app.config["STATE"].refresh_tokens.add("refresh-0")
    credentials.store(bridge.db, "kommo", "access-0", "refresh-0", clock() - 1, clock())

    def make_source(conn, sleep=time.sleep):
        return kommo_auth.TokenSource(bridge.settings, conn, clock, sleep=sleep)

    make_source.database_path = bridge.settings.database_path
    return bridge, make_source


def _kommo_fail(bridge, status: int, count: int = 1):
    requests.post(f"{bridge.kommo.url}/_standin/fail", json={
        "path_prefix": "/oauth2/access_token", "status": status, "count": count},
        timeout=5).raise_for_status()


def _kommo_refreshes(bridge) -> int:
    """Calls that reached the token endpoint, injected failures included."""
    return [r["path"] for r in bridge.kommo_state()["requests"]].count("/oauth2/access_token")


def test_kommo_a_lost_refresh_is_not_resent_by_the_waiter_and_once_later(make_settings, serve,
                                                                        clock):
    bridge, make_source = _kommo(make_settings, serve, clock)
    # GIVEN Kommo's token endpoint answers 503 (it did not rotate: the token still works)
    _kommo_fail(bridge, 503)
    # WHEN two threads need the refresh at once
    got = _two_waiters(make_source)
    # THEN one token call; the waiter got a retryable error without sending anything
    assert _kommo_refreshes(bridge) == 1
    assert isinstance(got["a"], KommoError) and got["a"].status == 503
    assert isinstance(got["b"], KommoError) and got["b"].retryable
    assert got["b"].status is None and not got["b"].may_have_reached
    assert WAIT - 1 <= got["b"].retry_after_seconds <= WAIT
    assert credentials.get(bridge.db, "kommo").ok
    # ... and so does anyone else before the wait is over
    clock.advance(WAIT - 10)
    with pytest.raises(KommoError):
        make_source(bridge.db).access_token()
    assert _kommo_refreshes(bridge) == 1
    # WHEN the wait is over
    clock.advance(11)
    token = make_source(bridge.db).access_token()
    # THEN the refresh token is sent once more, and the rotated pair is stored
    assert _kommo_refreshes(bridge) == 2
    stored = credentials.get(bridge.db, "kommo")
    assert stored.ok and stored.access_token == token != "access-0"
    assert bridge.kommo_app.config["STATE"].refresh_tokens == {stored.refresh_token}


def test_kommo_a_second_lost_answer_asks_for_reconnection_and_sends_no_third(make_settings,
                                                                             serve, clock):
    bridge, make_source = _kommo(make_settings, serve, clock)
    _kommo_fail(bridge, 502, count=2)
    source = make_source(bridge.db)
    with pytest.raises(KommoError):
        source.access_token()
    clock.advance(WAIT + 1)
    # WHEN the one resend is lost too
    with pytest.raises(kommo_auth.KommoDisconnected) as err:
        source.access_token()
    # THEN the account waits for the seller to reconnect, and says why in Portuguese
    stored = credentials.get(bridge.db, "kommo")
    assert stored.status == CredentialStatus.DISCONNECTED and stored.detail == err.value.detail
    assert "ficou sem resposta (HTTP 502; depois HTTP 502)" in stored.detail
    assert "/oauth/status" in stored.detail
    for _ in range(3):
        clock.advance(WAIT + 1)
        with pytest.raises(kommo_auth.KommoDisconnected):
            source.access_token()
    assert _kommo_refreshes(bridge) == 2


def _meli(make_settings, serve, clock, expires_at):
    b = Bridge(make_settings, serve, clock, ML_ACCESS_TOKEN="", ML_REFRESH_TOKEN="")
    credentials.store(b.conn, "mercadolivre", "APP_USR-standin-initial", "TG-standin-initial",
                      expires_at, clock())

    def make_source(conn, sleep=time.sleep):
        return meli_auth.MeliTokenSource(b.settings, conn, clock, sleep=sleep)

    make_source.database_path = b.settings.database_path
    return b, make_source


def _meli_refreshes(b) -> int:
    """Calls that reached the token endpoint, injected failures included."""
    return [c["path"] for c in b.ml_state()["calls"]].count("/oauth/token")


def _meli_fail(b, **rule):
    requests.post(f"{b.ml.url}/_standin/fail", json={"path_prefix": "/oauth/token", **rule},
                  timeout=5).raise_for_status()


def test_meli_a_refresh_rotated_then_lost_is_not_resent_at_once_then_asks_for_reconnection(
        make_settings, serve, clock):
    b, make_source = _meli(make_settings, serve, clock, expires_at=clock() - 1)
    # GIVEN Mercado Livre rotates the refresh token, then the answer is lost (500)
    _meli_fail(b, status=500, apply=True)
    # WHEN two threads need the refresh at once
    got = _two_waiters(make_source)
    # THEN one token call: the waiter did not spend the (already rotated) token again
    assert _meli_refreshes(b) == 1
    assert b.ml_state()["refresh_token"] != "TG-standin-initial"  # rotated at the peer
    assert isinstance(got["a"], MercadoLivreError) and got["a"].status == 500
    assert isinstance(got["b"], MercadoLivreError) and got["b"].retryable
    assert got["b"].status is None and got["b"].retry_after_seconds > WAIT - 1
    assert credentials.get(b.conn, "mercadolivre").ok
    # WHEN the wait is over, the one resend meets invalid_grant
    clock.advance(WAIT + 1)
    with pytest.raises(MercadoLivreError) as err:
        make_source(b.conn).access_token()
    # THEN the account waits for a new authorization, with the reason in Portuguese
    assert err.value.code == "disconnected" and _meli_refreshes(b) == 2
    stored = credentials.get(b.conn, "mercadolivre")
    assert stored.status == CredentialStatus.DISCONNECTED
    assert "ficou sem resposta (HTTP 500; depois invalid_grant)" in stored.detail
    assert "/oauth/mercadolivre/start" in stored.detail
    clock.advance(WAIT + 1)
    with pytest.raises(MercadoLivreError):
        make_source(b.conn).access_token()
    assert _meli_refreshes(b) == 2


def test_meli_a_token_not_expired_yet_is_still_used_while_the_resend_waits(make_settings, serve,
                                                                           clock):
    # GIVEN a token due for refresh (expires in 100 s) whose refresh answer was lost
    b, make_source = _meli(make_settings, serve, clock, expires_at=clock() + 100)
    _meli_fail(b, status=503)
    source = make_source(b.conn)
    with pytest.raises(MercadoLivreError):
        source.access_token()
    # WHEN calls need the token before the resend may go
    # THEN they use the stored one while it lasts, without a token call
    assert source.access_token() == "APP_USR-standin-initial"
    clock.advance(101)
    with pytest.raises(MercadoLivreError) as err:
        source.access_token()
    assert err.value.retryable and err.value.status is None
    assert _meli_refreshes(b) == 1


def test_a_refresh_that_never_left_is_not_in_doubt(db, clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    sent = []

    class Refused(Exception):
        may_have_reached = False  # a refused connection: the peer never saw it

    def exchange(refresh_token):
        sent.append(refresh_token)
        if len(sent) == 1:
            raise Refused()
        return {"access_token": "access-1", "refresh_token": "refresh-1", "expires_in": 60}

    def refresh():
        return credentials.refresh(db, "kommo", "access-0", exchange, clock,
                                   default_expires_in=60, refused_detail="recusado",
                                   no_refresh_detail="sem refresh token")

    with pytest.raises(Refused):
        refresh()
    assert refresh().access_token == "access-1" and sent == ["refresh-0", "refresh-0"]


def _refresh_in_doubt(db, clock, exchange):
    return credentials.refresh(db, "kommo", "access-0", exchange, clock, default_expires_in=60,
                               refused_detail="recusado ({reason})",
                               no_refresh_detail="sem refresh token",
                               in_doubt_detail="sem resposta ({reason})")


def test_a_resend_whose_process_died_is_not_sent_a_third_time(db, clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    sent = []

    class Lost(Exception):
        may_have_reached = True  # a read timeout: the peer may have rotated it

    class NeverLeft(Exception):
        may_have_reached = False

    def exchange(refresh_token):
        sent.append(refresh_token)
        raise [Lost(), NeverLeft(), SystemExit()][len(sent) - 1]

    def refresh():
        return _refresh_in_doubt(db, clock, exchange)

    with pytest.raises(Lost):
        refresh()
    clock.advance(WAIT)
    # a resend that never left (a refused connection) leaves the one resend to spend
    with pytest.raises(NeverLeft):
        refresh()
    # the process dies during the resend
    with pytest.raises(SystemExit):
        refresh()
    assert db.execute("SELECT COUNT(*) FROM locks").fetchone()[0] == 0
    # the next try does not send it again: reconnection is needed
    with pytest.raises(credentials.CredentialUnavailable) as err:
        refresh()
    assert err.value.detail == ("sem resposta (conexão interrompida ou tempo esgotado; depois "
                                "processo interrompido)")
    assert sent == ["refresh-0"] * 3
    assert credentials.get(db, "kommo").status == CredentialStatus.DISCONNECTED


def test_a_first_send_whose_process_died_is_resent_once_after_the_wait_and_never_again(db,
                                                                                    clock):
    credentials.store(db, "kommo", "access-0", "refresh-0", clock() - 1, clock())
    sent = []

    class Lost(Exception):
        may_have_reached = True

    def exchange(refresh_token):
        sent.append(refresh_token)
        raise [SystemExit(), Lost()][len(sent) - 1]

    # the process dies during the very first send: nothing else was recorded about it
    with pytest.raises(SystemExit):
        _refresh_in_doubt(db, clock, exchange)
    # the next holder does not send the same refresh token again at once ...
    with pytest.raises(credentials.RefreshInDoubt):
        _refresh_in_doubt(db, clock, exchange)
    assert sent == ["refresh-0"]
    # ... but once, after the wait; a lost answer then asks for reconnection: no third send
    clock.advance(WAIT)
    with pytest.raises(credentials.CredentialUnavailable) as err:
        _refresh_in_doubt(db, clock, exchange)
    assert err.value.detail == ("sem resposta (processo interrompido durante a renovação; "
                                "depois conexão interrompida ou tempo esgotado)")
    assert sent == ["refresh-0"] * 2
