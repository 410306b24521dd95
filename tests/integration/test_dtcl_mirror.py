"""DTCL's 'mirror stop ID;' and 'mirror start ID newer;' against two
daemons started as real processes: a large mirror stopped midway (status
says stopped, live changes still replicate, a later mirror-start completes
it), and a newer mirror (an older source file is not sent over a newer
target file, a newer one is)."""
import json
import os
import subprocess
import sys

from support.daemons import PASSWORD, wait_for
from support.pair import login, running_pair, wait_same
from support.treestate import diff, snapshot
from test_dtcl_e2e import dtcl, status

# small queues, so that a paused target holds the mirror back: the target
# stops reading when its queue is full, then the source's fills
SMALL_SOURCE = '[queues]\nsource_memory_limit = "256KiB"\ndisk_queue_limit = "2MiB"\n'
SMALL_TARGET = '[queues]\ntarget_memory_limit = "256KiB"\ndisk_queue_limit = "2MiB"\n'
FILES = 160


def spawn(env, *args):
    return subprocess.Popen([sys.executable, "-m", "smirror", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err and PASSWORD not in out + err, err
    return proc.returncode, out, err


def source_row(node):
    """The connection's row (while mirror-start restarts it: its state only)."""
    rows = status(node)["sources"]
    assert len(rows) == 1, rows             # never none, even while it restarts
    return rows[0]


def mirror_state(node):
    return (source_row(node).get("mirror") or {}).get("state")


def test_a_large_mirror_stopped_midway_leaves_a_replicating_connection_that_a_mirror_start_completes(
        tmp_path, monkeypatch):
    # inotify: a fanotify filesystem mark also counts the events of everything
    # else on the machine's /tmp, and an overflow's resync (right: the cache
    # lacks the files not sent) would send the rest into the small queue
    monkeypatch.setenv("SMIRROR_CAPTURE_BACKEND", "inotify")
    with running_pair(tmp_path, source_extra=SMALL_SOURCE,
                      target_extra=SMALL_TARGET) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "replica"
        for i in range(FILES):
            d = src / f"d{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"f{i:03}").write_bytes(os.urandom(100_000))
        login(source, env)
        login(target, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst, "nomirror")
        # no mirror running: a clear error, not a stop of nothing
        r = source.cli("mirror-stop", "1", check=False)
        assert r.returncode == 3 and "Traceback" not in r.stderr
        assert "connection 1 has no running mirror to stop: it has run none since it started" in r.stderr
        target.cli("pause-target", target.address)
        start = spawn(env, "mirror-start", "1", "--full", "--json", "--host", source.address)
        wait_for(lambda: mirror_state(source) == "scanning" and source_row(source)["mirror"]["ops"] > 20,
                 what="the mirror to be under way")
        # the note's form: a script, run from a scheduler; it waits for the stop
        script = tmp_path / "stop.dtcl"
        script.write_text(f"login {source.address} admin;\nsource {source.address};\n"
                          f"$C = conid data to {target.address} map base {dst};\nmirror stop $C;\n")
        stop = spawn({**env, "SMIRROR_PASSWORD": PASSWORD}, "dtcl", "-f", script)
        wait_for(lambda: mirror_state(source) == "stopping", what="the stop request")
        assert "mirror stopping (mirror-stop)" in source.cli("status").stdout
        target.cli("resume-target", target.address)
        code, out, err = finish(stop)
        assert code == 0, out + err
        assert "connection 1: mirror stopped after" in out and "the target is NOT complete" in out
        code, out, err = finish(start)
        assert code == 0, err
        m = json.loads(out)["mirror"]
        assert m["stopped"] and 0 < m["entries_checked"] < FILES
        # the connection stays; status says the mirror was stopped, and what it did
        def caught_up():
            row = source_row(source)
            return "seq_acked" in row and row["seq_acked"] == row["seq_captured"]
        wait_for(caught_up, what="what was queued to be applied")
        row = source_row(source)
        assert row["state"] == "connected" and row["mirror"]["state"] == "stopped"
        assert row["mirror"]["entries_checked"] == m["entries_checked"]
        text = source.cli("status").stdout
        assert "connection 1: mirror STOPPED (mirror-stop)" in text and "the target is NOT complete" in text
        sent = {p.relative_to(dst) for p in dst.rglob("f*")}
        assert 0 < len(sent) < FILES
        for rel in sent:
            assert (dst / rel).read_bytes() == (src / rel).read_bytes()     # whole files only
        # live changes still replicate: to a file sent, one never sent, a new one
        never = next(p.relative_to(src) for p in sorted(src.rglob("f*")) if p.relative_to(src) not in sent)
        some = sorted(sent)[0]
        for rel in (never, some):
            with open(src / rel, "r+b") as f:
                f.write(b"changed after the stop")
        (src / "d0" / "new-file").write_text("made after the stop")
        for rel in (never, some, "d0/new-file"):
            wait_for(lambda rel=rel: (dst / rel).exists()
                     and (dst / rel).read_bytes() == (src / rel).read_bytes(),
                     what=f"{rel} on the target")
        # a later mirror-start completes the target; status says done
        r = json.loads(source.cli("mirror-start", "1", "--json").stdout)
        assert not r["mirror"].get("stopped")
        assert wait_same(src, dst, 120), diff(snapshot(src), snapshot(dst))[:5]
        wait_for(lambda: mirror_state(source) == "done", what="the mirror to be done")
        r = source.cli("mirror-stop", "1", check=False)
        assert r.returncode == 3 and "no running mirror to stop: its last one is done" in r.stderr


def test_a_newer_mirror_sends_only_what_the_source_has_newer(tmp_path):
    with running_pair(tmp_path) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "replica"
        src.mkdir()
        dst.mkdir()
        t = 1_700_000_000
        for name, source_bytes, target_bytes, s_time, t_time in (
                ("kept.txt", b"older on the source", b"the target's newer, longer copy", t, t + 60),
                ("sent.txt", b"newer on the source", b"older on the target", t + 60, t)):
            (src / name).write_bytes(source_bytes)
            (dst / name).write_bytes(target_bytes)
            os.utime(src / name, (s_time, s_time))
            os.utime(dst / name, (t_time, t_time))
        (src / "missing.txt").write_text("only the source has it")
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        source.cli("connect", "data", "to", target.address, "map", "base", dst, "nomirror")
        kept = ((dst / "kept.txt").read_bytes(), os.stat(dst / "kept.txt").st_mtime_ns)
        text = (f'$S = "{source.address}";\nlogin $S admin;\nsource $S;\n'
                f"$C = conid data to {target.address} map base {dst};\nmirror start $C newer;\n")
        r = dtcl(tmp_path, env, text, extra_env={"SMIRROR_PASSWORD": PASSWORD})
        assert "connection 1: different newer mirror queued" in r.stdout
        assert "1 newer on the target left alone" in r.stdout
        wait_for(lambda: (dst / "missing.txt").exists() and
                 (dst / "sent.txt").read_bytes() == b"newer on the source", what="the newer files")
        wait_for(lambda: mirror_state(source) == "done", what="the mirror to be done")
        assert ((dst / "kept.txt").read_bytes(), os.stat(dst / "kept.txt").st_mtime_ns) == kept
        assert os.stat(dst / "sent.txt").st_mtime_ns == os.stat(src / "sent.txt").st_mtime_ns
        # the source's file changes: now it is newer, and it replicates whole
        with open(src / "kept.txt", "r+b") as f:
            f.write(b"O")
        assert wait_same(src, dst), diff(snapshot(src), snapshot(dst))
        # full and newer do not go together: said before anything is sent
        r = source.cli("mirror-start", "1", "--full", "--newer", check=False)
        assert r.returncode != 0 and "full sends every file; newer cannot go with it" in r.stderr
