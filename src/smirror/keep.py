"""Where a target puts what it takes out of a map base without deleting it:
orphans moved aside by a mirror's orphan policy (``orphans = move``) and
files the source deleted on a connection that ignores deletes with
``move`` (purged after the connection's number of days).

Both directories are the target daemon's choice (``[target] orphans_dir``,
``deleted_dir``), never the source's: an op still touches nothing outside
its map base except these two places its own administrator named. Layout::

    DIR/<source id>-<conid>/<path relative to the map base>

A name already taken there gets a ``.YYYYmmddTHHMMSS`` suffix (and a counter).
Deleted files are purged by the time they were moved (their ctime).
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import time

log = logging.getLogger("smirror.keep")

_PURGE_EVERY = 3600.0


class KeepDirs:
    def __init__(self, orphans_dir, deleted_dir):
        self.orphans_dir = os.fsencode(os.path.abspath(orphans_dir))
        self.deleted_dir = os.fsencode(os.path.abspath(deleted_dir))
        self._last_purge: dict[bytes, float] = {}

    @staticmethod
    def _slot(base: bytes, tc) -> bytes:
        return base + b"/" + os.fsencode(f"{tc.source or 'local'}-{tc.conid}")

    def move_orphan(self, tc, rel: bytes) -> bool:
        return self._move(tc, rel, self._slot(self.orphans_dir, tc), "orphan")

    def move_deleted(self, tc, rel: bytes, is_dir: bool, keep_days: float) -> bool:
        slot = self._slot(self.deleted_dir, tc)
        if is_dir:
            # its files were moved one by one before: the directory goes if empty
            try:
                os.rmdir(tc.applier.target.path(rel))
            except OSError:
                pass
            moved = False
        else:
            moved = self._move(tc, rel, slot, "deleted file")
        if keep_days:
            self.purge(slot, keep_days)
        return moved

    def _move(self, tc, rel: bytes, slot: bytes, what: str) -> bool:
        try:
            src = tc.applier.target.path(rel)          # confined to the map base
        except ValueError as exc:
            log.error("connection %s: %s %r not moved: %s", tc.conid, what, rel, exc)
            return False
        if not os.path.lexists(src):
            return False                                # replayed after a restart
        tc.applier.release(rel)
        dest = slot + b"/" + rel
        if os.path.lexists(dest):
            base = dest + time.strftime(".%Y%m%dT%H%M%S").encode()
            dest, n = base, 1
            while os.path.lexists(dest):
                dest, n = base + b"~%d" % n, n + 1
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            os.rename(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(src, dest)                      # another filesystem
        log.info("connection %s: %s %r moved to %r", tc.conid, what, rel, dest)
        return True

    def purge(self, slot: bytes, keep_days: float, force: bool = False) -> int:
        """Remove what was moved into ``slot`` more than ``keep_days`` ago."""
        now = time.time()
        if not force and now - self._last_purge.get(slot, 0.0) < _PURGE_EVERY:
            return 0
        self._last_purge[slot] = now
        limit = now - keep_days * 86400
        removed = 0
        for dirpath, dirnames, filenames in os.walk(slot, topdown=False):
            for name in filenames:
                p = os.path.join(dirpath, name)
                try:
                    if os.lstat(p).st_ctime < limit:
                        os.unlink(p)
                        removed += 1
                except OSError:
                    pass
            if dirpath != slot:
                try:
                    os.rmdir(dirpath)       # empty now
                except OSError:
                    pass
        if removed:
            log.info("purged %d deleted file(s) older than %g days from %r", removed, keep_days, slot)
        return removed
