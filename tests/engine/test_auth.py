import io
import json
import os
import stat
import threading
import time

import pytest

from smirror.daemon import auth
from smirror.errors import AuthError, ConfigError


@pytest.fixture
def store(tmp_path):
    return auth.UserStore(tmp_path / "state" / "users.json")


def test_add_and_verify(store):
    store.add("alice", "admin", "correct horse")
    store.add("mon", "monitor", "watching you")
    assert store.verify("alice", "correct horse") == auth.User("alice", "admin")
    assert store.verify("mon", "watching you").role == "monitor"
    assert [u.name for u in store.list()] == ["alice", "mon"]


def test_password_never_stored_in_clear(store):
    store.add("alice", "admin", "correct horse")
    text = store.path.read_text()
    assert "correct horse" not in text
    record = json.loads(text)["users"]["alice"]
    assert record["scrypt"][0] >= 1 << 14 and len(bytes.fromhex(record["salt"])) == 16
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    # same password, different salt -> different hash
    store.add("bob", "admin", "correct horse")
    users = json.loads(store.path.read_text())["users"]
    assert users["alice"]["stored_key"] != users["bob"]["stored_key"]


def test_wrong_password_and_unknown_user_same_message(store):
    store.add("alice", "admin", "correct horse")
    with pytest.raises(AuthError) as wrong:
        store.verify("alice", "battery staple")
    with pytest.raises(AuthError) as unknown:
        store.verify("mallory", "battery staple")
    assert "battery" not in str(wrong.value)
    assert str(wrong.value).replace("alice", "X") == str(unknown.value).replace("mallory", "X")


def test_roles_and_names_checked(store):
    with pytest.raises(ConfigError, match="role"):
        store.add("alice", "root", "correct horse")
    with pytest.raises(ConfigError, match="user name"):
        store.add("-rf", "admin", "correct horse")
    with pytest.raises(ConfigError, match="at least 8"):
        store.add("alice", "admin", "short")
    store.add("alice", "admin", "correct horse")
    with pytest.raises(ConfigError, match="exists already"):
        store.add("alice", "monitor", "correct horse")
    store.add("alice", "monitor", "new password", replace=True)
    assert store.verify("alice", "new password").role == "monitor"
    store.remove("alice")
    with pytest.raises(AuthError):
        store.verify("alice", "new password")


def test_monitor_cannot_do_admin_things():
    auth.User("a", "admin").require("admin")
    auth.User("m", "monitor").require("monitor")
    with pytest.raises(AuthError, match="needs admin"):
        auth.User("m", "monitor").require("admin")


def test_damaged_store_is_a_clear_error(store):
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    with pytest.raises(ConfigError, match="damaged"):
        store.verify("alice", "x")


def test_throttle_counts_each_attempt_before_it_is_known_to_fail():
    """Every attempt is counted when it is reserved (before the challenge),
    so the next one waits whether or not the last one ever finished."""
    t = auth.LoginThrottle(first_delay=0.01, max_delay=0.05)
    assert t.delay("user:a") == 0
    waits = []
    for _ in range(5):
        waits.append(round(t.attempt("user:a", "peer:p"), 3))
        time.sleep(waits[-1])
    assert waits == [0, 0.01, 0.02, 0.04, 0.05]
    assert t.delay("user:other") == 0
    # another user name from the same peer is slowed by the peer's count
    assert t.attempt("user:other", "peer:p") == pytest.approx(0.05, abs=0.01)
    t.succeeded("user:a", "peer:p")
    assert t.delay("user:a") == 0


def test_throttle_spaces_parallel_attempts_one_after_another():
    t = auth.LoginThrottle(first_delay=0.1, max_delay=1.0)
    waits = [t.attempt("user:a", "peer:p") for _ in range(4)]
    # all at once: each waits for the ones before it plus its own delay
    assert [round(w, 2) for w in waits] == [0, 0.1, 0.3, 0.7]
    with pytest.raises(AuthError, match="too many login attempts"):
        t.attempt("user:a", "peer:p")            # would wait 1.5 s > max_delay
    assert t.delay("user:a") == 0.8              # the refused one was not counted


def test_throttle_table_is_bounded():
    t = auth.LoginThrottle(first_delay=0.001, max_delay=0.001, forget_after=3600, max_entries=100)
    for i in range(5000):
        t.attempt(f"user:u{i}", f"peer:10.0.{i // 250}.{i % 250}")
    assert len(t) <= 100
    t = auth.LoginThrottle(first_delay=0.001, max_delay=0.001, forget_after=0.05)
    for i in range(50):
        t.attempt(f"user:u{i}")
    time.sleep(0.06)
    t.attempt("user:late")
    assert len(t) == 1


def test_client_refuses_weak_or_huge_scrypt_settings():
    assert auth.check_scrypt_params([1 << 14, 8, 1], "srv") == (1 << 14, 8, 1)
    for bad, what in (([2, 1, 1], "weak"), ([1 << 13, 8, 1], "weak"), ([1 << 14, 4, 1], "weak"),
                      ([1 << 14, 8, 0], "weak"), ([1 << 22, 8, 1], "unusable"),
                      ([1 << 20, 8, 1], "unusable"),       # 1 GiB
                      ([1 << 14, 8, 1000], "unusable"), ([(1 << 14) + 1, 8, 1], "unusable")):
        with pytest.raises(ValueError, match=f"srv offered {what} scrypt settings n={bad[0]}, "
                                             f"r={bad[1]}, p={bad[2]}"):
            auth.check_scrypt_params(bad, "srv")
    with pytest.raises(ValueError, match="three integers"):
        auth.check_scrypt_params([1 << 14, 8], "srv")
    with pytest.raises(ValueError, match="three integers"):
        auth.check_scrypt_params([1 << 14, True, 1], "srv")


def test_password_sources(monkeypatch):
    monkeypatch.setenv("SMIRROR_TEST_PW", "from env!")
    assert auth.password_from(env="SMIRROR_TEST_PW") == "from env!"
    assert auth.password_from(stdin=io.StringIO("from stdin\n")) == "from stdin"
    with pytest.raises(ConfigError, match="not set"):
        auth.password_from(env="SMIRROR_NOT_SET_ANYWHERE")
    with pytest.raises(ConfigError, match="no password"):
        auth.password_from(stdin=io.StringIO(""))


def test_concurrent_adds_keep_every_user(store):
    threads = [threading.Thread(target=store.add, args=(f"u{i}", "monitor", "password1"))
               for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(store.list()) == 4


def test_challenge_response_login_never_sends_the_password(store):
    store.add("alice", "admin", "correct horse")
    salt, params = store.challenge("alice")
    auth_message = b"client-nonce,server-nonce,alice"
    proof, expect_server = auth.client_proof("correct horse", salt, params, auth_message)
    assert b"correct horse" not in proof
    user, server_sig = store.verify_proof("alice", auth_message, proof)
    assert user.role == "admin"
    assert server_sig == expect_server          # the client can check the server too
    # a proof is bound to its auth message (no replay with another nonce)
    with pytest.raises(AuthError):
        store.verify_proof("alice", b"client-nonce,other-nonce,alice", proof)
    bad, _ = auth.client_proof("wrong horse", salt, params, auth_message)
    with pytest.raises(AuthError, match="login failed"):
        store.verify_proof("alice", auth_message, bad)
    with pytest.raises(AuthError):
        store.verify_proof("alice", auth_message, proof[:5])


def test_stored_record_does_not_let_anyone_log_in(store):
    """Whoever reads users.json learns stored_key and server_key; sending
    stored_key-derived values as proof must fail."""
    store.add("alice", "admin", "correct horse")
    record = json.loads(store.path.read_text())["users"]["alice"]
    msg = b"n1,n2,alice"
    for guess in (bytes.fromhex(record["stored_key"]), bytes.fromhex(record["server_key"])):
        with pytest.raises(AuthError):
            store.verify_proof("alice", msg, guess)


def test_unknown_user_challenge_is_stable_and_plausible(store):
    s1, p1 = store.challenge("ghost")
    s2, p2 = store.challenge("ghost")
    assert s1 == s2 and len(s1) == 16 and p1 == p2
    assert store.challenge("other")[0] != s1


def test_unknown_user_salt_survives_a_restart(store):
    """The key behind made-up salts lives in the state directory (0600): a
    new daemon process gives the same name the same salt, so comparing
    salts across a restart does not tell which names exist."""
    store.add("alice", "admin", "correct horse")
    before = store.challenge("ghost")
    key_file = store.path.with_name("fake-salt.key")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    again = auth.UserStore(store.path)                # another process, same state
    assert again.challenge("ghost") == before
    key_file.write_text("not hex")
    with pytest.raises(ConfigError, match="fake-salt.key: damaged"):
        auth.UserStore(store.path).challenge("ghost")


def test_session_tokens_are_bound_to_the_user_record(store):
    store.add("alice", "admin", "correct horse")
    sessions = auth.Sessions()
    token = sessions.new("alice", store.current("alice")[1])
    tid = auth.token_id(auth.token_key(token))
    assert token not in tid and auth.token_key(token) not in bytes.fromhex(tid)
    assert sessions.find("alice", tid) == auth.token_key(token)
    assert sessions.check_user("alice", tid, store) == auth.User("alice", "admin")
    with pytest.raises(AuthError, match="unknown or expired"):
        sessions.find("bob", tid)                       # bound to its user
    store.add("alice", "monitor", "correct horse", replace=True)
    with pytest.raises(AuthError, match="removed or changed"):
        sessions.check_user("alice", tid, store)
    with pytest.raises(AuthError, match="unknown or expired"):
        sessions.find("alice", tid)                     # revoked for good
    token = sessions.new("alice", store.current("alice")[1])
    store.remove("alice")
    with pytest.raises(AuthError, match="removed or changed"):
        sessions.check_user("alice", auth.token_id(auth.token_key(token)), store)


def test_session_proofs_are_labelled_and_bound_to_the_message():
    key = auth.token_key("t" * 43)
    client, server = auth.token_proofs(key, b"m1")
    assert client != server                              # no reflection
    assert auth.token_proofs(key, b"m2")[0] != client    # no replay with other nonces


def test_session_table_is_bounded():
    sessions = auth.Sessions(per_user=3, max_total=10)
    tokens = [sessions.new("alice", "r") for _ in range(5)]
    assert len(sessions) == 3
    with pytest.raises(AuthError):
        sessions.find("alice", auth.token_id(auth.token_key(tokens[0])))   # the oldest went
    sessions.find("alice", auth.token_id(auth.token_key(tokens[-1])))
    for i in range(50):
        sessions.new(f"u{i}", "r")
    assert len(sessions) == 10
    short = auth.Sessions(lifetime=0.01)
    old = short.new("alice", "r")
    time.sleep(0.02)
    with pytest.raises(AuthError, match="expired"):
        short.find("alice", auth.token_id(auth.token_key(old)))
