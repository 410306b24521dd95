"""Tree listings for mirrors: one :class:`Entry` per path, found with
``os.scandir`` (cached lstat, symlinks never followed), filtered by
include/exclude rules.

Paths are ``bytes`` relative to the tree root, ``/``-separated, so names that
are not UTF-8 (or contain newlines, spaces, leading dashes) survive unchanged.
The root itself is listed under the empty path ``b""``.

This module stays light (no numpy): a quick-check mirror of an unchanged tree
must not pay for imports it does not use.
"""
from __future__ import annotations

import gc
import os
import re
import stat

from smirror.errors import ConfigError

FILE, DIR, SYMLINK, SPECIAL = "f", "d", "l", "s"

# temporary files of an interrupted run: hidden, and removed by the next one
TEMP_PREFIX = b".smirror-tmp-"


class Entry:
    """What a mirror needs to know about one path (from one lstat)."""
    __slots__ = ("kind", "mode", "uid", "gid", "size", "mtime_ns", "ino", "dev",
                 "nlink", "rdev", "link", "ctime_ns")

    def __init__(self, kind, mode, uid, gid, size, mtime_ns, ino, dev, nlink,
                 rdev=0, link=None, ctime_ns=0):
        self.kind = kind          # FILE, DIR, SYMLINK or SPECIAL
        self.mode = mode          # full st_mode (type bits included)
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = mtime_ns
        self.ino = ino
        self.dev = dev
        self.nlink = nlink
        self.rdev = rdev          # device number of a SPECIAL entry
        self.link = link          # bytes target of a SYMLINK
        self.ctime_ns = ctime_ns  # last change of data or metadata (xattrs included)

    @property
    def perm(self) -> int:
        """Permission bits (including setuid/setgid/sticky)."""
        return stat.S_IMODE(self.mode)

    def __repr__(self):
        return (f"Entry({self.kind!r}, mode={self.mode:o}, size={self.size}, "
                f"mtime_ns={self.mtime_ns}, link={self.link!r})")


def kind_of(mode: int) -> str:
    if stat.S_ISREG(mode):
        return FILE
    if stat.S_ISDIR(mode):
        return DIR
    if stat.S_ISLNK(mode):
        return SYMLINK
    return SPECIAL


def entry_from_stat(st, link=None) -> Entry:
    mode = st.st_mode
    return Entry(kind_of(mode), mode, st.st_uid, st.st_gid, st.st_size,
                 st.st_mtime_ns, st.st_ino, st.st_dev, st.st_nlink, st.st_rdev,
                 link, st.st_ctime_ns)


# ---------------------------------------------------------------- rules

def _glob_to_regex(pattern: bytes, where: str) -> bytes:
    """Translate a glob (``*`` within a name, ``**`` across ``/``, ``?``,
    ``[...]``) to a regular expression over bytes."""
    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i:i + 1]
        if c == b"*":
            if pattern[i + 1:i + 2] == b"*":
                out.append(b".*")
                i += 2
                continue
            out.append(b"[^/]*")
        elif c == b"?":
            out.append(b"[^/]")
        elif c == b"[":
            end = pattern.find(b"]", i + 2 if pattern[i + 1:i + 2] in (b"!", b"^") else i + 1)
            if pattern[i + 1:i + 2] in (b"!", b"^") and end == i + 2:
                end = pattern.find(b"]", i + 3)
            if end < 0:
                raise ConfigError(f"{where}: unclosed '[' at character {i} of "
                                  f"pattern {pattern.decode(errors='backslashreplace')!r}")
            body = pattern[i + 1:end]
            if body[:1] in (b"!", b"^"):
                body = b"^" + body[1:]
            out.append(b"[" + body.replace(b"\\", b"\\\\") + b"]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return b"".join(out)


class Rule:
    """One include or exclude pattern, matched the way rsync does:

    * a pattern without ``/`` matches the last name of a path;
    * a pattern with ``/`` matches the whole relative path, anchored at the
      tree root when it starts with ``/``, else at any directory boundary;
    * a trailing ``/`` limits it to directories;
    * an excluded directory is not descended into.
    """
    __slots__ = ("include", "pattern", "dir_only", "regex")

    def __init__(self, include: bool, pattern):
        where = "--include" if include else "--exclude"
        raw = os.fsencode(pattern) if isinstance(pattern, str) else bytes(pattern)
        shown = raw.decode(errors="backslashreplace")
        if not raw or raw == b"/":
            raise ConfigError(f"{where}: empty pattern {shown!r}")
        if b"\0" in raw:
            raise ConfigError(f"{where}: pattern {shown!r} contains a NUL byte")
        self.include = include
        self.pattern = pattern
        self.dir_only = raw.endswith(b"/")
        body = raw.rstrip(b"/")
        anchored = body.startswith(b"/")
        body = body.lstrip(b"/")
        if not body:
            raise ConfigError(f"{where}: pattern {shown!r} names no path")
        regex = _glob_to_regex(body, where)
        prefix = b"" if anchored else b"(?:.*/)?"
        try:
            self.regex = re.compile(prefix + regex, re.DOTALL)
        except re.error as exc:
            raise ConfigError(f"{where}: invalid pattern {shown!r}: {exc}") from None

    def matches(self, rel: bytes, is_dir: bool) -> bool:
        if self.dir_only and not is_dir:
            return False
        return self.regex.fullmatch(rel) is not None


class Rules:
    """An ordered list of include/exclude rules; the first match decides,
    a path no rule matches is included."""

    def __init__(self, rules=()):
        self.rules = list(rules)

    @classmethod
    def from_patterns(cls, pairs) -> Rules:
        """``pairs``: iterable of ("include"|"exclude", pattern) in command-line order."""
        out = []
        for kind, pattern in pairs:
            if kind not in ("include", "exclude"):
                raise ConfigError(f"rule kind must be include or exclude, got {kind!r}")
            out.append(Rule(kind == "include", pattern))
        return cls(out)

    def __bool__(self):
        return bool(self.rules)

    def excluded(self, rel: bytes, is_dir: bool) -> bool:
        for rule in self.rules:
            if rule.matches(rel, is_dir):
                return not rule.include
        return False


# ---------------------------------------------------------------- scanning

class Listing:
    """Result of a scan: ``entries`` maps relative path -> Entry (parents
    before children in insertion order), ``errors`` lists (path, OSError) of
    what could not be read, ``temps`` lists leftover temporary files."""
    __slots__ = ("root", "entries", "errors", "temps")

    def __init__(self, root: bytes):
        self.root = root
        self.entries: dict[bytes, Entry] = {}
        self.errors: list[tuple[bytes, OSError]] = []
        self.temps: list[bytes] = []


def scan(root, rules: Rules | None = None, skip=(), collect_temps=False) -> Listing:
    """List the tree under ``root`` (which must be a directory).

    ``skip``: relative paths (bytes) not to list or descend into (e.g. an
    orphan directory inside the target). With ``collect_temps``, names
    starting with :data:`TEMP_PREFIX` go to ``temps`` instead of ``entries``.
    """
    # the cyclic collector would run every few hundred Entry objects and find
    # nothing (entries hold no cycles): off while listing, as it was after
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        return _scan(os.fsencode(root), rules, skip, collect_temps)
    finally:
        if gc_was_on:
            gc.enable()


def _scan(root: bytes, rules, skip, collect_temps) -> Listing:
    listing = Listing(root)
    entries = listing.entries
    errors = listing.errors
    entries[b""] = entry_from_stat(os.stat(root))
    skip = set(skip)
    S_ISDIR, S_ISLNK, S_ISREG = stat.S_ISDIR, stat.S_ISLNK, stat.S_ISREG
    readlink = os.readlink
    excluded = rules.excluded if rules else None
    stack = [b""]
    while stack:
        rel = stack.pop()
        dpath = root + b"/" + rel if rel else root
        try:
            it = os.scandir(dpath)
        except OSError as exc:
            errors.append((rel, exc))
            continue
        children = []
        with it:
            for de in it:
                name = de.name
                crel = rel + b"/" + name if rel else name
                if crel in skip:
                    continue
                if collect_temps and name.startswith(TEMP_PREFIX):
                    listing.temps.append(crel)
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue            # vanished since readdir: not there
                except OSError as exc:
                    errors.append((crel, exc))
                    continue
                mode = st.st_mode
                is_dir = S_ISDIR(mode)
                if excluded is not None and excluded(crel, is_dir):
                    continue
                link = None
                if S_ISREG(mode):
                    kind = FILE
                elif is_dir:
                    kind = DIR
                    children.append(crel)
                elif S_ISLNK(mode):
                    kind = SYMLINK
                    try:
                        link = readlink(dpath + b"/" + name)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        errors.append((crel, exc))
                        continue
                else:
                    kind = SPECIAL
                entries[crel] = Entry(kind, mode, st.st_uid, st.st_gid, st.st_size,
                                      st.st_mtime_ns, st.st_ino, st.st_dev,
                                      st.st_nlink, st.st_rdev, link, st.st_ctime_ns)
        # depth-first, children in reverse so they pop in directory order
        children.reverse()
        stack.extend(children)
    return listing
