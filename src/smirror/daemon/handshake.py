"""The login that opens every link (the daemon's side and its clients'):
a mutual challenge-response over the link's messages, so neither the
password nor a session token ever crosses the link. Password logins prove
knowledge of the user's scrypt-derived key; session logins prove the
token. Either way the server proves itself too (WELCOME's signature).

Before login a peer is held to small messages and a deadline (``Link``'s
login limits); a refusal is answered with ERROR and raised as AuthError
(ProtocolError for a broken protocol).
"""
from __future__ import annotations

import hmac
import secrets
import string
import time

from smirror.daemon.auth import (
    LoginThrottle,
    Sessions,
    User,
    UserStore,
    check_scrypt_params,
    check_username,
    client_proof,
    token_id,
    token_key,
    token_proofs,
)
from smirror.errors import AuthError, ConfigError, LinkClosed, LoginRefused, ProtocolError
from smirror.stream.wire import LOGIN_TIMEOUT, PROTOCOL_VERSION, PURPOSES, Link, MsgType, peer_certificate_cn


def _field(obj: dict, key: str, kind, where: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{where}: field {key!r} missing or of the wrong type")
    return value


def _nonce(obj: dict, where: str) -> str:
    value = _field(obj, "nonce", str, where)
    if not 16 <= len(value) <= 128 or value.strip(string.hexdigits):
        raise ProtocolError(f"{where}: field 'nonce' must be 16 to 128 hex digits")
    return value


def _login_reply(link: Link, *expect: MsgType) -> tuple[MsgType, dict]:
    """The server's next login message; its ERROR is a refused login."""
    mtype, reply = link.recv_json(*expect, MsgType.ERROR)
    if mtype == MsgType.ERROR:
        raise AuthError(f"{link.peer}: {reply.get('error', 'login refused')}")
    return mtype, reply


def login(link: Link, user: str, password: str, purpose: str = "control") -> User:
    """Client side of the mutual login. Raises AuthError on a refused login
    and ProtocolError if the server cannot prove it knows the user's key or
    offers scrypt settings a client must not accept."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    link.limit_login(None)
    cnonce = secrets.token_hex(16)
    link.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION, "user": user,
                                   "nonce": cnonce, "purpose": purpose})
    _, ch = _login_reply(link, MsgType.CHALLENGE)
    try:
        if ch.get("token"):
            raise ValueError("it answered a password login with a session challenge")
        salt = bytes.fromhex(_field(ch, "salt", str, "CHALLENGE"))
        params = check_scrypt_params(_field(ch, "params", list, "CHALLENGE"), link.peer)
        snonce = _nonce(ch, "CHALLENGE")
    except ValueError as exc:
        raise ProtocolError(f"{link.peer} sent a bad CHALLENGE: {exc}") from None
    auth_message = _auth_message(cnonce, snonce, user, purpose)
    proof, expect_sig = client_proof(password, salt, params, auth_message)
    link.send_json(MsgType.PROOF, {"proof": proof.hex()})
    return _welcome(link, user, expect_sig, "password", f"knows user {user!r}")


def login_token(link: Link, user: str, token: str, purpose: str = "control") -> User:
    """Client side of a session login (a token from an earlier password
    login), a challenge-response too: the HELLO names the token (by an id
    that proves nothing), the client proves it holds the token over both
    nonces, and the server proves it the same way; the token itself never
    crosses the link."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    link.limit_login(None)
    key = token_key(token)
    cnonce = secrets.token_hex(16)
    link.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION, "user": user, "nonce": cnonce,
                                   "purpose": purpose, "token_id": token_id(key)})
    _, ch = _login_reply(link, MsgType.CHALLENGE)
    if ch.get("token") is not True:
        raise ProtocolError(f"{link.peer} sent a bad CHALLENGE: it answered a session login "
                            "with a password challenge")
    auth_message = _auth_message(cnonce, _nonce(ch, "CHALLENGE"), user, purpose)
    proof, expect_sig = token_proofs(key, auth_message)
    link.send_json(MsgType.PROOF, {"proof": proof.hex()})
    return _welcome(link, user, expect_sig, "token", f"holds the session of user {user!r}")


def _welcome(link: Link, user: str, expect_sig: bytes, auth: str, proves: str) -> User:
    """Client side, the last step of either login: the server's WELCOME must
    carry its proof (``expect_sig``), or it is not the daemon it claims to be."""
    _, reply = _login_reply(link, MsgType.WELCOME)
    signature = reply.get("server_signature")
    if not isinstance(signature, str) or not hmac.compare_digest(signature, expect_sig.hex()):
        raise ProtocolError(f"{link.peer} could not prove it {proves}: "
                            "not the daemon it claims to be")
    link.user = found = User(user, _field(reply, "role", str, "WELCOME"))
    link.auth = auth
    link.end_login_limits()
    return found


def accept_login(link: Link, store: UserStore, throttle: LoginThrottle | None = None,
                 purposes=PURPOSES, sessions: Sessions | None = None,
                 timeout: float | None = LOGIN_TIMEOUT, cert_users: bool = False) -> tuple[User, str]:
    """Server side: (user, purpose) after a successful password or session
    login. Until then the peer may send only small messages and must finish
    within ``timeout``. With ``throttle``, the growing delay is waited out
    before the CHALLENGE goes out. With ``cert_users``, the CN of the
    peer's TLS certificate must be the user's name. A refusal is answered
    with ERROR and raised as AuthError (ProtocolError for a broken protocol)."""
    link.limit_login(timeout)
    try:
        found, purpose = _accept(link, store, throttle, purposes, sessions, cert_users)
    except LoginRefused:
        raise
    except AuthError as exc:
        _answer(link, str(exc))
        raise
    except ProtocolError as exc:
        if not isinstance(exc, LinkClosed):
            _answer(link, str(exc))       # oversized, not our protocol, too slow: say so
        raise
    link.end_login_limits()
    return found, purpose


def _answer(link: Link, message: str) -> None:
    """A refusal's ERROR, sent also past the login deadline (briefly: a
    peer that does not read gets no more time)."""
    link.end_login_limits()
    try:
        link.sock.settimeout(1.0)
    except OSError:
        pass
    link.send_error(message)


def _refuse(link: Link, message: str, error=None):
    _answer(link, message)
    raise (error or LoginRefused)(message if error is None else f"{link.peer}: {message}")


def _accept(link, store, throttle, purposes, sessions, cert_users):
    _, hello = link.recv_json(MsgType.HELLO)
    proto = hello.get("proto")
    if proto != PROTOCOL_VERSION:
        _refuse(link, f"protocol version {proto!r} not supported (this daemon speaks {PROTOCOL_VERSION})",
                ProtocolError)
    user = _field(hello, "user", str, "HELLO")
    try:
        check_username(user)
    except ConfigError as exc:
        _refuse(link, f"HELLO: {exc}", ProtocolError)
    cnonce = _nonce(hello, "HELLO")
    purpose = _field(hello, "purpose", str, "HELLO")
    if purpose not in purposes:
        _refuse(link, f"unknown link purpose {purpose!r}", ProtocolError)
    tid = hello.get("token_id")
    if tid is not None and (sessions is None or not isinstance(tid, str) or len(tid) > 64):
        _refuse(link, "session tokens are not accepted here")
    if tid is not None and purpose != "control":
        _refuse(link, "a session token opens control links only; a data link logs in with its password")
    if cert_users:
        cn = peer_certificate_cn(link)
        if cn != user:
            _refuse(link, f"the TLS certificate of {link.peer} names {cn!r}, not user {user!r}")
    keys = (f"user:{user}", f"peer:{link.peer.rsplit(':', 1)[0]}")
    # password guesses are throttled; a 256-bit token cannot be guessed, and
    # throttling it would let a guesser slow down the real user's CLI
    throttle = throttle if tid is None else None
    if throttle is not None:
        # the delay is served before the challenge: leaving early saves nothing
        wait = throttle.attempt(*keys)
        if wait:
            link.extend_login_deadline(wait)
            time.sleep(wait)
    snonce = secrets.token_hex(16)
    auth_message = _auth_message(cnonce, snonce, user, purpose)
    if tid is not None:
        key = sessions.find(user, tid)
        link.send_json(MsgType.CHALLENGE, {"token": True, "nonce": snonce})
        proof = _proof(link)
        expect, server_proof = token_proofs(key, auth_message)
        if not hmac.compare_digest(proof, expect):
            raise AuthError(f"session login failed for user {user!r}: wrong proof")
        found = sessions.check_user(user, tid, store)
        link.auth, link.token_id = "token", tid
    else:
        salt, params = store.challenge(user)
        link.send_json(MsgType.CHALLENGE, {"salt": salt.hex(), "params": params, "nonce": snonce})
        found, server_proof = store.verify_proof(user, auth_message, _proof(link))
        link.auth = "password"
    if throttle is not None:
        throttle.succeeded(*keys)
    link.send_json(MsgType.WELCOME, {"role": found.role, "server_signature": server_proof.hex()})
    link.user = found
    return found, purpose


def _proof(link: Link) -> bytes:
    _, msg = link.recv_json(MsgType.PROOF)
    try:
        return bytes.fromhex(_field(msg, "proof", str, "PROOF"))
    except ValueError:
        return b""


def _auth_message(cnonce: str, snonce: str, user: str, purpose: str) -> bytes:
    return f"smirror/{PROTOCOL_VERSION},{cnonce},{snonce},{user},{purpose}".encode()
