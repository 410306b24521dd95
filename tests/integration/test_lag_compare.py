"""The pieces of tools/lag_compare.py the lsyncd benchmark relies on: the
seeded workload, the probe lag measurer, the match wait, rsync's byte
count and the lsyncd process (when lsyncd is installed)."""
import os
import shutil
import subprocess
import threading
import time

import pytest

from support import lag_compare
from support.lag_compare import FileWorkload, LsyncdProcess, ProbeLag, rsync_stats_bytes, wait_match
from support.treestate import snapshot


def _run(root, seed, steps=300):
    wl = FileWorkload(root, seed)
    wl.populate(dirs=3, files=40)
    kinds = {wl.step() for _ in range(steps)}
    return wl, kinds


def test_same_seed_makes_the_same_tree(tmp_path):
    a, kinds = _run(tmp_path / "a", 7)
    b, _ = _run(tmp_path / "b", 7)
    c, _ = _run(tmp_path / "c", 8)
    assert snapshot(tmp_path / "a", mtime=False) == snapshot(tmp_path / "b", mtime=False)
    assert snapshot(tmp_path / "a", mtime=False) != snapshot(tmp_path / "c", mtime=False)
    assert kinds == set(FileWorkload.WEIGHTS)                 # every kind of op ran
    assert a.ops == 300 and a.bytes_written > 0
    # its model is the tree on disk
    on_disk = {os.fsdecode(p) for p, d in snapshot(tmp_path / "a").items()}
    assert on_disk == set(a.files) | set(a.dirs)


def test_probe_lag_counts_only_the_right_content(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    probes = ProbeLag(src, dst)
    probes.make_dir()
    (dst / "probes").mkdir(parents=True)
    probes.start()
    try:
        n = probes.probe()
        name = f"p{n:05d}"
        data = (src / "probes" / name).read_bytes()

        def copy():
            time.sleep(0.05)
            (dst / "probes" / name).write_bytes(data[:-3])    # a partial copy first
            time.sleep(0.1)
            (dst / "probes" / name).write_bytes(data)
        t = threading.Thread(target=copy)
        t.start()
        t.join()
        assert probes.wait_all(5)
    finally:
        probes.stop()
    assert probes.missing == 0
    assert 0.15 <= probes.lags[n] < 2.0
    assert probes.percentiles()["p50"] == probes.lags[n]


def test_wait_match(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _run(src, 3, steps=50)
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    assert wait_match(src, dst, 2.0) is not None
    victim = next(p for p in dst.rglob("*") if p.is_file())
    victim.write_bytes(victim.read_bytes() + b"x")
    assert wait_match(src, dst, 0.1) is None


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")
def test_rsync_stats_bytes_of_a_real_run(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(os.urandom(300_000))
    out = subprocess.run(["rsync", "-rt", "--stats", f"{tmp_path / 'src'}/", f"{tmp_path / 'dst'}/"],
                         check=True, capture_output=True, env={**os.environ, "LC_ALL": "C"}).stdout
    moved = rsync_stats_bytes(out)
    assert 300_000 < moved < 320_000          # the file once, plus the protocol
    assert rsync_stats_bytes(b"Total bytes sent: 1,234\nTotal bytes received: 56\n") == 1290


@pytest.mark.skipif(shutil.which("lsyncd") is None or shutil.which("rsync") is None,
                    reason="lsyncd and rsync are needed: apt-get install -y lsyncd rsync")
def test_lsyncd_process_replicates_and_counts_bytes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "before").write_bytes(b"a" * 1000)
    p = LsyncdProcess(src, dst, tmp_path, tuned=True, rsync_extra=lag_compare.NS_MTIME)
    try:
        p.start()
        assert (dst / "before").read_bytes() == b"a" * 1000      # the startup sync
        (src / "after").write_bytes(os.urandom(50_000))
        assert wait_match(src, dst, 20.0) is not None
    finally:
        p.stop()
    assert p.proc.returncode is not None
    assert 50_000 < p.bytes_moved() < 60_000                     # the new file, not "before" again
    assert "--modify-window=-1" in (tmp_path / "lsyncd.lua").read_text()
