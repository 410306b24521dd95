"""smbench as a user runs it (``python -m smirror.bench.cli``, real files,
real replication): the workload list, bad input, the quick suite with every
field of its JSON checked, compare, and the tuner's correctness on a burst
whose memory need is known by construction."""
import json
import os
import subprocess
import sys
import time

import pytest

from smirror.bench import limits
from smirror.bench.suite import METRICS, SUITE

MiB = 1 << 20


def smbench(*args, timeout=300):
    """The smbench command (the console script's module), as a user runs it."""
    return subprocess.run([sys.executable, "-m", "smirror.bench.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_list_names_every_workload_with_one_line():
    r = smbench("list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(SUITE)
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)


@pytest.mark.parametrize("args, message", [
    (["run", "nosuch"], "unknown workload 'nosuch': choose one of bulk, smallfiles"),
    (["tune", "nosuch"], "unknown workload 'nosuch'"),
    (["run", "bulk", "--duration", "3x"], "--duration: expected a duration like 30s"),
    (["run", "bulk", "--duration", "0s"], "--duration must be above 0"),
    (["run", "bulk", "--source-memory", "12QB"], "--source-memory: expected a size like"),
    (["run", "bulk", "--target-memory", "-1"], "--target-memory: expected a size like"),
    (["run", "burst", "--burst-size", "lots"], "--burst-size: expected a size like"),
    (["run", "bulk", "--pause-target"], "apply to the burst workload only"),
    (["run", "bulk", "--scale", "0"], "--scale: expected a number above 0"),
    (["tune", "burst", "--throughput-within", "150%"], "--throughput-within: must be between"),
    (["tune", "burst", "--slo-lag-p99", "soon"], "--slo-lag-p99: expected a duration"),
    (["tune", "burst", "--mode", "daemons", "--no-spill"], "--no-spill needs --mode embedded"),
    (["advise", "--app-reserve", "much"], "--app-reserve: expected a size like"),
    (["suite", "--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_input_is_a_clear_error_and_exit_2(args, message):
    r = smbench(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_compare_of_something_that_is_no_suite_result(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.json").write_text("not json")
    r = smbench("compare", tmp_path / "a.json", tmp_path / "b.json")
    assert r.returncode == 2 and "a.json: not an smbench suite result" in r.stderr, r.stderr
    r = smbench("compare", tmp_path / "missing.json", tmp_path / "a.json")
    assert r.returncode == 2 and "missing.json: No such file or directory" in r.stderr, r.stderr


def test_advise_reads_this_machine():
    r = smbench("advise", "--app-reserve", "1GiB", "--json", "-")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    import psutil
    assert data["ram"] == psutil.virtual_memory().total
    assert data["app_reserve"] == 1 << 30
    # the note's split: application + OS and the rest + engine never exceed the RAM
    assert data["app_reserve"] + data["os_share"] + data["engine"] <= data["ram"]
    assert data["engine"] <= data["ram"] // 4
    # the queues get the engine's share minus what the daemon holds itself
    assert data["queue_limit"] == limits.queue_limit_for(data["engine"]) < data["engine"]
    assert f'[memory] limit = "{limits.size_text(data["queue_limit"])}"' in r.stdout
    assert "512 MB to SQL Server" in r.stdout and "[memory] limit" in r.stdout


# -- the quick suite: every field of its JSON ---------------------------------------

def _num(v, lo=0.0):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= lo


def check_side(side: dict, shared: bool):
    assert set(side) == {"memory_limit", "queue_mem_peak", "queue_disk_peak", "spilled_frames",
                         "rss_idle", "rss_peak", "rss_growth", "cpu_s", "rss_growth_allowed",
                         "rss_within_limit"}
    assert side["rss_growth_allowed"] is None and side["rss_within_limit"] is None   # unbounded
    assert side["memory_limit"] == limits.UNBOUNDED
    for k in ("queue_mem_peak", "queue_disk_peak", "rss_growth", "cpu_s"):
        assert _num(side[k]), (k, side)
    # queue peaks are sampled (every 20 ms): a queue that drains faster can show 0
    assert side["queue_mem_peak"] <= 64 * MiB
    assert isinstance(side["spilled_frames"], int) and side["spilled_frames"] == 0   # unbounded
    assert side["rss_peak"] >= side["rss_idle"] > 10 * MiB       # a Python process with the engine
    assert side["rss_growth"] == side["rss_peak"] - side["rss_idle"]


def check_run(r: dict, name: str):
    assert set(r) == {"workload", "mode", "params", "bytes_written", "ops", "write_s", "drain_s",
                      "elapsed_s", "throughput_mb_s", "ops_per_s", "lag_ms", "source", "target",
                      "shared_process", "cpu_s", "cpu_s_per_gb", "bytes_sent", "auto_disconnects",
                      "paused_s", "drain_after_resume_s", "target_equals_source", "differences",
                      "errors"}
    assert r["workload"] == name and r["mode"] == "embedded"
    assert r["params"]["quick"] is True and r["params"]["duration_s"] == 2.0
    assert r["target_equals_source"] is True and r["differences"] == [] and r["errors"] == []
    assert isinstance(r["ops"], int) and r["ops"] > 0
    assert isinstance(r["bytes_written"], int) and r["bytes_written"] > 0
    # everything written crossed the link (framing only adds; data is incompressible)
    assert r["bytes_sent"] >= r["bytes_written"]
    assert r["elapsed_s"] > 0 and abs(r["elapsed_s"] - r["write_s"] - r["drain_s"]) < 0.01
    assert r["throughput_mb_s"] == pytest.approx(r["bytes_written"] / r["elapsed_s"] / 1e6, rel=0.01)
    assert r["ops_per_s"] == pytest.approx(r["ops"] / r["elapsed_s"], rel=0.01, abs=0.1)
    lag = r["lag_ms"]
    assert lag["probes"] > 0 and lag["probes_missing"] == 0
    assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    assert r["shared_process"] is True            # embedded: both engines in one process
    check_side(r["source"], True)
    check_side(r["target"], True)
    assert r["source"]["rss_peak"] == r["target"]["rss_peak"]
    assert _num(r["cpu_s"]) and r["cpu_s"] > 0
    assert r["cpu_s_per_gb"] == pytest.approx(r["cpu_s"] / (r["bytes_written"] / 1e9), rel=0.01)
    assert r["auto_disconnects"] == 0
    if name == "backup-window":
        # paused for a while (35% of the run when the workload keeps its
        # schedule; under load its events come late), then the backlog drained
        assert 0 < r["paused_s"] <= r["write_s"]
        assert _num(r["drain_after_resume_s"])
        assert r["target"]["queue_disk_peak"] > 0        # the durable target queue held the backlog
        assert lag["max"] >= 500 * r["paused_s"]          # a probe waited out (most of) the pause
    else:
        assert r["paused_s"] is None and r["drain_after_resume_s"] is None


def check_summary(summary: dict, runs: list):
    assert set(summary) == set(METRICS)
    for s in summary.values():
        assert set(s) == {"mean", "min", "max", "spread", "n"}
        assert s["n"] == len(runs) == 2
        assert s["min"] <= s["mean"] <= s["max"]
        assert s["spread"] is None or s["spread"] == pytest.approx(s["max"] / s["min"] - 1)
    assert summary["throughput_mb_s"]["mean"] == pytest.approx(
        sum(r["throughput_mb_s"] for r in runs) / 2)


def test_quick_suite_within_60_s_with_every_json_field_checked(tmp_path):
    out, pb = tmp_path / "suite.json", tmp_path / "pytest-benchmark.json"
    t0 = time.monotonic()
    r = smbench("suite", "--quick", "--json", out, "--benchmark-json", pb, timeout=180)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert elapsed < 60, f"smbench suite --quick took {elapsed:.0f} s"
    data = json.loads(out.read_text())
    assert set(data) == {"suite", "workloads"}
    s = data["suite"]
    assert s["quick"] is True and s["repeats"] == 2 and s["mode"] == "embedded"
    assert s["host"]["cpus"] == os.cpu_count() and s["host"]["ram"] > 0
    assert sorted(data["workloads"]) == sorted(SUITE)
    for name, w in data["workloads"].items():
        assert set(w) == {"runs", "summary", "baselines", "ratios"}
        for run in w["runs"]:
            check_run(run, name)
        check_summary(w["summary"], w["runs"])
        base = w["baselines"]
        d = base["direct"]
        assert d["workload"] == name and d["bytes_written"] > 0 and d["throughput_mb_s"] > 0
        assert len(d["runs"]) == 2
        assert w["ratios"]["direct"] == pytest.approx(
            w["summary"]["throughput_mb_s"]["mean"] / d["throughput_mb_s"], rel=0.01)
        for kind, tool, wanted in (("rsync", "rsync", ("bulk", "smallfiles")),
                                   ("lsyncd", "lsyncd", ("smallfiles",))):
            b = base[kind]
            if name not in wanted:
                assert b is None and w["ratios"][kind] is None
            elif shutil_which(tool) is None:
                assert "not installed" in b["skipped"] and w["ratios"][kind] is None
            else:
                assert b.get("error") is None, b
                assert b["throughput_mb_s"] > 0 and w["ratios"][kind] > 0
        if name == "smallfiles" and base["lsyncd"].get("throughput_mb_s"):
            assert base["lsyncd"]["time_to_match_s"] >= 0
    # the table names every workload
    for name in SUITE:
        assert name in r.stdout
    # the same figures in pytest-benchmark's format
    p = json.loads(pb.read_text())
    assert [b["name"] for b in p["benchmarks"]] == [f"smbench_{n}" for n in SUITE]
    for b in p["benchmarks"]:
        assert b["stats"]["rounds"] == 2 and b["stats"]["min"] <= b["stats"]["mean"] <= b["stats"]["max"]

    # compare: a result against itself moves nothing; a slower copy is a regression
    same = smbench("compare", out, out)
    assert same.returncode == 0 and "no regression" in same.stdout, same.stdout + same.stderr
    slower = json.loads(out.read_text())
    t = slower["workloads"]["bulk"]["summary"]["throughput_mb_s"]
    t["mean"] = t["mean"] * t["min"] / t["max"] / 2     # twice as far down as the repeats spread
    (tmp_path / "slower.json").write_text(json.dumps(slower))
    r = smbench("compare", out, tmp_path / "slower.json", "--json", tmp_path / "cmp.json")
    assert r.returncode == 1 and "REGRESSION" in r.stdout, r.stdout + r.stderr
    cmp = json.loads((tmp_path / "cmp.json").read_text())
    assert [(x["workload"], x["metric"]) for x in cmp["regressions"]] == [("bulk", "throughput_mb_s")]


def shutil_which(name):
    import shutil
    return shutil.which(name)


# -- the tuner ----------------------------------------------------------------------

def test_tune_finds_the_memory_a_paused_burst_needs_within_10_percent(tmp_path):
    """With the target paused, every frame of the burst waits in the target
    queue: the memory it needs not to spill is the burst's size (plus a
    little framing), known by construction."""
    burst = 8 * MiB
    try:
        import matplotlib  # noqa: F401 - the optional extra 'bench'
        plot = ["--plot", tmp_path / "tune.png"]
    except ImportError:
        plot = []
    r = smbench("tune", "burst", "--burst-size", burst, "--pause-target", "--duration", "2s",
                "--side", "target", "--no-spill", "--slo-lag-p99", "off", "--throughput-within", "off",
                "--json", tmp_path / "tune.json", *plot, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    if plot:
        assert (tmp_path / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "tune.json").read_text())
    found = result["recommended"]["target"]
    assert abs(found - burst) <= 0.10 * burst, (found, r.stdout)
    # every trial was printed as it finished, and the search went both ways
    trials = result["trials"]
    assert sum(line.startswith("trial") for line in r.stdout.splitlines()) == len(trials)
    assert any(t["ok"] for t in trials) and any(not t["ok"] for t in trials)
    for t in trials:
        # below the burst's size it spills, at or above it does not
        assert t["ok"] == (t["spilled_frames"] == 0)
        assert t["ok"] == (t["limit"] >= found)
    assert f'[memory] limit = "{limits.size_text(found)}"' in r.stdout


def test_run_in_daemons_mode_pauses_the_target_daemon_and_measures_each_side(tmp_path):
    """Two 'smirror serve' processes, the watcher capturing plain writes; the
    backup window pauses the target daemon and the drain after the resume is
    measured; RSS and CPU are each daemon's own."""
    r = smbench("run", "backup-window", "--mode", "daemons", "--quick", "--duration", "3s",
                "--json", tmp_path / "run.json", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["mode"] == "daemons" and data["shared_process"] is False
    assert data["target_equals_source"] is True and data["errors"] == []
    assert 0 < data["paused_s"] <= data["write_s"] and data["drain_after_resume_s"] is not None
    assert data["lag_ms"]["max"] >= 500 * data["paused_s"]      # a probe waited out (most of) the pause
    assert data["bytes_sent"] > 0 and data["auto_disconnects"] == 0
    for side in ("source", "target"):
        assert data[side]["rss_idle"] > 10 * MiB and data[side]["cpu_s"] > 0
        assert data[side]["spilled_frames"] is None      # the daemons' status does not count them
    assert data["source"]["rss_idle"] != data["target"]["rss_idle"]   # two processes
    assert "backup-window (daemons)" in r.stdout and "drain after resume" in r.stdout


def test_a_bounded_run_spills_past_its_limits_and_checks_rss_against_them(tmp_path):
    """A paused 16 MiB burst with a 2 MiB target queue: the queue holds at
    most its limit plus one frame in memory (invariant 4), spills the rest,
    and the RSS growth is judged against the limits plus the stated overhead."""
    r = smbench("run", "burst", "--quick", "--duration", "2s", "--pause-target",
                "--source-memory", "4MiB", "--target-memory", "2MiB", "--json", tmp_path / "r.json")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    t = data["target"]
    assert t["memory_limit"] == 2 * MiB and data["source"]["memory_limit"] == 4 * MiB
    assert t["spilled_frames"] > 0 and t["queue_disk_peak"] >= 14 * MiB
    assert t["queue_mem_peak"] <= 2 * MiB + MiB + 4096          # limit + one frame
    assert data["target_equals_source"] is True
    allowed = 6 * MiB + limits.RSS_OVERHEAD                     # one process: both limits
    for side in ("source", "target"):
        assert data[side]["rss_growth_allowed"] == allowed
        assert data[side]["rss_within_limit"] is (data[side]["rss_growth"] <= allowed)
    assert "RSS growth allowed" in r.stdout


def test_auto_disconnects_are_counted_and_the_target_converges_after_them(tmp_path):
    """Queues of 1 MiB in memory and 2 MiB on disk cannot hold a backup
    window's backlog: the source daemon auto-disconnects (counted), and after
    the resume it reconnects and remirrors, so the target still ends equal."""
    r = smbench("run", "backup-window", "--mode", "daemons", "--quick", "--duration", "4s",
                "--disk-limit", "2MiB", "--source-memory", "1MiB", "--target-memory", "1MiB",
                "--json", tmp_path / "r.json", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["params"]["disk_limit"] == 2 * MiB
    assert data["auto_disconnects"] >= 1
    assert data["target_equals_source"] is True and data["errors"] == []
    assert data["source"]["queue_disk_peak"] <= 2 * MiB + 64 * 1024


def test_disk_limit_must_be_a_size_of_at_least_1_mib():
    r = smbench("run", "oltp", "--disk-limit", "100KiB")
    assert r.returncode == 2 and "--disk-limit must be at least 1MiB" in r.stderr, r.stderr


def test_live_line_redraws_one_line_while_a_run_goes(tmp_path):
    import io

    from smirror.bench.report import LiveLine
    from smirror.bench.runner import measure
    from smirror.bench.workloads import Params
    out = io.StringIO()
    r = measure("oltp", params=Params(duration=1.0, quick=True), base_dir=tmp_path,
                progress=LiveLine(stream=out, enabled=True))
    assert r["target_equals_source"]
    text = out.getvalue()
    draws = text.split("\r")[1:]
    assert len(draws) >= 3 and text.endswith("\n") and "\n" not in text[:-1]   # one line, redrawn
    assert all(d.startswith("oltp  ") and "MB/s" in d and "lag p99" in d for d in draws)
    assert "/1s" in draws[-1]
