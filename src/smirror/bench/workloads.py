"""The workloads smbench runs, each modelling a job the application note
describes. A workload changes files through a :class:`Writer` (the library
capture API in embedded mode, plain system calls watched by the daemon in
daemons mode, or plain calls alone for the direct-write baseline), and asks
the run for target pauses through ``ctl``.

Sizes grow with ``scale``; ``quick`` shrinks them so the whole suite fits in
a minute on two cores. Data is incompressible (random), so the bytes a queue
holds are the bytes written, plus framing.
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np

KiB, MiB = 1 << 10, 1 << 20


class Writer:
    """File changes made with plain system calls under ``root``."""

    def __init__(self, root):
        self.root = os.fspath(root)

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def mkdir(self, rel: str) -> None:
        os.mkdir(self._abs(rel))

    def create(self, rel: str) -> None:
        os.close(os.open(self._abs(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))

    def write(self, rel: str, offset: int, data) -> None:
        fd = os.open(self._abs(rel), os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def fsync(self, rel: str) -> None:
        fd = os.open(self._abs(rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, old: str, new: str) -> None:
        os.rename(self._abs(old), self._abs(new))

    def delete(self, rel: str) -> None:
        os.unlink(self._abs(rel))


class RecorderWriter(Writer):
    """The same changes made and recorded through the library capture API
    (``smirror.capture.recorder.Recorder``): exact order, no watcher."""

    def __init__(self, recorder):
        super().__init__(os.fsdecode(recorder.root))
        self.rec = recorder

    def mkdir(self, rel):
        self.rec.mkdir(rel)

    def create(self, rel):
        self.rec.create(rel)

    def write(self, rel, offset, data):
        self.rec.write(rel, offset, data)

    def rename(self, old, new):
        self.rec.rename(old, new)

    def delete(self, rel):
        self.rec.delete(rel)


class NullCtl:
    """Target controls for a run without a target (the direct baseline)."""

    def pause_target(self) -> None:
        pass

    def resume_target(self) -> None:
        pass


@dataclass
class Params:
    duration: float = 30.0
    scale: float = 1.0
    quick: bool = False
    seed: int = 1
    burst_size: int | None = None      # burst: bytes of the burst (default by scale)
    pause_target: bool = False         # burst: target paused during the burst


class Workload:
    name = ""
    summary = ""
    rate_limited = False     # paced at a target rate: throughput is the offered rate

    def __init__(self, p: Params):
        self.p = p
        self.rng = random.Random(p.seed)
        self.np_rng = np.random.default_rng(p.seed)
        self.bytes_written = 0
        self.ops = 0
        self.phases: dict[str, float] = {}    # event -> seconds since the run's start

    def data(self, n: int) -> bytes:
        return self.np_rng.bytes(n)

    def setup(self, w: Writer) -> None:
        """Files that exist before the measured part (replicated, not counted)."""

    def run(self, w: Writer, ctl, t0: float) -> None:
        raise NotImplementedError

    def _count(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        self.ops += 1

    def _deadline(self, t0: float) -> float:
        return t0 + self.p.duration


class Bulk(Workload):
    name = "bulk"
    summary = "large files written sequentially in 1 MiB writes (backup images, media)"
    WRITE = MiB

    def run(self, w, ctl, t0):
        file_size = int((16 if self.p.quick else 256) * MiB * self.p.scale)
        cap = int((48 if self.p.quick else 2048) * MiB * self.p.scale)
        deadline, n = self._deadline(t0), 0
        while time.monotonic() < deadline and self.bytes_written < cap:
            name = f"image{n:03d}.bin"
            w.create(name)
            self.ops += 1
            off = 0
            while off < file_size and time.monotonic() < deadline and self.bytes_written < cap:
                size = min(self.WRITE, file_size - off)
                w.write(name, off, self.data(size))
                self._count(size)
                off += size
            n += 1


class SmallFiles(Workload):
    name = "smallfiles"
    summary = "4-64 KiB files created, rewritten, renamed and deleted (a mail spool, a source tree)"
    DIRS = 8

    def setup(self, w):
        for d in range(self.DIRS):
            w.mkdir(f"dir{d}")

    def run(self, w, ctl, t0):
        r = self.rng
        max_files = int(200 * self.p.scale)
        cap = int((1500 if self.p.quick else 200_000) * self.p.scale)
        files: list[str] = []
        counter = 0
        deadline = self._deadline(t0)
        while time.monotonic() < deadline and self.ops < cap:
            what = r.choices(("create", "rewrite", "rename", "delete"), (4, 3, 2, 1))[0]
            if what == "create" or not files or (what != "delete" and len(files) < 20):
                counter += 1
                name = f"dir{r.randrange(self.DIRS)}/m{counter:06d}"
                w.create(name)
                n = r.randint(4, 64) * KiB
                w.write(name, 0, self.data(n))
                self._count(n)
                files.append(name)
                if len(files) > max_files:
                    w.delete(files.pop(0))
                    self.ops += 1
            elif what == "rewrite":
                name = r.choice(files)
                n = r.randint(4, 64) * KiB
                w.write(name, 0, self.data(n))     # rewritten from the start (a shorter one keeps the tail)
                self._count(n)
            elif what == "rename":
                i = r.randrange(len(files))
                counter += 1
                new = f"dir{r.randrange(self.DIRS)}/m{counter:06d}"
                w.rename(files[i], new)
                files[i] = new
                self.ops += 1
            else:
                w.delete(files.pop(r.randrange(len(files))))
                self.ops += 1


class Oltp(Workload):
    name = "oltp"
    summary = "random 8 KiB page writes to data files + fsync'd log appends at a target rate (a database)"
    rate_limited = True
    PAGE = 8 * KiB
    FILES = 4
    PAGES_PER_COMMIT = 8

    def __init__(self, p):
        super().__init__(p)
        self.file_size = int((2 if p.quick else 16) * MiB * p.scale) // self.PAGE * self.PAGE
        self.rate = 1000 * p.scale           # page writes per second (8 MB/s at scale 1)

    def setup(self, w):
        for i in range(self.FILES):
            w.create(f"data{i}.db")
            for off in range(0, self.file_size, MiB):
                w.write(f"data{i}.db", off, self.data(min(MiB, self.file_size - off)))
        w.create("log")

    def run(self, w, ctl, t0):
        self._pages(w, t0, self._deadline(t0), ctl, {})

    def _pages(self, w, t0, deadline, ctl, events):
        """Pages at the target rate until ``deadline``; ``events`` maps a
        time since t0 to a ctl call made once it has passed."""
        r = self.rng
        log_off = 0
        pending = sorted(events.items())
        pages = self.file_size // self.PAGE
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            while pending and now - t0 >= pending[0][0]:
                _, (label, call) = pending.pop(0)
                call()
                self.phases[label] = time.monotonic() - t0
            for _ in range(self.PAGES_PER_COMMIT):
                f = f"data{r.randrange(self.FILES)}.db"
                w.write(f, r.randrange(pages) * self.PAGE, self.data(self.PAGE))
                self._count(self.PAGE)
            rec = self.data(512)
            w.write("log", log_off, rec)
            w.fsync("log")
            log_off += len(rec)
            self._count(len(rec))
            # pace: sleep until the pages written so far are due
            due = t0 + (self.ops / (self.PAGES_PER_COMMIT + 1)) * self.PAGES_PER_COMMIT / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        for _, (label, call) in pending:      # a pause is always resumed
            call()
            self.phases[label] = time.monotonic() - t0


class BackupWindow(Oltp):
    name = "backup-window"
    summary = "oltp while the target is paused (a tape backup running on it), then resumed"
    PAUSE_AT, RESUME_AT = 0.25, 0.6        # shares of the duration

    def run(self, w, ctl, t0):
        d = self.p.duration
        self._pages(w, t0, self._deadline(t0), ctl,
                    {d * self.PAUSE_AT: ("paused", ctl.pause_target),
                     d * self.RESUME_AT: ("resumed", ctl.resume_target)})


class Burst(Workload):
    name = "burst"
    summary = "idle, then a burst of a known size at full speed (a batch job, a nightly load)"
    WRITE = MiB

    def __init__(self, p):
        super().__init__(p)
        self.size = p.burst_size or int((16 if p.quick else 256) * MiB * p.scale)
        self.idle = min(2.0, p.duration / 4)

    def run(self, w, ctl, t0):
        time.sleep(self.idle)
        if self.p.pause_target:
            ctl.pause_target()
        self.phases["burst"] = time.monotonic() - t0
        w.create("burst.bin")
        self.ops += 1
        off = 0
        while off < self.size:
            n = min(self.WRITE, self.size - off)
            w.write("burst.bin", off, self.data(n))
            self._count(n)
            off += n
        self.phases["burst_end"] = time.monotonic() - t0
        if self.p.pause_target:
            ctl.resume_target()
            self.phases["resumed"] = time.monotonic() - t0


WORKLOADS = {cls.name: cls for cls in (Bulk, SmallFiles, Oltp, BackupWindow, Burst)}
