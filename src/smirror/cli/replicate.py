"""``smirror replicate SRC DST`` (continuous replication in one process) and
``smirror demo`` (the main job on a generated tree, for a first look)."""
from __future__ import annotations

import os
import sys
from typing import Any

from smirror.cli.common import local_dir, text_summary
from smirror.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE


def add_parser(subparsers):
    p = subparsers.add_parser(
        "replicate", help="replicate a directory to another continuously",
        description="Mirror SRC to DST, then replicate every change as it happens "
                    "(fanotify or inotify watcher, changed blocks only) until Ctrl-C or SIGTERM.")
    p.add_argument("src", metavar="SRC", type=local_dir)
    p.add_argument("dst", metavar="DST", type=local_dir)
    p.add_argument("--mirror", choices=("checksum", "different", "full", "none"), default="checksum",
                   help="initial mirror (default: checksum differences)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN")
    p.add_argument("--state-dir", metavar="DIR", help="queues and applied sequence "
                   "(default: $XDG_STATE_HOME/smirror/replicate/ID)")
    p.add_argument("--memory-limit", default="256MiB", metavar="SIZE",
                   help="RAM for queued data, shared by the source and target queues; past it "
                        "they spill to disk (default 256MiB)")
    p.add_argument("--mount", metavar="MOUNTPOINT",
                   help="serve SRC at MOUNTPOINT through the capture mount: every change made "
                        "there is replicated in the exact order it was made (docs/mount.md)")
    p.add_argument("--sync", choices=("async", "fsync", "every-write"), default="async",
                   help="with --mount: fsync = an fsync there returns once DST made it durable; "
                        "every-write = every changing call does (docs/mount.md; default async)")
    p.add_argument("--sync-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long a synchronous call waits for DST before it fails with EIO "
                        "(default 30)")
    p.add_argument("--json", action="store_true", help="status lines as JSON objects")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="status line interval (default 1)")
    p.add_argument("--for", dest="duration", type=float, metavar="SECONDS",
                   help="stop after this long (default: run until interrupted)")
    p.set_defaults(run=run_replicate)

    d = subparsers.add_parser(
        "demo", help="generate a demo tree and mirror it (full, then checksum differences)",
        description="Makes a demo tree, mirrors it, changes 1%% of the blocks of its "
                    "large file and a few small files, then runs the checksum "
                    "difference mirror administrators script, and prints both summaries.")
    d.add_argument("--dir", metavar="DIR", help="work here (default: a new temporary directory)")
    d.add_argument("--size-mb", type=int, default=64, help="size of the large file (default 64)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(run=run_demo)


def _status_line(st: dict) -> str:
    from smirror.units import format_size
    lag = st["lag_ms_p99"]
    err = f"  error: {st['error']}" if st.get("error") else ""
    return (f"{st['state']:<12} captured {st['seq_captured']:>8}  applied {st['seq_applied']:>8}  "
            f"durable {st['seq_durable']:>8}  "
            f"sent {format_size(st['bytes_sent']):>9}  "
            f"queue {format_size(st['source_queue_mem'] + st['source_queue_disk']):>9}"
            f"  lag p99 {'-' if lag is None else f'{lag:.1f} ms'}"
            f"  memory {format_size(st['memory']['used'])} of {format_size(st['memory']['limit'])}{err}")


def run_replicate(args) -> int:
    import json
    import logging
    import signal
    import threading
    import time

    from smirror.fs.tree import Rules
    from smirror.replication import Replication
    # warnings and errors (with their tracebacks) of every component to stderr
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rules = Rules.from_patterns([("exclude", p) for p in args.exclude]
                                + [("include", p) for p in args.include])
    rep = Replication(args.src, args.dst, mirror=args.mirror, rules=rules or None,
                      state_dir=args.state_dir, memory_limit=args.memory_limit, mount=args.mount,
                      sync=args.sync, sync_timeout=args.sync_timeout)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(*_):
        # no KeyboardInterrupt inside a lock: the first signal stops (after
        # draining), a second one stops without waiting for the drain
        (hurry if stop.is_set() else stop).set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rep.start()
    if rep.mount is not None:
        if rep.mount.cleared:
            print(f"smirror replicate: {rep.mount.cleared}", file=sys.stderr)
        print(f"serving {args.src} at {rep.mount.mountpoint}: write there", file=sys.stderr)
    if rep.mirror_summary is not None and not args.json:
        d = rep.mirror_summary.to_dict()
        print(f"initial mirror: {d['created']} created, {d['changed']} changed, "
              f"{d['unchanged']} unchanged in {d['seconds']:.2f} s", file=sys.stderr)
    t0 = time.monotonic()
    failure = ""
    try:
        while not stop.wait(args.interval):
            st = rep.status()
            print(json.dumps(st) if args.json else _status_line(st), flush=True)
            failure = rep.failure()
            if failure:
                break
            if args.duration is not None and time.monotonic() - t0 >= args.duration:
                break
    except KeyboardInterrupt:
        pass
    if failure:
        print(f"smirror replicate: error: {failure}; stopping (see the log for the traceback)",
              file=sys.stderr)
    stop.set()
    if not failure:
        print("stopping: applying what is queued (again to stop at once)...", file=sys.stderr)
        deadline = time.monotonic() + 30
        while not hurry.is_set() and time.monotonic() < deadline:
            if rep.wait(0.2):
                break
    rep.stop(drain=False)
    st = rep.status()
    print(json.dumps(st) if args.json else _status_line(st))
    if st["target_error"]:
        print(f"smirror replicate: error: the target could not apply: {st['target_error']}",
              file=sys.stderr)
    return EXIT_OK if not (st["target_error"] or failure) else EXIT_FAILED


def run_demo(args) -> int:
    import json
    import tempfile

    from smirror.mirror.engine import Mirror, MirrorOptions
    base = args.dir or tempfile.mkdtemp(prefix="smirror-demo-")
    src, dst = os.path.join(base, "source"), os.path.join(base, "target")
    if os.path.exists(src) or os.path.exists(dst):
        print(f"smirror demo: error: {src} or {dst} exists already; use an empty --dir",
              file=sys.stderr)
        return EXIT_USAGE
    _make_demo_tree(src, args.size_mb)
    results: dict[str, Any] = {}
    full = Mirror(src, dst, MirrorOptions()).run()
    results["full"] = full.to_dict()
    changed = _change_demo_tree(src)
    diff = Mirror(src, dst, MirrorOptions(different=True, checksum=True)).run()
    results["different_checksum"] = diff.to_dict()
    results["changed_bytes"] = changed
    if args.json:
        print(json.dumps(results))
    else:
        print(f"demo tree: {src}  ->  {dst}")
        print("full mirror:")
        print("  " + text_summary(results["full"]))
        print(f"changed {changed} bytes (1% of the large file's 8 KiB blocks, 20 small files)")
        print("checksum difference mirror (smirror mirror SRC DST --different --checksum):")
        print("  " + text_summary(results["different_checksum"]))
    return full.exit_code or diff.exit_code


def _make_demo_tree(src: str, size_mb: int) -> None:
    import random
    rng = random.Random(1)
    for d in range(10):
        sub = os.path.join(src, f"dir{d}")
        os.makedirs(sub)
        for f in range(20):
            with open(os.path.join(sub, f"file{f}.dat"), "wb") as fh:
                fh.write(rng.randbytes(rng.randint(1000, 200_000)))
    with open(os.path.join(src, "database.db"), "wb") as fh:
        for _ in range(size_mb):
            fh.write(rng.randbytes(1 << 20))
    os.symlink("database.db", os.path.join(src, "current.db"))


def _change_demo_tree(src: str) -> int:
    import random
    rng = random.Random(2)
    changed = 0
    path = os.path.join(src, "database.db")
    blocks = os.path.getsize(path) // 8192
    with open(path, "r+b") as fh:
        for b in rng.sample(range(blocks), max(1, blocks // 100)):
            fh.seek(b * 8192)
            fh.write(rng.randbytes(8192))
            changed += 8192
    for d in range(10):
        for f in range(2):
            p = os.path.join(src, f"dir{d}", f"file{f}.dat")
            with open(p, "ab") as fh:
                fh.write(b"appended")
            changed += 8
    return changed
