"""The mirror engine against a remote target daemon (mirror/remote.py): the
target read through its target.scan / target.signature verbs, written as
ops through a real connection stream (journal, sender, TCP, the target's
receiver and applier)."""
import os
import signal

import pytest

from smirror.daemon import handshake
from smirror.daemon.control import Client
from smirror.kernels.memqueue import SpillQueue
from smirror.mirror.engine import Mirror, MirrorOptions
from smirror.mirror.remote import RemoteTarget
from smirror.stream import wire
from smirror.stream.journal import ConnectionJournal
from smirror.stream.sender import Sender
from support.daemons import PASSWORD, Node
from support.faults import rsync_diff
from support.gen_tree import xattrs_supported

SOURCE, CONID = "remotemirror", 1


@pytest.fixture
def remote(tmp_path):
    """(dst, make): a target daemon and a connection stream to its map base
    ``dst``; ``make(**opts)`` gives a RemoteTarget writing into it and a
    function that flushes the stream and waits until all of it is applied."""
    target = Node(tmp_path, "target", {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")})
    target.add_user("repl", "replication")
    target.start()
    dst = tmp_path / "dst"
    dst.mkdir()
    queue = SpillQueue(str(tmp_path / "squeue"), 1 << 20, 1 << 30)
    journal = ConnectionJournal(queue)

    def dial():
        link = wire.connect("127.0.0.1", target.port)
        handshake.login(link, "repl", PASSWORD, purpose="data")
        return link
    sender = Sender(CONID, str(dst), journal, dial, source_name=SOURCE, retry_interval=0.05).start()
    client = Client(target.address, timeout=60)
    client.login("repl", PASSWORD)

    def make(**options):
        side = RemoteTarget(client, str(dst), {"source": SOURCE, "conid": CONID}, journal.append,
                            **options)

        def settle():
            journal.flush()
            assert sender.wait_acked(journal.last_seq, 60)
            # target.scan waits for what the target received to be applied
            client.call("target.scan", map_base=str(dst), source=SOURCE, conid=CONID)
        return side, settle
    try:
        yield dst, make
    finally:
        client.close()
        sender.stop()
        queue.close()
        target.kill(signal.SIGTERM)


def _tree(src, dst):
    """A source tree, and a target holding an older, partly different copy."""
    rng = __import__("random").Random(5)
    big = bytes(rng.getrandbits(8) for _ in range(64 << 10)) * 40        # 2.5 MiB
    for d in (src, dst):
        (d / "sub" / "deeper").mkdir(parents=True)
        (d / "same").write_bytes(b"unchanged " * 100)
        (d / "big").write_bytes(big)
        (d / "grows").write_bytes(big[:1 << 20])
        (d / "shrinks").write_bytes(big)
    # the source moves on
    with open(src / "big", "r+b") as f:                 # two blocks change, in place
        f.seek(1 << 20)
        f.write(b"X" * 5000)
    with open(src / "grows", "ab") as f:
        f.write(b"more" * 100_000)
    os.truncate(src / "shrinks", 100_000)
    (src / "sub" / "new").write_bytes(b"new file")
    (src / "sub" / "deeper" / "link").symlink_to("../new")
    os.link(src / "sub" / "new", src / "sub" / "twin")       # a hard link group
    with open(src / "sparse", "wb") as f:                     # a hole stays a hole
        f.seek(8 << 20)
        f.write(b"end")
    (src / "was_dir").write_bytes(b"a file now")
    (dst / "was_dir").mkdir()
    (dst / "was_dir" / "inside").write_bytes(b"gone with it")
    (dst / "orphan").write_bytes(b"only the target has it")
    os.chmod(src / "same", 0o600)                             # metadata only
    os.utime(src / "same", ns=(1, 1_500_000_000_000_000_000))
    for d in (src, dst):
        for p in ("big", "grows", "shrinks"):
            os.utime(d / p, ns=(1, 1_600_000_000_000_000_000))   # the quick check sees equal


@pytest.mark.parametrize("mode", ["checksum", "different+checksum", "full"])
def test_a_remote_mirror_brings_the_map_base_in_line_through_the_stream(tmp_path, remote, mode):
    dst, make = remote
    src = tmp_path / "src"
    src.mkdir()
    _tree(src, dst)
    if xattrs_supported(src) and xattrs_supported(dst):
        os.setxattr(src / "same", "user.colour", b"blue")
        os.setxattr(dst / "sub", "user.stale", b"x")      # the mirror removes it
    side, settle = make()
    opts = MirrorOptions(checksum="checksum" in mode, different="different" in mode, threads=2)
    summary = Mirror(src, side, opts).run()
    settle()
    assert summary.errors == []
    assert [os.fsdecode(p) for p in summary.orphans] == ["orphan"]
    # the orphan is reported, not removed; everything else is the source's
    left = rsync_diff(src, dst, extra=["--exclude=/orphan"])
    if mode == "different+checksum":
        # the quick check passes big/grows/shrinks' twins of equal size and
        # mtime (that is what it is for); the others are in line
        left = [line for line in left if line.split()[-1] not in ("big",)]
    assert left == [], left
    assert (dst / "orphan").exists()
    assert os.stat(dst / "sub" / "new").st_ino == os.stat(dst / "sub" / "twin").st_ino
    assert os.stat(dst / "sparse").st_blocks * 512 < 1 << 20, "the hole was filled"
    if mode == "checksum":
        # only the blocks that changed travelled for the big file, and
        # only the new tail for the one that grew
        assert summary.bytes_literal < 2 << 20, summary.to_dict()


def test_a_remote_mirror_reports_its_unsupported_orphan_move_and_stops_when_asked(tmp_path, remote):
    import threading
    dst, make = remote
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02}").write_bytes(b"x" * 1000)
    (dst / "orphan").write_bytes(b"o")
    side, settle = make()
    summary = Mirror(src, side, MirrorOptions(orphans="move", orphan_dir=str(tmp_path / "aside"),
                                              threads=1)).run()
    settle()
    assert [(os.fsdecode(p), "orphan policy" in m) for p, m in summary.errors] == [("orphan", True)]
    assert (dst / "orphan").exists() and (dst / "f19").exists()
    # a stop event set before the run: nothing is written, the summary says so
    (src / "late").write_bytes(b"late")
    stop = threading.Event()
    stop.set()
    side, settle = make()
    summary = Mirror(src, side, MirrorOptions(), stop=stop).run()
    settle()
    assert summary.stopped and summary.to_dict()["stopped"]
    assert not (dst / "late").exists()


def test_a_remote_reader_lists_only_what_the_rules_take(tmp_path, remote):
    from smirror.fs.tree import Rules
    dst, make = remote
    (dst / "keep").mkdir()
    (dst / "keep" / "a").write_bytes(b"a")
    (dst / "cache").mkdir()
    (dst / "cache" / "b").write_bytes(b"b")
    side, _ = make()
    listing = side.scan(Rules.from_patterns([("exclude", "cache/")]))
    assert sorted(listing.entries) == [b"", b"keep", b"keep/a"]
    assert side.lstat(b"keep/a") is None            # no inodes in a remote listing
    sig = side.signature(b"keep/a", 4096, False)
    assert sig.count == 1 and sig.length == 1
    with pytest.raises(Exception, match="no rolling hashes"):
        side.signature(b"keep/a", 4096, True)
