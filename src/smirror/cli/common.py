"""What the CLI's verbs share: argument types and how results print. Exit
codes live in ``smirror.errors`` (the errors carry them).
"""
from __future__ import annotations

import argparse


def local_dir(text: str) -> str:
    """argparse type of a local directory argument (SRC, DST): an empty one
    would mean the current directory, and ``host:path`` is a remote path,
    which goes through a daemon (``smirror connect``), never a local
    directory named ``host:``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not a directory (use '.' for this one)")
    head, colon, _ = text.partition(":")
    if colon and head and "/" not in head and not text.startswith("./"):
        raise argparse.ArgumentTypeError(
            f"{text!r} looks like a remote HOST:PATH; remote targets go through a target "
            f"daemon ('smirror connect REPSET to HOST map base PATH'); for a local name with "
            f"a colon write './{text}'")
    return text


def text_summary(d: dict) -> str:
    from smirror.units import format_size
    head = "dry run: " if d["dry_run"] else ""
    lines = [
        f"{head}{d['files_scanned']} files scanned ({format_size(d['bytes_scanned'])}), "
        f"{d['dirs_scanned']} dirs, {d['symlinks_scanned']} symlinks; "
        f"{d['created']} created, {d['changed']} changed, {d['unchanged']} unchanged, "
        f"{d['meta_updated']} metadata updated; {d['orphans']} orphans"
        + (f" ({d['orphans_deleted']} deleted)" if d["orphans_deleted"] else "")
        + (f" ({d['orphans_moved']} moved)" if d["orphans_moved"] else "")
        + f"; {format_size(d['bytes_literal'])} literal, {format_size(d['bytes_matched'])} "
        f"matched, {format_size(d['bytes_written'])} written; {d['seconds']:.2f} s"]
    return "\n".join(lines)
