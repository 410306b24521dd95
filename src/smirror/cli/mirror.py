"""``smirror mirror SRC DST``: the one-shot full / difference / checksum mirror.

Exit codes: 0 done; 1 done, but some entries failed (listed on stderr and in
``--json``); 2 bad arguments (unknown option, invalid block size or pattern,
DST inside SRC or the reverse); 3 could not run or stopped (SRC missing,
target disk full or read-only); 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
import time

from smirror.cli.common import local_dir, text_summary
from smirror.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, SmirrorError


class _RuleAction(argparse.Action):
    """--include / --exclude into one list, in command-line order (the
    first matching rule decides)."""

    def __call__(self, parser, namespace, values, option_string=None):
        rules = list(getattr(namespace, "rules", None) or [])
        kind = "include" if option_string == "--include" else "exclude"
        rules.extend((kind, v) for v in values)
        namespace.rules = rules


def _block_size(text: str) -> int:
    from smirror.units import parse_size
    try:
        return parse_size(text, "--block-size")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _orphans(text: str):
    if text in ("report", "delete"):
        return (text, None)
    if text.startswith("move:") and len(text) > 5:
        return ("move", text[5:])
    raise argparse.ArgumentTypeError(
        f"expected report, delete or move:DIR, got {text!r}")


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"days must be >= 0, got {text!r}")
    return value


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_parser(subparsers):
    p = subparsers.add_parser(
        "mirror", help="bring DST in line with SRC (full, difference or checksum mirror)",
        description="Bring the directory DST in line with SRC. Without a mode flag every "
                    "file is written (full mirror).",
        epilog="exit codes: 0 ok, 1 some entries failed (reported), 2 bad arguments, "
               "3 could not run or stopped (missing SRC, target disk full), 130 interrupted")
    p.add_argument("src", metavar="SRC", type=local_dir, help="source directory")
    p.add_argument("dst", metavar="DST", type=local_dir, help="target directory (created if missing)")
    p.add_argument("--different", action="store_true",
                   help="only files whose size or mtime differ (quick check)")
    p.add_argument("--checksum", action="store_true",
                   help="compare block checksums and write only differing blocks; with "
                        "--different, only of the files the quick check flags")
    p.add_argument("--newer", action="store_true", help="only files where SRC is newer")
    p.add_argument("--block-size", type=_block_size, metavar="N",
                   help="checksum block size (default: ~128Ki blocks per file, >= 4 KiB)")
    p.add_argument("--orphans", type=_orphans, default=("report", None),
                   metavar="report|delete|move:DIR",
                   help="what to do with files under DST that SRC lacks (default: report)")
    p.add_argument("--orphans-older-than", type=_days, metavar="DAYS",
                   help="handle only orphans last modified more than DAYS ago")
    p.add_argument("--exclude", nargs="+", action=_RuleAction, metavar="PATTERN",
                   help="skip paths matching PATTERN (rsync-style glob; first matching "
                        "--include/--exclude wins)")
    p.add_argument("--include", nargs="+", action=_RuleAction, metavar="PATTERN",
                   help="keep paths matching PATTERN even if a later --exclude matches")
    p.add_argument("--dry-run", action="store_true", help="show what would be done, change nothing")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--threads", type=_threads, metavar="N",
                   help="workers hashing and copying (default: number of CPUs)")
    p.add_argument("--no-xattrs", action="store_true", help="do not replicate extended attributes")
    p.add_argument("--fsync", action="store_true",
                   help="flush every file to disk before renaming it into place")
    p.set_defaults(run=run, rules=None)
    return p


def run(args) -> int:
    from smirror.fs.tree import Rules
    from smirror.mirror.engine import Mirror, MirrorOptions, show

    def fail(message, code):
        print(f"smirror mirror: error: {message}", file=sys.stderr)
        return code

    try:
        rules = Rules.from_patterns(args.rules or ())
        orphans, orphan_dir = args.orphans
        options = MirrorOptions(
            different=args.different, checksum=args.checksum, newer=args.newer,
            block_size=args.block_size, orphans=orphans, orphan_dir=orphan_dir,
            orphans_older_than=args.orphans_older_than, rules=rules,
            dry_run=args.dry_run, threads=args.threads, xattrs=not args.no_xattrs,
            fsync=args.fsync)
    except ConfigError as exc:
        return fail(exc, EXIT_USAGE)
    show_bar = not args.quiet and not args.json and sys.stderr.isatty()
    progress = None
    if show_bar:
        from smirror.cli.progress import Progress
        progress = Progress(sys.stderr, enabled=True)
    try:
        summary = Mirror(args.src, args.dst, options, progress).run()
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except SmirrorError as exc:
        partial = getattr(exc, "summary", None)
        if partial is not None and args.json:
            import json
            print(json.dumps(partial.to_dict()))
        return fail(exc, getattr(exc, "exit_code", EXIT_FAILED))
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return fail(f"{exc.strerror or exc}{where}", EXIT_FAILED)
    for rel, message in summary.errors:
        print(f"smirror mirror: {show(rel)}: {message}", file=sys.stderr)
    if args.json:
        import json
        data = summary.to_dict()
        started = getattr(args, "started", None)
        if started is not None:
            # the whole command from smirror.cli.main() on (argument parsing,
            # imports of the mirror modules, both scans, the work): what an
            # in-process caller would see, without the interpreter's start-up
            data["main_seconds"] = round(time.perf_counter() - started, 6)
        print(json.dumps(data))
    elif not args.quiet:
        data = summary.to_dict()
        for action, rel in summary.actions:
            print(f"would {action}: {show(rel)}")
        if orphans == "report":
            for rel in summary.orphans:
                print(f"orphan: {show(rel)}")
        print(text_summary(data))
    return summary.exit_code
