"""Random file-system workloads performed through the library capture API
(smirror.capture.recorder.Recorder), so every change is recorded in exact order.
Used by the tests, the prefix-consistency checker and smbench."""
from __future__ import annotations

import os
import random


class Workload:
    """Keeps a model of the namespace it made, so each step is valid on the
    source: writes at random offsets, appends, truncates, creates, deletes,
    renames of files and directories, mkdir/rmdir, mode changes, symlinks,
    hard links."""

    def __init__(self, recorder, seed: int = 0, max_write: int = 64 * 1024):
        self.rec = recorder
        self.rng = random.Random(seed)
        self.max_write = max_write
        self.files: set[str] = set()
        self.dirs: set[str] = set()
        self.links: set[str] = set()
        self.counter = 0

    def _name(self, parent: str | None = None) -> str:
        self.counter += 1
        if parent is None:
            parent = self.rng.choice(sorted(self.dirs)) if self.dirs and self.rng.random() < 0.6 else ""
        base = self.rng.choice(["f", "data", "log", "odd name", "x-"]) + str(self.counter)
        return f"{parent}/{base}" if parent else base

    def _data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def step(self) -> str:
        r = self.rng
        choices = ["create", "mkdir"]
        if self.files:
            choices += ["write"] * 6 + ["append"] * 3 + ["truncate", "delete", "rename", "chmod", "hardlink"]
        if self.dirs:
            choices += ["rename_dir", "rmdir", "symlink"]
        what = r.choice(choices)
        rec = self.rec
        if what == "create":
            p = self._name()
            rec.create(p, r.choice([0o644, 0o600, 0o755]))
            self.files.add(p)
        elif what == "mkdir":
            p = self._name()
            rec.mkdir(p, r.choice([0o755, 0o700]))
            self.dirs.add(p)
        elif what in ("write", "append"):
            p = r.choice(sorted(self.files))
            size = os.path.getsize(os.path.join(rec.root, os.fsencode(p)))
            n = r.randint(1, self.max_write)
            off = size if what == "append" else r.randint(0, size + 1024)
            rec.write(p, off, self._data(n))
        elif what == "truncate":
            p = r.choice(sorted(self.files))
            rec.truncate(p, r.randint(0, 100_000))
        elif what == "delete":
            p = r.choice(sorted(self.files))
            rec.delete(p)
            self.files.discard(p)
        elif what == "rename":
            p = r.choice(sorted(self.files))
            q = self._name()
            rec.rename(p, q)
            self.files.discard(p)
            self.files.add(q)
        elif what == "chmod":
            p = r.choice(sorted(self.files))
            rec.setattr(p, mode=r.choice([0o600, 0o640, 0o644, 0o755]))
        elif what == "hardlink":
            p = r.choice(sorted(self.files))
            q = self._name()
            rec.hardlink(q, p)
            self.files.add(q)
        elif what == "symlink":
            q = self._name()
            rec.symlink(q, r.choice(["../elsewhere", "target-does-not-exist", "/etc/passwd"]))
            self.links.add(q)
        elif what == "rename_dir":
            d = r.choice(sorted(self.dirs))
            new = self._name(parent="")
            rec.rename(d, new)
            self._move_prefix(d, new)
        elif what == "rmdir":
            d = r.choice(sorted(self.dirs))
            inside = [p for p in self.files | self.dirs | self.links if p.startswith(d + "/")]
            if inside:
                return self.step()
            rec.rmdir(d)
            self.dirs.discard(d)
        return what

    def _move_prefix(self, old: str, new: str) -> None:
        def move(s: set) -> set:
            return {new + p[len(old):] if p == old or p.startswith(old + "/") else p for p in s}
        self.files, self.dirs, self.links = move(self.files), move(self.dirs), move(self.links)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
