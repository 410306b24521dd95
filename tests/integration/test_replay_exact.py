"""Replay after a power loss is exact (stream.apply's barriers): a target's
map base on the power-loss layer (tests/support/lazyfs.py) loses the data
written since its last durable pass and keeps the names (a later state);
the ops after the synced seq, applied again in order over what the disk
kept, give the source's tree without asking the source for anything. The
library API's source serves no resyncs: without exact replay its replica
never converges after a power loss."""
import contextlib
import os
import shutil

import pytest

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")
pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")

from smirror.capture.recorder import Recorder  # noqa: E402
from smirror.stream.apply import Applier  # noqa: E402
from support.lazyfs import LazyMount, clear  # noqa: E402
from support.treestate import diff, snapshot  # noqa: E402
from support.workload import Workload  # noqa: E402

BOOT_AT = 24        # the boot id's place in the applied-state file (stream.apply)


class Numbered(list):
    def __call__(self, op):
        self.append(op._replace(seq=len(self) + 1))


@pytest.mark.parametrize("seed", range(4))
def test_ops_replayed_after_a_power_loss_give_the_source_tree(tmp_path, seed):
    src = tmp_path / "src"
    src.mkdir()
    ops = Numbered()
    Workload(Recorder(src, ops), seed=700 + seed, max_write=9000).run(400)
    n = len(ops)
    for j, k in ((n // 5, n // 2), (n // 3, n), (n // 2, n)):
        disk, mnt = tmp_path / f"disk-{j}-{k}", tmp_path / f"mnt-{j}-{k}"
        disk.mkdir()
        # the state file off the layer: this process serves the layer, and
        # an msync of a mapping on it would wait for this process
        state = tmp_path / f"applied-{j}-{k}"
        layer = LazyMount(disk, mnt).start()
        app = Applier(mnt / "replica", state_path=state)
        try:
            app.apply_all(ops[:j])
            app.sync_durable()
            app.apply_all(ops[j:k])
        finally:
            lost = layer.power_loss()
            with contextlib.suppress(OSError):
                app.close()
            clear(mnt)          # (the unmount waited for the applier's descriptors)
        raw = bytearray(state.read_bytes())
        raw[BOOT_AT:BOOT_AT + 16] = b"\x07" * 16          # the machine restarted
        state.write_bytes(bytes(raw))
        # what the disk kept, served again (plain: no later loss is modelled)
        again = Applier(disk / "replica", state_path=state)
        synced = again.applied_seq
        # (after a reboot: up to the reservation, stream.apply.RESERVE_OPS)
        assert again.replay_until >= k and j <= synced <= k, (j, synced, k)
        try:
            for op in ops[synced:]:
                again.apply(op)         # raises where the tree does not fit the op
        finally:
            again.close()
        assert diff(snapshot(src), snapshot(disk / "replica")) == [], \
            f"replay of {synced + 1}..{k} over the disk (lost {lost}), seed {seed}"


def _ops(*steps):
    """Ops numbered from 1; the string "sync" marks a durable pass."""
    from smirror.ops import Op
    made, syncs = [], []
    for step in steps:
        if step == "sync":
            syncs.append(len(made))
            continue
        kind, *args = step
        made.append(getattr(Op, kind)(len(made) + 1, *args))
    return made, syncs


# each needs its barrier: without it, the replay writes into the wrong inode
# or moves a later file over the right one
NAMES_REUSED = {
    "rename-over-a-written-name": _ops(
        ("create", b"a", 0o644), ("write", b"a", 0, b"A" * 5000),
        ("create", b"b", 0o644), ("write", b"b", 0, b"B" * 5000), "sync",
        ("write", b"b", 0, b"b" * 100), ("rename", b"a", b"b")),
    "a-name-renamed-away-made-again": _ops(
        ("create", b"a", 0o644), ("write", b"a", 0, b"A" * 5000), "sync",
        ("rename", b"a", b"b"), ("create", b"a", 0o644), ("write", b"a", 0, b"new")),
    "a-hard-link-over-a-written-name": _ops(
        ("create", b"n", 0o644), ("write", b"n", 0, b"N" * 5000),
        ("create", b"e", 0o644), ("write", b"e", 0, b"E" * 5000), "sync",
        ("write", b"n", 0, b"n" * 100), ("hardlink", b"n", b"e")),
    "a-directory-renamed-away-made-again": _ops(
        ("mkdir", b"d", 0o755), ("create", b"d/f", 0o644), ("write", b"d/f", 0, b"F" * 5000),
        "sync", ("rename", b"d", b"e"), ("mkdir", b"d", 0o755), ("create", b"d/f", 0o644),
        ("write", b"d/f", 0, b"other")),
    # replayed, the RMDIR finds the file the rename moved in (its data
    # durable long ago) and removes the directory with it
    "a-directory-removed-made-again-and-a-file-moved-in": _ops(
        ("mkdir", b"d", 0o755), ("create", b"x", 0o644), ("write", b"x", 0, b"X" * 5000),
        "sync", ("rmdir", b"d"), ("mkdir", b"d", 0o755), ("rename", b"x", b"d/x")),
    "a-file-deleted-made-a-directory-and-a-file-moved-in": _ops(
        ("create", b"d", 0o644), ("create", b"x", 0o644), ("write", b"x", 0, b"X" * 5000),
        "sync", ("delete", b"d"), ("mkdir", b"d", 0o755), ("mkdir", b"d/sub", 0o755),
        ("rename", b"x", b"d/sub/x")),
}


@pytest.mark.parametrize("case", NAMES_REUSED)
def test_a_replay_where_names_are_reused_is_exact(tmp_path, case):
    ops, syncs = NAMES_REUSED[case]
    want = tmp_path / "want"
    plain = Applier(want)
    plain.apply_all(ops)
    plain.close()
    disk, mnt, state = tmp_path / "disk", tmp_path / "mnt", tmp_path / "applied"
    disk.mkdir()
    layer = LazyMount(disk, mnt).start()
    app = Applier(mnt / "replica", state_path=state)
    try:
        for i, op in enumerate(ops):
            if i in syncs:
                app.sync_durable()
            app.apply(op)
    finally:
        layer.power_loss()
        with contextlib.suppress(OSError):
            app.close()
        clear(mnt)
    raw = bytearray(state.read_bytes())
    raw[BOOT_AT:BOOT_AT + 16] = b"\x07" * 16
    state.write_bytes(bytes(raw))
    again = Applier(disk / "replica", state_path=state)
    try:
        for op in ops[again.applied_seq:]:
            again.apply(op)
    finally:
        again.close()
    # (mtimes: these ops carry none, each tree has the times it was made at)
    assert diff(snapshot(want, mtime=False), snapshot(disk / "replica", mtime=False)) == []
    assert _link_groups(want) == _link_groups(disk / "replica")


def _link_groups(root):
    groups: dict = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            groups.setdefault(st.st_ino, []).append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(sorted(g) for g in groups.values())


def test_the_durable_pass_survives_directories_removed_and_their_numbers_reused(tmp_path):
    # a directory whose attributes changed is synced by name at the pass:
    # one held open, removed and its inode number given to a new directory
    # was an inode the FUSE kernel fails every call on (EIO, the pass held
    # for good); one removed since needs no sync (ENOENT from the layer)
    from smirror.ops import Op
    disk, mnt = tmp_path / "disk", tmp_path / "mnt"
    disk.mkdir()
    with LazyMount(disk, mnt):
        app = Applier(mnt / "replica", state_path=tmp_path / "applied")
        try:
            seq = 0
            for i in range(20):
                ops = [Op.mkdir(0, b"d%d" % i, 0o755), Op.setattr(0, b"d%d" % i, mode=0o700),
                       Op.rmdir(0, b"d%d" % i), Op.mkdir(0, b"e%d" % i, 0o755),
                       Op.create(0, b"e%d/f" % i, 0o644)]
                for op in ops:
                    seq += 1
                    app.apply(op._replace(seq=seq))
                assert app.sync_durable() == seq
        finally:
            app.close()
