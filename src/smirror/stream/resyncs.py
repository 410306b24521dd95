"""The target's resync requests of one connection: which subtrees it asked
the source to send again, and how often it may ask for the same one.

A subtree the target asks for goes out at once the first times; asked
again and again (its ops keep failing after each resync: something on the
target keeps it from converging), each next ask waits longer (doubled each
time, bounded), and after ``give_up`` asks in a row the subtree is the
connection's error: said once, to the log, the target's status and the
source's, instead of a silent loop. It is still asked for, at the bounded
pace, so it converges once the cause is gone; a subtree not asked for in
``forgive`` seconds starts afresh, and a given-up one whose resync is done
and then stays quiet for ``quiet`` seconds clears the error.

Pure bookkeeping: the caller says what time it is and sends what
:meth:`ResyncRequests.ask` and :meth:`ResyncRequests.due` return.
"""
from __future__ import annotations


class _Subtree:
    __slots__ = ("asks", "last", "deferred", "given_up", "done_at")

    def __init__(self):
        self.asks = 0               # asks in a row (since it was last forgiven)
        self.last = 0.0             # when it was last asked for
        self.deferred: tuple | None = None      # (due, seq, why): an ask waiting for its turn
        self.given_up = False
        self.done_at = 0.0          # when its last resync was done (0: not since the last ask)


class ResyncRequests:
    """``again``: seconds after which a resync asked and not done yet is
    asked again; ``free``: asks in a row that go out at once; then waits of
    ``backoff`` seconds doubled each time up to ``backoff_max``;
    ``give_up``: asks in a row that make it the connection's error."""

    def __init__(self, *, again: float = 30.0, free: int = 3, backoff: float = 0.25,
                 backoff_max: float = 30.0, give_up: int = 10, forgive: float = 60.0,
                 quiet: float = 2.0):
        self.again, self.free, self.backoff, self.backoff_max = again, free, backoff, backoff_max
        self.give_up, self.forgive, self.quiet = give_up, forgive, quiet
        self.pending: dict[bytes, float] = {}       # subtree -> when asked (not done yet)
        self._subtrees: dict[bytes, _Subtree] = {}
        self.deferred = 0           # asks held back by the back-off, in all
        self.errors: dict[bytes, str] = {}          # given-up subtree -> what is said
        self._next_check = float("inf")     # when due() has something to do, at the earliest

    def check_due(self, now: float) -> bool:
        """Whether :meth:`due` has anything to do at ``now`` (cheap)."""
        return now >= self._next_check

    def _covered(self, root: bytes, now: float) -> bool:
        """A resync of ``root`` or of a directory above it is on its way."""
        for p, at in self.pending.items():
            if (p == root or root.startswith(p + b"/") or not p) and now - at < self.again:
                return True
        return False

    def wait(self, asks: int) -> float:
        """Seconds between the ask number ``asks`` and the next one."""
        if asks < self.free:
            return 0.0
        return min(self.backoff * 2 ** (asks - self.free), self.backoff_max)

    def ask(self, root: bytes, seq: int, why: str, now: float) -> bool:
        """The target wants ``root`` sent again. True: ask the source now
        (:meth:`sent` says it was); False: covered by a resync on its way,
        or held back by the back-off (:meth:`due` gives it back later)."""
        if self._covered(root, now):
            return False
        sub = self._subtrees.get(root)
        if sub is not None and now - max(sub.last, sub.done_at) > self.forgive and not sub.deferred:
            self._forget(root)
            sub = None
        if sub is None:
            return True
        due = sub.last + self.wait(sub.asks)
        if now >= due:
            return True
        if sub.deferred is None:
            self.deferred += 1
            sub.deferred = (due, seq, why)
            self._next_check = min(self._next_check, due)
        return False

    def sent(self, root: bytes, now: float) -> str:
        """``root`` was asked for at ``now``. Returns the error to report
        when this ask makes it the connection's error, else ""."""
        sub = self._subtrees.get(root)
        if sub is None:
            sub = self._subtrees[root] = _Subtree()
        sub.asks += 1
        sub.last, sub.done_at, sub.deferred = now, 0.0, None
        self.pending[root] = now
        self._next_check = min(self._next_check, now + self.forgive)
        if sub.asks >= self.give_up and not sub.given_up:
            sub.given_up = True
            return self.errors.setdefault(
                root, f"{root.decode(errors='replace') or '(the whole set)'!r} still diverges "
                f"after {sub.asks} resyncs in a row")
        return ""

    def done(self, root: bytes, now: float) -> bool:
        """The source's resync of ``root`` is done. False: it was not asked."""
        if self.pending.pop(root, None) is None:
            return False
        sub = self._subtrees.get(root)
        if sub is not None:
            sub.done_at = now
            if sub.given_up:
                self._next_check = min(self._next_check, now + self.quiet)
        return True

    def due(self, now: float) -> tuple[list[tuple[bytes, int, str]], list[bytes]]:
        """(asks whose turn came: (root, seq, why), given-up subtrees
        whose resync is done and that stayed quiet since: their error is
        cleared)."""
        asks, cleared = [], []
        self._next_check = float("inf")
        for root, sub in list(self._subtrees.items()):
            if sub.deferred is not None and now >= sub.deferred[0]:
                _, seq, why = sub.deferred
                sub.deferred = None
                if not self._covered(root, now):
                    asks.append((root, seq, why))
            elif sub.given_up and sub.done_at and now - sub.done_at >= self.quiet \
                    and sub.deferred is None:
                cleared.append(root)
                self.errors.pop(root, None)
                self._forget(root)
            elif not sub.deferred and now - max(sub.last, sub.done_at) > self.forgive:
                if sub.given_up:
                    cleared.append(root)
                self._forget(root)      # the table does not grow with every subtree ever asked
        for sub in self._subtrees.values():        # the next thing due() will have to do
            nxt = sub.deferred[0] if sub.deferred is not None else \
                sub.done_at + self.quiet if sub.given_up and sub.done_at else \
                max(sub.last, sub.done_at) + self.forgive
            self._next_check = min(self._next_check, nxt)
        return asks, cleared

    def _forget(self, root: bytes) -> None:
        sub = self._subtrees.pop(root, None)
        if sub is not None and sub.given_up:
            self.errors.pop(root, None)

    def __len__(self) -> int:
        """Subtrees asked for that are remembered."""
        return len(self._subtrees)

    def waiting(self) -> int:
        """Asks held back now."""
        return sum(1 for s in self._subtrees.values() if s.deferred is not None)
