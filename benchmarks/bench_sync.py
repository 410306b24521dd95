"""The cost of the synchronous modes (issue 16), against direct writes in
the same run: an application (its own process) does N transactions of one
8 KiB write and one fsync, on

* ``direct``: the backing directory itself (the baseline: a local fsync);
* ``async``: ``Replication(BACKING, DST, mount=MNT)``: the fsync is local,
  the target follows behind;
* ``fsync``: the same with ``sync="fsync"``: each fsync returns once the
  target made it durable (queue segment or applied file fsynced there);
* ``every-write``: ``sync="every-write"``: the write waits too.

Figures: fsync latency p50 / p99 (ms) and write+fsync transactions per
second (and MiB/s of 8 KiB writes). Source and target share this machine
and its disk, so each synchronous fsync costs the local fsync plus the
target's own (a target on another machine adds the network round trip).

    python benchmarks/bench_sync.py            # a table
    python -m pytest benchmarks/bench_sync.py -q -s

Needs root, /dev/fuse, fusermount3 and smirror built with libfuse3-dev. N = $SMIRROR_BENCH_SYNC_N
(default 1000); each figure is the best of ROUNDS ($SMIRROR_BENCH_ROUNDS,
default 2) by throughput.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

N = int(os.environ.get("SMIRROR_BENCH_SYNC_N", "1000"))
ROUNDS = int(os.environ.get("SMIRROR_BENCH_ROUNDS", "2"))
MODES = ("direct", "async", "fsync", "every-write")

# the application: N x (8 KiB pwrite, fsync); prints its figures as JSON
APP = r"""
import json, os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
buf = os.urandom(8192)
fd = os.open(os.path.join(d, "tx"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
lat = []
t0 = time.perf_counter()
for i in range(n):
    os.pwrite(fd, buf, (i % 4096) * 8192)
    t = time.perf_counter()
    os.fsync(fd)
    lat.append(time.perf_counter() - t)
total = time.perf_counter() - t0
os.close(fd)
lat.sort()
print(json.dumps({"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
                  "tx_per_s": n / total, "mib_per_s": n * 8192 / total / 2**20}))
"""


def _app(directory) -> dict:
    out = subprocess.run([sys.executable, "-c", APP, str(directory), str(N)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def run_mode(mode: str, base: str) -> dict:
    back, dst, mnt = (os.path.join(base, x) for x in ("back", "dst", "mnt"))
    os.makedirs(back)
    if mode == "direct":
        return _app(back)
    from smirror.replication import Replication
    rep = Replication(back, dst, mount=mnt, sync=mode, mirror="none",
                      state_dir=os.path.join(base, "state"))
    rep.start()
    try:
        return _app(mnt)
    finally:
        rep.stop()


def measure() -> dict:
    results = {}
    for mode in MODES:
        best = None
        for _ in range(ROUNDS):
            base = tempfile.mkdtemp(prefix="smirror-bench-sync-", dir=os.environ.get("TMPDIR", "/var/tmp"))
            try:
                r = run_mode(mode, base)
            finally:
                shutil.rmtree(base, ignore_errors=True)
            if best is None or r["tx_per_s"] > best["tx_per_s"]:
                best = r
        results[mode] = best
    return results


def table(results: dict) -> str:
    direct = results["direct"]["tx_per_s"]
    lines = [f"8 KiB write + fsync, {N} transactions (best of {ROUNDS})",
             f"{'MODE':<12} {'FSYNC P50':>10} {'FSYNC P99':>10} {'TX/S':>8} {'MiB/S':>7} {'VS DIRECT':>9}"]
    for mode, r in results.items():
        lines.append(f"{mode:<12} {r['p50_ms']:>8.2f}ms {r['p99_ms']:>8.2f}ms {r['tx_per_s']:>8.0f} "
                     f"{r['mib_per_s']:>7.2f} {r['tx_per_s'] / direct:>9.2f}")
    return "\n".join(lines)


def _usable() -> str:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        return "needs root, /dev/fuse and fusermount3"
    try:
        import smirror.capture.mount._fuse  # noqa: F401
    except ImportError:
        return "needs smirror built with libfuse3-dev (its FUSE binding)"
    return ""


def test_sync_modes_against_direct_writes():
    import pytest
    why = _usable()
    if why:
        pytest.skip(why)
    results = measure()
    print("\n" + table(results))
    # a synchronous fsync waits for the target's own fsync: it cannot beat async
    assert results["fsync"]["p50_ms"] >= results["async"]["p50_ms"] * 0.5


if __name__ == "__main__":
    why = _usable()
    if why:
        sys.exit(f"bench_sync: {why}")
    print(table(measure()))
