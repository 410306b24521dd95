"""``smirror mirror`` as a user runs it: real subprocesses, exit codes,
JSON summary, quiet/no-tty output, the progress line, and SIGKILL mid-run
followed by a rerun."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smirror.cli.progress import Progress
from support import gen_tree
from support.daemons import package_path

RSYNC = shutil.which("rsync")
ENV = {**os.environ, "PYTHONPATH": package_path()}


def smirror(*args, **kw):
    return subprocess.run([sys.executable, "-m", "smirror", "mirror", *map(str, args)],
                          capture_output=True, env=ENV, **kw)


def test_json_summary_and_exit_code_0(tmp_path):
    src = tmp_path / "s"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x" * 5000)
    proc = smirror(src, tmp_path / "d", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["files_scanned"] == 1 and data["created"] == 2
    assert data["bytes_literal"] == 5000 and data["errors"] == [] and data["orphans"] == 0
    assert proc.stderr == b""              # not a tty: no progress bar
    # the command's own time from main() on covers the mirror's run
    assert 0 < data["seconds"] <= data["main_seconds"] < 60


def test_text_summary_lists_orphans_and_quiet_is_silent(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    dst.mkdir()
    (dst / "stray file").write_bytes(b"x")
    proc = smirror(src, dst, "--different")
    assert proc.returncode == 0
    assert b"orphan: stray file" in proc.stdout and b"1 orphans" in proc.stdout
    proc = smirror(src, dst, "--different", "--quiet")
    assert proc.returncode == 0 and proc.stdout == b"" and proc.stderr == b""


def test_orphans_move_and_include_exclude_from_the_command_line(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    dst.mkdir()
    (src / "a.log").write_bytes(b"1")
    (src / "keep.log").write_bytes(b"2")
    (src / "b.txt").write_bytes(b"3")
    (dst / "old").write_bytes(b"4")
    proc = smirror(src, dst, "--include", "keep.log", "--exclude", "*.log",
                   "--orphans", f"move:{tmp_path / 'attic'}", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(dst)) == ["b.txt", "keep.log"]
    assert (tmp_path / "attic" / "old").read_bytes() == b"4"


@pytest.mark.parametrize("args,code,message", [
    (["--block-size", "10"], 2, b"block size"),
    (["--block-size", "lots"], 2, b"--block-size"),
    (["--exclude", "a[b"], 2, b"unclosed"),
    (["--orphans", "shred"], 2, b"move:DIR"),
    (["--threads", "0"], 2, b"positive"),
    (["--orphans-older-than", "soon"], 2, b"days"),
])
def test_bad_arguments_exit_2(tmp_path, args, code, message):
    (tmp_path / "s").mkdir()
    proc = smirror(tmp_path / "s", tmp_path / "d", *args)
    assert proc.returncode == code
    assert message in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_missing_source_exit_3_and_overlap_exit_2(tmp_path):
    proc = smirror(tmp_path / "nope", tmp_path / "d")
    assert proc.returncode == 3 and b"does not exist" in proc.stderr
    (tmp_path / "s" / "sub").mkdir(parents=True)
    proc = smirror(tmp_path / "s", tmp_path / "s" / "sub")
    assert proc.returncode == 2 and b"inside" in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_dry_run_lists_actions_odd_names_survive(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    (src / "-x\nnew line").write_bytes(b"a")
    proc = smirror(src, tmp_path / "d", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert b"would create: -x\nnew line" in proc.stdout
    assert not (tmp_path / "d").exists()


def test_progress_line_rate_and_eta():
    out = io.StringIO()
    p = Progress(out, enabled=False)
    p.start(1000, 4)
    assert "ETA ?" in p.line(now=p._t0 + 0.05)       # no rate yet: no made-up ETA
    p.advance(250)
    p.file_done()
    line = p.line(now=p._t0 + 1.0)
    assert "25.0%" in line and "1/4 files" in line
    # 250 B in 1 s: 750 B left take 3 s
    assert "ETA 3s" in line and "250 B/s" in line
    p.advance(750)
    assert "ETA 0s" in p.line(now=p._t0 + 2.0)


def test_progress_bar_is_drawn_when_enabled():
    out = io.StringIO()
    p = Progress(out, enabled=True)
    p.INTERVAL = 0.01
    p.start(100, 1)
    p.advance(100)
    time.sleep(0.05)
    p.finish()
    text = out.getvalue()
    assert text.startswith("\r[") and text.endswith("\n") and "100.0%" in text


@pytest.mark.slow
@pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
def test_sigkill_mid_run_then_rerun(tmp_path):
    """Kill -9 a mirror mid-run: no file is half-written under its final
    name; a rerun cleans the temp files and ends identical (rsync lists
    nothing)."""
    src, dst = tmp_path / "s", tmp_path / "d"
    info = gen_tree.make_bench_tree(src, scale=1.0, files=600, big_size=0)
    for i in range(6):
        gen_tree.write_random(src / f"big{i}", 48 << 20, __import__("numpy").random.default_rng(i))
    proc = subprocess.Popen([sys.executable, "-m", "smirror", "mirror", str(src), str(dst),
                             "--threads", "1", "--fsync"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    # kill once some files are in place but not all
    while time.monotonic() < deadline:
        n = sum(len(files) for _, _, files in os.walk(dst)) if dst.exists() else 0
        if n > 150:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    finals = [p for p in dst.rglob("*") if p.is_file() and not p.name.startswith(".smirror-tmp-")]
    assert finals, "killed before anything was written"
    assert len(finals) < len(info["files"]) + 7, "finished before the kill"
    for p in finals:
        rel = p.relative_to(dst)
        assert p.read_bytes() == (src / rel).read_bytes(), f"{rel} half-written"
    rerun = smirror(src, dst, "--different", "--checksum")
    assert rerun.returncode == 0, rerun.stderr
    assert not list(dst.rglob(".smirror-tmp-*"))
    diff = subprocess.run([RSYNC, "-a", "-H", "-X", "--checksum", "--dry-run",
                           "--itemize-changes", "--delete", f"{src}/", f"{dst}/"],
                          capture_output=True, check=True).stdout
    assert diff == b""


def _modules_loaded_by(argv, tmp_path) -> set:
    """Modules a fresh interpreter loads for ``smirror.cli.main(argv)``
    beyond what it had at start-up."""
    out = tmp_path / "modules.txt"
    code = ("import sys\nbefore = set(sys.modules)\nfrom smirror.cli.main import main\n"
            f"assert main({argv!r}) == 0\n"
            f"open({str(out)!r}, 'w').write('\\n'.join(sorted(set(sys.modules) - before)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return set(out.read_text().split())


def test_quick_check_does_not_import_numpy(tmp_path):
    """The quick check of an unchanged tree stays light: no numpy, no
    checksum kernel, no concurrent.futures/logging, none of the daemon
    verbs' modules, no json, no worker threads' pool."""
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    args = ['mirror', '--quiet', '--different', str(src), str(tmp_path / 'd')]
    assert "smirror.mirror.engine" in _modules_loaded_by(args, tmp_path)      # the first, copying run
    loaded = _modules_loaded_by(args, tmp_path)                        # nothing to do
    heavy = {"numpy", "smirror.kernels.checksum", "smirror.kernels._checksum", "concurrent.futures",
             "logging",
             "smirror.cli.daemon", "smirror.daemon.config", "smirror.cli.replicate", "dataclasses",
             "json", "smirror.cli.progress", "queue"} & loaded
    assert not heavy, heavy


def test_checksum_of_unchanged_tree_does_not_import_numpy(tmp_path):
    """--checksum of an unchanged tree (small files and one of 32 MiB or
    more) compares whole-file digests: no signature arrays, so no numpy."""
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "small").write_bytes(os.urandom(100_000))
    (src / "large").write_bytes(os.urandom(33 << 20))
    assert smirror(src, dst).returncode == 0
    loaded = _modules_loaded_by(["mirror", "--quiet", "--checksum", str(src), str(dst)], tmp_path)
    assert "smirror.kernels._checksum" in loaded and "numpy" not in loaded


def test_progress_bar_on_a_terminal(tmp_path):
    """stderr on a pseudo-terminal: the bar is drawn (and ends the line)."""
    import pty
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1 << 20))
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "smirror", "mirror", str(src),
                               str(tmp_path / "d")], stdout=subprocess.PIPE, stderr=slave,
                              env=ENV, timeout=60)
        os.close(slave)
        slave = None
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    assert b"\r[" in out and b"100.0%" in out and b"1/1 files" in out
    assert b"1 files scanned" in proc.stdout


@pytest.mark.parametrize("src", ["", "  ", "backuphost:/srv/data"])
def test_empty_and_remote_looking_paths_are_refused(tmp_path, src):
    """An empty SRC would mirror the current directory; HOST:PATH would make a
    local directory named 'HOST:'. Both are refused before anything runs."""
    proc = smirror(src, tmp_path / "d")
    assert proc.returncode == 2
    assert b"empty path" in proc.stderr or b"remote HOST:PATH" in proc.stderr
    assert not (tmp_path / "d").exists() and not Path("backuphost:").exists()
    proc = smirror(tmp_path, "backuphost:/srv/data")
    assert proc.returncode == 2 and b"smirror connect" in proc.stderr


def test_a_local_name_with_a_colon_is_written_as_dot_slash(tmp_path):
    src = tmp_path / "a:b"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    proc = smirror("./a:b", "./c:d", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c:d" / "f").read_bytes() == b"x"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"),
                    reason="needs root and chattr (an immutable file refuses even root's chmod)")
def test_a_failed_chmod_on_the_target_is_reported_not_a_crash(tmp_path):
    """chmod through a file descriptor fails with the fd as the error's
    'filename' (an int): the mirror reports the file (exit 1), no TypeError."""
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_bytes(b"same")
    (dst / "f").write_bytes(b"same")
    os.chmod(src / "f", 0o640)
    os.chmod(dst / "f", 0o644)
    st = os.stat(src / "f")
    os.utime(dst / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    if subprocess.run(["chattr", "+i", str(dst / "f")], capture_output=True).returncode:
        pytest.skip("this filesystem has no immutable flag")
    try:
        proc = smirror(src, dst, "--different")
    finally:
        subprocess.run(["chattr", "-i", str(dst / "f")], check=True)
    assert b"Traceback" not in proc.stderr and b"TypeError" not in proc.stderr
    assert proc.returncode == 1, proc.stderr
    assert b"f: Operation not permitted" in proc.stderr


def test_replicate_refuses_empty_and_remote_looking_paths_too(tmp_path):
    for args in (["", str(tmp_path / "d")], [str(tmp_path), "host:/srv/x"]):
        proc = subprocess.run([sys.executable, "-m", "smirror", "replicate", *args],
                              capture_output=True, env=ENV, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert b"empty path" in proc.stderr or b"remote HOST:PATH" in proc.stderr
    assert not (tmp_path / "d").exists()
