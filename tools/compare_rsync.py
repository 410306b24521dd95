#!/usr/bin/env python3
"""smirror mirror vs rsync, side by side, as whole commands (process start
included), on one generated tree with the data in the page cache.

    python tools/compare_rsync.py [--scale 1.0] [--repeat 3] [--workdir /tmp/smirror-bench]
                                  [--json-out results.json]

Tree (tools/gen_tree.py): ~2,000 files of 1 KiB - 4 MiB plus one 1 GiB file
(``--scale`` multiplies the file count and the big file's size). Cases:

1. initial full copy to an empty DST:       smirror mirror          vs rsync -a
2. unchanged tree, checksums:               smirror mirror --checksum vs rsync -a --checksum
3. unchanged tree, quick check:             smirror mirror --different vs rsync -a
4. 1% of the 8 KiB blocks of the big file changed:
                                            smirror mirror --different --checksum
                                            vs rsync -a --no-whole-file --inplace
5. 200 of the small files changed:         smirror mirror --different vs rsync -a

Each tool mirrors into its own DST, from the same SRC state; every case is
repeated (``--repeat``; cases 4 and 5 change fresh blocks/files each time,
the same for both tools), the order of the two tools alternates, and the
best time is kept. Before every timed run SRC and that tool's DST are read
into the page cache and dirty pages are flushed (sync), outside the timing.
smirror runs as ``python -m smirror`` with compiled .pyc files, as an
installed package would. Ratio = smirror time / rsync time (below 1:
smirror is faster).

Extra information, never used for the ratios: the interpreter's own
start-up here (``python -c pass``, and with ``-S``: without site-packages'
.pth files), and for the unchanged-tree cases 2 and 3 (and case 4, whose
timed runs print JSON anyway) the time the command spends from
``smirror.cli.main()`` on, read from ``--json``'s ``main_seconds`` in
separate, untimed runs of the same command with ``--json`` added.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
from support import gen_tree  # noqa: E402

GOALS = {1: 0.8, 2: 0.33, 3: 0.8, 4: 0.33, 5: 0.8}


def smirror_cmd(*args):
    return [sys.executable, "-m", "smirror", "mirror", "--quiet", *map(str, args)]


def run_timed(cmd, env=None) -> tuple[float, bytes]:
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): "
                         f"{proc.stderr.decode(errors='replace')}")
    return elapsed, proc.stdout


def best_wall(cmd, n, env=None) -> float:
    """Best of ``n`` wall times of a command (no page-cache preparation)."""
    return min(run_timed(cmd, env)[0] for _ in range(n))


def warm(path):
    """Read a tree so it sits in the page cache."""
    subprocess.run(["sh", "-c", f"find '{path}' -type f -exec cat {{}} + > /dev/null"],
                   check=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/smirror-bench")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the generated tree")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a tree kept by --keep with the same scale (faster reruns)")
    ap.add_argument("--cases", default="1,2,3,4,5", help="which cases to run, e.g. 2,3")
    args = ap.parse_args(argv)

    rsync = shutil.which("rsync")
    if rsync is None:
        raise SystemExit("rsync is not installed (apt-get install rsync)")
    work = Path(args.workdir)
    src, dst_s, dst_r = work / "src", work / "dst-smirror", work / "dst-rsync"
    cases = {int(c) for c in args.cases.split(",")}
    marker = work / "tree.json"
    t0 = time.perf_counter()
    if args.reuse and marker.exists() and json.loads(marker.read_text())["scale"] == args.scale:
        info = json.loads(marker.read_text())["info"]
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        info = gen_tree.make_bench_tree(src, scale=args.scale)
        marker.write_text(json.dumps({"scale": args.scale, "info": info}))
    print(f"tree: {len(info['files'])} files + big file "
          f"{os.path.getsize(info['big']) / 2**20:.0f} MiB, {info['bytes'] / 2**30:.2f} GiB "
          f"(generated in {time.perf_counter() - t0:.1f} s)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    # compile the package's .pyc once, as an installed package has them
    subprocess.run([sys.executable, "-c",
                    "import smirror.cli.main, smirror.mirror.engine, smirror.kernels.checksum"],
                   env=env, check=True)
    results = {}
    # fresh change seeds every run: a reused tree must really change again
    seed_base = int(time.time()) % 1_000_000 * 10

    def record(case, name, s_times, r_times, extra=None):
        s, r = min(s_times), min(r_times)
        results[case] = {"case": name, "smirror_s": s, "rsync_s": r, "ratio": s / r,
                         "goal": GOALS[case], "smirror_all": s_times, "rsync_all": r_times,
                         **(extra or {})}
        print(f"{case}. {name:<44} smirror {s:8.3f} s  rsync {r:8.3f} s  "
              f"ratio {s / r:5.2f}  (goal <= {GOALS[case]})", flush=True)

    def in_process(case, outs):
        """Record the best main_seconds / seconds of --json outputs (extra
        information beside the timed whole commands)."""
        data = [json.loads(o) for o in outs]
        main_s = min(d["main_seconds"] for d in data)
        run_s = min(d["seconds"] for d in data)
        results[case]["in_process"] = {"main_seconds": main_s, "mirror_run_seconds": run_s,
                                       "main_all": [d["main_seconds"] for d in data]}
        print(f"   in-process, from smirror.cli.main() on: {main_s:.3f} s "
              f"(the mirror's run: {run_s:.3f} s; untimed --json runs, not the ratio)")

    def untimed_json_runs(case_args):
        """The same smirror command with --json, on the same (unchanged)
        state, each after the same cache warming; for in_process()."""
        outs = []
        for _ in range(args.repeat):
            warm(src)
            warm(dst_s)
            outs.append(run_timed(smirror_cmd(*case_args, "--json", src, dst_s), env)[1])
        return outs

    # reference only: what any Python command costs here before it does anything
    n_ref = max(5, 3 * args.repeat)
    startup = {"python -c pass": best_wall([sys.executable, "-c", "pass"], n_ref),
               "python -S -c pass": best_wall([sys.executable, "-S", "-c", "pass"], n_ref),
               "python -c 'import smirror.cli.main, smirror.mirror.engine'":
                   best_wall([sys.executable, "-c", "import smirror.cli.main, smirror.mirror.engine"],
                             n_ref, env)}
    print("start-up, best of", n_ref, "(reference, not in any ratio): "
          + "; ".join(f"{k} {v * 1000:.0f} ms" for k, v in startup.items()), flush=True)

    def pair(case_args_s, case_args_r, setup=None, warm_dst=True, repeat=None):
        """Time smirror and rsync on the same starting state, alternating
        which goes first; every run starts with SRC and its DST read into
        the page cache (this VM's memory reclaim evicts cold pages)."""
        s_t, r_t, outs = [], [], []
        for i in range(repeat or args.repeat):
            if setup:
                setup(i)
            order = [("s", dst_s), ("r", dst_r)]
            if i % 2:
                order.reverse()
            for tool, dst in order:
                warm(src)
                if warm_dst and dst.exists():
                    warm(dst)
                if tool == "s":
                    t, out = run_timed(smirror_cmd(*case_args_s, src, dst), env)
                    s_t.append(t)
                    outs.append(out)
                else:
                    r_t.append(run_timed([rsync, *case_args_r, f"{src}/", f"{dst}/"])[0])
        return s_t, r_t, outs

    # 1. initial full copy
    if 1 in cases:
        def clear(_):
            for d in (dst_s, dst_r):
                shutil.rmtree(d, ignore_errors=True)
            os.sync()
        s_t, r_t, _ = pair([], ["-a"], setup=clear, warm_dst=False)
        record(1, "initial full copy", s_t, r_t)

    # 2. unchanged tree, checksum
    if 2 in cases:
        s_t, r_t, _ = pair(["--checksum"], ["-a", "--checksum"])
        record(2, "unchanged tree, --checksum", s_t, r_t)
        in_process(2, untimed_json_runs(["--checksum"]))

    # 3. unchanged tree, quick check
    if 3 in cases:
        s_t, r_t, _ = pair(["--different"], ["-a"])
        record(3, "unchanged tree, quick check", s_t, r_t)
        in_process(3, untimed_json_runs(["--different"]))

    # 4. 1% of 8 KiB blocks changed in the big file (fresh blocks each round)
    if 4 in cases:
        changed_bytes = []

        def change_big(i):
            changed_bytes.append(gen_tree.change_blocks(info["big"], 0.01, 8192,
                                                        seed=seed_base + i))
        s_t, r_t, outs = pair(["--different", "--checksum", "--json"],
                              ["-a", "--no-whole-file", "--inplace"], setup=change_big)
        written = [json.loads(o)["bytes_written"] for o in outs]
        record(4, "1% of 8 KiB blocks of the big file changed", s_t, r_t,
               {"changed_bytes": changed_bytes, "smirror_bytes_written": written,
                "written_over_changed": [w / c for w, c in zip(written, changed_bytes, strict=True)]})
        in_process(4, outs)
        print(f"   bytes written / bytes changed: "
              f"{', '.join(f'{w / c:.3f}' for w, c in zip(written, changed_bytes, strict=True))}")

    # 5. 200 small files changed (other files each round)
    if 5 in cases:
        n_small = max(1, int(200 * min(1.0, len(info["files"]) / 2000)))
        s_t, r_t, _ = pair(["--different"], ["-a"],
                           setup=lambda i: gen_tree.change_small(info["files"], n_small,
                                                                 seed=seed_base + 5 + i))
        record(5, f"{n_small} small files changed", s_t, r_t)

    # both targets must equal the source
    if 1 not in cases and not dst_s.exists():
        raise SystemExit("cases without 1 need a kept tree with both targets (--keep, --reuse)")
    for d in (dst_s, dst_r):
        diff = subprocess.run([rsync, "-a", "--checksum", "--dry-run", "--itemize-changes",
                               "--delete", f"{src}/", f"{d}/"], capture_output=True, check=True)
        if diff.stdout:
            listed = diff.stdout.decode(errors="replace")
            raise SystemExit(f"{d} differs from the source:\n{listed}")

    summary = {"scale": args.scale, "repeat": args.repeat, "files": len(info["files"]),
               "bytes": info["bytes"], "cpus": os.cpu_count(),
               "rsync": subprocess.run([rsync, "--version"], capture_output=True,
                                       text=True).stdout.splitlines()[0],
               "python": sys.version.split()[0], "startup_reference_s": startup,
               "cases": results,
               "goals_met": all(r["ratio"] <= r["goal"] for r in results.values())}
    out = Path(args.json_out) if args.json_out else work.parent / "smirror-vs-rsync.json"
    out.write_text(json.dumps(summary, indent=2))
    print(f"results: {out}; goals {'met' if summary['goals_met'] else 'NOT all met'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
