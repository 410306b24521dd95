"""The control client: logs in to a daemon and sends it requests. The CLI
verbs (and, later, DTCL scripts) are built on it.

``smirror login`` keeps the session token a daemon hands out in
``~/.config/smirror/sessions.json`` (mode 0600), so later verbs need no
password; the password itself is never stored.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from . import wire
from .config import DEFAULT_PORT, parse_hostport
from .errors import AuthError, SmirrorError


class RequestError(SmirrorError):
    """The daemon refused or failed a request; the message is the daemon's."""


def sessions_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "smirror" / "sessions.json"


def _load_sessions() -> dict:
    try:
        return json.loads(sessions_file().read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_sessions(data: dict) -> None:
    path = sessions_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".sessions.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def save_session(address: str, user: str, token: str) -> None:
    data = _load_sessions()
    data[address] = {"user": user, "token": token}
    _write_sessions(data)


def forget_session(address: str) -> None:
    data = _load_sessions()
    if data.pop(address, None) is not None:
        _write_sessions(data)


class Client:
    """One control link to a daemon."""

    def __init__(self, address: str = f"127.0.0.1:{DEFAULT_PORT}", *, tls=None, timeout: float = 30.0):
        host, port = parse_hostport(address, "daemon address")
        self.address = f"{host}:{port}"
        self.link = wire.connect(host, port, tls=tls, timeout=timeout, io_timeout=timeout)
        self._ids = itertools.count(1)
        self.user = None

    def login(self, user: str, password: str) -> "Client":
        self.user = wire.login(self.link, user, password)
        return self

    def login_saved(self) -> "Client":
        """Log in with the session saved by ``smirror login`` for this daemon."""
        saved = _load_sessions().get(self.address)
        if saved is None:
            raise AuthError(f"not logged in to {self.address}: run 'smirror login {self.address}'")
        self.user = wire.login_token(self.link, saved["user"], saved["token"])
        return self

    def call(self, verb: str, **args):
        rid = next(self._ids)
        self.link.send_json(wire.MsgType.REQUEST, {"id": rid, "verb": verb, "args": args})
        _, reply = self.link.recv_json(wire.MsgType.REPLY)
        if reply.get("id") != rid:
            raise wire.ProtocolError(f"{self.address} answered request {reply.get('id')}, not {rid}")
        if not reply.get("ok"):
            raise RequestError(f"{self.address}: {verb}: {reply.get('error', 'failed')}")
        return reply.get("result")

    def close(self) -> None:
        try:
            self.link.send_json(wire.MsgType.BYE, {})
        except OSError:
            pass
        self.link.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
