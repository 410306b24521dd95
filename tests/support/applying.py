"""Ops captured into a list, applied to a target directory as they come
(a capture's ``emit``, a target in the same process)."""
from __future__ import annotations

from collections.abc import Callable

from smirror.stream.apply import Applier


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
