"""The link protocol between smirror processes (control clients and daemons,
source and target daemons): length-prefixed messages over a stream socket,
optional TLS from the standard library. The login that opens every link
(a mutual challenge-response) is the daemon's: ``daemon.handshake``.

Before login a peer is held to little: messages of at most
``PRELOGIN_MAX_MESSAGE`` bytes and the whole handshake within a timeout;
after it the link's normal maximum applies and a data link may idle.

Message layout (little-endian), pinned by tests::

    b"SM"  type:u8  flags:u8  length:u32  payload[length]

Control messages carry UTF-8 JSON objects; data messages (FRAME) carry
journal frames, which have their own checksum.
"""
from __future__ import annotations

import ipaddress
import json
import select
import socket
import ssl
import struct
import time
from enum import IntEnum
from typing import Any, Protocol

from smirror.errors import LinkClosed, ProtocolError

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBI")
MAGIC = b"SM"
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
PRELOGIN_MAX_MESSAGE = 64 * 1024      # what a peer may send before it logged in
LOGIN_TIMEOUT = 10.0                  # seconds for a whole login (TLS handshake included)
PURPOSES = ("control", "data")
ACK = struct.Struct("<Q")             # an ACK's binary payload: the last seq durable on the target
# an ACK's payload on a link whose OPEN asked for "durable" (and whose READY
# said so): the last seq received (verified and held: in the target queue or
# applied, maybe only in the page cache) and the last seq durable (the
# queue's segments and the files the applier changed fsynced)
ACK2 = struct.Struct("<QQ")
SYNC = struct.Struct("<Q")            # a SYNC's payload: make ops up to this seq durable now
# an OPEN's "order" when the source's capture keeps per-file order only (a
# watcher): the target may coalesce within a frame; absent: exact order
ORDER_PER_FILE = "file"


class MsgType(IntEnum):
    HELLO = 1        # client -> server: {"proto", "user", "nonce", "purpose"[, "token_id"]}
    CHALLENGE = 2    # server -> client: {"salt", "params", "nonce"} or {"token": true, "nonce"}
    PROOF = 3        # client -> server: {"proof"}
    WELCOME = 4      # server -> client: {"role", "server_signature"}
    ERROR = 5        # either way: {"error": message}; the sender closes after it
    REQUEST = 6      # control request: {"id", "verb", "args"}
    REPLY = 7        # control reply: {"id", "ok", "result" | "error"}
    FRAME = 8        # data: one journal frame
    ACK = 9          # data: {"seq"} acknowledged (durable on the target)
    BYE = 10         # orderly close
    OPEN = 11        # data: source -> target {"conid", "map_base", "source", "next_seq", "order"?,
                     # "durable"?: true (this source reads ACK2 and sends SYNC)}
    READY = 12       # data: target -> source {"last_seq"}: the last op it holds; with
                     # "durable": true also "durable_seq" (and ACKs are ACK2 from then on)
    RESET = 13       # data: source -> target {"seq"}: the stream goes on after seq
                     # (ops before it are gone from the source: a mirror follows)
    NOTICE = 14      # data: target -> source {"event", ...}: a task was refused, ran, failed
    SYNC = 15        # data: source -> target, SYNC payload: a synchronous waiter needs ops up
                     # to seq durable: a durable pass at once (only after "durable" in OPEN/READY)


_MSG_TYPES = {int(t): t for t in MsgType}


class LinkUser(Protocol):
    """Who a link is logged in as: daemon.auth.User, which this module (a
    layer below the daemon) does not import."""
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    def require(self, role: str) -> None: ...


class Link:
    """One connected stream socket speaking the message protocol. Receive
    buffers are reused, so a received payload is valid until the next recv."""

    def __init__(self, sock: socket.socket, peer: str = "", max_message: int = DEFAULT_MAX_MESSAGE):
        self.sock = sock
        self.peer = peer or _peer_name(sock)
        self.max_message = max_message
        self._header = bytearray(HEADER.size)
        self._buf = bytearray(64 * 1024)
        self._poll: select.poll | None = None
        self._deadline: float | None = None      # login limits, see limit_login()
        self._saved_limits: tuple[int, float | None] | None = None
        self.user: LinkUser | None = None        # a daemon.auth.User, once logged in
        self.auth: str | None = None             # "password" or "token", once logged in
        self.token_id: str | None = None         # the session a token login used
        self.record: str | None = None           # fingerprint of the user's record at login

    # -- limits while a peer is not logged in ---------------------------
    def limit_login(self, timeout: float | None) -> None:
        """Until ``end_login_limits()``: messages of at most
        PRELOGIN_MAX_MESSAGE bytes and, with ``timeout``, every read and
        write done within ``timeout`` seconds from now (a peer that stalls
        is dropped, not waited for)."""
        self._saved_limits = (self.max_message, self.sock.gettimeout())
        self.max_message = min(self.max_message, PRELOGIN_MAX_MESSAGE)
        if timeout is not None:
            self._deadline = time.monotonic() + timeout
            self.sock.settimeout(timeout)

    def extend_login_deadline(self, seconds: float) -> None:
        if self._deadline is not None:
            self._deadline += seconds

    def end_login_limits(self) -> None:
        if self._saved_limits is not None:
            self.max_message, timeout = self._saved_limits
            self._saved_limits = self._deadline = None
            self.sock.settimeout(timeout)

    def _time_left(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._timed_out()
        self.sock.settimeout(left)

    def _timed_out(self) -> ProtocolError:
        return ProtocolError(f"{self.peer} did not finish logging in in time: link closed")

    # -- sending ---------------------------------------------------------
    def send(self, mtype: MsgType, payload=b"", flags: int = 0) -> None:
        if self._deadline is not None:
            self._time_left(self._deadline)
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
            if self._deadline is None:
                n = self.sock.recv_into(view[got:])
            else:
                self._time_left(self._deadline)
                try:
                    n = self.sock.recv_into(view[got:])
                except TimeoutError:
                    raise self._timed_out() from None
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
        known = _MSG_TYPES.get(mtype)       # (MsgType(mtype) costs more than the rest of recv)
        if known is None:
            raise ProtocolError(f"{self.peer} sent unknown message type {mtype}")
        mtype = known
        if length > self.max_message:
            raise ProtocolError(f"{self.peer} announced a {mtype.name} message of {length} bytes, "
                                f"over the {self.max_message}-byte limit"
                                + (" before login" if self._saved_limits is not None else ""))
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
            raise ProtocolError(f"{self.peer} sent a {mtype.name} message that is not "
                                f"a JSON object: {exc}") from None
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


def peer_certificate_cn(link: Link) -> str | None:
    """The common name in the subject of the peer's TLS certificate."""
    sock = link.sock
    # getpeercert()'s subject: ((("commonName", "name"),), ...), one tuple an RDN
    cert: dict[str, Any] | None = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback
                               for i in infos)


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


# A peer that vanishes without a FIN or RST (power loss, a cut cable, a
# firewall that forgets the flow) is found by TCP keepalive: probes after
# 30 s of silence, every 10 s, 6 unanswered close the link (about 90 s), so
# an idle data link never shows "connected" to a dead peer for TCP's
# default two hours. A link with data in flight is bounded by TCP's own
# retransmission timeout; TCP_USER_TIMEOUT is left alone on purpose: a
# target whose queue is full stops reading, and that must not cut the link.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 6


def tune_socket(sock: socket.socket) -> None:
    """The options of every link's socket, on both ends: no Nagle delay
    (ops are small and ordered) and keepalive (see above)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


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
    tune_socket(sock)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            raise ProtocolError(f"TLS with {host}:{port} failed: {exc}") from None
    sock.settimeout(io_timeout)
    return Link(sock, f"{host}:{port}", max_message)
