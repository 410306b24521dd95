"""DTCL text -> tokens, each with its line and column (1-based).

Tokens: ``$Name`` (VAR), ``"text"`` (STRING, no escapes: the note's paths
hold backslashes; one line at most), digits (NUMBER), ``;`` ``,`` ``=``
(punctuation) and WORD: any other run of characters (a verb, a keyword, a
host name, a path, a command). Comments: a line whose first word is ``rem``
(any case), and ``#`` at the start of a token, to the end of the line (the
note's comment lines also end with ``#``; a ``#`` inside a word is part of
it)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from smirror.errors import DtclError

VAR, STRING, NUMBER, WORD, SEMI, COMMA, EQUALS = "var", "string", "number", "word", ";", ",", "="

# a word stops at blanks, punctuation and quotes
_WORD = re.compile(r'[^\s;,="$]+')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REM = re.compile(r"\s*rem(\s|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str            # the value: a string without its quotes, a name without '$'
    line: int
    column: int
    raw: str = ""        # the characters of the script (for a message)

    def __str__(self) -> str:
        return self.raw or self.text


class Source:
    """A script's text and name, for messages that show its lines."""

    def __init__(self, text: str, name: str = "<script>", first_line: int = 1):
        self.text = text
        self.name = name
        self.first_line = first_line          # interactive input: line numbers go on
        self.lines = text.splitlines()
        self.secrets: set[str] = set()        # masked wherever a line is shown

    def line_text(self, line: int) -> str | None:
        i = line - self.first_line
        if not 0 <= i < len(self.lines):
            return None
        return mask(self.lines[i], self.secrets)

    def error(self, message: str, line: int, column: int, hint: str | None = None) -> DtclError:
        return DtclError(message, script=self.name, line=line, column=column,
                         source_line=self.line_text(line), hint=hint)


def mask(text: str, secrets) -> str:
    """``text`` with every secret replaced by as many ``*`` (the caret
    under a later column stays where it was)."""
    for s in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(s, "*" * len(s))
    return text


def tokenize(src: Source) -> list[Token]:
    tokens: list[Token] = []
    for i, line in enumerate(src.lines):
        lineno = src.first_line + i
        if _REM.match(line):
            continue
        col = 0
        n = len(line)
        while col < n:
            ch = line[col]
            if ch.isspace():
                col += 1
                continue
            if ch == "#":
                break
            if ch in ";,=":
                tokens.append(Token(ch, ch, lineno, col + 1, ch))
                col += 1
                continue
            if ch == '"':
                end = line.find('"', col + 1)
                if end < 0:
                    # what follows the quote may be a password: not shown
                    src.secrets.update(secrets_in(tokens))
                    src.secrets.add(line[col + 1:])
                    raise src.error("unterminated string: no closing '\"' on this line", lineno, col + 1)
                value = line[col + 1:end]
                tokens.append(Token(STRING, value, lineno, col + 1, line[col:end + 1]))
                col = end + 1
                continue
            if ch == "$":
                m = _NAME.match(line, col + 1)
                if not m:
                    src.secrets.update(secrets_in(tokens))
                    raise src.error("'$' must be followed by a variable name (letters, digits, _)",
                                    lineno, col + 1)
                tokens.append(Token(VAR, m.group(), lineno, col + 1, "$" + m.group()))
                col = m.end()
                continue
            m = _WORD.match(line, col)
            if not m:          # a character no token starts with (cannot happen: '$' and '"' are above)
                raise src.error(f"unexpected character {ch!r}", lineno, col + 1)
            word = m.group()
            kind = NUMBER if word.isascii() and word.isdigit() else WORD
            tokens.append(Token(kind, word, lineno, col + 1, word))
            col = m.end()
    return tokens


def secrets_in(tokens: list[Token]) -> set[str]:
    """The passwords a token list holds: the third argument of each
    ``login`` (a literal, or the literals assigned to its variable), found
    without parsing, so that even a message about a broken script masks
    them."""
    starts = [0] + [i + 1 for i, t in enumerate(tokens) if t.kind == SEMI]
    vars_, found = set(), set()
    for i in starts:
        stmt = tokens[i:i + 4]
        if len(stmt) == 4 and stmt[0].kind == WORD and stmt[0].text.lower() == "login":
            pw = stmt[3]
            if pw.kind == VAR:
                vars_.add(pw.text)
            elif pw.kind in (STRING, WORD, NUMBER):
                found.add(pw.text)
    for i in starts:
        stmt = tokens[i:i + 3]
        if len(stmt) == 3 and stmt[0].kind == VAR and stmt[0].text in vars_ and stmt[1].kind == EQUALS \
                and stmt[2].kind in (STRING, WORD, NUMBER):
            found.add(stmt[2].text)
    return found
