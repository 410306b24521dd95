"""A connection's mirror (connect, remirror, ``mirror-start``): the one
mirror engine (:class:`smirror.mirror.engine.Mirror`) reading the set's
directory, its target a :class:`smirror.mirror.remote.RemoteTarget`: the
target daemon's listing and block hashes read through its verbs, every
change an op in the connection's journal, in order with what the capture
queues after it. The capture the set runs goes on from what the mirror left
(:meth:`smirror.capture.watch.TreeCapture.take_mirror`).

Modes, as the daemon names them: ``"full"`` (every file sent, the target
not read), ``"different"`` (files whose size or mtime differ sent whole),
``True`` (checksum: those files compared block by block, only differing
blocks sent; a mount set's files are all compared: after a crash the last
write served may share size and mtime with the target's copy); ``newer``
leaves the target's newer files as they are.
"""
from __future__ import annotations

import threading

from smirror.capture.watch import MirrorHandover
from smirror.fs.files import xattr_filter
from smirror.mirror.engine import Mirror, MirrorOptions
from smirror.mirror.local import LocalTarget
from smirror.mirror.remote import RemoteReader, StreamTarget


def remote_reader(client, map_base: str, ident: dict, mode) -> RemoteReader:
    """The reader of a connection's map base over a logged-in control
    ``client`` (closed with the reader); the listing is read now, so a
    target that cannot be read fails before anything is queued. A full
    mirror reads nothing."""
    reader = RemoteReader(client, map_base, ident, xattrs=True, wanted_xattr=xattr_filter(),
                          rows={} if mode == "full" else None)
    try:
        reader.read()
    except BaseException:
        reader.close()
        raise
    return reader


def options_for(mode, *, newer: bool = False, mount: bool = False, rules=None) -> MirrorOptions:
    """The engine's options for a daemon mirror mode (see the module docstring)."""
    if mode == "full":
        return MirrorOptions(rules=rules, threads=1)
    if mode == "different":
        return MirrorOptions(different=True, newer=newer, rules=rules, threads=1)
    return MirrorOptions(different=not mount, checksum=True, newer=newer, rules=rules, threads=1)


class ConnectionMirror:
    """One mirror of a connection: ``reader`` (a :class:`RemoteReader`,
    closed when the run ends), ``options`` (:func:`options_for`), ``stop``
    (mirror-stop: ends it before its next file). Called as ``run(root,
    emit)`` by the capture (see ``run_mirror``); returns the hand-over."""

    def __init__(self, reader: RemoteReader | LocalTarget, options: MirrorOptions,
                 stop: threading.Event | None = None):
        self.reader = reader
        self.options = options
        self.stop = stop if stop is not None else threading.Event()
        self.orphans_stay = True        # the connection's orphan policy is "report"
        self.engine: Mirror | None = None
        self.target: StreamTarget | None = None

    def __call__(self, root: bytes, emit) -> MirrorHandover:
        # a RemoteReader's: the RemoteTarget; a local directory's (tests,
        # a target on this machine): the same writer over that reader
        target = self.target = StreamTarget(self.reader, emit, xattrs=True)
        try:
            engine = self.engine = Mirror(root, target, self.options, stop=self.stop)
            summary = engine.run()
        finally:
            self.reader.close()
        src, dst = engine.source_listing, engine.target_listing
        assert src is not None and dst is not None      # run() listed both or raised
        orphans = [] if summary.stopped else _with_contents(summary.orphans, dst.entries)
        return MirrorHandover(
            left=engine.left, links={rel: leader for rel, leader, _ in engine.hardlinks},
            hashes=engine.hashes, kept=engine.kept, unsure=engine.unsure, stale=engine.stale,
            target=dst.entries, source=src.entries, xattrs=target.xattrs, orphans=orphans,
            orphans_stay=self.orphans_stay, stats=self.counters())

    def counters(self) -> dict:
        """The mirror's counters so far (status reads them while it runs)."""
        engine, target = self.engine, self.target
        if engine is None or target is None:
            return {"ops": 0, "bytes_sent": 0, "entries_checked": 0}
        s = engine.summary
        out = {"mode": self.options.mode, "ops": target.ops, "bytes_sent": target.bytes_written,
               "entries_checked": self._entries_checked(),
               "created": s.created, "changed": s.changed, "unchanged": s.unchanged,
               "meta_updated": s.meta_updated, "hardlinks": s.hardlinks, "removed": s.removed,
               "bytes_matched": s.bytes_matched, "failures": len(s.errors),
               "errors": [{"path": p.decode("utf-8", "backslashreplace"), "error": m}
                          for p, m in s.errors[:20]],
               "seconds": round(s.seconds, 6)}
        if s.stopped:
            out["stopped"] = True
        if self.options.newer:
            out["kept_newer"] = len(engine.kept)
        return out

    def _entries_checked(self) -> int:
        """Source entries compared so far (the root not counted)."""
        engine = self.engine
        assert engine is not None
        done = len(engine.left) + len(engine.unsure) + len(engine.kept)
        return max(0, done - (b"" in engine.left))


def _with_contents(orphans: list[bytes], listed: dict) -> list[bytes]:
    """The engine's orphans (the top of each orphan subtree) with everything
    the target listed under them: the orphan policy acts on each."""
    tops = set(orphans)
    out = set(orphans)
    for rel in listed:
        parent = rel.rpartition(b"/")[0]
        while parent and parent not in tops:
            parent = parent.rpartition(b"/")[0]
        if parent:
            out.add(rel)
    return sorted(out)


__all__ = ["ConnectionMirror", "remote_reader", "options_for"]
