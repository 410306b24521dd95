"""DTCL, the scripting language of Storage Mirroring administrators:
lexer -> parser (statements with positions) -> check (resolution, before
anything runs) -> run (the control requests the CLI verbs send)."""
from __future__ import annotations

from smirror.daemon.config import DEFAULT_PORT
from .check import Action, Checker
from .lexer import Source
from .parser import parse


def check_text(text: str, name: str = "<script>", default_port: int = DEFAULT_PORT
               ) -> tuple[list[Action], Checker]:
    """Parse and check a whole script: its actions and the checker (notes,
    whether it holds a password). Raises DtclError, nothing else."""
    src = Source(text, name)
    checker = Checker(src, default_port=default_port)
    return checker.check(parse(src)), checker
