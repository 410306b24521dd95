"""The final check of every run: does the target equal the source?"""
from __future__ import annotations

import os
import stat


def _entries(root: str) -> dict[str, os.stat_result]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                out[os.path.relpath(p, root)] = os.lstat(p)
            except FileNotFoundError:
                pass     # gone while we walked (a live tree, a tool's temporary file)
    return out


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def compare_trees(src, dst, limit: int = 10) -> list[str]:
    """Differences between the trees (names, kinds, modes, sizes, file
    mtimes and contents), at most ``limit``; empty when they are equal."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(dst):
        return [f"{dst} does not exist"]
    a, b = _entries(src), _entries(dst)
    out: list[str] = []
    for rel in sorted(a.keys() | b.keys()):
        if len(out) >= limit:
            break
        sa, sb = a.get(rel), b.get(rel)
        if sa is None or sb is None:
            out.append(f"{rel}: only on the {'target' if sa is None else 'source'}")
        elif stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            out.append(f"{rel}: a different kind of file")
        elif stat.S_IMODE(sa.st_mode) != stat.S_IMODE(sb.st_mode):
            out.append(f"{rel}: mode {sa.st_mode:o} on the source, {sb.st_mode:o} on the target")
        elif stat.S_ISREG(sa.st_mode):
            if sa.st_size != sb.st_size:
                out.append(f"{rel}: {sa.st_size} bytes on the source, {sb.st_size} on the target")
            elif sa.st_mtime_ns != sb.st_mtime_ns:
                out.append(f"{rel}: mtime differs")
            else:
                try:
                    same = _same_content(os.path.join(src, rel), os.path.join(dst, rel))
                except FileNotFoundError:
                    same = False
                if not same:
                    out.append(f"{rel}: content differs")
    return out
