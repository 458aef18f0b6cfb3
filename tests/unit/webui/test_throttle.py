"""Throttling of passwords and API tokens (issue 23): per (account, address) and per
account, growing delays, bounded memory, atomic under concurrency."""

from __future__ import annotations

import threading
import time

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.unit.webui.support import PASSWORDS, TOKEN, Clock, csrf, login
from webui import auth
from webui.throttle import ACCOUNT, PAIR, Policy, Throttle, Throttled, address_key

BEARER_OK = {"Authorization": f"Bearer bot:{TOKEN}"}


def _bearer(token: str, user: str = "bot") -> dict[str, str]:
    return {"Authorization": f"Bearer {user}:{token}"}


def _fail(t: Throttle, account: str = "alice", remote: str = "192.0.2.1",
          kind: str = "password") -> None:
    with t.attempt(kind, account, remote):
        pass  # no ok(True): a failure


# ---- the throttle itself -------------------------------------------------------------------


def test_policy_delays_grow_after_the_free_failures_up_to_the_cap() -> None:
    p = Policy(free=3, base=1.0, cap=10.0)
    assert [p.delay(n) for n in range(8)] == [0, 0, 0, 1, 2, 4, 8, 10]
    assert PAIR.delay(10_000) == PAIR.cap  # no overflow


def test_throttle_refuses_after_the_free_failures_until_the_delay_passes() -> None:
    clock = Clock()
    t = Throttle(pair=Policy(2, 10.0, 100.0), clock=clock)
    _fail(t)
    _fail(t)
    with pytest.raises(Throttled) as exc:
        _fail(t)
    assert exc.value.retry_after == 10
    clock.t += 10
    _fail(t)  # allowed again, and the next delay is twice as long
    clock.t += 10
    with pytest.raises(Throttled) as exc:
        _fail(t)
    assert exc.value.retry_after == 10


def test_throttle_forgets_a_key_long_after_its_last_failure() -> None:
    clock = Clock()
    t = Throttle(pair=Policy(1, 100.0, 100.0), forget=60, clock=clock)
    _fail(t)
    clock.t += 61
    _fail(t)  # would be refused for 100 s if remembered


def test_parallel_attempts_get_no_more_checks_than_the_free_failures() -> None:
    t = Throttle(pair=Policy(5, 1.0, 60.0))
    started = []
    refused = 0
    for _ in range(16):  # 16 checks in flight at once: none has finished
        cm = t.attempt("password", "alice", "192.0.2.1")
        try:
            cm.__enter__()
            started.append(cm)
        except Throttled:
            refused += 1
    assert len(started) == 5 and refused == 11
    for cm in started:
        cm.__exit__(None, None, None)


def test_success_clears_the_address_key_but_not_the_account_key() -> None:
    t = Throttle(pair=Policy(2, 60.0, 60.0), account=Policy(3, 60.0, 60.0))
    _fail(t, remote="192.0.2.1")
    _fail(t, remote="192.0.2.2")
    with t.attempt("password", "alice", "192.0.2.1") as att:
        att.ok(True)
    assert ("password", "alice", "192.0.2.1") not in t.entries
    _fail(t, remote="192.0.2.3")
    with pytest.raises(Throttled):  # three failures on the account
        _fail(t, remote="192.0.2.4")


def test_an_address_that_signed_in_before_is_spared_the_account_delay() -> None:
    t = Throttle(pair=Policy(5, 60.0, 60.0), account=Policy(3, 60.0, 60.0),
                 protected=lambda a: a == "alice")
    with t.attempt("password", "alice", "192.0.2.1") as att:
        att.ok(True)
    for i in range(3):  # a guesser elsewhere uses up the account's free failures
        _fail(t, remote=f"198.51.100.{i}")
    with pytest.raises(Throttled):
        _fail(t, remote="198.51.100.9")
    with t.attempt("password", "alice", "192.0.2.1") as att:  # the owner still can
        att.ok(True)


def test_ipv6_clients_count_by_their_64() -> None:
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key(None) == address_key("junk") == "?"


def test_guesses_from_many_addresses_are_throttled_per_account() -> None:
    t = Throttle()
    checked = 0
    for i in range(1500):  # 300 IPv6 /64s, five guesses each
        try:
            _fail(t, remote=f"2001:db8:{i // 5:x}::1")
            checked += 1
        except Throttled:
            pass
    assert checked == ACCOUNT.free


def test_throttle_memory_is_bounded_but_keeps_configured_accounts() -> None:
    t = Throttle(max_entries=100, account=Policy(3, 60.0, 60.0),
                 protected=lambda a: a == "alice")
    for i in range(3):
        _fail(t, remote=f"192.0.2.{i}")
    for i in range(5000):
        _fail(t, account=f"u{i}", remote=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(t.entries) <= 100
    with pytest.raises(Throttled):  # alice's count survived the flood
        _fail(t, remote="192.0.2.200")


# ---- passwords and tokens through the app ---------------------------------------------------


def test_api_token_guessing_is_throttled(client: FlaskClient, clock: Clock) -> None:
    for i in range(PAIR.free):
        assert client.get("/api/services", headers=_bearer(f"guess-{i:04}")).status_code \
            == 401
    r = client.get("/api/services", headers=_bearer("guess-9999"))
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "too many failed attempts" in r.get_json()["error"]
    assert client.get("/api/services", headers=BEARER_OK).status_code == 429  # even right
    clock.t += PAIR.delay(PAIR.free)
    assert client.get("/api/services", headers=BEARER_OK).status_code == 200


def test_a_throttled_token_costs_no_hash(client: FlaskClient,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = auth.check_password_hash
    monkeypatch.setattr(auth, "check_password_hash",
                        lambda h, p: calls.append(1) or real(h, p))
    for i in range(30):
        client.get("/api/services", headers=_bearer(f"guess-{i:04}"))
    assert len(calls) == PAIR.free


@pytest.mark.parametrize("header", ["Bearer bot:short", "Bearer bot:" + "x" * 600,
                                    "Bearer bot:with space in it", "Bearer b\u00f6t:" + TOKEN,
                                    "Bearer " + "n" * 65 + ":" + TOKEN,
                                    "Bearer bot:t\u00f6ken-0123456789"])
def test_malformed_credentials_are_refused_before_any_hash(
        client: FlaskClient, monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    def no_hash(h: str, p: str) -> bool:
        raise AssertionError("hashed a malformed credential")

    monkeypatch.setattr(auth, "check_password_hash", no_hash)
    assert client.get("/api/services", headers={"Authorization": header}).status_code == 401


def test_malformed_password_is_refused_before_any_hash(
        client: FlaskClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "check_password_hash", lambda h, p: 1 / 0)
    assert login(client, "alice", "x" * 5000).status_code == 401
    assert login(client, "no such user!", "password").status_code == 401


def test_another_user_still_logs_in_while_one_is_throttled(app: Flask) -> None:
    mallory, bob = app.test_client(), app.test_client()  # both 127.0.0.1, as via a tunnel
    for _ in range(PAIR.free):
        assert login(mallory, "alice", "guess-guess").status_code == 401
    assert login(mallory, "alice", "guess-guess").status_code == 429
    assert login(bob, "bob").status_code == 302
    assert bob.get("/").status_code == 200


def test_throttled_login_says_when_to_retry(client: FlaskClient) -> None:
    for _ in range(PAIR.free):
        login(client, "alice", "guess-guess")
    r = login(client)
    assert r.status_code == 429 and b"try again in 1 s" in r.data
    assert r.headers["Retry-After"] == "1"


def test_parallel_wrong_logins_check_no_more_passwords_than_allowed(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    gate = threading.Barrier(16, timeout=10)

    def slow_check(h: str, p: str) -> bool:
        calls.append(1)
        time.sleep(0.2)  # every check overlaps the others
        return False

    clients = [app.test_client() for _ in range(16)]
    tokens = []
    for c in clients:
        c.get("/login")
        tokens.append(csrf(c))
    monkeypatch.setattr(auth, "check_password_hash", slow_check)
    codes: list[int] = []

    def guess(c: FlaskClient, token: str) -> None:
        gate.wait()
        codes.append(c.post("/login", data={"username": "alice", "password": "guess",
                                            "csrf_token": token}).status_code)

    threads = [threading.Thread(target=guess, args=ct) for ct in zip(clients, tokens,
                                                                      strict=True)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == PAIR.free
    assert sorted(codes) == [401] * PAIR.free + [429] * (16 - PAIR.free)


def test_right_password_after_throttle_passes_and_clears_it(client: FlaskClient,
                                                           clock: Clock) -> None:
    for _ in range(PAIR.free):
        login(client, "alice", "guess-guess")
    clock.t += PAIR.delay(PAIR.free)
    assert login(client, "alice", PASSWORDS["alice"]).status_code == 302
    client.post("/logout", data={"csrf_token": csrf(client)})
    assert login(client, "alice", "one-typo").status_code == 401  # a fresh count
