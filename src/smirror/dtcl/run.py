"""Checked actions -> the control requests the CLI verbs send (through
control.Client: the protocol is not spoken here). A failed statement stops
the script with a DtclRunError that names its line and what already ran."""
from __future__ import annotations

import os
import sys

from smirror.daemon.control import Client, RequestError, saved_session, tls_context, tls_settings_from_env
from smirror.errors import AuthError, ConfigError, DtclRunError, SmirrorError
from smirror.stream import wire

from .check import Action, VarRef
from .lexer import Source, mask

PASSWORD_ENV = "SMIRROR_PASSWORD"
TASK_ANSWER_WAIT = 5.0      # seconds a queuetask waits for the target's answer, as the CLI's default
MIRROR_WAIT = 24 * 3600.0   # seconds 'mirror start' waits for its mirror to be queued
MIRROR_STOP_WAIT = 120.0    # seconds 'mirror stop' waits (the daemon answers within 35)


class Runner:
    """Runs actions in order; keeps one logged-in control link per daemon
    and the connection ids variables got."""

    def __init__(self, src: Source, *, password_file: str | None = None, out=None, json: bool = False):
        self.src = src
        self.password_file = password_file
        self.out = out or sys.stdout
        self.json = json
        self.clients: dict[str, Client] = {}
        self.values: dict[str, int] = {}
        self.ran: list[Action] = []
        self.results: list[dict] = []      # --json: one entry a statement that ran

    # -- running ---------------------------------------------------------------
    def run(self, actions: list[Action]) -> None:
        for act in actions:
            try:
                result = getattr(self, "_" + act.verb.replace(" ", "_"))(act)
            except (SmirrorError, OSError) as exc:
                raise DtclRunError(self._failure(act, exc)) from None
            if act.assign is not None and act.verb != "set":
                self.values[act.assign] = result["conid"]
            self.ran.append(act)
            if act.verb not in ("set", "source", "target"):
                self.results.append({"line": act.line, "statement": act.summary, "result": result})

    def _failure(self, act: Action, exc: BaseException) -> str:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if isinstance(exc, OSError) and act.host and "to " + act.host not in why:
            why = f"cannot reach {act.host}: {why}"
        done = [f"line {a.line} ({a.summary})" for a in self.ran if a.verb not in ("set", "source", "target")]
        text = (f"{self.src.name}:{act.line}: {act.summary}: {why}; the script stopped here; "
                + ("already ran: " + ", ".join(done) if done else "nothing had run before it"))
        return mask(text, self.src.secrets)

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.clients.clear()

    def say(self, text: str) -> None:
        if not self.json:
            print(mask(text, self.src.secrets), file=self.out, flush=True)

    def _id(self, conid) -> int:
        return self.values[conid.name] if isinstance(conid, VarRef) else conid

    def _client(self, address: str) -> Client:
        """The link a 'login' opened, else one with the session 'smirror
        login' saved for the daemon."""
        c = self.clients.get(address)
        if c is None:
            c = self.clients[address] = Client.with_session(address, tls=tls_settings_from_env())
        return c

    # -- statements ------------------------------------------------------------
    def _set(self, act):
        if act.args["copy_of"]:
            self.values[act.assign] = self.values[act.args["copy_of"]]
        return None

    def _source(self, act):
        return None

    _target = _source

    def _login(self, act):
        address, user = act.host, act.args["user"]
        password = act.args["password"]
        if password is None:
            password = self._password()
        old = self.clients.pop(address, None)
        if old is not None:
            old.close()
        if password is None:
            saved = saved_session(address)
            if saved is None:
                raise AuthError(f"no password for {user}: set {PASSWORD_ENV}, give --password-file, "
                                f"or run 'smirror login {address} --user {user}' first")
            if saved.get("user") != user:
                raise AuthError(f"the saved session of {address} is user {saved.get('user')!r}, not "
                                f"{user!r}: set {PASSWORD_ENV} or give --password-file")
            c = self._client(address)
        else:
            tls = tls_settings_from_env()
            host = address.rsplit(":", 1)[0]
            if tls is None and not wire.is_loopback(host.strip("[]")):
                raise AuthError(f"refusing to send a password to {address} without TLS: it is not a "
                                f"loopback address (set SMIRROR_TLS_CA to the CA of its certificate)")
            c = Client(address, tls=tls_context(tls))
            try:
                c.login(user, password)
            except BaseException:
                c.link.close()
                raise
            self.clients[address] = c
        assert c.user is not None           # both ways above logged in
        self.say(f"logged in to {address} as {user} ({c.user.role})")
        return {"host": address, "user": user, "role": c.user.role}

    def _password(self) -> str | None:
        if self.password_file:
            try:
                with open(self.password_file) as f:
                    value = f.readline().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"--password-file {self.password_file}: {exc.strerror}") from None
            if not value:
                raise ConfigError(f"--password-file {self.password_file}: the first line is empty")
            self.src.secrets.add(value)
            return value
        env = os.environ.get(PASSWORD_ENV)
        if env:
            self.src.secrets.add(env)
        return env or None

    def _logout(self, act):
        c = self.clients.pop(act.host, None)
        if c is not None:
            c.close()
        self.say(f"logged out of {act.host}")
        return {"host": act.host, "was_logged_in": c is not None}

    def _connect(self, act):
        a = act.args
        r = self._client(act.host).call("connect", repset=a["repset"], target=a["target"],
                                        map_base=a["map_base"], nomirror=a["nomirror"],
                                        options={"sync": a["sync"]} if a.get("sync") else {})
        self.say(f"connection {r['conid']}: {a['repset']} -> {a['target']} at {a['map_base']}"
                 + ("" if a["nomirror"] else " (mirror started)"))
        return r

    def _conid(self, act):
        a = act.args
        r = self._client(act.host).call("conid", repset=a["repset"], target=a["target"],
                                        map_base=a["map_base"])
        self.say(f"connection {r['conid']}: {a['repset']} -> {a['target']} at {a['map_base']}")
        return r

    def _disconnect(self, act):
        r = self._client(act.host).call("disconnect", conid=self._id(act.args["conid"]))
        self.say(f"disconnected {r['conid']}" + (f"; target: {r['target']}" if r.get("target") else ""))
        return r

    def _mirror_start(self, act):
        mode, newer = act.args["mode"], act.args.get("newer", False)
        # the answer comes once the mirror is queued: as long as that takes
        r = self._client(act.host).call_waiting(
            MIRROR_WAIT, "mirror-start", conid=self._id(act.args["conid"]), full=mode == "full",
            different=mode in ("different", "checksum"), checksum=mode == "checksum", newer=newer)
        m = r.get("mirror") or {}
        if m.get("stopped"):
            self.say(f"connection {r['conid']}: {mode} mirror STOPPED (mirror stop) after "
                     f"{m.get('entries_checked', 0)} entries: {m.get('ops', 0)} ops, "
                     f"{m.get('bytes_sent', 0)} bytes; the target is not complete")
            return r
        kept = f", {m['kept_newer']} newer on the target left alone" if "kept_newer" in m else ""
        self.say(f"connection {r['conid']}: {mode}{' newer' if newer else ''} mirror queued: "
                 f"{m.get('ops', 0)} ops, {m.get('bytes_sent', 0)} bytes{kept}")
        return r

    def _mirror_stop(self, act):
        from smirror.daemon.control import mirror_stop_text
        r = self._client(act.host).call_waiting(MIRROR_STOP_WAIT, "mirror-stop",
                                                conid=self._id(act.args["conid"]))
        self.say(mirror_stop_text(r))
        return r

    def _pause(self, act):
        r = self._client(act.host).call("pause-target" if act.verb == "pausetarget" else "resume-target")
        states = ", ".join(f"{k}: {v}" for k, v in r["targets"].items()) or "no connections yet"
        self.say(f"{act.host}: {'paused' if r['paused'] else 'resumed'} ({states})")
        return r

    _pausetarget = _resumetarget = _pause

    def _queuetask(self, act):
        a = act.args
        r = self._client(act.host).call(
            "queue-task", name=a["name"], target=a["target"], on_queue=a.get("on_queue"),
            on_transmit=a.get("on_transmit"), on_receive=a.get("on_receive"),
            on_execute=a.get("on_execute"), timeout=a["timeout"], args=[])
        conns = ", ".join(f"{k} at seq {v}" for k, v in r["connections"].items())
        # as 'smirror queue-task' does: wait for the target's answer, so a
        # refused task fails the script
        from smirror.daemon.control import task_answer
        answer = task_answer(self._client(act.host), r, TASK_ANSWER_WAIT)
        if answer["state"] == "refused":
            raise RequestError(f"task {r['task']} queued on connection(s) {conns}, but the target "
                               f"refused it: {answer['error']}")
        said = {"received": "received by the target",
                "unknown": f"the target has not received it yet (waited {TASK_ANSWER_WAIT:g}s; see status)"}
        self.say(f"task {r['task']} ({r['id']}) queued on connection(s) {conns}; {said[answer['state']]}")
        return dict(r, target=answer)

    def _repset_create(self, act):
        a = act.args
        extra = {"capture": "mount", "mount": a["mount"]} if "mount" in a else {}
        r = self._client(act.host).call("repset.create", name=a["name"], root=a["root"], rules=a["rules"],
                                        **extra)
        self.say(f"created {r['name']} at {r['root']}"
                 + (f", captured through the mount at {r['mount']}" if r.get("capture") == "mount" else ""))
        return r

    def _status(self, act):
        from smirror.daemon.status_table import status_text
        st = self._client(act.host).call("status")
        conid = act.args["conid"]
        if conid is not None:
            conid = self._id(conid)
            st = dict(st, sources=[s for s in st["sources"] if s.get("conid") == conid],
                      targets=[t for t in st["targets"] if t.get("conid") == conid])
            if not st["sources"] and not st["targets"]:
                raise RequestError(f"{act.host}: no connection {conid}")
        self.say(status_text(st))
        return st
