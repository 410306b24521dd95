"""A connection's two policies for what the source does not have: the
orphan policy and ignore-deletes (at the end: a DELETE or RMDIR becomes a
MARK the target counts, or acts on by moving the file aside).

The orphan policy, for the mirrors that run through the connection's
stream: orphans (entries under the map base that the source lacks, found
from the target's listing) are reported, deleted, or moved aside to the
target's orphans directory, optionally only those older than some days.

The actions are ops queued right behind the mirror in the same stream, so
they apply in order with everything else: DELETE / RMDIR for ``delete``
(deepest first), a MARK ``orphan-move`` naming the path for ``move``
(a target moves it into its own ``orphans_dir`` when its own configuration
says so, ``[target] orphans = "move"``, the default; the source never names
a place outside the map base, and a symlink is never moved).

Without an age limit an orphan directory goes as a whole; with one, only
files (and symlinks) older than the limit go, and an orphan directory is
removed once everything in it went (``delete``) or is left (``move``).
"""
from __future__ import annotations

import json
import os
import time

from smirror.fs.tree import DIR
from smirror.ops import MARK_IGNORED_DELETE, MARK_ORPHAN_MOVE, Op, OpKind

POLICIES = ("report", "delete", "move")


def orphan_ops(orphans: list[bytes], known: dict, policy: str, older_than_days: float = 0.0,
               now_ns: int | None = None) -> tuple[list[Op], dict]:
    """Ops carrying out ``policy`` on ``orphans`` (paths; ``known[path]``:
    the target's listing entry, a :class:`smirror.fs.tree.Entry`), and the counters
    ``orphans``, ``orphan_bytes``, ``orphans_deleted``, ``orphans_moved``."""
    if policy not in POLICIES:
        raise ValueError(f"orphan policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    now_ns = time.time_ns() if now_ns is None else now_ns
    cutoff = now_ns - int(older_than_days * 86400e9) if older_than_days else None
    is_dir = {p: known[p].kind == DIR for p in orphans}
    orphan_set = set(orphans)

    def top(p: bytes) -> bool:
        return p.rpartition(b"/")[0] not in orphan_set

    def qualifies(p: bytes) -> bool:
        return cutoff is None or (not is_dir[p] and known[p].mtime_ns < cutoff)

    chosen = [p for p in orphans if qualifies(p) and (cutoff is not None or top(p))]
    # without an age limit a whole subtree goes: everything in it is acted on
    acted = orphans if cutoff is None else chosen
    stats = {"orphans": len(orphans),
             "orphan_bytes": sum(known[p].size for p in orphans if not is_dir[p]),
             "orphans_deleted": 0, "orphans_moved": 0, "orphan_policy": policy,
             "orphans_older_than_days": older_than_days}
    ops: list[Op] = []
    if policy == "report":
        return ops, stats
    if policy == "move":
        for p in chosen:
            ops.append(Op.mark(0, MARK_ORPHAN_MOVE, json.dumps({"path": os.fsdecode(p)}).encode()))
        stats["orphans_moved"] = len(chosen)
        stats["orphan_bytes_acted"] = sum(known[p].size for p in chosen if not is_dir[p])
        return ops, stats
    # delete: deepest first; with an age limit a directory only once emptied
    removed: set[bytes] = set()
    for p in sorted(acted, key=lambda p: (-p.count(b"/"), p)):
        if not is_dir[p]:
            ops.append(Op.delete(0, p))
            removed.add(p)
    # a directory goes only once everything under it went: every directory
    # above a file that stays (or above anything the target keeps) stays
    kept_under: set[bytes] = set()
    for p in known:
        if p not in removed and not is_dir.get(p, False):
            parent = p.rpartition(b"/")[0]
            while parent and parent not in kept_under:
                kept_under.add(parent)
                parent = parent.rpartition(b"/")[0]
    for d in sorted((p for p in orphans if is_dir[p]), key=lambda p: (-p.count(b"/"), p)):
        if d not in kept_under:
            ops.append(Op.rmdir(0, d))
            removed.add(d)
    stats["orphans_deleted"] = len(removed)
    stats["orphan_bytes_acted"] = sum(known[p].size for p in removed if not is_dir[p])
    return ops, stats


# -- ignore deletes: the other policy for what the source no longer has ----

IGNORE_DELETES = ("off", "keep", "move")


def for_connection(op: Op, ignore_deletes: str, keep_days: float, moving_out: bool) -> Op:
    """The op a connection gets for a captured ``op``: itself, or, for a
    delete on a connection that ignores deletes (not a move out of the set,
    ``moving_out``), the mark that stands for it."""
    if ignore_deletes != "off" and op.kind in (OpKind.DELETE, OpKind.RMDIR) and not moving_out:
        return ignored_delete(op, ignore_deletes, keep_days)
    return op


def ignored_delete(op: Op, mode: str, keep_days: float = 0.0) -> Op:
    """What a connection with ignore-deletes sends instead of a DELETE or
    RMDIR of the source (not a move out of the set: that still deletes): a
    MARK the target counts, and with ``mode`` 'move' acts on by moving the
    file to its deleted-files directory (purged after ``keep_days``)."""
    payload = json.dumps({"path": os.fsdecode(bytes(op.path)), "dir": op.kind == OpKind.RMDIR,
                          "mode": mode, "keep_days": keep_days}).encode()
    return Op.mark(op.seq, MARK_IGNORED_DELETE, payload)
