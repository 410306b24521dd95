"""Snapshots of a directory tree for comparisons: what a path is, its
content digest, mode, mtime and link target. Used by the tests and by the
prefix-consistency checker."""
from __future__ import annotations

import hashlib
import os
import stat


def snapshot(root, *, mtime: bool = True, owner: bool = False, skip=()) -> dict:
    """{relative path (bytes): description tuple} of everything under ``root``."""
    root = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = b"" if rel_dir == b"." else rel_dir
        dirnames[:] = [d for d in dirnames if os.path.join(rel_dir, d) not in skip]
        for name in dirnames + filenames:
            rel = os.path.join(rel_dir, name) if rel_dir else name
            if rel in skip:
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                kind = stat.S_IFMT(st.st_mode)
                extra = ()
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        extra = (st.st_size, hashlib.blake2b(f.read(), digest_size=16).hexdigest())
                elif stat.S_ISLNK(st.st_mode):
                    extra = (os.readlink(path),)
            except FileNotFoundError:
                continue      # removed while we looked: a tree in flux (callers poll)
            desc = (kind, extra)
            if not stat.S_ISLNK(st.st_mode):
                desc += (stat.S_IMODE(st.st_mode),)
            if mtime and stat.S_ISREG(st.st_mode):
                desc += (st.st_mtime_ns,)
            if owner:
                desc += (st.st_uid, st.st_gid)
            out[rel] = desc
    return out


def diff(a: dict, b: dict, limit: int = 10) -> list[str]:
    """Human-readable differences between two snapshots (at most ``limit``)."""
    lines = []
    for rel in sorted(a.keys() | b.keys()):
        if a.get(rel) != b.get(rel):
            lines.append(f"{rel!r}: {a.get(rel)} != {b.get(rel)}")
            if len(lines) >= limit:
                lines.append("...")
                break
    return lines
