"""What smirror is measured against in the same run: the workload's writes
made straight to the disk (``runner.run_direct``), a one-shot ``rsync -a``
of the tree it leaves, and lsyncd (``default.rsync``, delay 0, mtimes to the
nanosecond) replicating it live - the last two where they are installed."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .verify import compare_trees
from .workloads import WORKLOADS, NullCtl, Params, Writer


def rsync_copy(root) -> dict | None:
    """Seconds and MB/s of ``rsync -a`` of ``root`` to an empty directory on
    the same disk; None when rsync is not installed."""
    rsync = shutil.which("rsync")
    if rsync is None:
        return None
    dst = Path(tempfile.mkdtemp(prefix="smbench-rsync-", dir=os.path.dirname(os.fspath(root))))
    try:
        t0 = time.monotonic()
        r = subprocess.run([rsync, "-a", f"{os.fspath(root)}/", f"{dst}/"], capture_output=True,
                           text=True, timeout=600)
        seconds = time.monotonic() - t0
        if r.returncode != 0:
            return {"baseline": "rsync",
                    "error": f"rsync exited with {r.returncode}: {r.stderr.strip()[-500:]}"}
        nbytes = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(dst) for f in fs)
        return {"baseline": "rsync", "bytes": nbytes, "elapsed_s": round(seconds, 4),
                "throughput_mb_s": round(nbytes / max(seconds, 1e-9) / 1e6, 3)}
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def _lua(s) -> str:
    return json.dumps(os.fspath(s))          # a JSON string is a valid Lua string here


def lsyncd_run(workload: str, params: Params, base_dir=None, match_timeout: float = 30.0) -> dict | None:
    """The workload under lsyncd (delay 0, ``--modify-window=-1`` so a file
    rewritten within the second it was copied is not left stale): its
    throughput counted to the moment the target matched, and that time
    after the last write. None when lsyncd or rsync is not installed."""
    lsyncd, rsync = shutil.which("lsyncd"), shutil.which("rsync")
    if lsyncd is None or rsync is None:
        return None
    work = Path(tempfile.mkdtemp(prefix=f"smbench-lsyncd-{workload}-", dir=base_dir))
    src, dst = work / "src", work / "dst"
    src.mkdir()
    dst.mkdir()
    config = work / "lsyncd.lua"
    config.write_text(
        f"settings {{\n    logfile = {_lua(work / 'lsyncd.log')},\n}}\n"
        f"sync {{\n    default.rsync,\n    source = {_lua(src)},\n    target = {_lua(dst)},\n"
        f"    delay = 0,\n    maxDelays = 1,\n"
        f"    rsync = {{ binary = {_lua(rsync)}, _extra = {{ \"--modify-window=-1\" }} }},\n}}\n")
    out = open(work / "lsyncd.out", "wb")
    proc = subprocess.Popen([lsyncd, "-nodaemon", str(config)], stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        log = work / "lsyncd.log"
        deadline = time.monotonic() + 60
        while not (log.exists() and b"finished." in log.read_bytes()):   # "Startup of ... finished."
            if proc.poll() is not None or time.monotonic() > deadline:
                return {"baseline": "lsyncd", "error": "lsyncd did not start: "
                        + (work / "lsyncd.out").read_text(errors="replace")[-500:]}
            time.sleep(0.02)
        wl = WORKLOADS[workload](params)
        w = Writer(src)
        wl.setup(w)
        t0 = time.monotonic()
        wl.run(w, NullCtl(), t0)
        t_written = time.monotonic()
        start = t0 + wl.phases.get("burst", 0.0)
        while compare_trees(src, dst, limit=1):
            if time.monotonic() - t_written > match_timeout:
                stale = len(compare_trees(src, dst, limit=1000))
                return {"baseline": "lsyncd", "bytes_written": wl.bytes_written,
                        "time_to_match_s": None, "throughput_mb_s": None,
                        "error": f"the target did not match within {match_timeout:.0f} s "
                                 f"({stale} path(s) differ)"}
            time.sleep(0.02)
        t_match = time.monotonic()
        return {"baseline": "lsyncd", "bytes_written": wl.bytes_written,
                "time_to_match_s": round(t_match - t_written, 4),
                "elapsed_s": round(t_match - start, 4),
                "throughput_mb_s": round(wl.bytes_written / max(t_match - start, 1e-9) / 1e6, 3)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        out.close()
        shutil.rmtree(work, ignore_errors=True)
