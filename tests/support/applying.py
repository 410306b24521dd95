"""Ops captured into a list, applied to a target directory as they come
(a capture's ``emit``, a target in the same process)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from smirror.errors import ApplyError
from smirror.ops import MARK_RESYNC_DONE, Op, OpKind
from smirror.stream.apply import Applier
from smirror.stream.receiver import MARK_SKIPPED, divergence_root
from smirror.stream.resyncs import ResyncRequests


def applier_of(ops: list, dst) -> Callable[[], None]:
    """A function that applies to ``dst`` the ops appended to ``ops`` since
    its last call (numbered in the order captured), then flushes."""
    applier, applied = Applier(dst), 0

    def apply_new() -> None:
        nonlocal applied
        for op in ops[applied:]:
            applied += 1
            applier.apply(op._replace(seq=applied))
        applier.flush()
    return apply_new


class Pipe(list):
    """A capture's ``emit``: each op numbered, kept, and applied to ``dst``
    at once (the root's mtime MARK too, as on a target)."""

    def __init__(self, dst):
        super().__init__()
        self.applier = Applier(dst)

    def __call__(self, op):
        op = op._replace(seq=len(self) + 1)
        self.append(op)
        self.applier.apply(op)


class ResyncingTarget:
    """A target as a connection's receiver runs one, in this process: the
    ops it is sent (it is a capture's ``emit``, and the output of the
    resyncs it asks for) applied to ``dst`` in order by :meth:`apply_new`;
    an op that fails because the tree diverged (a path missing) is skipped
    and the smallest subtree involved asked of ``capture`` again, unless a
    resync above it is under way (the receiver's ResyncRequests: until its
    done MARK, or 30 s). ``skipped``: the ops skipped."""

    def __init__(self, dst, capture=None):
        self.dst = os.fsencode(os.path.abspath(dst))
        self.capture = capture
        self.ops: list = []
        self.skipped: list = []
        self.requests = ResyncRequests()
        self._applier, self._applied = Applier(dst), 0

    def __call__(self, op) -> None:
        self.ops.append(op)

    def apply_new(self) -> None:
        for op in self.ops[self._applied:]:
            self._applied += 1
            op = op._replace(seq=self._applied)
            try:
                self._applier.apply(op)
            except ApplyError as exc:
                if not isinstance(exc.__cause__, (FileNotFoundError, NotADirectoryError)):
                    raise
                self.skipped.append(op)
                self._applier.apply(Op.mark(op.seq, MARK_SKIPPED, b""))
                self._ask(op, str(exc))
                continue
            if op.kind == OpKind.MARK and bytes(op.path) == MARK_RESYNC_DONE:
                rel = os.fsencode(json.loads(bytes(op.data))["path"])
                self.requests.done(rel, time.monotonic())
        self._applier.flush()

    def _ask(self, op, why: str) -> None:
        root = divergence_root(self.dst, bytes(op.path))
        now = time.monotonic()
        if self.capture is not None and self.requests.ask(root, op.seq, why, now):
            self.requests.sent(root, now)
            self.capture.request_resync(root, self, why)
