"""The fanotify binding on real events (a real filesystem mark), its record
parser on damaged buffers, and what the fanotify watcher adds to the tree
tests it shares with inotify (tests/test_inotify.py)."""
import errno
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from smirror.capture import fanotify
from smirror.capture.fanotify import (
    FAN_ATTRIB,
    FAN_CLOSE_WRITE,
    FAN_CREATE,
    FAN_DELETE,
    FAN_EVENT_INFO_TYPE_DFID_NAME,
    FAN_EVENT_INFO_TYPE_FID,
    FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
    FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
    FAN_MODIFY,
    FAN_ONDIR,
    FAN_RENAME,
    EventFormatError,
    name_to_handle,
    parse_events,
)
from smirror.capture.inotify import Kind
from smirror.capture.watch import TreeCapture
from support.applying import applier_of
from support.daemons import wait_for
from support.descriptors import no_free_descriptors
from support.events import collect
from support.treestate import diff, snapshot

MISSING = fanotify.unavailable_reason()
needs_fanotify = pytest.mark.skipif(bool(MISSING), reason=f"fanotify unavailable: {MISSING}")




# -- the record parser ---------------------------------------------------------

def fid_record(info_type, handle_bytes, name=None, *, length=None):
    """An info record as the kernel writes it, padded to 4 bytes."""
    body = struct.pack("=ii", 7, 9) + handle_bytes
    if name is not None:
        body += name + b"\0"
    body += b"\0" * (-(4 + len(body)) % 4)
    return struct.pack("=BBH", info_type, 0, length or 4 + len(body)) + body


def handle(n=8, htype=1, fill=b"\xab"):
    return struct.pack("=Ii", n, htype) + fill * n


def event(mask, records, *, vers=3, meta_len=24, event_len=None, pid=1234):
    payload = b"".join(records)
    return struct.pack("=IBBHQii", event_len or 24 + len(payload), vers, 0, meta_len, mask,
                       -1, pid) + payload


def test_parse_a_well_formed_buffer():
    buf = (event(FAN_CREATE, [fid_record(FAN_EVENT_INFO_TYPE_DFID_NAME, handle(), b"name"),
                              fid_record(FAN_EVENT_INFO_TYPE_FID, handle(fill=b"\x01"))])
           + event(FAN_RENAME | FAN_ONDIR,
                   [fid_record(FAN_EVENT_INFO_TYPE_OLD_DFID_NAME, handle(), b"a"),
                    fid_record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME, handle(12), b"b\xff\n"),
                    fid_record(4, b""),        # a pidfd-like record: skipped
                    fid_record(FAN_EVENT_INFO_TYPE_FID, handle())]))
    for data in (buf, bytearray(buf), memoryview(buf)):
        a, b = parse_events(data)
        assert a.mask == FAN_CREATE and a.pid == 1234
        assert a.record(FAN_EVENT_INFO_TYPE_DFID_NAME).name == b"name"
        assert a.record(FAN_EVENT_INFO_TYPE_DFID_NAME).handle == handle()
        assert a.record(FAN_EVENT_INFO_TYPE_DFID_NAME).fsid == (7, 9)
        assert a.record(FAN_EVENT_INFO_TYPE_FID).name is None
        assert b.record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME).name == b"b\xff\n"
        assert b.record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME).handle == handle(12)
        assert len(b.records) == 3
    assert parse_events(b"") == []


def test_the_file_events_of_skipped_processes_are_left_out_unparsed():
    """The capture mount's own writes: their file events are dropped
    before their records are read (even a damaged one), the directory
    events kept for the map, other processes' events kept."""
    ours, other = 4321, 1234
    damaged = struct.pack("=BBH", FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 400)     # runs past its event
    buf = (event(FAN_MODIFY, [damaged], pid=ours)
           + event(FAN_CREATE | FAN_ONDIR, [fid_record(FAN_EVENT_INFO_TYPE_DFID_NAME, handle(), b"d")],
                   pid=ours)
           + event(FAN_MODIFY, [fid_record(FAN_EVENT_INFO_TYPE_DFID_NAME, handle(), b"f")], pid=other))
    got = parse_events(buf, frozenset({ours}))
    assert [(e.mask, e.pid) for e in got] == [(FAN_CREATE | FAN_ONDIR, ours), (FAN_MODIFY, other)]
    assert got[0].record(FAN_EVENT_INFO_TYPE_DFID_NAME).name == b"d"
    with pytest.raises(EventFormatError, match="info record length 400"):
        parse_events(buf)       # not skipped: the damaged record is read


GOOD_RECORD = fid_record(FAN_EVENT_INFO_TYPE_DFID_NAME, handle(), b"n")


@pytest.mark.parametrize("data, message, offset", [
    (event(FAN_CREATE, [GOOD_RECORD])[:20], "less than the 24-byte metadata", 0),
    (event(FAN_CREATE, [GOOD_RECORD]) + b"\0" * 7, "less than the 24-byte metadata", 56),
    (event(FAN_CREATE, [GOOD_RECORD], vers=2), "metadata version 2", 0),
    (event(FAN_CREATE, [GOOD_RECORD], meta_len=8), "metadata_len 8", 0),
    (event(FAN_CREATE, [GOOD_RECORD], event_len=400), "event_len 400 runs past", 0),
    (event(FAN_CREATE, [GOOD_RECORD[:2]]), "less than an info header", 24),
    (event(FAN_CREATE, [fid_record(FAN_EVENT_INFO_TYPE_DFID_NAME, handle(), b"n", length=2)]),
     "info record length 2", 24),
    (event(FAN_CREATE, [fid_record(FAN_EVENT_INFO_TYPE_DFID_NAME, handle(), b"n", length=200)]),
     "info record length 200", 24),
    (event(FAN_CREATE, [struct.pack("=BBH", FAN_EVENT_INFO_TYPE_FID, 0, 12) + b"\0" * 8]),
     "too short for fsid", 24),
    (event(FAN_CREATE, [fid_record(FAN_EVENT_INFO_TYPE_FID,
                                   struct.pack("=Ii", 64, 1) + b"\0" * 8)]),
     "file handle of 64 bytes does not fit", 24),
], ids=["truncated", "trailing-bytes", "version", "metadata-len", "event-len", "info-header",
        "info-len-short", "info-len-long", "fid-short", "handle-long"])
def test_damaged_buffers_are_clear_errors(data, message, offset):
    with pytest.raises(EventFormatError, match=message) as info:
        parse_events(data)
    assert info.value.offset == offset
    assert f"byte offset {offset}" in str(info.value)


def test_a_name_without_its_nul_is_an_error():
    rec = struct.pack("=BBH", FAN_EVENT_INFO_TYPE_DFID_NAME, 0, 4 + 8 + 16 + 4) \
        + struct.pack("=ii", 0, 0) + handle() + b"abcd"
    with pytest.raises(EventFormatError, match="terminating NUL"):
        parse_events(event(FAN_CREATE, [rec]))


@needs_fanotify
def test_a_damaged_read_is_a_rescan_not_a_crash(tmp_path, caplog):
    """The watcher meets a record it cannot parse (fed here through its
    own read path): it logs the error, asks for a rescan and keeps watching."""
    root = tmp_path / "root"
    root.mkdir()
    with fanotify.Watcher(root) as w:
        bad = event(FAN_CREATE, [GOOD_RECORD], event_len=400)
        r, wr = os.pipe()
        real_fd, w.fd = w.fd, r
        try:
            os.write(wr, bad)
            ev = w.read(timeout=1)
        finally:
            w.fd = real_fd
            os.close(r)
            os.close(wr)
        assert [e.kind for e in ev] == [Kind.RESCAN] and "event_len 400" in ev[0].reason
        assert w.format_errors == 1 and "event_len 400" in caplog.text
        (root / "after").write_bytes(b"a")
        assert (Kind.CREATED, b"after") in [(e.kind, e.path) for e in collect(w)]


# -- the binding on real events -------------------------------------------------

@needs_fanotify
def test_binding_reports_names_handles_and_renames(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    flags = (fanotify.FAN_CLASS_NOTIF | fanotify.FAN_CLOEXEC | fanotify.FAN_NONBLOCK
             | fanotify.FAN_REPORT_DFID_NAME_TARGET)
    fd = fanotify.fanotify_init(flags)
    try:
        fanotify.fanotify_mark(fd, fanotify.FAN_MARK_ADD | fanotify.FAN_MARK_FILESYSTEM,
                               fanotify.MARK_MASK, os.fsencode(root))
        os.mkdir(root / "d")
        (root / "d" / "f").write_bytes(b"data")
        os.rename(root / "d" / "f", root / "g")
        os.chmod(root / "d", 0o700)
        h_root, h_d, h_g = (name_to_handle(os.fsencode(p)) for p in (root, root / "d", root / "g"))
        os.unlink(root / "g")
        raw = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    mine = {h_root, h_d}
    events = [e for e in parse_events(raw) if e.pid == os.getpid()
              and any(r.handle in mine for r in e.records)]
    by_name = {}
    for e in events:
        rec = e.record(FAN_EVENT_INFO_TYPE_DFID_NAME)
        if rec is not None:
            by_name.setdefault((rec.handle, rec.name), []).append(e)
    mkdir, = by_name[(h_root, b"d")][:1]
    assert mkdir.mask & (FAN_CREATE | FAN_ONDIR) == FAN_CREATE | FAN_ONDIR
    assert mkdir.record(FAN_EVENT_INFO_TYPE_FID).handle == h_d      # the child's handle
    write = by_name[(h_d, b"f")][0]
    assert write.mask & (FAN_CREATE | FAN_MODIFY | FAN_CLOSE_WRITE) == \
        FAN_CREATE | FAN_MODIFY | FAN_CLOSE_WRITE                     # merged by the kernel
    assert write.record(FAN_EVENT_INFO_TYPE_FID).handle == h_g       # same inode, renamed since
    rename, = [e for e in events if e.mask & FAN_RENAME]
    assert rename.record(FAN_EVENT_INFO_TYPE_OLD_DFID_NAME).handle == h_d
    assert rename.record(FAN_EVENT_INFO_TYPE_OLD_DFID_NAME).name == b"f"
    assert rename.record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME).handle == h_root
    assert rename.record(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME).name == b"g"
    assert rename.record(FAN_EVENT_INFO_TYPE_FID).handle == h_g
    attrib = by_name[(h_d, b".")][0]                                 # the directory itself
    assert attrib.mask & (FAN_ATTRIB | FAN_ONDIR) == FAN_ATTRIB | FAN_ONDIR
    unlink = by_name[(h_root, b"g")][0]
    assert unlink.mask & FAN_DELETE


# -- what the fanotify watcher adds ----------------------------------------------

@needs_fanotify
def test_events_outside_the_root_are_skipped_after_one_lookup(tmp_path):
    root, beside = tmp_path / "root", tmp_path / "beside"
    root.mkdir()
    beside.mkdir()
    with fanotify.Watcher(root) as w:
        for i in range(50):
            (beside / f"f{i}").write_bytes(b"x")
        (root / "in").write_bytes(b"y")
        ev = collect(w)
        assert [(e.kind, e.path) for e in ev if e.path == b"in"][0] == (Kind.CREATED, b"in")
        assert all(not e.path.startswith(b"f") for e in ev)
        h_beside = name_to_handle(os.fsencode(beside))
        assert h_beside in w._outside
        looked_up = []
        resolve = w._resolve
        w._resolve = lambda h: looked_up.append(h) or resolve(h)
        for i in range(50):
            (beside / f"f{i}").write_bytes(b"again")
        assert collect(w) == [] or all(not e.path.startswith(b"f") for e in collect(w))
        assert h_beside not in looked_up


_CLOSE_INHERITED = ("import os, sys\n"
                    "sys.stdin.readline(); os.close(int(sys.argv[1])); print('closed', flush=True)\n"
                    "sys.stdin.readline()\n")


@needs_fanotify
def test_a_child_closing_a_descriptor_it_inherited_is_not_its_change(tmp_path):
    """The capture mount's process (an ignored pid) forks a subprocess while
    it holds a backing file open for writing; the child's copy of the
    descriptor is the last one closed: a lone CLOSE_WRITE in the child's
    name, which the bypass watcher counted as a change made behind the
    mount's back. A process that is not its child still counts."""
    root = tmp_path / "root"
    root.mkdir()
    # the mark covers the whole file system: on a busy machine its queue can
    # overflow (a RESCAN, the events dropped), which proves nothing either
    # way; such a round is run again
    with fanotify.Watcher(root, ignore_pids={os.getpid()}) as w:
        for _ in range(OVERFLOW_ROUNDS):
            events = _close_inherited_by_a_child(root / "f", w)
            if not _overflowed(events):
                assert [e for e in events if e.path == b"f"] == []
                break
        else:
            pytest.fail(f"the fanotify queue overflowed in {OVERFLOW_ROUNDS} rounds in a row")
        # an unrelated process (its parent is sh, not us) that opens for
        # writing and closes without a write: reported
        for _ in range(OVERFLOW_ROUNDS):
            subprocess.run(["sh", "-c", f"{sys.executable} -c 'open(\"{root}/f\", \"r+\").close()' & wait"],
                           check=True)
            events = collect(w)
            if (Kind.CLOSED, b"f") in [(e.kind, e.path) for e in events]:
                break
            assert _overflowed(events), events
        else:
            pytest.fail(f"the fanotify queue overflowed in {OVERFLOW_ROUNDS} rounds in a row")


@needs_fanotify
def test_the_map_follows_the_directories_an_ignored_process_moves(tmp_path):
    """This process is ignored (the capture mount's own writes): its file
    events are not reported, but its directory creations and renames are
    followed, so another process's write below them is reported where it is."""
    root = tmp_path / "root"
    root.mkdir()
    with fanotify.Watcher(root, ignore_pids={os.getpid()}) as w:
        for _ in range(OVERFLOW_ROUNDS):
            (root / "a").mkdir()
            (root / "a" / "mine").write_bytes(b"x")
            os.rename(root / "a", root / "b")
            (root / "b" / "c").mkdir()
            ours = collect(w)
            subprocess.run([sys.executable, "-c", f"open({str(root / 'b' / 'c' / 'f')!r}, 'w').write('y')"],
                           check=True)
            theirs = collect(w)
            if not _overflowed(ours + theirs):
                break
            shutil.rmtree(root / "b")
            collect(w)
        else:
            pytest.fail(f"the fanotify queue overflowed in {OVERFLOW_ROUNDS} rounds in a row")
        assert [e for e in ours if e.kind is not Kind.RESCAN] == []
        assert (Kind.CREATED, b"b/c/f") in [(e.kind, e.path) for e in theirs], theirs


@needs_fanotify
def test_a_paced_watcher_reads_at_most_once_a_pace(tmp_path):
    """The bypass watch's pacing: a stream of writes is read at most once
    every ``pace`` seconds (the kernel merges them meanwhile), not once a
    write; the writes still arrive."""
    root = tmp_path / "root"
    root.mkdir()
    with fanotify.Watcher(root) as w:
        w.pace = 0.05
        path = root / "f"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        seen: list = []
        done = threading.Event()

        def watch():
            while not done.is_set():
                seen.extend(w.read(0.2))
        t = threading.Thread(target=watch)
        t.start()
        try:
            t0 = time.monotonic()
            for i in range(400):
                os.pwrite(fd, b"x" * 512, i * 512)
                os.fdatasync(fd)
            elapsed = time.monotonic() - t0
            wait_for(lambda: (Kind.MODIFIED, b"f") in [(e.kind, e.path) for e in seen],
                     what="the writes reported")
        finally:
            done.set()
            t.join()
            os.close(fd)
        # (+2: the read in flight as the writes began, the last one after)
        assert w.reads <= elapsed / w.pace + 2, (w.reads, elapsed)


OVERFLOW_ROUNDS = 10


def _overflowed(events) -> bool:
    return any(e.kind == Kind.RESCAN and "overflow" in e.reason for e in events)


def _close_inherited_by_a_child(path, w) -> list:
    """Write ``path`` here, fork a child that inherits the descriptor, close
    ours, then the child's (the last): the events that came of it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"ours")
    child = subprocess.Popen([sys.executable, "-c", _CLOSE_INHERITED, str(fd)], pass_fds=(fd,),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        os.close(fd)
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline() == "closed\n"
        return collect(w)
    finally:
        child.communicate("\n", timeout=30)


@needs_fanotify
def test_a_directory_the_map_lost_is_rescanned(tmp_path):
    """A directory the handle map does not hold (here: its entry dropped by
    hand) is found inside the root by its handle and reported for a rescan,
    not skipped."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    with fanotify.Watcher(root) as w:
        h_b = name_to_handle(os.fsencode(root / "a" / "b"))
        del w._dirs[h_b]
        (root / "a" / "b" / "new").write_bytes(b"n")
        ev = collect(w)
        assert ev[0].kind == Kind.RESCAN and ev[0].path == b"a/b"
        assert (Kind.CREATED, b"a/b/new") in [(e.kind, e.path) for e in ev]
        assert h_b in w._dirs
        # with the directory above it lost too, the rescan is of that one
        # (the capture knows its parent), once, not once per event
        del w._dirs[h_b], w._dirs[name_to_handle(os.fsencode(root / "a"))]
        later = []
        for name in ("one", "two"):
            (root / "a" / "b" / name).write_bytes(b"n")
            later += collect(w)
        assert [(e.kind, e.path) for e in later if e.kind == Kind.RESCAN] == [(Kind.RESCAN, b"a")]
        assert (Kind.CREATED, b"a/b/two") in [(e.kind, e.path) for e in later]


@needs_fanotify
def test_a_directory_renamed_while_the_map_is_built_is_mapped_below(tmp_path):
    """The start-up walk lists each directory through its handle: one
    renamed after the walk met it under its old name, before it was
    listed, still has everything below it mapped (by path its listing
    failed and its subtree stayed out of the map)."""
    root = tmp_path / "root"
    for top in ("A", "B"):
        (root / top / "sub" / "deeper").mkdir(parents=True)
    renamed = []

    def exclude(rel, is_dir):
        if not renamed and b"/" in rel:     # listing below the root: rename the other top
            renamed.append(b"B" if rel.startswith(b"A/") else b"A")
            os.rename(os.path.join(os.fsencode(root), renamed[0]), os.fsencode(root / "Z"))
        return False

    with fanotify.Watcher(root, exclude=exclude) as w:
        assert renamed
        for d in ("Z/sub", "Z/sub/deeper"):
            assert name_to_handle(os.fsencode(root / d)) in w._dirs, d
        assert [(e.kind, e.path, e.new_path) for e in collect(w)] == \
            [(Kind.MOVED, renamed[0], b"Z")]
        (root / "Z" / "sub" / "deeper" / "f").write_bytes(b"n")
        assert (Kind.CREATED, b"Z/sub/deeper/f") in [(e.kind, e.path) for e in collect(w)]


@needs_fanotify
def test_a_lost_directory_that_a_rename_later_in_the_read_brings_is_not_taken_for_outside(tmp_path):
    """A directory the map lacks, whose event is read with a later rename
    of a directory above it (inside the root): that event is skipped (the
    capture resyncs the renamed directory), but the directory is not
    remembered as outside the root: the events that follow in it are
    reported (before, they were dropped for good)."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x")
    with fanotify.Watcher(root) as w:
        h_b = name_to_handle(os.fsencode(root / "a" / "b"))
        del w._dirs[h_b]
        (root / "a" / "b" / "f").write_bytes(b"before")
        os.rename(root / "a", root / "c")
        collect(w)
        assert h_b not in w._outside
        (root / "c" / "b" / "f").write_bytes(b"after")
        ev = [(e.kind, e.path) for e in collect(w)]
        assert ev[0] == (Kind.RESCAN, b"c/b") and (Kind.CLOSED, b"c/b/f") in ev


@needs_fanotify
def test_queue_overflow_is_a_rescan_of_everything(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    path = "/proc/sys/fs/fanotify/max_queued_events"
    old = open(path).read()
    open(path, "w").write("128\n")
    try:
        w = fanotify.Watcher(root)       # the group keeps the limit it was made with
    finally:
        open(path, "w").write(old)
    with w:
        for i in range(1000):
            os.close(os.open(root / f"f{i}", os.O_CREAT | os.O_WRONLY))
        ev = collect(w)
    assert w.overflows >= 1
    assert any(e.kind == Kind.RESCAN and e.path == b"" and "overflow" in e.reason for e in ev)


@needs_fanotify
def test_deleting_the_root_is_a_rescan(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    with fanotify.Watcher(root) as w:
        os.rmdir(root)
        ev = collect(w)
    assert any(e.kind == Kind.RESCAN and "root was deleted" in e.reason for e in ev)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_without_cap_sys_admin_auto_falls_back_to_inotify(tmp_path):
    """A process without CAP_SYS_ADMIN cannot place a filesystem mark:
    forcing fanotify is a clear error, auto picks inotify and says why."""
    code = (
        "import sys\n"
        "from smirror.capture import fanotify\n"
        "from smirror.capture.watch import open_watcher\n"
        "try:\n"
        "    fanotify.Watcher(sys.argv[1])\n"
        "except fanotify.FanotifyUnavailable as e:\n"
        "    print('forced:', e.strerror)\n"
        "w, why = open_watcher(sys.argv[1])\n"
        "print('auto:', w.backend, why)\n")
    # CAP_SYS_ADMIN leaves the bounding set: gone after exec, even for root
    out = subprocess.run(["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
                          sys.executable, "-c", code, str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    if "setpriv:" in out.stderr:
        pytest.skip(f"cannot drop CAP_SYS_ADMIN here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    # (unprivileged fanotify_init works since Linux 5.13; the filesystem mark does not)
    forced, auto = out.stdout.splitlines()
    assert forced.startswith("forced: ") and forced.endswith("needs CAP_SYS_ADMIN")
    assert auto.startswith("auto: inotify inotify: fanotify unavailable (")
    assert auto.endswith("needs CAP_SYS_ADMIN)")


@needs_fanotify
def test_a_mount_inside_the_root_falls_back_to_inotify(tmp_path):
    """One filesystem mark cannot see another filesystem mounted inside the
    set: forced fanotify says so, auto takes inotify."""
    from smirror.capture.watch import open_watcher
    root = tmp_path / "root"
    (root / "sub mnt").mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(root / "sub mnt")],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        assert fanotify.mounts_below(os.fsencode(root)) == [os.fsencode(root / "sub mnt")]
        with pytest.raises(fanotify.FanotifyUnavailable, match="sub mnt is mounted inside"):
            fanotify.Watcher(root)
        w, why = open_watcher(root)
        with w:
            assert w.backend == "inotify" and "mounted inside" in why
    finally:
        subprocess.run(["umount", str(root / "sub mnt")], check=True)


# -- lookups that fail for a passing reason ---------------------------------------

def read_until(w, cond, what, limit=10.0):
    """Events until ``cond(events so far)`` holds (held lookups are retried
    within the watcher's reads)."""
    out, deadline = [], time.monotonic() + limit
    while not cond(out):
        assert time.monotonic() < deadline, f"{what}: not within {limit} s; events {out}"
        out += w.read(timeout=0.2)
    return out


@needs_fanotify
def test_a_lookup_that_fails_for_lack_of_descriptors_holds_the_directory(tmp_path, caplog):
    """A tree moved in, and a file written in it, are read while the
    process has no free descriptor: nothing of the tree can be listed or
    looked up. Its directories are held, not taken for outside the root;
    once descriptors are free again each is rescanned, and the events
    that follow in it are reported (before: the moved-in content was never
    reported, and the subdirectory was skipped for good)."""
    caplog.set_level(logging.INFO, logger="smirror.capture.fanotify")
    root, beside = tmp_path / "root", tmp_path / "beside"
    root.mkdir()
    (beside / "t" / "sub").mkdir(parents=True)
    (beside / "t" / "f").write_bytes(b"f")
    with fanotify.Watcher(root) as w:
        os.rename(beside / "t", root / "t")
        (root / "t" / "sub" / "g").write_bytes(b"g")     # names t/sub, not mapped yet
        with no_free_descriptors():
            during = w.read(timeout=5)
            held, failures = w.lookups_held, w.watch_failures
        assert (Kind.CREATED, b"t") in [(e.kind, e.path) for e in during]
        assert held >= 2 and failures >= 2              # t (not listed) and t/sub (not placed)
        assert "Too many open files" in w.lookup_error
        h_sub = name_to_handle(os.fsencode(root / "t" / "sub"))
        assert h_sub not in w._outside
        after = read_until(w, lambda ev: not w.lookups_held, "the held lookups settled")
        rescans = [(e.path, e.reason) for e in during + after if e.kind is Kind.RESCAN]
        assert [path for path, _ in rescans] == [b"t"]     # t/sub with it: one rescan
        assert "Too many open files" in rescans[0][1]
        assert h_sub in w._dirs and h_sub not in w._outside
        (root / "t" / "sub" / "h").write_bytes(b"h")
        assert (Kind.CREATED, b"t/sub/h") in [(e.kind, e.path) for e in collect(w)]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "lookup failed" in warned[0].getMessage()   # once, not per event
    assert any("lookups work again" in r.getMessage() for r in caplog.records)


@needs_fanotify
def test_the_target_converges_after_lookups_failed_for_lack_of_descriptors(tmp_path):
    """The capture end to end (its ops applied to a real target directory):
    a tree moved into the set and written in while the process has no free
    descriptor reaches the target whole once descriptors are free again,
    with no operator and no periodic verification; the capture's status
    says lookups are held meanwhile."""
    src, dst, beside = tmp_path / "src", tmp_path / "dst", tmp_path / "beside"
    src.mkdir()
    (beside / "t" / "sub" / "deeper").mkdir(parents=True)
    for rel in ("t/f", "t/sub/g", "t/sub/deeper/h"):
        (beside / rel).write_bytes(rel.encode() * 100)
    ops = []
    cap = TreeCapture(src, ops.append, capture_backend="fanotify", verify_interval=None)
    apply_new = applier_of(ops, dst)

    try:
        cap.resync(b"", "initial")
        os.rename(beside / "t", src / "t")
        (src / "t" / "sub" / "new").write_bytes(b"written after the move")
        with no_free_descriptors():
            cap.poll(5)                 # the capture's own reads fail too: its ops are kept
            held = cap.status()["lookups_held"]
        assert held >= 1 and cap.status()["watch_failures"] >= 1
        (src / "t" / "sub" / "later").write_bytes(b"written once descriptors are back")
        deadline = time.monotonic() + 30
        while True:
            cap.sync()
            apply_new()
            left = diff(snapshot(src), snapshot(dst))
            if not left and not cap.watcher.lookups_held:
                break
            assert time.monotonic() < deadline, f"the target did not converge: {left}"
            cap.poll(0.2)
        assert "file handle lookup failed" in cap.status()["last_rescan_reason"]
    finally:
        cap.close()


@contextmanager
def failing_lookups(monkeypatch, handle, err, times=None):
    """open_by_handle_at (the thin wrapper, nothing else) fails with ``err``
    for ``handle`` (or each of a set of handles): ``times`` times, or for
    the whole block."""
    real = fanotify.open_by_handle
    left = [times]
    handles = handle if isinstance(handle, set) else {handle}

    def open_by_handle(mount_fd, h, flags=os.O_PATH):
        if h in handles and (left[0] is None or left[0] > 0):
            if left[0] is not None:
                left[0] -= 1
            raise OSError(err, f"open_by_handle_at: {os.strerror(err)}")
        return real(mount_fd, h, flags)

    monkeypatch.setattr(fanotify, "open_by_handle", open_by_handle)
    try:
        yield
    finally:
        monkeypatch.setattr(fanotify, "open_by_handle", real)


def lost_directory(root, w):
    """root/a/b, dropped from the watcher's map: its next event is looked up."""
    h_b = name_to_handle(os.fsencode(root / "a" / "b"))
    del w._dirs[h_b]
    return h_b


@needs_fanotify
def test_a_lookup_racing_a_rename_is_looked_at_again(tmp_path, monkeypatch):
    """ESTALE once (a decode that raced a rename) is not a verdict: the next
    look finds the directory inside the root, and its event is reported."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    with fanotify.Watcher(root) as w:
        h_b = lost_directory(root, w)
        with failing_lookups(monkeypatch, h_b, errno.ESTALE, times=1):
            (root / "a" / "b" / "new").write_bytes(b"n")
            ev = [(e.kind, e.path) for e in collect(w)]
        assert ev[0] == (Kind.RESCAN, b"a/b") and (Kind.CREATED, b"a/b/new") in ev
        assert h_b in w._dirs and not w.lookups_held and w.watch_failures == 0


@needs_fanotify
def test_a_directory_found_gone_every_time_is_skipped_like_one_outside(tmp_path, monkeypatch):
    """ESTALE on every look is a directory gone: its events are skipped and
    its handle is remembered like one outside (no later directory has
    that handle), not held for a retry."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    with fanotify.Watcher(root) as w:
        h_b = lost_directory(root, w)
        looks = w.handle_lookups
        with failing_lookups(monkeypatch, h_b, errno.ESTALE):
            for name in ("x", "y"):
                (root / "a" / "b" / name).write_bytes(b"x")
            assert [e for e in collect(w) if e.path.startswith(b"a/b")] == []
        assert h_b in w._outside and not w.lookups_held and w.watch_failures == 0
        assert w.handle_lookups - looks >= 1


@needs_fanotify
@pytest.mark.parametrize("err", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                                 errno.EPERM],
                         ids=["EMFILE", "ENFILE", "ENOMEM", "EAGAIN", "unknown-EPERM"])
def test_a_passing_lookup_failure_holds_the_directory_until_it_can_be_placed(
        tmp_path, monkeypatch, err):
    """Any failure that does not say the directory is gone (an errno not
    known here included) holds it: its events are skipped, it is looked up
    again until that works, then rescanned (the rescan covers what was
    skipped); never remembered as outside the root."""
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    with fanotify.Watcher(root) as w:
        h_b = lost_directory(root, w)
        with failing_lookups(monkeypatch, h_b, err):
            for name in ("x", "y"):
                (root / "a" / "b" / name).write_bytes(b"x")
            during = collect(w, settle=0.3)
            assert [e for e in during if e.path.startswith(b"a/b")] == []
            assert w.lookups_held == 1 and h_b not in w._outside
            assert w.lookup_error == os.strerror(err)
        after = read_until(w, lambda ev: any(e.kind is Kind.RESCAN for e in ev), "the rescan")
        rescan, = [e for e in after if e.kind is Kind.RESCAN]
        assert rescan.path == b"a/b" and os.strerror(err) in rescan.reason
        assert not w.lookups_held and h_b in w._dirs
        (root / "a" / "b" / "z").write_bytes(b"z")
        assert (Kind.CREATED, b"a/b/z") in [(e.kind, e.path) for e in collect(w)]


@needs_fanotify
def test_a_merged_create_and_delete_is_settled_by_path_when_handles_fail(tmp_path):
    """f created, linked as g, unlinked, linked back from g: the kernel
    merges it all into one CREATE|DELETE of f, settled by asking whether f
    is that inode now. With no free descriptor the directory's handle
    cannot be opened: its path is asked instead (before: f was reported
    deleted while it is there)."""
    root = tmp_path / "root"
    root.mkdir()
    with fanotify.Watcher(root) as w:
        (root / "f").write_bytes(b"f")
        os.link(root / "f", root / "g")
        os.unlink(root / "f")
        os.link(root / "g", root / "f")
        with no_free_descriptors():
            ev = w.read(timeout=5)
        ev += collect(w)
    about_f = [e.kind for e in ev if e.path == b"f"]
    assert Kind.CREATED in about_f and Kind.DELETED not in about_f, ev


@needs_fanotify
def test_a_deleted_link_whose_other_names_cannot_be_checked_is_checked_later(tmp_path):
    """A write through one name of a hard-linked file, then that name
    unlinked: the kernel folds the write into the DELETE, and the other
    names must get it. With no free descriptor the inode cannot be looked
    at: it is held, and once it can be, the whole tree is rescanned
    (which names it has is not known here). Before: nothing, the write
    never reached the other name."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "a").write_bytes(b"old")
    os.link(root / "a", root / "b")
    with fanotify.Watcher(root) as w:
        with open(root / "a", "r+b") as f:
            f.write(b"new")
        os.unlink(root / "a")
        with no_free_descriptors():
            during = w.read(timeout=5)
        # (the mark sees the whole file system: what other processes do
        # elsewhere may be held too)
        assert w._held.get(name_to_handle(os.fsencode(root / "b"))) is False    # a file
        deleted, = [e for e in during if e.path == b"a"]
        assert deleted.kind is Kind.DELETED and deleted.ino is None
        after = read_until(w, lambda ev: any(e.kind is Kind.RESCAN for e in ev), "the rescan")
    rescan, = [e for e in after if e.kind is Kind.RESCAN]
    assert rescan.path == b"" and "has other names" in rescan.reason


@needs_fanotify
def test_past_the_held_limit_the_whole_tree_is_rescanned(tmp_path, monkeypatch):
    """More held handles than HELD_LIMIT: they are dropped for one rescan
    of the whole tree once lookups work (memory stays bounded, nothing is
    left out)."""
    monkeypatch.setattr(fanotify, "HELD_LIMIT", 1)
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "c" / "d").mkdir(parents=True)
    with fanotify.Watcher(root) as w:
        h_b = lost_directory(root, w)
        h_d = name_to_handle(os.fsencode(root / "c" / "d"))
        del w._dirs[h_d]
        with failing_lookups(monkeypatch, {h_b, h_d}, errno.ENOMEM):
            (root / "a" / "b" / "x").write_bytes(b"x")
            (root / "c" / "d" / "y").write_bytes(b"y")
            collect(w, settle=0.3)
            assert set(w._held) == {name_to_handle(os.fsencode(root))}
        after = read_until(w, lambda ev: any(e.kind is Kind.RESCAN for e in ev), "the rescan")
        assert [e.path for e in after if e.kind is Kind.RESCAN] == [b""]
        assert h_b in w._dirs and h_d in w._dirs and not w.lookups_held
