"""The link protocol over real TCP sockets on 127.0.0.1."""
import socket
import ssl
import threading
import time

import pytest

from smirror.daemon import auth, handshake
from smirror.errors import AuthError
from smirror.stream import wire
from smirror.stream.wire import Link, LinkClosed, MsgType, ProtocolError
from support.daemons import make_certs


@pytest.fixture
def store(tmp_path):
    s = auth.UserStore(tmp_path / "users.json")
    s.add("admin", "admin", "admin-password")
    s.add("watcher", "monitor", "monitor-password")
    return s


class Server:
    """A listening socket on 127.0.0.1 that runs ``handler(link)`` for each
    accepted connection in a thread and keeps what it returned or raised."""

    def __init__(self, handler, tls=None):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler, self.tls = handler, tls
        self.results = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                if self.tls:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                with Link(conn) as link:
                    self.results.append(self.handler(link))
            except Exception as exc:  # noqa: BLE001 - kept for the test to look at
                self.results.append(exc)

    def wait(self, n, timeout=5.0):
        """Until ``n`` connections were handled."""
        deadline = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.results) >= n, self.results
        return self.results

    def close(self):
        self.sock.close()


@pytest.fixture
def server_factory():
    servers = []

    def make(handler, tls=None):
        servers.append(Server(handler, tls))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def test_header_layout_is_pinned():
    assert wire.HEADER.pack(wire.MAGIC, MsgType.FRAME, 0, 5) == b"SM\x08\x00\x05\x00\x00\x00"


def test_messages_round_trip_small_and_large(server_factory):
    def echo(link):
        while True:
            try:
                mtype, payload = link.recv()
            except LinkClosed:
                return "closed"
            link.send(mtype, payload)
    srv = server_factory(echo)
    with wire.connect("127.0.0.1", srv.port) as link:
        for size in (0, 1, 100, 70_000, 3 << 20):
            data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            link.send(MsgType.FRAME, data)
            mtype, got = link.recv()
            assert mtype == MsgType.FRAME and bytes(got) == data
        link.send_json(MsgType.REQUEST, {"verb": "status", "name": "caf\u00e9"})
        assert link.recv_json(MsgType.REQUEST)[1] == {"verb": "status", "name": "caf\u00e9"}


def test_owned_payloads_are_private_bytes(server_factory):
    """recv(own=...) hands FRAME payloads out as bytes objects of their own
    (received straight into them) that stay valid past the next recv."""
    def keep(link):
        got = []
        while True:
            try:
                got.append(link.recv(own=(MsgType.FRAME,)))
            except LinkClosed:
                return got
    srv = server_factory(keep)
    sizes = (0, 1, 70_000, 3 << 20)
    datas = [bytes([i]) * n for i, n in enumerate(sizes)]
    with wire.connect("127.0.0.1", srv.port) as link:
        for data in datas:
            link.send(MsgType.FRAME, data)
            link.send_json(MsgType.REQUEST, {"after": len(data)})
    got = srv.wait(1)[0]
    frames = [p for t, p in got if t == MsgType.FRAME]
    assert all(type(p) is bytes for p in frames) and frames == datas
    assert all(type(p) is memoryview for t, p in got if t == MsgType.REQUEST)


def test_owned_payload_torn_by_the_peer(server_factory):
    srv = server_factory(lambda link: link.recv(own=(MsgType.FRAME,)))
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(wire.HEADER.pack(wire.MAGIC, MsgType.FRAME, 0, 100) + b"x" * 10)
    srv.wait(1)
    assert isinstance(srv.results[0], LinkClosed) and "10 of 100 bytes" in str(srv.results[0])


def test_login_success_gives_role(server_factory, store):
    srv = server_factory(lambda link: handshake.accept_login(link, store))
    with wire.connect("127.0.0.1", srv.port) as link:
        user = handshake.login(link, "watcher", "monitor-password")
    assert user == auth.User("watcher", "monitor")
    srv.wait(1)
    assert srv.results[0] == (auth.User("watcher", "monitor"), "control")


def test_wrong_password_is_refused_with_growing_delay(server_factory, store):
    """The delay after a failure is served before the next CHALLENGE."""
    throttle = auth.LoginThrottle(first_delay=0.05, max_delay=1.0)
    srv = server_factory(lambda link: handshake.accept_login(link, store, throttle))
    for expected_delay in (0, 0.05, 0.1, 0.2):
        t0 = time.monotonic()
        with wire.connect("127.0.0.1", srv.port) as link:
            with pytest.raises(AuthError, match="login failed for user 'admin'"):
                handshake.login(link, "admin", "not-the-password")
        assert time.monotonic() - t0 >= expected_delay
    assert throttle.delay("user:admin") == 0.4 and throttle.delay("peer:127.0.0.1") == 0.4
    t0 = time.monotonic()
    with wire.connect("127.0.0.1", srv.port) as link:
        assert handshake.login(link, "admin", "admin-password").role == "admin"
    assert time.monotonic() - t0 >= 0.4          # a right guess waits its turn too
    assert throttle.delay("user:admin") == 0
    assert throttle.delay("peer:127.0.0.1") == 0.4   # only that attempt is taken back


def test_challenge_waits_for_the_delay_even_if_the_client_left(server_factory, store):
    """A client that sends its PROOF and leaves at once never sees the
    delay of that failure, but its next HELLO waits for it."""
    throttle = auth.LoginThrottle(first_delay=0.3, max_delay=1.0)
    srv = server_factory(lambda link: handshake.accept_login(link, store, throttle))
    for _ in range(2):
        with wire.connect("127.0.0.1", srv.port) as link:
            link.send_json(MsgType.HELLO, {"proto": 1, "user": "admin", "nonce": "a" * 32,
                                           "purpose": "control"})
            ch = link.recv_json(MsgType.CHALLENGE)[1]
            assert ch["nonce"]
            link.send_json(MsgType.PROOF, {"proof": "00" * 32})
    srv.wait(2)
    t0 = time.monotonic()
    with wire.connect("127.0.0.1", srv.port) as link:
        link.send_json(MsgType.HELLO, {"proto": 1, "user": "admin", "nonce": "a" * 32,
                                       "purpose": "control"})
        link.recv_json(MsgType.CHALLENGE)
    assert time.monotonic() - t0 >= 0.6          # two failures: 0.3 * 2


def test_impostor_server_is_detected(server_factory, store, tmp_path):
    """A server that does not know the user's keys cannot fake WELCOME."""
    other = auth.UserStore(tmp_path / "other.json")
    other.add("admin", "admin", "some-other-password")

    def impostor(link):
        _, hello = link.recv_json(MsgType.HELLO)
        salt, params = store.challenge("admin")     # it may even know the salt
        link.send_json(MsgType.CHALLENGE, {"salt": salt.hex(), "params": params, "nonce": "ab" * 16})
        link.recv_json(MsgType.PROOF)
        link.send_json(MsgType.WELCOME, {"role": "admin", "server_signature": "00" * 32})
    srv = server_factory(impostor)
    with wire.connect("127.0.0.1", srv.port) as link:
        with pytest.raises(ProtocolError, match="could not prove"):
            handshake.login(link, "admin", "admin-password")


def test_not_our_protocol(server_factory):
    srv = server_factory(lambda link: link.recv())
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
    srv.wait(1)
    assert isinstance(srv.results[0], ProtocolError)
    assert "not speaking the smirror protocol" in str(srv.results[0])


def test_oversized_announcement_is_refused_without_allocating(server_factory):
    srv = server_factory(lambda link: link.recv())
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(wire.HEADER.pack(wire.MAGIC, MsgType.FRAME, 0, 0xFFFFFFF0))
    srv.wait(1)
    assert "over the" in str(srv.results[0]) and "limit" in str(srv.results[0])


def test_torn_message_and_unknown_type(server_factory):
    srv = server_factory(lambda link: link.recv())
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(wire.HEADER.pack(wire.MAGIC, MsgType.FRAME, 0, 100) + b"x" * 10)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(wire.HEADER.pack(wire.MAGIC, 200, 0, 0))
    srv.wait(2)
    assert isinstance(srv.results[0], LinkClosed) and "10 of 100 bytes" in str(srv.results[0])
    assert "unknown message type 200" in str(srv.results[1])


def test_bad_json_and_wrong_message_type(server_factory, store):
    srv = server_factory(lambda link: handshake.accept_login(link, store))
    with wire.connect("127.0.0.1", srv.port) as link:
        link.send(MsgType.HELLO, b"\xff not json")
    with wire.connect("127.0.0.1", srv.port) as link:
        link.send_json(MsgType.PROOF, {"proof": "00"})
    srv.wait(2)
    assert "not a JSON object" in str(srv.results[0])
    assert "sent PROOF, expected HELLO" in str(srv.results[1])


def test_connect_error_names_the_address():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ProtocolError, match=f"cannot connect to 127.0.0.1:{port}"):
        wire.connect("127.0.0.1", port, timeout=2)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("tls"))


def test_tls_login_and_data(server_factory, store, certs):
    ctx = wire.server_tls_context(str(certs / "daemon.pem"), str(certs / "daemon.key"), str(certs / "ca.pem"))

    def handler(link):
        user, purpose = handshake.accept_login(link, store)
        mtype, payload = link.recv()
        mtype, owned = link.recv(own=(MsgType.FRAME,))      # TLS: read, then one copy
        return link.sock.version(), purpose, bytes(payload), owned
    srv = server_factory(handler, tls=ctx)
    client = wire.client_tls_context(str(certs / "ca.pem"), str(certs / "daemon.pem"),
                                     str(certs / "daemon.key"))
    with wire.connect("127.0.0.1", srv.port, tls=client) as link:
        assert isinstance(link.sock, ssl.SSLSocket)
        handshake.login(link, "admin", "admin-password", purpose="data")
        link.send(MsgType.FRAME, b"frame bytes")
        link.send(MsgType.FRAME, b"y" * 100_000)
    srv.wait(1)
    version, purpose, data, owned = srv.results[0]
    assert version in ("TLSv1.2", "TLSv1.3") and purpose == "data" and data == b"frame bytes"
    assert owned == b"y" * 100_000


def test_tls_refuses_a_server_with_an_unknown_certificate(server_factory, certs):
    rogue = wire.server_tls_context(str(certs / "rogue.pem"), str(certs / "rogue.key"))
    srv = server_factory(lambda link: link.recv(), tls=rogue)
    client = wire.client_tls_context(str(certs / "ca.pem"))
    with pytest.raises(ProtocolError, match="TLS with 127.0.0.1"):
        wire.connect("127.0.0.1", srv.port, tls=client)


def test_tls_refuses_a_client_without_certificate(server_factory, certs):
    ctx = wire.server_tls_context(str(certs / "daemon.pem"), str(certs / "daemon.key"), str(certs / "ca.pem"))
    srv = server_factory(lambda link: link.recv(), tls=ctx)
    client = wire.client_tls_context(str(certs / "ca.pem"))
    with pytest.raises((ProtocolError, ssl.SSLError, ConnectionError)):
        with wire.connect("127.0.0.1", srv.port, tls=client) as link:
            link.send(MsgType.FRAME, b"x")     # TLS 1.3: the refusal arrives on first use
            link.recv()
    srv.wait(1)
    assert srv.results and isinstance(srv.results[0], (ssl.SSLError, OSError))


def _session_server(server_factory, store, sessions):
    return server_factory(lambda link: (handshake.accept_login(link, store, sessions=sessions), link.auth))


def test_session_login_is_mutual_and_never_sends_the_token(server_factory, store):
    sessions = auth.Sessions()
    token = sessions.new("admin", store.current("admin")[1])
    srv = _session_server(server_factory, store, sessions)
    with wire.connect("127.0.0.1", srv.port) as link:
        assert handshake.login_token(link, "admin", token).role == "admin"
        assert link.auth == "token"
    assert srv.wait(1)[0] == ((auth.User("admin", "admin"), "control"), "token")
    # a wrong token is refused by the server
    with wire.connect("127.0.0.1", srv.port) as link:
        with pytest.raises(AuthError, match="unknown or expired"):
            handshake.login_token(link, "admin", "not-the-token")
    # another user's name with this token: refused too
    with wire.connect("127.0.0.1", srv.port) as link:
        with pytest.raises(AuthError, match="unknown or expired"):
            handshake.login_token(link, "watcher", token)


def test_session_token_opens_control_links_only(server_factory, store):
    sessions = auth.Sessions()
    token = sessions.new("admin", store.current("admin")[1])
    srv = _session_server(server_factory, store, sessions)
    with wire.connect("127.0.0.1", srv.port) as link:
        with pytest.raises(AuthError, match="control links only"):
            handshake.login_token(link, "admin", token, purpose="data")


def test_login_limits_before_and_after(server_factory, store):
    """Before login: a small cap, said in an ERROR; after it: the normal
    maximum, and no timeout."""
    def handler(link):
        handshake.accept_login(link, store, timeout=0.5)
        time.sleep(0.7)                        # idle past the login timeout
        return len(link.recv()[1])
    srv = server_factory(handler)
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(wire.HEADER.pack(wire.MAGIC, MsgType.HELLO, 0, wire.PRELOGIN_MAX_MESSAGE + 1))
        with pytest.raises(ProtocolError, match=f"HELLO message of {wire.PRELOGIN_MAX_MESSAGE + 1} "
                                                 "bytes, over the 65536-byte limit before login"):
            Link(s).recv_json(MsgType.CHALLENGE)
    with wire.connect("127.0.0.1", srv.port) as link:
        handshake.login(link, "admin", "admin-password")
        time.sleep(0.7)
        link.send(MsgType.FRAME, b"x" * 200_000)
    assert srv.wait(2)[1] == 200_000


def test_session_logins_are_not_slowed_by_password_guessing(server_factory, store):
    """Someone guessing admin's password must not slow admin's CLI, whose
    verbs log in with an unguessable session token."""
    throttle = auth.LoginThrottle(first_delay=1.0, max_delay=4.0)
    sessions = auth.Sessions()
    token = sessions.new("admin", store.current("admin")[1])
    srv = server_factory(lambda link: handshake.accept_login(link, store, throttle, sessions=sessions))
    for _ in range(2):
        throttle.attempt("user:admin", "peer:127.0.0.1")       # two failed guesses
    t0 = time.monotonic()
    with wire.connect("127.0.0.1", srv.port) as link:
        assert handshake.login_token(link, "admin", token).role == "admin"
    assert time.monotonic() - t0 < 1.0
    assert throttle.delay("user:admin") == 2.0                 # the guesses still count


def test_hello_fields_are_checked(server_factory, store):
    srv = server_factory(lambda link: handshake.accept_login(link, store))
    bad = [({"user": "-rf"}, "user name must be"), ({"nonce": "x,y" * 10}, "16 to 128 hex digits"),
           ({"nonce": "ab"}, "16 to 128 hex digits"), ({"purpose": "root"}, "unknown link purpose"),
           ({"proto": 2}, "protocol version 2 not supported")]
    for change, message in bad:
        with wire.connect("127.0.0.1", srv.port) as link:
            link.send_json(MsgType.HELLO, {"proto": 1, "user": "admin", "nonce": "ab" * 16,
                                           "purpose": "control", **change})
            with pytest.raises(ProtocolError, match=message):
                link.recv_json(MsgType.CHALLENGE)
