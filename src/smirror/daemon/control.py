"""The control client: logs in to a daemon and sends it requests. The CLI
verbs (and, later, DTCL scripts) are built on it.

``smirror login`` keeps the session token a daemon hands out in
``~/.config/smirror/sessions.json`` (mode 0600), so later verbs need no
password; the password itself is never stored. The file also remembers
whether the login used TLS (and with which CA, certificate and key): a host
logged in to over TLS is never sent a session login without TLS, and a host
that is not a loopback address gets session logins only over TLS.
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

from smirror.daemon import handshake
from smirror.daemon.auth import User
from smirror.daemon.config import DEFAULT_PORT, parse_hostport
from smirror.errors import AuthError, RequestError
from smirror.fs.atomic import write_atomic
from smirror.stream import wire


def sessions_file() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "smirror" / "sessions.json"


def _load_sessions() -> dict:
    try:
        data = json.loads(sessions_file().read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_sessions(data: dict) -> None:
    path = sessions_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data))


def tls_settings_from_env() -> dict | None:
    """``{"ca", "cert", "key"}`` (absolute paths) when ``SMIRROR_TLS_CA`` is
    set (``SMIRROR_TLS_CERT`` / ``SMIRROR_TLS_KEY`` for a daemon that wants a
    client certificate), else None."""
    ca = os.environ.get("SMIRROR_TLS_CA")
    if not ca:
        return None
    return {k: os.path.abspath(v) if v else "" for k, v in (
        ("ca", ca), ("cert", os.environ.get("SMIRROR_TLS_CERT", "")),
        ("key", os.environ.get("SMIRROR_TLS_KEY", "")))}


def tls_context(settings: dict | None):
    if not settings:
        return None
    return wire.client_tls_context(settings.get("ca", ""), settings.get("cert", ""),
                                   settings.get("key", ""))


def saved_session(address: str) -> dict | None:
    found = _load_sessions().get(address)
    return found if isinstance(found, dict) else None


def save_session(address: str, user: str, token: str, tls: dict | None = None) -> None:
    """Keep ``token`` for ``address``, with the TLS settings the login used
    (None: it did not use TLS)."""
    data = _load_sessions()
    data[address] = {"user": user, "token": token, "tls": bool(tls), **(tls or {})}
    _write_sessions(data)


def forget_session(address: str) -> bool:
    data = _load_sessions()
    if data.pop(address, None) is None:
        return False
    _write_sessions(data)
    return True


class Client:
    """One control link to a daemon."""

    def __init__(self, address: str = f"127.0.0.1:{DEFAULT_PORT}", *, tls=None, timeout: float = 30.0):
        host, port = parse_hostport(address, "daemon address")
        self.host = host
        self.address = f"{host}:{port}"
        self.tls = tls is not None
        self.link = wire.connect(host, port, tls=tls, timeout=timeout, io_timeout=timeout)
        self._ids = itertools.count(1)
        self.user: User | None = None        # set by a login

    @classmethod
    def with_session(cls, address: str, *, tls: dict | None = None, timeout: float = 30.0) -> Client:
        """A client logged in with the session ``smirror login`` saved for
        ``address``: TLS as ``tls`` says, else as the login was made."""
        host, port = parse_hostport(address, "daemon address")
        saved = saved_session(f"{host}:{port}")
        if saved is None:
            raise AuthError(f"not logged in to {host}:{port}: run 'smirror login {host}:{port}'")
        if tls is None and saved.get("tls"):
            tls = {k: saved.get(k, "") for k in ("ca", "cert", "key")}
        check_session_transport(host, port, saved, tls is not None)
        client = cls(address, tls=tls_context(tls), timeout=timeout)
        try:
            return client.login_saved()
        except BaseException:
            client.link.close()
            raise

    def login(self, user: str, password: str) -> Client:
        self.user = handshake.login(self.link, user, password)
        return self

    def login_saved(self) -> Client:
        """Log in with the session saved by ``smirror login`` for this daemon."""
        saved = saved_session(self.address)
        if saved is None:
            raise AuthError(f"not logged in to {self.address}: run 'smirror login {self.address}'")
        check_session_transport(self.host, self.address.rsplit(":", 1)[1], saved, self.tls)
        if not isinstance(saved.get("user"), str) or not isinstance(saved.get("token"), str):
            raise AuthError(f"{sessions_file()}: the session of {self.address} is damaged: "
                            f"run 'smirror login {self.address}'")
        self.user = handshake.login_token(self.link, saved["user"], saved["token"])
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

    def call_waiting(self, wait: float, verb: str, **args):
        """``call`` for a request whose answer may take up to ``wait``
        seconds (mirror-start answers once its mirror is queued)."""
        before = self.link.sock.gettimeout()
        self.link.sock.settimeout(wait)
        try:
            return self.call(verb, **args)
        finally:
            self.link.sock.settimeout(before)

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


def check_session_transport(host: str, port, saved: dict, tls: bool) -> None:
    """Refuse to use a session where it could be taken: without TLS to a host
    it was made with over TLS, or to a host that is not a loopback address."""
    if tls:
        return
    if saved.get("tls"):
        raise AuthError(f"the session of {host}:{port} was made over TLS; refusing to use it "
                        "without TLS (set SMIRROR_TLS_CA, or log in again)")
    if not wire.is_loopback(host):
        raise AuthError(f"{host} is not a loopback address: sessions are used with it only over "
                        "TLS (set SMIRROR_TLS_CA and log in again)")


def task_answer(client, queued: dict, wait: float) -> dict:
    """What the target said of a queued task, waiting up to ``wait``
    seconds: ``refused`` (its NOTICE came back, with the error),
    ``received`` (acknowledged by every connection, and no refusal came
    in the moment after), or ``unknown``."""
    import time
    seqs = {int(k): v for k, v in queued["connections"].items()}
    deadline = time.monotonic() + wait
    acked_at = None
    while True:
        rows = {s["conid"]: s for s in client.call("status")["sources"] if s["conid"] in seqs}
        for s in rows.values():
            for rep in s.get("task_reports") or []:
                if rep.get("id") == queued["id"] and rep.get("state") in ("refused", "error", "failed") \
                        and rep.get("stage") != "on_execute":
                    return {"state": "refused", "error": rep.get("error") or rep["state"],
                            "conid": s["conid"]}
        now = time.monotonic()
        if all(rows.get(c, {}).get("seq_acked", 0) >= seq for c, seq in seqs.items()):
            # a refusal follows the ACK of the task's frame at once
            acked_at = acked_at or now
            if now - acked_at >= 0.5:
                return {"state": "received"}
        if now >= deadline:
            return {"state": "unknown"}
        time.sleep(0.1)


def mirror_stop_text(r: dict) -> str:
    """What mirror-stop says (the CLI verb and DTCL's 'mirror stop')."""
    m = r.get("mirror") or {}
    if m.get("state") == "stopping":
        return (f"connection {r['conid']}: mirror stopping: it ends after the entry it is queueing "
                f"(waiting for room in the queue); see 'smirror status'")
    if m.get("state") != "stopped":
        return (f"connection {r['conid']}: the mirror ended before it could be stopped "
                f"({m.get('state')}): nothing was left to stop")
    return (f"connection {r['conid']}: mirror stopped after {m.get('entries_checked', 0)} entries: "
            f"{m.get('ops', 0)} ops, {m.get('bytes_sent', 0)} bytes queued; the connection "
            f"replicates on, the target is NOT complete: 'smirror mirror-start {r['conid']}' completes it")
