"""A daemon's status answer as the table a person reads at a glance: what
``smirror status`` prints and DTCL's ``status`` statement prints."""
from __future__ import annotations

import time

from smirror.units import format_size


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def status_text(st: dict) -> str:
    """What 'smirror status' (and DTCL's status) prints of a status reply."""
    paused = "  (target side PAUSED)" if st.get("paused") else ""
    lines = [f"daemon {st['daemon']} on {st['listen']}{paused}"]
    mem = st.get("memory")
    if mem:
        lines.append(f"memory budget {format_size(mem['limit'])}: {format_size(mem['used'])} used "
                     f"(queues {format_size(mem['queue_bytes'])}, "
                     f"handoff {format_size(mem['handoff_bytes'])}), "
                     f"peak {format_size(mem['peak'])}, room refused {mem['refused']} time(s)")
    for name, m in sorted((st.get("mounts") or {}).items()):
        # a mount set's capture mount (docs/mount.md)
        lines.append(f"repset {name}: capture mount at {m['mount_point']}, {m['state']}"
                     + (f": {m['error']}" if m.get("error") else
                        f", {m.get('ops', 0)} ops, {m.get('failures', 0)} failed, "
                        f"{m.get('refused', 0)} refused"))
    if st["sources"]:
        lines += _source_rows(st["sources"])
    if st["targets"]:
        lines += _target_rows(st["targets"])
    for s in st["sources"]:
        lines += _source_notes(s)
    for t in st["targets"]:
        lines += _target_notes(t)
    for w in st.get("tasks_waiting", []):
        lines.append(f"    task {w['task']} waits for connection(s) {w['waiting_for']} to reach it "
                     f"({w['seconds']}s)")
    if st.get("tasks"):
        lines += _task_rows(st["tasks"][-10:])
    if not st["sources"] and not st["targets"]:
        lines.append("no connections")
    return "\n".join(lines)


def _source_rows(sources: list[dict]) -> list[str]:
    lines = [f"{'ID':>3}  {'REPSET':<12} {'TARGET':<21} {'STATE':<12} {'CAPTURED':>9} "
             f"{'DURABLE':>9} {'QUEUE MEM':>10} {'QUEUE DISK':>10} {'LAG P99':>8}"]
    for s in sources:
        if "repset" not in s:          # down (auto-disconnected), waiting to reconnect
            lines.append(f"{s['conid']:>3}  {'':<12} {'':<21} {s['state']}")
            continue
        lines.append(f"{s['conid']:>3}  {s['repset']:<12} {s['target']:<21} {s['state']:<12} "
                     f"{s['seq_captured']:>9} {s['seq_acked']:>9} "
                     f"{format_size(s['queue_mem_bytes']):>10} {format_size(s['queue_disk_bytes']):>10} "
                     f"{_ms(s.get('lag_ms_p99')):>8}")
    return lines


def _target_rows(targets: list[dict]) -> list[str]:
    lines = [f"{'ID':>3}  {'SOURCE':<16} {'MAP BASE':<30} {'APPLY':<13} {'RECEIVED':>9} "
             f"{'DURABLE':>9} {'APPLIED':>9} {'QUEUE MEM':>10} {'QUEUE DISK':>10}"]
    for t in targets:
        lines.append(f"{t['conid']:>3}  {t['source']:<16} {t['map_base']:<30} {t['apply_state']:<13} "
                     f"{t['seq_received']:>9} {t.get('seq_durable', 0):>9} {t['seq_applied']:>9} "
                     f"{format_size(t['queue_mem_bytes'] + t.get('handoff_bytes', 0)):>10} "
                     f"{format_size(t['queue_disk_bytes']):>10}")
    return lines


def _source_notes(s: dict) -> list[str]:
    """Errors, alerts, non-default options and mirror progress of a source
    connection, below the tables."""
    notes = []
    if s.get("last_error"):
        at = time.strftime(" (%H:%M:%S)", time.localtime(s["last_error_at"])) \
            if s.get("last_error_at") else ""
        notes.append(f"  ! connection {s['conid']}: last error{at}: {s['last_error']}")
    if s.get("alert"):
        notes.append(f"  ! connection {s['conid']} source queue: {s['alert']}")
    opts = s.get("options") or {}
    if opts.get("ignore_deletes", "off") != "off" or opts.get("orphans", "report") != "report":
        notes.append(f"    connection {s['conid']}: ignore deletes {opts['ignore_deletes']}, "
                     f"orphans {opts['orphans']}")
    m = s.get("mirror") or {}
    if m.get("state") == "scanning":
        notes.append(f"    connection {s['conid']}: mirror scanning: {m.get('ops', 0)} ops, "
                     f"{format_size(m.get('bytes_sent', 0))} of changed blocks queued so far")
    elif m.get("state") == "sending":
        notes.append(f"    connection {s['conid']}: mirror sending: {m['progress']:.0f}% of "
                     f"{m.get('ops', 0)} ops acknowledged")
    elif m.get("state") == "stopping":
        notes.append(f"  ! connection {s['conid']}: mirror stopping (mirror-stop): it ends after "
                     f"the entry it is queueing")
    elif m.get("state") == "stopped":
        notes.append(f"  ! connection {s['conid']}: mirror STOPPED (mirror-stop) after "
                     f"{m.get('entries_checked', 0)} entries, {m.get('ops', 0)} ops, "
                     f"{format_size(m.get('bytes_sent', 0))}: the target is NOT complete; "
                     f"'smirror mirror-start {s['conid']}' completes it")
    if m.get("orphans"):
        notes.append(f"    connection {s['conid']}: last mirror found {m['orphans']} orphan(s), "
                     f"{format_size(m.get('orphan_bytes', 0))} ({m.get('orphan_policy', 'report')})")
    return notes


def _target_notes(t: dict) -> list[str]:
    notes = []
    if t.get("alert"):
        notes.append(f"  ! connection {t['conid']} target queue: {t['alert']}")
    if t.get("waiting"):
        w = t["waiting"]
        notes.append(f"  ! connection {t['conid']}: op seq {w['seq']} {w['op']} {w['path']!r} "
                     f"waits: {w['why']}")
    if t.get("pause_reason") and t["pause_reason"] != "paused by request":
        notes.append(f"  ! connection {t['conid']}: {t['pause_reason']}")
    return notes


def _task_rows(tasks: list[dict]) -> list[str]:
    lines = [f"{'TASK':<20} {'STAGE':<12} {'STATE':<9} {'EXIT':>4} {'SECONDS':>8}  "
             "CONNECTIONS / ERROR"]
    for r in tasks:
        exit_ = "" if r["exit"] is None else str(r["exit"])
        lines.append(f"{r['task'][:20]:<20} {r['stage'].replace('_', '-'):<12} {r['state']:<9} "
                     f"{exit_:>4} {r['seconds']:>8.2f}  {','.join(map(str, r['conids']))}"
                     f"{'  ' + r['error'] if r['error'] else ''}")
    return lines
