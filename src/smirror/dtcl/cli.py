"""``smirror dtcl``: its arguments only. What it does is in
:mod:`smirror.dtcl.command`, imported when the verb runs, so the other verbs
do not pay for loading the language (about 100 ms)."""
from __future__ import annotations

from smirror.daemon.config import DEFAULT_PORT


def add_parser(sub) -> None:
    p = sub.add_parser("dtcl", help="run a DTCL script (Storage Mirroring's scripting language)",
                       description="Run a DTCL script: checked in full (syntax, variables, verbs, "
                                   "arguments) before its first statement runs. Without -f, "
                                   "statements are read from standard input, one per ';'.")
    p.add_argument("-f", dest="script", metavar="SCRIPT", help="the script to run")
    p.add_argument("--host-default-port", type=int, default=DEFAULT_PORT, metavar="PORT",
                   help=f"port of a HOST given without one (default {DEFAULT_PORT})")
    p.add_argument("--check", action="store_true", help="parse and check the script; run nothing")
    p.add_argument("--json", action="store_true", help="print what ran (or the error) as JSON")
    p.add_argument("--password-file", metavar="FILE",
                   help="password of 'login HOST USER;' (first line; else $SMIRROR_PASSWORD, "
                        "else the session of 'smirror login')")
    p.set_defaults(run=run_dtcl)


def run_dtcl(args) -> int:
    from smirror.dtcl.command import run_dtcl as run
    return run(args)
