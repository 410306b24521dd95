"""Tokens -> statements (the AST), each keeping the tokens of its verb and
arguments for positions in messages. Only the shape is checked here
(verbs, keywords, argument counts); what the arguments mean (variables,
hosts, paths) is check.py's."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .lexer import COMMA, EQUALS, NUMBER, SEMI, STRING, VAR, WORD, Source, Token, secrets_in, tokenize

VALUE_KINDS = (VAR, STRING, NUMBER, WORD)

# verb -> usage; the grammar each follows is in Parser._parse_<verb>
USAGE = {
    "login": "login HOST USER [PASSWORD [DOMAIN]];",
    "logout": "logout HOST;",
    "source": "source HOST;",
    "target": "target HOST;",
    "connect": "connect REPSET to TARGET map base PATH [, nomirror] [, sync async|fsync|every-write];",
    "conid": "conid REPSET to TARGET map base PATH;",
    "disconnect": "disconnect ID;",
    "mirror": "mirror start ID [full | different] [, checksum] [, newer]; or mirror stop ID;",
    "pausetarget": "pausetarget [HOST];",
    "resumetarget": "resumetarget [HOST];",
    "queuetask": "queuetask NAME to TARGET [onqueue=CMD] [ontransmit=CMD] [onreceive=CMD] "
                 "onexecute=CMD [timeout=SECONDS|forever];",
    "repset": "repset create NAME root PATH [mount MOUNTPOINT] [include GLOB]... [exclude GLOB]...;",
    "status": "status [ID];",
}
RETURNS_VALUE = ("conid", "connect")
TASK_KEYS = ("onqueue", "ontransmit", "onreceive", "onexecute", "timeout")


@dataclass
class Statement:
    verb: str                       # "login", "mirror start", "set" (an assignment of a value), ...
    at: Token                       # the verb's token (or the value's, for "set")
    args: dict = field(default_factory=dict)    # name -> Token, list of Tokens, or bool
    assign: Token | None = None     # the $Var of "$Var = ..."

    @property
    def line(self) -> int:
        return (self.assign or self.at).line


def parse(src: Source) -> list[Statement]:
    tokens = tokenize(src)
    src.secrets.update(secrets_in(tokens))
    return Parser(src, tokens).statements()


class Parser:
    def __init__(self, src: Source, tokens: list[Token]):
        self.src = src
        self.tokens = tokens

    def statements(self) -> list[Statement]:
        out: list[Statement] = []
        group: list[Token] = []
        for tok in self.tokens:
            if tok.kind == SEMI:
                if not group:
                    raise self.src.error("empty statement: a ';' with nothing before it",
                                         tok.line, tok.column)
                out.append(self._statement(group, tok))
                group = []
            else:
                group.append(tok)
        if group:                   # a missing ';' at the end of the file is tolerated
            out.append(self._statement(group, None))
        return out

    # -- one statement -------------------------------------------------------
    def _statement(self, group: list[Token], semi: Token | None) -> Statement:
        self._missing_semicolon(group)
        end = (semi.line, semi.column) if semi else (group[-1].line, group[-1].column + len(group[-1].raw))
        cur = Cursor(self.src, group, end)
        first = cur.peek()
        if first.kind == VAR and len(group) > 1 and group[1].kind == EQUALS:
            var = cur.next()
            cur.next()
            if cur.at_end():
                raise cur.error_at_end(f"nothing after '=': give ${var.text} a \"string\", a number, "
                                       f"or a {' or '.join(RETURNS_VALUE)} statement")
            head = cur.peek()
            if head.kind == WORD and head.text.lower() in USAGE:
                verb = head.text.lower()
                if verb not in RETURNS_VALUE:
                    raise self.src.error(f"{verb} returns no value to assign to ${var.text} (only "
                                         f"{' and '.join(RETURNS_VALUE)} do)", head.line, head.column)
                stmt = self._verb(cur)
                stmt.assign = var
                return stmt
            value = cur.value(f"the value of ${var.text}")
            cur.done("an assignment: $Name = \"string\"; or $Name = number;")
            return Statement("set", value, {"value": value}, assign=var)
        if first.kind == VAR:
            raise self.src.error(f"a statement cannot start with ${first.text}: did you mean "
                                 f"'${first.text} = ...;'?", first.line, first.column)
        if first.kind != WORD:
            raise self.src.error(f"expected a verb, got {first.kind} {first.raw}", first.line, first.column)
        return self._verb(cur)

    def _missing_semicolon(self, group: list[Token]) -> None:
        """A statement that goes on to a line starting with a verb or an
        assignment is two statements with the ';' between them missing."""
        for i in range(1, len(group)):
            prev, tok = group[i - 1], group[i]
            if tok.line == prev.line:
                continue
            starts = (tok.kind == WORD and tok.text.lower() in USAGE) or \
                (tok.kind == VAR and i + 1 < len(group) and group[i + 1].kind == EQUALS)
            if starts:
                raise self.src.error(f"missing ';' at the end of this statement (line {tok.line} "
                                     f"starts another one)", prev.line, prev.column + len(prev.raw))

    def _verb(self, cur: Cursor) -> Statement:
        tok = cur.next()
        verb = tok.text.lower()
        if verb not in USAGE:
            close = difflib.get_close_matches(verb, list(USAGE), n=1, cutoff=0.6)
            raise self.src.error(f"unknown verb {tok.text!r}", tok.line, tok.column,
                                 hint=f"did you mean {close[0]!r}?" if close else
                                 "verbs: " + ", ".join(USAGE))
        return getattr(self, f"_parse_{verb}")(cur, tok)

    # -- the verbs -----------------------------------------------------------
    def _parse_login(self, cur, tok):
        args = {"host": cur.value("HOST", "login"), "user": cur.value("USER", "login")}
        if not cur.at_end():
            args["password"] = cur.value("PASSWORD", "login")
        if not cur.at_end():
            args["domain"] = cur.value("DOMAIN", "login")
        cur.done(USAGE["login"])
        return Statement("login", tok, args)

    def _one_host(self, cur, tok, verb):
        args = {"host": cur.value("HOST", verb)}
        cur.done(USAGE[verb])
        return Statement(verb, tok, args)

    def _parse_logout(self, cur, tok):
        return self._one_host(cur, tok, "logout")

    def _parse_source(self, cur, tok):
        return self._one_host(cur, tok, "source")

    def _parse_target(self, cur, tok):
        return self._one_host(cur, tok, "target")

    def _connection(self, cur, verb):
        repset = cur.value("REPSET", verb)
        cur.keyword("to", verb)
        target = cur.value("TARGET", verb)
        cur.keyword("map", verb)
        cur.keyword("base", verb)
        return {"repset": repset, "target": target, "path": cur.value("PATH", verb)}

    def _parse_connect(self, cur, tok):
        args = self._connection(cur, "connect")
        args["nomirror"] = False
        args["sync"] = None
        while not cur.at_end():
            if cur.peek().kind == COMMA:        # "PATH, nomirror", "PATH nomirror", "PATH,"
                cur.next()
                continue
            opt = cur.next()
            if opt.kind == WORD and opt.text.lower() == "nomirror":
                args["nomirror"] = True
                continue
            if opt.kind == WORD and opt.text.lower() == "sync":
                if cur.at_end():
                    raise self.src.error("connect: sync needs a mode: async, fsync or every-write",
                                         opt.line, opt.column)
                mode = cur.next()
                if mode.kind != WORD or mode.text.lower() not in ("async", "fsync", "every-write"):
                    raise self.src.error(f"connect: sync {mode.raw!r}: the mode is async, fsync or "
                                         f"every-write", mode.line, mode.column)
                args["sync"] = mode.text.lower()
                continue
            raise self.src.error(f"connect: unknown option {opt.raw!r} after the map base (they "
                                 f"are nomirror and sync MODE)", opt.line, opt.column,
                                 hint="a path with blanks goes in quotes" if opt.kind == WORD else None)
        return Statement("connect", tok, args)

    def _parse_conid(self, cur, tok):
        args = self._connection(cur, "conid")
        while not cur.at_end() and cur.peek().kind == COMMA:
            cur.next()
        cur.done(USAGE["conid"])
        return Statement("conid", tok, args)

    def _parse_disconnect(self, cur, tok):
        args = {"id": cur.value("ID", "disconnect")}
        cur.done(USAGE["disconnect"])
        return Statement("disconnect", tok, args)

    def _parse_mirror(self, cur, tok):
        what = cur.next_word("start or stop", "mirror")
        sub = what.text.lower()
        if sub == "stop":
            args = {"id": cur.value("ID", "mirror stop")}
            cur.done("mirror stop ID;")
            return Statement("mirror stop", tok, args)
        if sub != "start":
            raise self.src.error(f"mirror {what.raw}: expected 'mirror start' or 'mirror stop'",
                                 what.line, what.column)
        args = {"id": cur.value("ID", "mirror start"), "options": []}
        while not cur.at_end():
            if cur.peek().kind == COMMA:
                cur.next()
                continue
            opt = cur.next()
            if not (opt.kind == WORD and opt.text.lower() in ("full", "different", "checksum", "newer")):
                raise self.src.error(f"mirror start: unknown option {opt.raw!r} (options: full, "
                                     f"different, checksum, newer)", opt.line, opt.column)
            args["options"].append(opt)
        return Statement("mirror start", tok, args)

    def _parse_pausetarget(self, cur, tok):
        args = {} if cur.at_end() else {"host": cur.value("HOST", tok.text.lower())}
        cur.done(USAGE[tok.text.lower()])
        return Statement(tok.text.lower(), tok, args)

    _parse_resumetarget = _parse_pausetarget

    def _parse_queuetask(self, cur, tok):
        args = {"name": cur.value("NAME", "queuetask")}
        cur.keyword("to", "queuetask")
        args["target"] = cur.value("TARGET", "queuetask")
        while not cur.at_end():
            if cur.peek().kind == COMMA:
                cur.next()
                continue
            key = cur.next_word("an option KEY=VALUE", "queuetask")
            name = key.text.lower()
            if name not in TASK_KEYS:
                close = difflib.get_close_matches(name, TASK_KEYS, n=1)
                raise self.src.error(f"queuetask: unknown option {key.raw!r}", key.line, key.column,
                                     hint=f"did you mean {close[0]}=?" if close else
                                     "options: " + ", ".join(k + "=" for k in TASK_KEYS))
            if name in args:
                raise self.src.error(f"queuetask: {name}= given twice", key.line, key.column)
            if cur.at_end() or cur.peek().kind != EQUALS:
                raise cur.error_here(f"queuetask: expected '=' after {key.raw}")
            cur.next()
            args[name] = cur.value(f"the value of {name}=", "queuetask")
        if "onexecute" not in args:
            raise cur.error_at_end("queuetask: onexecute=CMD is required (what runs on the target)")
        return Statement("queuetask", tok, args)

    def _parse_repset(self, cur, tok):
        what = cur.next_word("create", "repset")
        if what.text.lower() != "create":
            raise self.src.error(f"repset {what.raw}: only 'repset create' is a DTCL verb (use "
                                 f"'smirror repset list|delete' for the others)", what.line, what.column)
        args = {"name": cur.value("NAME", "repset create")}
        cur.keyword("root", "repset create")
        args["root"] = cur.value("PATH", "repset create")
        args["rules"] = []
        while not cur.at_end():
            if cur.peek().kind == COMMA:
                cur.next()
                continue
            kind = cur.next_word("include or exclude", "repset create")
            if kind.text.lower() == "mount" and "mount" not in args:
                # captured through a mount there (capture = "mount", docs/mount.md)
                args["mount"] = cur.value("MOUNTPOINT", "repset create")
                continue
            if kind.text.lower() not in ("include", "exclude"):
                raise self.src.error(f"repset create: expected include or exclude, got {kind.raw!r}",
                                     kind.line, kind.column)
            args["rules"].append((kind.text.lower(), cur.value("GLOB", "repset create")))
        return Statement("repset create", tok, args)

    def _parse_status(self, cur, tok):
        args = {} if cur.at_end() else {"id": cur.value("ID", "status")}
        cur.done(USAGE["status"])
        return Statement("status", tok, args)


class Cursor:
    """Reading the tokens of one statement; ``end`` is where its ';' is (or
    would be), for a message about something missing."""

    def __init__(self, src: Source, tokens: list[Token], end: tuple[int, int]):
        self.src = src
        self.tokens = tokens
        self.i = 0
        self.end = end

    def at_end(self) -> bool:
        return self.i >= len(self.tokens)

    def peek(self) -> Token:
        return self.tokens[self.i]

    def next(self) -> Token:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def error_at_end(self, message: str):
        return self.src.error(message, *self.end)

    def error_here(self, message: str):
        if self.at_end():
            return self.error_at_end(message)
        tok = self.peek()
        return self.src.error(message, tok.line, tok.column)

    def value(self, what: str, verb: str = "") -> Token:
        prefix = f"{verb}: " if verb else ""
        if self.at_end():
            usage = USAGE.get(verb.split()[0]) if verb else None
            raise self.error_at_end(f"{prefix}missing {what}" + (f" (usage: {usage})" if usage else ""))
        tok = self.peek()
        if tok.kind not in VALUE_KINDS:
            raise self.error_here(f"{prefix}expected {what}, got '{tok.raw}'")
        return self.next()

    def next_word(self, what: str, verb: str) -> Token:
        if self.at_end() or self.peek().kind != WORD:
            got = "" if self.at_end() else f", got '{self.peek().raw}'"
            raise self.error_here(f"{verb}: expected {what}{got}")
        return self.next()

    def keyword(self, word: str, verb: str) -> None:
        if self.at_end() or self.peek().kind != WORD or self.peek().text.lower() != word:
            got = "" if self.at_end() else f", got '{self.peek().raw}'"
            raise self.error_here(f"{verb}: expected '{word}'{got} (usage: {USAGE[verb.split()[0]]})")
        self.next()

    def done(self, usage: str) -> None:
        if not self.at_end():
            tok = self.peek()
            raise self.src.error(f"too many arguments: '{tok.raw}' (usage: {usage})", tok.line, tok.column)
