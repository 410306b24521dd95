"""Prefix-consistency checker (DESIGN.md invariant 2).

A workload goes through the library capture API; every op is recorded in
order. When the target is stopped (SIGKILL) or cut off, its tree must equal
the source state after some prefix of that op sequence. The checker reads
the target's applied sequence number, rebuilds the source state after that
prefix by applying the recorded ops to a scratch directory with the same
applier, and compares the trees. The one op a killed target may have applied
without recording it is allowed for: prefix ``n`` or ``n + 1`` must match.
Hidden temporaries (``.smirror-tmp-*``) of an entry being replaced when the
kill came are not compared, and a WRITE cut short by the kill (write(2) stops
between pages on SIGKILL) is accepted page by page as old or new; the
restarted target applies that op again.

    rec = PrefixRecorder()                  # the emit sink: records, then forwards
    ...
    checker.check(target_dir, applied_seq)  # -> the prefix length that matched

Usable from the tests and from the command line on a stopped target::

    python tools/prefixcheck.py OPS.pickle TARGET_DIR APPLIED_FILE
"""
from __future__ import annotations

import ast
import os
import pickle
import shutil
import struct
import sys
import tempfile

from support.treestate import diff, snapshot


def read_applied(path) -> int:
    """The applied sequence number in a target's ``applied`` state file."""
    with open(path, "rb") as f:
        data = f.read(48)
    # SMAPPLY1: magic + applied; SMAPPLY2 (the durable watermark): magic +
    # applied + synced + boot id; SMAPPLY3: ... + reserved
    if (len(data), data[:8]) not in ((16, b"SMAPPLY1"), (40, b"SMAPPLY2"), (48, b"SMAPPLY3")):
        raise ValueError(f"{path}: not an applied-sequence file")
    return struct.unpack_from("<Q", data, 8)[0]


class PrefixChecker:
    """Keeps the recorded ops (numbered as the connection journal numbers
    them) and checks target trees against their prefixes."""

    def __init__(self, first_seq: int = 1):
        self.ops = []               # ops with their connection seq
        self.first_seq = first_seq

    def record(self, op) -> None:
        self.ops.append(op)

    def state_after(self, n_ops: int, where) -> dict:
        """Snapshot of the source state after the first ``n_ops`` ops."""
        from smirror.stream.apply import Applier
        if os.path.exists(where):
            shutil.rmtree(where)
        app = Applier(where)
        app.apply_all(self.ops[:n_ops])
        app.close()
        return snapshot(where, mtime=False)

    def check(self, target_dir, applied_seq: int) -> int:
        """The prefix length the target equals (``applied`` or one more);
        AssertionError with the differences otherwise."""
        count = sum(1 for op in self.ops if op.seq <= applied_seq)
        # a kill in the middle of replacing an entry may leave its hidden
        # temporary (.smirror-tmp-*): not part of the replica's content
        have = {k: v for k, v in snapshot(target_dir, mtime=False).items()
                if not k.rpartition(b"/")[2].startswith(b".smirror-tmp-")}
        scratch = tempfile.mkdtemp(prefix="smirror-prefix-")
        try:
            tried = []
            for n in (count, count + 1):
                if n > len(self.ops):
                    continue
                want = self.state_after(n, os.path.join(scratch, str(n)))
                problems = diff(want, have)
                if not problems:
                    return n
                tried.append((n, problems))
            if count < len(self.ops) and self._torn_write(target_dir, scratch, count, tried[0][1]):
                return count
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        raise AssertionError(f"target tree is no prefix state of the source (applied seq "
                             f"{applied_seq}): " + "; ".join(f"after {n} ops: {p}" for n, p in tried))

    def _torn_write(self, target_dir, scratch, n: int, problems) -> bool:
        """A SIGKILL can stop a write(2) between pages: the target then holds
        prefix ``n`` except that the file of op ``n + 1`` (a WRITE) has each
        page of the written range either old or new. Accept exactly that."""
        from smirror.ops import OpKind
        op = self.ops[n]
        if op.kind != OpKind.WRITE or "..." in problems:
            return False
        rel = os.fsdecode(bytes(op.path))
        ino = os.stat(os.path.join(target_dir, rel)).st_ino
        for line in problems:           # the file itself, or its other hard links
            other = os.fsdecode(ast.literal_eval(line.split(": ", 1)[0]))
            try:
                if os.stat(os.path.join(target_dir, other)).st_ino != ino:
                    return False
            except OSError:
                return False
        with open(os.path.join(scratch, str(n), rel), "rb") as f:
            old = f.read()
        new = bytearray(old.ljust(op.offset, b"\0"))
        new[op.offset:op.offset + len(op.data)] = bytes(op.data)
        with open(os.path.join(target_dir, rel), "rb") as f:
            have = f.read()
        if not min(len(old), len(new)) <= len(have) <= max(len(old), len(new)):
            return False
        page = 4096
        for start in range(0, len(have), page):
            chunk = have[start:start + page]
            end = start + len(chunk)
            if chunk != new[start:end] and chunk != old[start:end].ljust(len(chunk), b"\0"):
                return False
        return True

    def save(self, path) -> None:
        with open(path, "wb") as f:
            pickle.dump([tuple(op[:11]) + (bytes(op.data),) for op in self.ops], f)

    @classmethod
    def load(cls, path) -> PrefixChecker:
        from smirror.ops import Op
        c = cls()
        with open(path, "rb") as f:
            c.ops = [Op(*t) for t in pickle.load(f)]
        return c


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    checker = PrefixChecker.load(argv[0])
    n = checker.check(argv[1], read_applied(argv[2]))
    print(f"target equals the source after {n} of {len(checker.ops)} ops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
