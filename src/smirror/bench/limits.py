"""The one place smbench turns a memory size into engine settings: the
memory budget of each process (``[memory] limit`` of a daemon,
``Replication(memory_limit=...)``, docs/memory.md). Every smbench run, the
tuner's recommendation and ``advise`` go through these functions.
"""
from __future__ import annotations

from smirror.units import format_size

MiB = 1 << 20
# "no limit" for a reference run: far above anything a bench run queues
UNBOUNDED = 64 << 30


# RSS a process may grow by beyond its memory budget: what the budget does
# not cover (the frame being built, sent, received and applied, socket
# buffers, the interpreter's own allocations); docs/memory.md states it
# (measured 10-17 MiB per process; the tests allow 24 MiB, as here)
RSS_OVERHEAD = 24 * MiB


# an idle `smirror serve` with a watched replication set, measured by
# `smbench run --mode daemons` on the build machine (source role; a target
# alone is about 40 MiB): what a daemon holds before its queues hold anything
DAEMON_IDLE_RSS = 72 * MiB


def queue_limit_for(engine_share: int) -> int:
    """The queue memory limit that keeps a daemon within ``engine_share``
    of RAM: the share minus its idle RSS and the overhead above its queues."""
    return max(0, engine_share - DAEMON_IDLE_RSS - RSS_OVERHEAD) // MiB * MiB


def rss_allowed(source: int, target: int, shared: bool) -> tuple[int | None, int | None]:
    """The RSS growth allowed to the source's and the target's process
    (None: unbounded, nothing to check). One process holding both sides
    (embedded) is allowed both limits and one overhead."""
    def one(limit: int) -> int | None:
        return None if limit >= UNBOUNDED else limit + RSS_OVERHEAD
    if shared:
        both = None if max(source, target) >= UNBOUNDED else source + target + RSS_OVERHEAD
        return both, both
    return one(source), one(target)


def replication_kwargs(source: int, target: int, disk: int) -> dict:
    """Keyword arguments of ``Replication(...)`` for these limits (bytes):
    one process holds both sides, so its budget is their sum, and each
    side keeps its own share as a cap under it."""
    return {"memory_limit": min(source + target, UNBOUNDED), "source_memory_limit": source,
            "target_memory_limit": target, "disk_queue_limit": disk}


def daemon_config(role: str, memory: int, disk: int) -> str:
    """TOML text for a daemon of ``role`` (source or target) whose memory
    budget is ``memory`` bytes."""
    return (f"[memory]\nlimit = {memory}\n"
            f"[queues]\ndisk_queue_limit = {disk}\nmin_free_space = 0\n")


def config_lines(source: int | None, target: int | None) -> list[str]:
    """The lines a user puts in each daemon's config for these limits."""
    lines = []
    if source is not None:
        lines.append(f'source daemon:  [memory] limit = "{size_text(source)}"')
    if target is not None:
        lines.append(f'target daemon:  [memory] limit = "{size_text(target)}"')
    return lines


def size_text(n: int) -> str:
    """A size as a config value: whole MiB when it is at least 1 MiB
    (rounded up: a limit is a floor of what the run needs), else KiB."""
    if n >= MiB:
        return f"{-(-n // MiB)}MiB"
    return f"{-(-n // 1024)}KiB"


def human(n: int | None) -> str:
    return "-" if n is None else format_size(int(n))
