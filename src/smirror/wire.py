"""The link protocol between smirror processes (control clients and daemons,
source and target daemons): length-prefixed messages over a stream socket,
a mutual challenge-response login (the password never crosses the link),
and optional TLS from the standard library.

Message layout (little-endian), pinned by tests::

    b"SM"  type:u8  flags:u8  length:u32  payload[length]

Control messages carry UTF-8 JSON objects; data messages (FRAME) carry
journal frames, which have their own checksum.
"""
from __future__ import annotations

import json
import secrets
import select
import socket
import ssl
import struct
from enum import IntEnum

from .auth import LoginThrottle, UserStore, User, client_proof
from .errors import AuthError, SmirrorError

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBI")
MAGIC = b"SM"
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
PURPOSES = ("control", "data")


class MsgType(IntEnum):
    HELLO = 1        # client -> server: {"proto", "user", "nonce", "purpose"}
    CHALLENGE = 2    # server -> client: {"salt", "params", "nonce"}
    PROOF = 3        # client -> server: {"proof"}
    WELCOME = 4      # server -> client: {"role", "server_signature"}
    ERROR = 5        # either way: {"error": message}; the sender closes after it
    REQUEST = 6      # control request: {"id", "verb", "args"}
    REPLY = 7        # control reply: {"id", "ok", "result" | "error"}
    FRAME = 8        # data: one journal frame
    ACK = 9          # data: {"seq"} acknowledged (durable on the target)
    BYE = 10         # orderly close
    OPEN = 11        # data: source -> target {"conid", "map_base", "source", "next_seq"}
    READY = 12       # data: target -> source {"last_seq"}: the last op it holds durably
    RESET = 13       # data: source -> target {"seq"}: the stream goes on after seq
                     # (ops before it are gone from the source: a mirror follows)
    NOTICE = 14      # data: target -> source {"event", ...}: a task was refused, ran, failed


class ProtocolError(SmirrorError, ConnectionError):
    """The peer sent something that is not the smirror protocol, or broke it."""


class LinkClosed(ProtocolError):
    """The peer closed the link (possibly in the middle of a message)."""


class Link:
    """One connected stream socket speaking the message protocol. Receive
    buffers are reused, so a received payload is valid until the next recv."""

    def __init__(self, sock: socket.socket, peer: str = "", max_message: int = DEFAULT_MAX_MESSAGE):
        self.sock = sock
        self.peer = peer or _peer_name(sock)
        self.max_message = max_message
        self._header = bytearray(HEADER.size)
        self._buf = bytearray(64 * 1024)
        self._poll = None
        self.user: User | None = None

    # -- sending ---------------------------------------------------------
    def send(self, mtype: MsgType, payload=b"", flags: int = 0) -> None:
        n = memoryview(payload).nbytes
        if n > self.max_message:
            raise ProtocolError(f"refusing to send a {MsgType(mtype).name} message of {n} bytes "
                                f"to {self.peer}: over the {self.max_message}-byte limit")
        header = HEADER.pack(MAGIC, mtype, flags, n)
        if n < 16384:
            self.sock.sendall(header + bytes(payload))
        elif type(self.sock) is socket.socket:
            # large payloads: no copy into one buffer, one system call
            sent = self.sock.sendmsg([header, payload])
            if sent < len(header):
                self.sock.sendall(header[sent:])
                sent = len(header)
            if sent < len(header) + n:
                with memoryview(payload) as view:
                    self.sock.sendall(view.cast("B")[sent - len(header):])
        else:                       # TLS: no sendmsg
            self.sock.sendall(header)
            self.sock.sendall(payload)

    def send_json(self, mtype: MsgType, obj: dict) -> None:
        self.send(mtype, json.dumps(obj, separators=(",", ":")).encode())

    def send_error(self, message: str) -> None:
        try:
            self.send_json(MsgType.ERROR, {"error": message})
        except OSError:
            pass

    # -- receiving -------------------------------------------------------
    def _recv_exact(self, view: memoryview, what: str, got: int = 0) -> None:
        """Fill ``view`` from its byte ``got`` on."""
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                if got == 0 and what == "header":
                    raise LinkClosed(f"{self.peer} closed the link")
                raise LinkClosed(f"{self.peer} closed the link in the middle of a message "
                                 f"({what}: {got} of {len(view)} bytes)")
            got += n

    def _recv_bytes(self, n: int, what: str) -> bytes:
        """``n`` bytes as a new bytes object, received straight into it (no
        copy): one blocking recv with MSG_WAITALL on a plain socket; a short
        read (a signal, a timeout, TLS) is completed and joined once."""
        first = b""
        if type(self.sock) is socket.socket and self.sock.gettimeout() is None:
            first = self.sock.recv(n, socket.MSG_WAITALL)
            if len(first) == n:
                return first
            if not first:
                raise LinkClosed(f"{self.peer} closed the link in the middle of a message "
                                 f"({what}: 0 of {n} bytes)")
        buf = bytearray(n)
        buf[:len(first)] = first
        with memoryview(buf) as view:
            self._recv_exact(view, what, len(first))
        return bytes(buf)

    def recv(self, own=()) -> tuple[MsgType, memoryview | bytes]:
        """Next message: (type, payload view valid until the next recv).
        Payloads of the types in ``own`` come as new bytes objects instead,
        received straight into them, that the caller may keep (a frame
        the target queue holds costs no copy out of the reused buffer)."""
        self._recv_exact(memoryview(self._header), "header")
        magic, mtype, _flags, length = HEADER.unpack(self._header)
        if magic != MAGIC:
            raise ProtocolError(f"{self.peer} is not speaking the smirror protocol "
                                f"(message starts with {bytes(self._header[:2])!r}, expected {MAGIC!r})")
        try:
            mtype = MsgType(mtype)
        except ValueError:
            raise ProtocolError(f"{self.peer} sent unknown message type {mtype}") from None
        if length > self.max_message:
            raise ProtocolError(f"{self.peer} announced a {mtype.name} message of {length} bytes, "
                                f"over the {self.max_message}-byte limit")
        if mtype in own:
            return mtype, self._recv_bytes(length, f"{mtype.name} payload") if length else b""
        if length > len(self._buf):
            self._buf = bytearray(max(length, 2 * len(self._buf)))
        view = memoryview(self._buf)[:length]
        self._recv_exact(view, f"{mtype.name} payload")
        return mtype, view

    def readable(self) -> bool:
        """True when the next recv would not wait: bytes (or the peer's
        close) are there already."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock, select.POLLIN)
        return bool(self._poll.poll(0))

    def recv_json(self, *expect: MsgType) -> tuple[MsgType, dict]:
        """Next control message as a dict; an ERROR from the peer raises
        ProtocolError with the peer's message; other types than ``expect``
        raise ProtocolError."""
        mtype, payload = self.recv()
        try:
            obj = json.loads(bytes(payload))
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"{self.peer} sent a {mtype.name} message that is not a JSON object: {exc}") from None
        if mtype == MsgType.ERROR and MsgType.ERROR not in expect:
            raise ProtocolError(f"{self.peer}: {obj.get('error', 'unspecified error')}")
        if expect and mtype not in expect:
            raise ProtocolError(f"{self.peer} sent {mtype.name}, expected "
                                f"{' or '.join(t.name for t in expect)}")
        return mtype, obj

    def close(self) -> None:
        """Close the link; a thread blocked in recv on it wakes up (a plain
        close from another thread would leave it blocked)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _peer_name(sock) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, ValueError, TypeError):
        return "peer"


def _field(obj: dict, key: str, kind, where: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{where}: field {key!r} missing or of the wrong type")
    return value


# -- login ---------------------------------------------------------------

def login(link: Link, user: str, password: str, purpose: str = "control") -> User:
    """Client side of the mutual login. Raises AuthError on a refused login
    and ProtocolError if the server cannot prove it knows the user's key."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    cnonce = secrets.token_hex(16)
    link.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION, "user": user,
                                   "nonce": cnonce, "purpose": purpose})
    _, ch = link.recv_json(MsgType.CHALLENGE)
    try:
        salt = bytes.fromhex(_field(ch, "salt", str, "CHALLENGE"))
        params = _field(ch, "params", list, "CHALLENGE")
        snonce = _field(ch, "nonce", str, "CHALLENGE")
        if len(params) != 3 or not all(isinstance(x, int) and 0 < x < 1 << 22 for x in params):
            raise ValueError("bad scrypt parameters")
    except ValueError as exc:
        raise ProtocolError(f"{link.peer} sent a bad CHALLENGE: {exc}") from None
    auth_message = _auth_message(cnonce, snonce, user, purpose)
    proof, expect_sig = client_proof(password, salt, params, auth_message)
    link.send_json(MsgType.PROOF, {"proof": proof.hex()})
    mtype, reply = link.recv_json(MsgType.WELCOME, MsgType.ERROR)
    if mtype == MsgType.ERROR:
        raise AuthError(f"{link.peer}: {reply.get('error', 'login refused')}")
    if reply.get("server_signature") != expect_sig.hex():
        raise ProtocolError(f"{link.peer} could not prove it knows user {user!r}: "
                            "not the daemon it claims to be")
    link.user = User(user, _field(reply, "role", str, "WELCOME"))
    return link.user


def accept_login(link: Link, store: UserStore, throttle: LoginThrottle | None = None,
                 purposes=PURPOSES, sessions=None) -> tuple[User, str]:
    """Server side: (user, purpose) after a successful login. A failure is
    answered with ERROR after the growing delay and raised as AuthError."""
    _, hello = link.recv_json(MsgType.HELLO)
    proto = hello.get("proto")
    if proto != PROTOCOL_VERSION:
        link.send_error(f"protocol version {proto!r} not supported (this daemon speaks {PROTOCOL_VERSION})")
        raise ProtocolError(f"{link.peer} speaks protocol {proto!r}, not {PROTOCOL_VERSION}")
    user = _field(hello, "user", str, "HELLO")
    cnonce = _field(hello, "nonce", str, "HELLO")
    purpose = _field(hello, "purpose", str, "HELLO")
    if purpose not in purposes:
        link.send_error(f"unknown link purpose {purpose!r}")
        raise ProtocolError(f"{link.peer} asked for link purpose {purpose!r}")
    token = hello.get("token")
    if token is not None:
        if sessions is None or not isinstance(token, str):
            link.send_error("session tokens are not accepted here")
            raise AuthError(f"{link.peer}: session login not accepted")
        try:
            found = sessions.check(user, token)
        except AuthError as exc:
            link.send_error(str(exc))
            raise
        link.send_json(MsgType.WELCOME, {"role": found.role, "server_signature": ""})
        link.user = found
        return found, purpose
    salt, params = store.challenge(user)
    snonce = secrets.token_hex(16)
    link.send_json(MsgType.CHALLENGE, {"salt": salt.hex(), "params": params, "nonce": snonce})
    _, msg = link.recv_json(MsgType.PROOF)
    try:
        proof = bytes.fromhex(_field(msg, "proof", str, "PROOF"))
    except ValueError:
        proof = b""
    key = f"{user}@{link.peer.rsplit(':', 1)[0]}"
    try:
        found, signature = store.verify_proof(user, _auth_message(cnonce, snonce, user, purpose), proof)
    except AuthError as exc:
        if throttle is not None:
            throttle.failed(key)
            throttle.wait(key)
        link.send_error(str(exc))
        raise
    if throttle is not None:
        throttle.succeeded(key)
    link.send_json(MsgType.WELCOME, {"role": found.role, "server_signature": signature.hex()})
    link.user = found
    return found, purpose


def login_token(link: Link, user: str, token: str, purpose: str = "control") -> User:
    """Client side of a session login (a token from an earlier password login)."""
    link.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION, "user": user,
                                   "nonce": secrets.token_hex(16), "purpose": purpose,
                                   "token": token})
    mtype, reply = link.recv_json(MsgType.WELCOME, MsgType.ERROR)
    if mtype == MsgType.ERROR:
        raise AuthError(f"{link.peer}: {reply.get('error', 'login refused')}")
    link.user = User(user, _field(reply, "role", str, "WELCOME"))
    return link.user


def _auth_message(cnonce: str, snonce: str, user: str, purpose: str) -> bytes:
    return f"smirror/{PROTOCOL_VERSION},{cnonce},{snonce},{user},{purpose}".encode()


# -- TLS -----------------------------------------------------------------

def server_tls_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """TLS for a listening daemon; with ``ca``, peers must present a
    certificate that chains to it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    """TLS for a connecting peer: verifies the daemon against ``ca`` (or the
    system store) and its host name; presents ``cert`` when given."""
    ctx = ssl.create_default_context(cafile=ca or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx


def connect(host: str, port: int, *, tls: ssl.SSLContext | None = None,
            timeout: float | None = 10.0, io_timeout: float | None = None,
            max_message: int = DEFAULT_MAX_MESSAGE) -> Link:
    """Open a link to a daemon (TCP, optionally TLS). ``timeout`` bounds
    the connect and the TLS handshake; ``io_timeout`` every later read and
    write (None: a data link may be idle for as long as it likes). Connection
    errors name the address."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise ProtocolError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ProtocolError(f"TLS with {host}:{port} failed: {exc}") from None
    sock.settimeout(io_timeout)
    return Link(sock, f"{host}:{port}", max_message)
