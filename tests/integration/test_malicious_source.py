"""A malicious source against a real target daemon (issue: a compromised
source or a local user must not own the target).

The attacker is built from smirror's own wire and journal modules: it logs
in with the link user's password (what a compromised source has), opens a
data link and sends hand-made frames. Each attack of the security review is
replayed; each must be refused or defused, logged by the target, and leave
nothing outside the map base. The target daemon runs as a real process with
tasks enabled and deleted files moved aside (the settings the original
attack needed)."""
import json
import os
import stat
import time

import pytest

from smirror.daemon import handshake
from smirror.errors import AuthError
from smirror.kernels.frames import encode_frame
from smirror.ops import MARK_IGNORED_DELETE, Op
from smirror.stream import wire
from smirror.stream.wire import MsgType, ProtocolError
from support.daemons import PASSWORD, Node, wait_for

SOURCE_ID = "ba5eba11deadbeef"


def _tree(root):
    """Every entry under ``root`` as path -> (mode, size, mtime_ns, link)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                             os.readlink(p) if stat.S_ISLNK(st.st_mode) else None)
    return out




class Attacker:
    """A data link opened as a compromised source would: the link user's
    password, any OPEN, any frame."""

    def __init__(self, node, user="repl", source=SOURCE_ID, conid=1, map_base=None):
        self.link = wire.connect("127.0.0.1", node.port, io_timeout=30)
        handshake.login(self.link, user, PASSWORD, purpose="data")
        self.link.send_json(MsgType.OPEN, {"conid": conid, "map_base": str(map_base),
                                           "source": source, "next_seq": 1})
        mtype, reply = self.link.recv_json(MsgType.READY, MsgType.ERROR)
        if mtype == MsgType.ERROR:
            self.link.close()
            raise ProtocolError(reply.get("error", "refused"))
        self.seq = reply["last_seq"]
        self.acked = self.seq

    def send(self, make):
        """Send one op in a frame of its own: ``make(seq)`` builds it."""
        self.seq += 1
        self.link.send(MsgType.FRAME, encode_frame([make(self.seq)], False))
        return self.seq

    def acked_through(self, seq, timeout=30.0):
        """Read ACKs until ``seq`` is acknowledged (applied or durable);
        an ERROR from the target raises ProtocolError with its text."""
        deadline = time.monotonic() + timeout
        while self.acked < seq:
            if time.monotonic() > deadline:
                raise AssertionError(f"seq {seq} not acknowledged (last ACK {self.acked})")
            mtype, payload = self.link.recv()
            if mtype == MsgType.ACK:
                self.acked = int.from_bytes(bytes(payload)[:8], "little")
            elif mtype == MsgType.ERROR:
                raise ProtocolError(json.loads(bytes(payload)).get("error", ""))
        return True

    def applied(self, map_base, timeout=30.0):
        """Until every op sent so far is applied: a CREATE of a fresh name
        goes last, and ops apply in order."""
        name = f"applied-{self.seq + 1}"
        self.acked_through(self.send(lambda s: Op.create(s, name.encode(), 0o644)), timeout)
        wait_for(lambda: os.path.exists(os.path.join(map_base, name)), timeout, f"{name} applied")

    def close(self):
        self.link.close()


@pytest.fixture
def world(tmp_path):
    """A target daemon whose allowed root is ``backup``; beside it an
    ``outside`` directory (with a task directory holding one harmless task)
    that nothing may touch."""
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    backup, outside = tmp_path / "backup", tmp_path / "outside"
    tasks = outside / "tasks"
    tasks.mkdir(parents=True)
    backup.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    (tasks / "ok.sh").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(tasks / "ok.sh", 0o755)
    node = Node(tmp_path, "target", env, allowed_roots=[backup],
                extra=f'[tasks]\nenabled = true\ndirectory = "{tasks}"\n'
                      f'[target]\nignored_deletes = "move"\norphans = "move"\n')
    node.add_user("repl", "replication")
    node.add_user("repl2", "replication")
    node.start()
    before = _tree(outside)
    yield node, backup / "mb", outside
    node.kill()
    assert _tree(outside) == before, "something outside the map base changed"
    for p, (mode, *_rest) in _tree(tmp_path).items():
        assert not (stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID)), \
            f"setuid/setgid file {p} on the target"


def _no_symlink_in(root):
    return [p for p, (mode, *_r) in _tree(root).items() if stat.S_ISLNK(mode)]


def test_keep_slot_symlink_attack_writes_nothing_outside(world):
    """Finding 1: SYMLINK x -> outside, a MARK moving x into the deleted
    slot, MKDIR x, a setuid script x/evil.sh, a second move: in the original
    the second move followed the symlink in the slot into the task directory."""
    node, mb, outside = world
    a = Attacker(node, map_base=mb)
    tasks = outside / "tasks"
    def mark(path):
        return lambda s: Op.mark(s, MARK_IGNORED_DELETE, json.dumps(
            {"path": path, "dir": False, "mode": "move", "keep_days": 0}).encode())
    a.send(lambda s: Op.symlink(s, b"x", os.fsencode(tasks)))
    a.send(mark("x"))
    a.send(lambda s: Op.mkdir(s, b"x", 0o755))
    a.send(lambda s: Op.create(s, b"x/evil.sh", 0o4755))
    a.send(lambda s: Op.write(s, b"x/evil.sh", 0, b"#!/bin/sh\ntouch /tmp/pwned\n"))
    a.send(mark("x/evil.sh"))
    a.applied(mb)
    deleted = node.dir / "state" / "deleted"
    assert not (tasks / "evil.sh").exists()
    if deleted.exists():
        assert _no_symlink_in(deleted) == [], "a symlink was moved into a keep slot"
    a.close()


def test_setuid_and_setgid_bits_are_stripped(world):
    node, mb, _ = world
    a = Attacker(node, map_base=mb)
    a.send(lambda s: Op.create(s, b"suid", 0o4755))
    a.send(lambda s: Op.mkdir(s, b"sgid-dir", 0o2775))
    a.send(lambda s: Op.create(s, b"plain", 0o644))
    last = a.send(lambda s: Op.setattr(s, b"plain", mode=0o6755))
    a.acked_through(last)
    wait_for(lambda: (mb / "plain").exists() and stat.S_IMODE(os.lstat(mb / "plain").st_mode) == 0o755,
          what="the SETATTR applied")
    assert stat.S_IMODE(os.lstat(mb / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(mb / "sgid-dir").st_mode) == 0o775
    a.close()


def test_a_forged_source_id_is_refused_and_the_real_connection_goes_on(world):
    """Finding 5: a second link user claiming the first source's id (with
    another map base) must neither close nor take over its connection."""
    node, mb, _ = world
    a = Attacker(node, map_base=mb)
    a.acked_through(a.send(lambda s: Op.create(s, b"f", 0o644)))
    with pytest.raises(ProtocolError, match="(?i)bound|source"):
        Attacker(node, user="repl2", map_base=mb.parent / "other")
    with pytest.raises(ProtocolError):
        Attacker(node, user="repl", source="0123456789abcdef", map_base=mb.parent / "other")
    a.acked_through(a.send(lambda s: Op.write(s, b"f", 0, b"still here")))
    wait_for(lambda: (mb / "f").read_bytes() == b"still here", what="the real source's write")
    assert not (mb.parent / "other").exists()
    assert "refused" in node.log()
    a.close()


@pytest.mark.parametrize("where", ["/", "/etc", "..", "backup/../../outside"])
def test_map_bases_outside_the_allowed_roots_are_refused(world, where):
    node, mb, outside = world
    base = where if where.startswith("/") else str(mb.parent / where) if where != ".." \
        else str(mb.parent / ".." / "outside")
    with pytest.raises(ProtocolError, match="(?i)allowed|map base|refused"):
        Attacker(node, map_base=base)


def test_a_bad_task_is_refused_and_the_applier_goes_on(world):
    """Finding 11: a TASK whose fields have the wrong types killed the
    applier; now it is refused with a notice and later ops are applied."""
    node, mb, _ = world
    a = Attacker(node, map_base=mb)
    spec = {"v": 1, "name": "t", "on_execute": ["ok.sh"], "on_receive": None, "on_queue": None,
            "on_transmit": None, "timeout": None, "args": [1], "id": "00", "group": [1],
            "source": SOURCE_ID, "queued_at": 0.0}
    try:
        a.send(lambda s: Op.task(s, b"t", json.dumps(spec).encode()))
    except Exception as exc:       # noqa: BLE001 - an encoder that refuses it is fine too
        pytest.fail(f"the attacker's own encoder refused a TASK payload: {exc}")
    last = a.send(lambda s: Op.create(s, b"after-task", 0o644))
    a.acked_through(last)
    wait_for(lambda: (mb / "after-task").exists(), what="the op after the bad task")
    assert "task" in node.log() and ("refused" in node.log() or "TaskError" in node.log())
    a.close()


def test_a_directory_swapped_for_a_symlink_between_ops(world):
    """Finding 2: a local user who owns a directory in the map base swaps it
    for a symlink to elsewhere between two ops: the next op under it must not
    write through it."""
    node, mb, outside = world
    a = Attacker(node, map_base=mb)
    a.send(lambda s: Op.mkdir(s, b"d", 0o777))
    a.acked_through(a.send(lambda s: Op.create(s, b"d/a", 0o644)))
    wait_for(lambda: (mb / "d" / "a").exists(), what="d/a")
    os.rename(mb / "d", mb / "d.old")
    os.symlink(outside, mb / "d")
    for make in (lambda s: Op.create(s, b"d/b", 0o644),
                 lambda s: Op.write(s, b"d/precious", 0, b"owned"),
                 lambda s: Op.truncate(s, b"d/precious", 0),
                 lambda s: Op.setattr(s, b"d/precious", mode=0o777),
                 lambda s: Op.hardlink(s, b"hl", b"d/precious"),
                 lambda s: Op.rename(s, b"d/precious", b"stolen"),
                 lambda s: Op.delete(s, b"d/precious")):
        try:
            a.send(make)
        except OSError:
            break                  # the target ended the link: refused
    wait_for(lambda: "symlink" in node.log(), what="the refusal in the target's log")
    assert not (mb / "stolen").exists() and not (mb / "hl").exists()
    a.close()


def test_the_link_user_cannot_use_control_verbs(world):
    """Finding 4: the password on every source gives data links only."""
    from smirror.daemon.control import Client, RequestError
    node, mb, _ = world
    with Client(node.address) as c:
        c.login("repl", PASSWORD)
        for verb, args in (("status", {}), ("repset.create", {"name": "x", "root": str(node.dir)}),
                           ("target.scan", {"map_base": str(node.dir / "state")}),
                           ("target.signature", {"map_base": str(node.dir / "state"),
                                                 "path": "users.json", "block_size": 4096})):
            with pytest.raises((RequestError, AuthError)):
                c.call(verb, **args)
