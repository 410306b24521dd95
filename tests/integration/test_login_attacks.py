"""Attacks on logins and sessions against real daemons (processes started by
tests/support/daemons.py) over real sockets: fast guessing with early disconnects,
parallel handshakes, a fake server that weakens scrypt or has no token, a
relay that replays a captured session login, tokens that outlive their
user, and the rules about TLS."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from smirror.daemon import control, handshake
from smirror.errors import AuthError
from smirror.stream import wire
from smirror.stream.wire import MsgType, ProtocolError
from support.daemons import PASSWORD, Node, free_port, make_certs, smirror, wait_for

FAST_LOGIN = '[login]\nfirst_delay = "100ms"\nmax_delay = "800ms"\n'


@pytest.fixture
def env(tmp_path):
    return {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}


@pytest.fixture
def start_node(tmp_path, env):
    """start_node(name, extra='') -> a started daemon with users 'admin'
    (admin) and 'watcher' (monitor); stopped at the end."""
    nodes = []

    def start(name="d", extra="", **options):
        node = Node(tmp_path, name, env, extra=extra, **options)
        node.add_user("admin", "admin")
        node.add_user("watcher", "monitor")
        nodes.append(node.start())
        return node
    yield start
    for n in nodes:
        if n.proc and n.proc.poll() is None:
            n.kill(signal.SIGTERM)


def login(node, user="admin", password=PASSWORD, check=True, extra_env=None):
    return smirror("login", node.address, "--user", user, "--password-env", "PW",
                   env={**node.env, "PW": password, **(extra_env or {})}, check=check)


def hello(link, user="admin", **more):
    link.send_json(MsgType.HELLO, {"proto": wire.PROTOCOL_VERSION, "user": user,
                                   "nonce": os.urandom(16).hex(), "purpose": "control", **more})




class FakeServer:
    """A listening socket on 127.0.0.1 whose every connection is handled by
    ``handler(link)`` in a thread; keeps what the handler returned or raised."""

    def __init__(self, handler):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.handler = handler
        self.results = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with wire.Link(conn) as link:
                try:
                    self.results.append(self.handler(link))
                except Exception as exc:      # noqa: BLE001 - kept for the test
                    self.results.append(exc)

    def close(self):
        self.sock.close()


# -- guessing ------------------------------------------------------------------

def test_fast_guessing_with_early_disconnects_is_still_slowed(start_node):
    """A client that sends its PROOF and closes 50 ms later (never waiting
    for the ERROR) pays every delay: N wrong guesses take at least the sum of
    the delays their failures earned, counted, not assumed."""
    node = start_node(extra=FAST_LOGIN)
    first, most = 0.1, 0.8
    guesses = 7
    t0 = time.monotonic()
    for i in range(guesses):
        # a different user name each time: the peer's count slows it all the same
        with wire.connect("127.0.0.1", node.port) as link:
            hello(link, user="admin" if i % 2 else f"guess{i}")
            link.recv_json(MsgType.CHALLENGE)
            link.send_json(MsgType.PROOF, {"proof": os.urandom(32).hex()})
            time.sleep(0.05)
    elapsed = time.monotonic() - t0
    owed = sum(min(most, first * 2 ** (k - 1)) for k in range(1, guesses))
    assert elapsed >= owed, (elapsed, owed)
    # the right password still gets in (after its own wait), and resets the user
    assert "logged in" in login(node).stdout
    assert "login failed" in node.log() and PASSWORD not in node.log()


def test_parallel_handshakes_hit_the_caps(start_node):
    """Logins in progress are capped per peer address and in all; over a
    cap the connection gets a short ERROR and no thread."""
    node = start_node(extra='[login]\nmax_pending = 5\nmax_pending_per_peer = 3\ntimeout = "60s"\n')
    stalled = []

    def stall(source_ip):
        s = socket.create_connection(("127.0.0.1", node.port), source_address=(source_ip, 0))
        stalled.append(s)
        return s

    def refused_with(source_ip):
        with socket.create_connection(("127.0.0.1", node.port), source_address=(source_ip, 0)) as s:
            s.settimeout(10)
            link = wire.Link(s)
            with pytest.raises(ProtocolError) as err:
                link.recv_json(MsgType.CHALLENGE)
            return str(err.value)

    try:
        for _ in range(3):
            stall("127.0.0.1")
        # the accept loop counts each connection before it takes the next
        assert "too many logins in progress from 127.0.0.1 (3)" in refused_with("127.0.0.1")
        stall("127.0.0.2")
        stall("127.0.0.3")
        assert "too many logins in progress (5)" in refused_with("127.0.0.4")
        assert "too many logins in progress" in node.log()
    finally:
        for s in stalled:
            s.close()
    # the slots come back when the stalled peers leave
    wait_for(lambda: login(node, check=False).returncode == 0, what="a login after the stall")


def test_fake_server_offering_weak_scrypt_is_refused(env):
    """A fake server that asks for n=2, r=1, p=1 (cheap to crack the proof
    offline) gets no proof at all."""
    def weak(link):
        link.recv_json(MsgType.HELLO)
        link.send_json(MsgType.CHALLENGE, {"salt": "00" * 16, "params": [2, 1, 1],
                                           "nonce": "ab" * 16})
        try:
            return link.recv_json(MsgType.PROOF)
        except ProtocolError as exc:
            return exc
    fake = FakeServer(weak)
    try:
        r = smirror("login", fake.address, "--user", "admin", "--password-env", "PW",
                    env={**env, "PW": PASSWORD}, check=False)
        assert r.returncode == 3 and "Traceback" not in r.stderr
        assert f"{fake.address} offered weak scrypt settings n=2, r=1, p=1" in r.stderr
        wait_for(lambda: fake.results, what="the fake server's result")
        assert isinstance(fake.results[0], ProtocolError)     # no PROOF came
    finally:
        fake.close()


# -- session tokens ------------------------------------------------------------------

class Relay:
    """A TCP relay that records what the client sent."""

    def __init__(self, port):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.target = port
        self.from_client = bytearray()
        threading.Thread(target=self._serve, daemon=True).start()

    def _pipe(self, a, b, record):
        try:
            while data := a.recv(65536):
                if record is not None:
                    record += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _serve(self):
        conn, _ = self.sock.accept()
        up = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pipe, args=(conn, up, self.from_client), daemon=True).start()
        self._pipe(up, conn, None)


def _saved(node):
    """The session the CLI keeps for ``node`` (under the node's XDG_CONFIG_HOME)."""
    path = os.path.join(node.env["XDG_CONFIG_HOME"], "smirror", "sessions.json")
    try:
        with open(path) as f:
            return json.load(f).get(node.address)
    except FileNotFoundError:
        return None


def test_relayed_session_login_cannot_be_replayed(start_node, monkeypatch, env):
    node = start_node()
    login(node)
    saved = _saved(node)
    relay = Relay(node.port)
    with wire.connect("127.0.0.1", relay.port) as link:
        assert handshake.login_token(link, "admin", saved["token"]).role == "admin"
    captured = bytes(relay.from_client)
    assert saved["token"].encode() not in captured          # the token never crossed
    # replay what the client sent: the daemon's new nonce makes the proof wrong
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        s.settimeout(10)
        s.sendall(captured)
        link = wire.Link(s)
        _, ch = link.recv_json(MsgType.CHALLENGE)
        with pytest.raises(ProtocolError, match="session login failed for user 'admin': wrong proof"):
            link.recv_json(MsgType.WELCOME)
    # the session itself still works for its owner
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    assert "daemon" in json.loads(node.cli("status", "--json").stdout)


def test_fake_server_without_the_token_cannot_pass_the_clients_check(env, monkeypatch):
    """A server that does not hold the session's token cannot prove it: the
    CLI refuses its WELCOME whether the proof is empty or made up."""
    for signature in ("", "00" * 32):
        def fake(link, signature=signature):
            _, h = link.recv_json(MsgType.HELLO)
            link.send_json(MsgType.CHALLENGE, {"token": True, "nonce": "5e" * 16})
            link.recv_json(MsgType.PROOF)
            link.send_json(MsgType.WELCOME, {"role": "admin", "server_signature": signature})
            return h
        server = FakeServer(fake)
        try:
            monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
            control.save_session(server.address, "admin", "a-token-the-fake-does-not-know")
            r = smirror("status", "--host", server.address, env=env, check=False)
            assert r.returncode == 3 and "Traceback" not in r.stderr
            assert f"{server.address} could not prove it holds the session of user 'admin'" in r.stderr
            wait_for(lambda server=server: server.results, what="the fake server's result")
            assert "token" not in server.results[0] and "token_id" in server.results[0]
        finally:
            server.close()


def test_tokens_die_with_their_user_and_on_logout(start_node, tmp_path):
    node = start_node()
    login(node)
    assert node.cli("status").returncode == 0
    # replaced with a lesser role: the old token stops working
    smirror("user", "add", "admin", "--role", "monitor", "--replace", "--password-env", "PW",
            "--config", node.config, env={**node.env, "PW": PASSWORD})
    r = node.cli("status", check=False)
    assert r.returncode == 3 and "session of user 'admin' ended: the user was removed or changed" in r.stderr
    login(node)
    assert node.cli("status").returncode == 0
    r = node.cli("repset", "create", "x", "--root", tmp_path, check=False)
    assert r.returncode == 3 and "needs admin" in r.stderr
    # an open link of a user who is then removed ends at its next request
    with control.Client(node.address) as c:
        c.login("watcher", PASSWORD)
        assert c.call("status")["daemon"]
        smirror("user", "remove", "watcher", "--config", node.config, env=node.env)
        with pytest.raises(ProtocolError, match="user 'watcher' was removed or changed"):
            c.call("status")
    # removed: the token stops working
    smirror("user", "remove", "admin", "--config", node.config, env=node.env)
    r = node.cli("status", check=False)
    assert r.returncode == 3 and "removed or changed" in r.stderr
    # logout revokes on the daemon, not only here
    node.add_user("admin", "admin")
    login(node)
    token = _saved(node)["token"]
    r = smirror("logout", node.address, env=node.env)
    assert "revoked on the daemon" in r.stdout and _saved(node) is None
    with wire.connect("127.0.0.1", node.port) as link:
        with pytest.raises(AuthError, match="unknown or expired"):
            handshake.login_token(link, "admin", token)


def test_session_cannot_mint_sessions(start_node, env, monkeypatch):
    node = start_node()
    login(node)
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    with control.Client.with_session(node.address) as c:
        with pytest.raises(control.RequestError, match="only be started after a password login"):
            c.call("session")
    with control.Client(node.address) as c:                 # a password login may
        c.login("admin", PASSWORD)
        assert len(c.call("session")["token"]) >= 40


# -- TLS ---------------------------------------------------------------------

def test_daemon_refuses_to_listen_beyond_loopback_without_tls(tmp_path, env):
    node = Node(tmp_path, "open", env)
    port = free_port()
    r = smirror("serve", "--config", node.config, "--listen", f"0.0.0.0:{port}", env=env, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"daemon.listen is 0.0.0.0:{port}" in r.stderr and "tls.enabled" in r.stderr \
        and "insecure = true" in r.stderr
    # the administrator may say so explicitly
    node.config.write_text(node.config.read_text().replace(
        "[daemon]\n", "[daemon]\ninsecure = true\n").replace(f'listen = "{node.address}"',
                                                            f'listen = "0.0.0.0:{port}"'))
    proc = subprocess.Popen([sys.executable, "-m", "smirror", "serve", "--config", node.config],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on 0.0.0.0" in proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(30)


def test_sessions_are_not_used_without_tls_where_they_could_be_taken(tmp_path, env, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", env["XDG_CONFIG_HOME"])
    # a host beyond loopback: no login without TLS, nothing is sent
    r = smirror("login", "192.0.2.1:6320", "--user", "admin", "--password-env", "PW",
                env={**env, "PW": PASSWORD}, check=False)
    assert r.returncode == 3 and "without TLS: it is not a loopback address" in r.stderr
    control.save_session("192.0.2.1:6320", "admin", "t")
    r = smirror("status", "--host", "192.0.2.1:6320", env=env, check=False)
    assert r.returncode == 3 and "192.0.2.1 is not a loopback address" in r.stderr
    # a session made over TLS is never used in clear, even on loopback
    def no_login(link):
        return link.recv()
    fake = FakeServer(no_login)
    try:
        control.save_session(fake.address, "admin", "t", {"ca": "/nonexistent/ca.pem", "cert": "", "key": ""})
        client = control.Client(fake.address)
        with pytest.raises(AuthError, match="was made over TLS; refusing to use it without TLS"):
            client.login_saved()
        client.close()
    finally:
        fake.close()


def _client_cert(certs, name):
    """A client certificate with CN=name, signed by the test CA."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(certs / f"{name}.key"), "-out", str(certs / f"{name}.csr"), "-subj", f"/CN={name}")
    run("x509", "-req", "-in", str(certs / f"{name}.csr"), "-CA", str(certs / "ca.pem"),
        "-CAkey", str(certs / "ca.key"), "-CAcreateserial", "-out", str(certs / f"{name}.pem"), "-days", "2")
    return certs / f"{name}.pem", certs / f"{name}.key"


def test_tls_is_remembered_per_host_and_certificates_name_users(tmp_path, start_node, env):
    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    node = start_node(tls_dir=certs, extra="[tls]\ncert_users = true\n")
    cert, key = _client_cert(certs, "admin")
    tls_env = {"SMIRROR_TLS_CA": str(certs / "ca.pem"), "SMIRROR_TLS_CERT": str(cert),
               "SMIRROR_TLS_KEY": str(key)}
    assert "over TLS" in login(node, extra_env=tls_env).stdout
    saved = json.loads((tmp_path / "config" / "smirror" / "sessions.json").read_text())[node.address]
    assert saved["tls"] is True and saved["ca"] == str(certs / "ca.pem")
    # later verbs need no TLS variables: the session remembers them
    assert json.loads(node.cli("status", "--json").stdout)["daemon"]
    # a certificate that names another user is refused
    r = login(node, user="watcher", check=False, extra_env=tls_env)
    assert r.returncode == 3 and "names 'admin', not user 'watcher'" in r.stderr
    other = {**tls_env, "SMIRROR_TLS_CERT": str(certs / "daemon.pem"),
             "SMIRROR_TLS_KEY": str(certs / "daemon.key")}
    r = login(node, check=False, extra_env=other)
    assert r.returncode == 3 and "names 'localhost', not user 'admin'" in r.stderr


def test_login_and_user_add_without_a_terminal(tmp_path, start_node):
    """No terminal and no password option: a clear error, not EOFError."""
    node = start_node()
    for args in (("login", node.address, "--user", "admin"),
                 ("user", "add", "x", "--config", node.config)):
        r = subprocess.run([sys.executable, "-m", "smirror", *map(str, args)], env=node.env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "no terminal to ask for the password: use --password-stdin" in r.stderr
