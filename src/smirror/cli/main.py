"""The ``smirror`` command line. Each verb lives in the module of its concern;
this file only wires them to argparse and turns SmirrorError into a clear
message and an exit code (no traceback for a user)."""
from __future__ import annotations

import argparse
import sys
import time

from smirror import native_status
from smirror.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, SmirrorError


def version_text() -> str:
    from smirror import __version__
    status = native_status()
    loaded = [k for k, v in status.items() if v is True]
    if len(loaded) == len(status):
        native = "native kernels loaded (" + ", ".join(k.lstrip("_") for k in loaded) + ")"
    else:
        missing = {k: v for k, v in status.items() if v is not True}
        native = "native kernels MISSING: " + "; ".join(f"{k}: {v}" for k, v in missing.items())
    return f"smirror {__version__}, {native}"


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``verb`` "mirror", only that verb's
    parser (what ``smirror mirror ...`` parses is the same either way)."""
    parser = argparse.ArgumentParser(
        prog="smirror",
        description="Continuous, write-order-preserving file replication.")
    parser.add_argument("--version", action="store_true",
                        help="print the version and whether native kernels are loaded")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    # verbs register themselves here, one module a concern
    from smirror.cli import mirror as mirror_cli
    mirror_cli.add_parser(sub)
    if verb == "mirror":
        # a one-shot mirror of an unchanged tree takes tens of milliseconds:
        # the daemon verbs' modules (config, dataclasses, inspect: ~8 ms)
        # are not loaded for it
        return parser
    from smirror.cli import daemon as daemon_cli
    from smirror.cli import replicate as replicate_cli
    from smirror.dtcl import cli as dtcl_cli
    replicate_cli.add_parser(sub)
    daemon_cli.add_parsers(sub)
    dtcl_cli.add_parser(sub)
    return parser


def main(argv=None) -> int:
    started = time.perf_counter()
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv[0] if argv else None)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # a verb whose trailing ARGs may come after its options (queue-task
        # NAME --to T --on-execute CMD ARG ...) takes the words left over
        if getattr(args, "trailing_args", False) and not any(w.startswith("-") for w in extra):
            args.args.extend(extra)
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        print(version_text())
        return EXIT_OK
    if not args.verb:
        parser.print_help()
        return EXIT_USAGE
    args.started = started      # for a verb that reports its own run time
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("smirror: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SmirrorError as exc:
        print(f"smirror {args.verb}: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_FAILED)
    except OSError as exc:       # a peer that hung up, a file that vanished, ...
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"smirror {args.verb}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
