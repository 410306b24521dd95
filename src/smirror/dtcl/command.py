"""What ``smirror dtcl`` does: read a script (``-f SCRIPT``), check it in
full, then run it; or read statements from standard input, one per ';'."""
from __future__ import annotations

import json
import os
import stat
import sys

from smirror.errors import EXIT_FAILED, EXIT_OK, DtclError, DtclRunError
from smirror.errors import EXIT_USAGE as EXIT_SCRIPT

from .check import Checker
from .lexer import SEMI, Source, mask, tokenize
from .parser import parse
from .run import Runner


def _read_script(path: str) -> Source:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DtclError(f"cannot read the script: {exc.strerror}", script=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DtclError(f"not UTF-8 text (byte 0x{data[exc.start]:02x})", script=path, line=line,
                        column=column) from None
    return Source(text, path)


def run_dtcl(args) -> int:
    if not 0 < args.host_default_port < 65536:
        return _fail(args, DtclError(f"--host-default-port must be 1-65535, got {args.host_default_port}",
                                     script="smirror dtcl"), EXIT_SCRIPT)
    if args.script is None:
        return _interactive(args)
    try:
        src = _read_script(args.script)
        checker = Checker(src, default_port=args.host_default_port)
        actions = checker.check(parse(src))
    except DtclError as exc:
        return _fail(args, exc, EXIT_SCRIPT)
    if args.check:
        notes = list(checker.notes)
        mode = os.stat(args.script).st_mode
        if checker.holds_password and mode & 0o044:
            notes.append(f"warning: {args.script} holds a password and is readable by others "
                         f"(mode {stat.filemode(mode)}): chmod 600 {args.script}")
        if args.json:
            print(json.dumps({"ok": True, "script": args.script, "statements": len(actions),
                              "notes": notes}))
        else:
            for n in notes:
                print(f"{args.script}: {n}")
            print(f"{args.script}: {len(actions)} statement(s) checked; nothing was run")
        return EXIT_OK
    runner = Runner(src, password_file=args.password_file, json=args.json)
    try:
        runner.run(actions)
    except DtclRunError as exc:
        return _fail(args, exc, EXIT_FAILED, runner)
    finally:
        runner.close()
    if args.json:
        print(mask(json.dumps({"ok": True, "script": args.script, "ran": runner.results}),
                   src.secrets))
    return EXIT_OK


def _fail(args, exc, code: int, runner: Runner | None = None) -> int:
    print(str(exc), file=sys.stderr)
    if args.json:
        out = {"ok": False, "error": getattr(exc, "message", str(exc)),
               "ran": runner.results if runner else []}
        if isinstance(exc, DtclError):
            out.update(script=exc.script, line=exc.line or None, column=exc.column or None)
        text = json.dumps(out)
        print(mask(text, runner.src.secrets) if runner else text)
    return code


def _interactive(args) -> int:
    """Statements from standard input, each checked and run when its ';'
    comes. At a terminal an error is shown and input goes on (like the Text
    Client); from a pipe the first error stops it (like a script)."""
    tty = sys.stdin.isatty()
    secrets: set[str] = set()
    checker = Checker(Source("", "<stdin>"), default_port=args.host_default_port)
    runner = Runner(checker.src, password_file=args.password_file, json=args.json)
    lines: list[str] = []
    first = lineno = 1
    status = EXIT_OK

    def prompt():
        if tty:
            print("dtcl> " if not lines else "  ... ", end="", file=sys.stderr, flush=True)

    try:
        prompt()
        for raw in sys.stdin:
            lines.append(raw.rstrip("\r\n"))
            lineno += 1
            src = Source("\n".join(lines), "<stdin>", first_line=first)
            src.secrets = secrets
            try:
                tokens = tokenize(src)
                if tokens and tokens[-1].kind != SEMI:
                    prompt()
                    continue                    # the statement goes on on the next line
                if tokens:
                    checker.src = runner.src = src
                    actions = checker.check(parse(src))
                    if not args.check:
                        runner.run(actions)
            except (DtclError, DtclRunError) as exc:
                status = EXIT_SCRIPT if isinstance(exc, DtclError) else EXIT_FAILED
                if not tty:
                    return _fail(args, exc, status, runner)
                print(str(exc), file=sys.stderr)
            lines, first = [], lineno
            prompt()
        if lines:                               # a last statement without ';'
            src = Source("\n".join(lines), "<stdin>", first_line=first)
            src.secrets = secrets
            checker.src = runner.src = src
            try:
                actions = checker.check(parse(src))
                if not args.check:
                    runner.run(actions)
            except (DtclError, DtclRunError) as exc:
                return _fail(args, exc, EXIT_SCRIPT if isinstance(exc, DtclError) else EXIT_FAILED, runner)
    finally:
        runner.close()
    if args.check and not args.json:
        for n in checker.notes:
            print(f"<stdin>: {n}")
        print("<stdin>: checked; nothing was run")
    if args.json:
        print(mask(json.dumps({"ok": status == EXIT_OK, "script": "<stdin>", "ran": runner.results,
                               **({"notes": checker.notes} if args.check else {})}), secrets))
    return status
