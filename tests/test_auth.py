import io
import json
import os
import stat
import threading

import pytest

from smirror import auth
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


def test_throttle_grows_and_resets():
    t = auth.LoginThrottle(first_delay=0.01, max_delay=0.05)
    assert t.delay("peer") == 0
    assert [t.failed("peer") for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert t.delay("other") == 0
    t.succeeded("peer")
    assert t.delay("peer") == 0


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
