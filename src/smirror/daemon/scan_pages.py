"""A map base's listing for a source's mirror (the ``target.scan`` verb), in
pages.

One reply used to hold the whole listing: a map base of about a million
files (fewer with extended attributes, such as SELinux labels on every file)
made a reply past the link's message cap (``wire.DEFAULT_MAX_MESSAGE``), so
every mirror of that connection failed, at connect and at every reconnect.
A source that asks for pages (``page_bytes``) gets the first one and a
cursor; it asks for the next ones with the cursor until none is left. A
source of an older version asks for no pages and gets the whole listing in
one reply, as before.

The listing is taken once, at the first page: the pages are one moment of
the map base. It is held until its last page is read, until the same user
opened ``MAX_OPEN`` newer ones, or until it was left alone ``IDLE_SECONDS``.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from smirror.errors import ConfigError, SmirrorError
from smirror.fs.tree import Listing

PAGE_BYTES_MIN = 64 * 1024
PAGE_BYTES_MAX = 16 * 1024 * 1024       # a quarter of the message cap: estimates are not exact
MAX_OPEN = 8                            # listings held per user
IDLE_SECONDS = 600.0

Rows = Iterator[tuple[str, list]]


def listing_rows(base: bytes, listing: Listing, xattrs: bool) -> Rows:
    """``(path, row)`` for each entry of ``listing`` but the root and the
    applier's temporaries: ``[mode, uid, gid, size, mtime_ns, link]``, and
    with ``xattrs`` a table of the entry's extended attributes (hex), read
    beneath the map base's handle (no symlink leads out); None when it is
    gone meanwhile (not known: the source sends all)."""
    from smirror.mirror.local import LocalTarget
    reader = LocalTarget(base) if xattrs else None
    try:
        for rel, e in listing.entries.items():
            if rel and not rel.rpartition(b"/")[2].startswith(b".smirror-tmp-"):
                row = [e.mode, e.uid, e.gid, e.size, e.mtime_ns,
                       os.fsdecode(e.link) if e.link is not None else None]
                if reader is not None:
                    try:
                        row.append({n: v.hex() for n, v in reader.xattrs(rel).items()})
                    except (OSError, SmirrorError):
                        row.append(None)
                yield os.fsdecode(rel), row
    finally:
        if reader is not None:
            reader.close()


def check_page_bytes(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) \
            or not PAGE_BYTES_MIN <= value <= PAGE_BYTES_MAX:
        raise ConfigError(f"target.scan: page_bytes must be an integer from {PAGE_BYTES_MIN} to "
                          f"{PAGE_BYTES_MAX}, got {value!r}")
    return value


def row_bytes(name: str, row: list) -> int:
    """About what ``name: row`` takes in the reply's JSON (at least that
    much: the numbers are counted at their widest)."""
    size = len(json.dumps(name)) + 80
    link = row[5] if len(row) > 5 else None
    if link is not None:
        size += len(json.dumps(link))
    xattrs = row[6] if len(row) > 6 else None
    if xattrs:
        size += sum(len(json.dumps(n)) + len(v) + 4 for n, v in xattrs.items())
    return size


class _Open:
    __slots__ = ("user", "rows", "page_bytes", "used", "pages", "lock", "dropped")

    def __init__(self, user: str, rows: Rows, page_bytes: int):
        self.user, self.rows, self.page_bytes = user, rows, page_bytes
        self.used = time.monotonic()
        self.pages = 0
        self.lock = threading.Lock()    # one page at a time
        self.dropped = False

    def close(self) -> None:
        """Close what the rows hold open (a generator's descriptors), now
        or, while a page is being read, at its end."""
        self.dropped = True
        if self.lock.acquire(blocking=False):
            try:
                _close_rows(self.rows)
            finally:
                self.lock.release()


def _close_rows(rows) -> None:
    close = getattr(rows, "close", None)
    if close is not None:
        close()


class ScanPages:
    """The listings being read page by page, by cursor."""

    def __init__(self):
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, user: str, rows: Rows, page_bytes) -> dict:
        """The first page of ``rows`` (``(path, row)`` pairs) for ``user``."""
        scan = _Open(user, rows, check_page_bytes(page_bytes))
        cursor = secrets.token_hex(12)
        with self._lock:
            self._expire(user)
            self._open[cursor] = scan
        return self._page(cursor, scan)

    def next(self, user: str, cursor) -> dict:
        """The page after the last one read with ``cursor``."""
        with self._lock:
            self._expire(user)
            scan = self._open.get(cursor) if isinstance(cursor, str) else None
            if scan is None or scan.user != user:
                raise SmirrorError(f"target.scan: cursor {str(cursor)[:40]!r} is not a listing in progress "
                                   f"(read to its end, or left alone {IDLE_SECONDS:.0f} s): "
                                   "list again from the first page")
            self._open.move_to_end(cursor)
        return self._page(cursor, scan)

    def _page(self, cursor: str, scan: _Open) -> dict:
        rows: dict[str, list] = {}
        size = 0
        done = True
        with scan.lock:
            if scan.dropped:
                raise SmirrorError(f"target.scan: cursor {cursor!r} was dropped (too many listings "
                                   "open, or left alone): list again from the first page")
            for name, row in scan.rows:
                rows[name] = row
                size += row_bytes(name, row)
                if size >= scan.page_bytes:
                    done = False
                    break
            scan.pages += 1
            scan.used = time.monotonic()
            if done or scan.dropped:
                _close_rows(scan.rows)
        if done:
            with self._lock:
                self._open.pop(cursor, None)
        # "paged": a row is a list, never True, so an older target's reply
        # (the rows themselves) is never taken for a page
        return {"paged": True, "rows": rows, "cursor": None if done else cursor, "page": scan.pages}

    def _expire(self, user: str) -> None:
        """Drop listings left alone too long, and ``user``'s oldest past
        MAX_OPEN (called with the lock held)."""
        now = time.monotonic()
        stale = [c for c, s in self._open.items() if now - s.used > IDLE_SECONDS]
        mine = [c for c, s in self._open.items() if s.user == user]
        stale += mine[:max(0, len(mine) - MAX_OPEN + 1)]
        for c in stale:
            scan = self._open.pop(c, None)
            if scan is not None:
                scan.close()

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)
