"""``smbench advise``: the application note's memory reasoning with this
machine's numbers.

The note: replication queues exactly when the application is busiest, and
the busiest application (a database) takes all the RAM it can by default.
So RAM is split three ways on purpose: the application gets a fixed share
(512 MB of 1 GB), the replication engine a fixed share (256 MB), and the
operating system and everything else the rest (256 MB) - and nothing may
add up to more than the RAM, or the machine swaps when it can least afford
to. Here the split is RAM minus what the largest processes hold now (or the
reserve asked for) and a quarter for the system; the engine gets what is
left, at most a quarter of RAM, as in the note; its queues get that share
minus what the daemon holds itself (``limits.queue_limit_for``).
"""
from __future__ import annotations

import psutil

from smirror.units import format_size

from . import limits

MiB = 1 << 20


def largest_processes(n: int = 5) -> list[tuple[str, int, int]]:
    """(name, pid, RSS) of the ``n`` processes holding the most memory."""
    procs = []
    for p in psutil.process_iter(["name", "memory_info"]):
        mi = p.info.get("memory_info")
        if mi is not None:
            procs.append((p.info.get("name") or "?", p.pid, mi.rss))
    return sorted(procs, key=lambda x: -x[2])[:n]


def advise(app_reserve: int | None = None) -> dict:
    vm = psutil.virtual_memory()
    ram = vm.total
    top = largest_processes()
    # what the applications need: the reserve asked for, else what the
    # largest processes hold now (a database would take more when busy)
    app = app_reserve if app_reserve is not None else sum(rss for _, _, rss in top)
    os_share = max(ram // 4, 256 * MiB)         # the note leaves a quarter for the OS and the rest
    free_for_engine = max(0, ram - app - os_share)
    engine = min(ram // 4, free_for_engine)     # the note gives the engine a quarter of RAM
    engine = max(engine, 0) // MiB * MiB
    # of the engine's share, the daemon itself holds its idle RSS and the
    # overhead above its queues; the rest is the queue memory limit
    queues = limits.queue_limit_for(engine)
    return {"ram": ram, "available": vm.available, "largest_processes": top,
            "app_reserve": app, "app_reserve_given": app_reserve is not None,
            "os_share": os_share, "engine": engine, "daemon_idle": limits.DAEMON_IDLE_RSS,
            "overhead": limits.RSS_OVERHEAD, "queue_limit": queues,
            "config_lines": limits.config_lines(queues, queues) if queues else []}


def text(a: dict) -> str:
    f = format_size
    lines = [f"RAM: {f(a['ram'])} ({f(a['available'])} available now)",
             "largest processes now:"]
    lines += [f"  {name:<20} pid {pid:<8} {f(rss)}" for name, pid, rss in a["largest_processes"]]
    how = "as given (--app-reserve)" if a["app_reserve_given"] else \
        "what the largest processes hold now; a database takes more when busy: give --app-reserve"
    lines += [
        "",
        "The application note's reasoning: the engine queues exactly when the application is",
        "busiest, and a busy database takes all the RAM it may. So cap the application, give the",
        "engine a fixed share, and leave the rest to the system; together never more than the RAM",
        "(1 GB server: 512 MB to SQL Server, 256 MB to the engine, 256 MB to the OS and the rest).",
        "",
        f"on this machine: application {f(a['app_reserve'])} ({how}),",
        f"  operating system and the rest {f(a['os_share'])} (a quarter of RAM, at least 256 MiB),",
        f"  engine {f(a['engine'])} (what is left, at most a quarter of RAM):",
        f"    the daemon itself {f(a['daemon_idle'])} idle + {f(a['overhead'])} working above its queues,",
        f"    queue memory limit {f(a['queue_limit'])}",
    ]
    if a["queue_limit"] < 16 * MiB:
        lines.append("  too little is left for the engine: its queues will spill to disk under load; "
                     "lower the application's share or add RAM")
    if a["config_lines"]:
        lines += ["", "set (then check with 'smbench tune WORKLOAD' for your workload):"]
        lines += [f"  {line}" for line in a["config_lines"]]
    return "\n".join(lines)
