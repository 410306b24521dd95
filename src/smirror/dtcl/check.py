"""Statements -> actions: every variable defined before use, every host
and path resolved to what the daemons are sent, every argument of the shape
its verb wants. Nothing here talks to a daemon: a script is checked in full
before its first statement runs, so a script with an error changes nothing.

Only ``conid`` and ``connect`` make values at run time (connection ids);
every other value (strings, numbers) is known here."""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field

from smirror.daemon.config import DEFAULT_PORT, parse_hostport
from smirror.errors import ConfigError

from .lexer import NUMBER, VAR, Source, Token
from .parser import Statement, parse

_WINDOWS = re.compile(r"^[A-Za-z]:([\\/]|$)")


@dataclass
class VarRef:
    """A connection id a variable will hold at run time."""
    name: str
    line: int


@dataclass
class Action:
    """One statement, resolved: ``host`` is the daemon it goes to."""
    line: int
    verb: str
    host: str | None
    args: dict
    assign: str | None = None
    summary: str = ""          # for "already ran": never a password


@dataclass
class _Binding:
    kind: str                  # "string", "number" or "conid"
    value: object
    line: int


@dataclass
class Checker:
    """Checks statements one by one (a whole script, or interactive input
    one statement at a time), keeping what earlier ones defined."""
    src: Source
    default_port: int = DEFAULT_PORT
    notes: list[str] = field(default_factory=list)
    holds_password: bool = False
    _vars: dict = field(default_factory=dict)
    _default_source: str | None = None  # set by "source HOST;"
    _default_target: str | None = None  # set by "target HOST;"
    _first_login: str | None = None
    _noted_default_source: bool = False

    def check(self, statements: list[Statement]) -> list[Action]:
        return [self.statement(s) for s in statements]

    def statement(self, st: Statement) -> Action:
        act = getattr(self, "_" + st.verb.replace(" ", "_"))(st)
        act.line = st.line
        if st.assign is not None:
            self._vars[st.assign.text] = _Binding("conid", None, st.line) if st.verb != "set" \
                else act.args["binding"]
            act.assign = st.assign.text
        return act

    # -- values --------------------------------------------------------------
    def _err(self, tok: Token, message: str, hint: str | None = None):
        return self.src.error(message, tok.line, tok.column, hint)

    def _binding(self, tok: Token) -> _Binding:
        if tok.kind == VAR:
            b = self._vars.get(tok.text)
            if b is None:
                close = difflib.get_close_matches(tok.text, list(self._vars), n=1, cutoff=0.6)
                raise self._err(tok, f"undefined variable ${tok.text}",
                                f"did you mean ${close[0]}?" if close else
                                "set it first: $" + tok.text + ' = "...";')
            return b
        if tok.kind == NUMBER:
            return _Binding("number", int(tok.text), tok.line)
        return _Binding("string", tok.text, tok.line)

    def _text(self, tok: Token, what: str) -> str:
        b = self._binding(tok)
        if b.kind == "conid":
            raise self._err(tok, f"{what}: ${tok.text} holds a connection id (set on line {b.line}), "
                                 f"not a {what}")
        text = str(b.value)
        if not text:
            raise self._err(tok, f"{what} is empty")
        return text

    def _host(self, tok: Token, what: str = "HOST") -> str:
        text = self._text(tok, what)
        try:
            host, port = parse_hostport(text, what, default_port=self.default_port)
        except ConfigError as exc:
            raise self._err(tok, str(exc)) from None
        return f"{host}:{port}"

    def _path(self, tok: Token, what: str) -> str:
        text = self._text(tok, what)
        if _WINDOWS.match(text) or "\\" in text:
            posix = (text[2:] if _WINDOWS.match(text) else text).replace("\\", "/")
            posix = "/" + posix.lstrip("/")
            where = f" (${tok.text} is set on line {self._vars[tok.text].line})" if tok.kind == VAR else ""
            raise self._err(tok, f"{what} '{text}' is a Windows path{where}: smirror paths are POSIX",
                            f"write it as {posix}, under a directory the target allows")
        return text

    def _conn_id(self, tok: Token):
        b = self._binding(tok)
        if b.kind == "conid":
            return VarRef(tok.text, b.line)
        text = str(b.value)
        if not (text.isascii() and text.isdigit()):
            src = f" (${tok.text} = {text!r})" if tok.kind == VAR else ""
            raise self._err(tok, f"expected a connection ID (a number, or a variable set by conid or "
                                 f"connect), got {text!r}{src}")
        return int(text)

    def _source_host(self, st: Statement) -> str:
        if self._default_source:
            return self._default_source
        if self._first_login:
            if not self._noted_default_source:
                self._noted_default_source = True
                self.notes.append(f"line {st.line}: no 'source HOST;' before it: {st.verb} and later "
                                  f"statements go to {self._first_login}, the first host logged in to")
            return self._first_login
        raise self._err(st.at, f"{st.verb} goes to a source daemon, and none is named",
                        "add 'source HOST;' or 'login HOST USER;' before this line")

    # -- statements ------------------------------------------------------------
    def _set(self, st):
        value = st.args["value"]
        b = self._binding(value)
        # "$D = $C;" with $C a connection id: D gets C's value when it runs
        copy_of = value.text if b.kind == "conid" else None
        return Action(0, "set", None, {"binding": _Binding(b.kind, b.value, st.line), "copy_of": copy_of},
                      summary=f"${st.assign.text} =")

    def _login(self, st):
        a = st.args
        host = self._host(a["host"])
        user = self._text(a["user"], "USER")
        password = None
        if "password" in a:
            password = self._text(a["password"], "PASSWORD")
            self.src.secrets.add(password)
            self.holds_password = True
            self.notes.append(f"line {st.line}: warning: the script holds a password (login {host} "
                              f"{user}); 'login HOST USER;' takes it from SMIRROR_PASSWORD, "
                              f"--password-file or a 'smirror login' session instead")
        if "domain" in a:
            domain = self._text(a["domain"], "DOMAIN")
            self.notes.append(f"line {st.line}: the domain {domain!r} is accepted and ignored "
                              f"(smirror users are the daemon's own, not Windows domain accounts)")
        self._first_login = self._first_login or host
        return Action(0, "login", host, {"user": user, "password": password},
                      summary=f"login {host} as {user}")

    def _logout(self, st):
        host = self._host(st.args["host"])
        return Action(0, "logout", host, {}, summary=f"logout {host}")

    def _source(self, st):
        self._default_source = self._host(st.args["host"])
        return Action(0, "source", self._default_source, {}, summary=f"source {self._default_source}")

    def _target(self, st):
        self._default_target = self._host(st.args["host"])
        return Action(0, "target", self._default_target, {}, summary=f"target {self._default_target}")

    def _connection(self, st):
        a = st.args
        path = self._path(a["path"], "map base")
        if not path.startswith("/"):
            raise self._err(a["path"], f"map base {path!r} is not an absolute path",
                            "the target resolves it, not this directory: write /...")
        return {"repset": self._text(a["repset"], "REPSET"), "target": self._host(a["target"], "TARGET"),
                "map_base": path}

    def _connect(self, st):
        args = self._connection(st)
        args["nomirror"] = st.args["nomirror"]
        args["sync"] = st.args.get("sync")
        return Action(0, "connect", self._source_host(st), args,
                      summary=f"connect {args['repset']} to {args['target']} map base {args['map_base']}"
                              + (", nomirror" if args["nomirror"] else "")
                              + (f", sync {args['sync']}" if args["sync"] else ""))

    def _conid(self, st):
        args = self._connection(st)
        return Action(0, "conid", self._source_host(st), args,
                      summary=f"conid {args['repset']} to {args['target']} map base {args['map_base']}")

    def _disconnect(self, st):
        conid = self._conn_id(st.args["id"])
        return Action(0, "disconnect", self._source_host(st), {"conid": conid},
                      summary=f"disconnect {_show(conid)}")

    def _mirror_start(self, st):
        conid = self._conn_id(st.args["id"])
        seen = {}
        for opt in st.args["options"]:
            name = opt.text.lower()
            if name in seen:
                raise self._err(opt, f"mirror start: {name} given twice")
            seen[name] = opt
        if "full" in seen and len(seen) > 1:
            other = next(t for n, t in seen.items() if n != "full")
            raise self._err(other, f"mirror start: full sends everything; {other.text.lower()} "
                                   f"cannot go with it")
        # DTCL: with neither full nor different a mirror is full; newer
        # compares with the target, as different does (files sent whole)
        newer = "newer" in seen
        mode = "checksum" if "checksum" in seen else \
            "different" if "different" in seen or newer else "full"
        return Action(0, "mirror start", self._source_host(st),
                      {"conid": conid, "mode": mode, "newer": newer},
                      summary=f"mirror start {_show(conid)} ({mode}{', newer' if newer else ''})")

    def _mirror_stop(self, st):
        conid = self._conn_id(st.args["id"])
        return Action(0, "mirror stop", self._source_host(st), {"conid": conid},
                      summary=f"mirror stop {_show(conid)}")

    def _pause(self, st):
        verb = st.verb
        if "host" in st.args:
            host = self._host(st.args["host"])
        elif self._default_target:
            host = self._default_target
        else:
            raise self._err(st.at, f"{verb}: which target? name it ({verb} HOST;) or set it "
                                   f"before with 'target HOST;'")
        return Action(0, verb, host, {}, summary=f"{verb} {host}")

    _pausetarget = _resumetarget = _pause

    def _queuetask(self, st):
        from smirror.stream.tasks import parse_timeout
        a = st.args
        args = {"name": self._text(a["name"], "NAME"), "target": self._host(a["target"], "TARGET")}
        for key in ("onqueue", "ontransmit", "onreceive", "onexecute"):
            if key in a:
                args["on_" + key[2:]] = self._text(a[key], f"{key}=")
        args["timeout"] = "forever"
        if "timeout" in a:
            text = self._text(a["timeout"], "timeout=")
            try:
                parse_timeout(text)
            except ConfigError as exc:
                raise self._err(a["timeout"], f"timeout={text}: {exc}",
                                "seconds (30, 5m, ...) or forever") from None
            args["timeout"] = text
        return Action(0, "queuetask", self._source_host(st), args,
                      summary=f"queuetask {args['name']} to {args['target']}")

    def _repset_create(self, st):
        a = st.args
        root = self._path(a["root"], "repset root")
        rules = [[kind, self._text(tok, kind.upper() + " pattern"), True] for kind, tok in a["rules"]]
        args = {"name": self._text(a["name"], "NAME"), "root": os.path.abspath(root), "rules": rules}
        if "mount" in a:
            args["mount"] = os.path.abspath(self._path(a["mount"], "mount point"))
        return Action(0, "repset create", self._source_host(st), args,
                      summary=f"repset create {args['name']} root {args['root']}"
                      + (f" mount {args['mount']}" if "mount" in args else ""))

    def _status(self, st):
        conid = self._conn_id(st.args["id"]) if "id" in st.args else None
        return Action(0, "status", self._source_host(st), {"conid": conid},
                      summary="status" + (f" {_show(conid)}" if conid is not None else ""))


def _show(conid) -> str:
    return f"${conid.name}" if isinstance(conid, VarRef) else str(conid)


def check_text(text: str, name: str = "<script>", default_port: int = DEFAULT_PORT
               ) -> tuple[list[Action], Checker]:
    """Parse and check a whole script: its actions and the checker (notes,
    whether it holds a password). Raises DtclError, nothing else."""
    src = Source(text, name)
    checker = Checker(src, default_port=default_port)
    return checker.check(parse(src)), checker
