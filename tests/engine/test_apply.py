"""The applier on real directories: a random workload recorded through the
capture API and applied op by op ends in an identical tree; confinement."""
import os

import pytest

from smirror.capture.recorder import Recorder
from smirror.errors import ConfinementError
from smirror.ops import Op, OpKind
from smirror.stream.apply import Applier, ApplyError
from support.treestate import diff, snapshot
from support.workload import Workload


class Numbered(list):
    """An emit sink that numbers ops like a connection journal does."""
    def __call__(self, op):
        self.append(op._replace(seq=len(self) + 1))


@pytest.fixture
def dirs(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    return src, dst


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_gives_identical_tree(dirs, seed):
    src, dst = dirs
    ops = Numbered()
    Workload(Recorder(src, ops), seed=seed).run(300)
    app = Applier(dst)
    app.apply_all(ops)
    app.flush()
    assert diff(snapshot(src), snapshot(dst)) == []
    assert app.applied_seq == len(ops) and app.stats["repairs"] == 0


@pytest.mark.parametrize("seed", range(3))
def test_restart_at_every_point_converges(dirs, seed):
    """A target killed at any point restarts from its applied-sequence file;
    the op it applied but had not recorded comes again and must be harmless."""
    src, dst = dirs
    ops = Numbered()
    Workload(Recorder(src, ops), seed=100 + seed).run(150)
    for cut in range(1, len(ops), 7):
        target, state = dst / str(cut), dst / f"{cut}.applied"
        app = Applier(target, state_path=state)
        app.apply_all(ops[:cut])
        app.close()
        # the kill came after op `cut` took effect but before its seq was stored
        with open(state, "r+b") as f:
            f.seek(8)
            f.write((cut - 1).to_bytes(8, "little"))
        app = Applier(target, state_path=state)
        assert app.applied_seq == cut - 1
        app.apply_all(ops)          # the whole stream again: earlier ops are skipped
        app.close()
        assert app.stats["skipped"] == cut - 1
        assert diff(snapshot(src), snapshot(target)) == [], f"restart after op {cut}"


def test_applied_ops_are_never_applied_again(tmp_path):
    runs = []
    state = tmp_path / "applied"
    ops = [Op.task(1, "a"), Op.task(2, "b"), Op.task(3, "c")]
    app = Applier(tmp_path / "base", state_path=state, on_task=lambda op: runs.append(bytes(op.path)))
    app.apply_all(ops[:2])
    app.close()
    app = Applier(tmp_path / "base", state_path=state, on_task=lambda op: runs.append(bytes(op.path)))
    app.apply_all(ops)
    assert runs == [b"a", b"b", b"c"]


def test_damaged_state_file_is_a_clear_error(tmp_path):
    (tmp_path / "applied").write_bytes(b"SMAPPLY2garbage")
    with pytest.raises(ApplyError, match="expected 40"):
        Applier(tmp_path / "base", state_path=tmp_path / "applied")
    (tmp_path / "applied").write_bytes(b"x" * 40)
    with pytest.raises(ApplyError, match="bad magic"):
        Applier(tmp_path / "base", state_path=tmp_path / "applied")


@pytest.mark.parametrize("op,message", [
    (Op(1, OpKind.WRITE, b"../escape", b"", 0, 0, 0, 0, 0, 0, 0, b"x"), "'..'"),
    (Op(1, OpKind.CREATE, b"/etc/evil", b"", 0, 0, 0o644, 0, 0, 0, 0, b""), "absolute"),
    (Op(1, OpKind.RENAME, b"a", b"../../b", 0, 0, 0, 0, 0, 0, 0, b""), "'..'"),
    (Op(1, OpKind.MKDIR, b"a/./b", b"", 0, 0, 0o755, 0, 0, 0, 0, b""), "'.'"),
])
def test_crafted_paths_are_refused(tmp_path, op, message):
    app = Applier(tmp_path / "base")
    with pytest.raises(ConfinementError, match=message) as info:
        app.apply(op)
    assert f"op seq 1 {OpKind(op.kind).name} refused" in str(info.value)
    assert os.listdir(tmp_path) == ["base"]


def test_symlink_escape_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    app = Applier(tmp_path / "base")
    app.apply(Op.symlink(1, b"evil", os.fsencode(outside)))
    for op in (Op.create(2, b"evil/owned", 0o644), Op.write(2, b"evil/owned", 0, b"x"),
               Op.mkdir(2, b"evil/d", 0o755)):
        with pytest.raises(ConfinementError, match="passes through symlink"):
            app.apply(op)
    # writing to the symlink itself does not follow it either
    (outside / "victim").write_text("keep")
    app.apply(Op.symlink(3, b"link2", os.fsencode(outside / "victim")))
    with pytest.raises(ConfinementError, match="symlink"):
        app.apply(Op.write(4, b"link2", 0, b"overwritten"))
    assert os.listdir(outside) == ["victim"] and (outside / "victim").read_text() == "keep"


def test_directory_replaced_by_symlink_after_rename_is_refused(tmp_path):
    """Verified-directory caches must not survive a rename: d is renamed,
    a symlink to the outside takes its name, a write into d/ must fail."""
    outside = tmp_path / "outside"
    outside.mkdir()
    app = Applier(tmp_path / "base")
    app.apply(Op.mkdir(1, b"d", 0o755))
    app.apply(Op.create(2, b"d/f", 0o644))
    app.apply(Op.rename(3, b"d", b"e"))
    app.apply(Op.symlink(4, b"d", os.fsencode(outside)))
    with pytest.raises(ConfinementError):
        app.apply(Op.create(5, b"d/f", 0o644))
    assert os.listdir(outside) == []


def test_failed_op_names_op_and_path(tmp_path):
    """An op the target cannot carry out names itself (a write to what is
    a directory on the target)."""
    app = Applier(tmp_path / "base")
    app.apply(Op.mkdir(6, b"dir", 0o755))
    with pytest.raises(ApplyError, match=r"op seq 7 WRITE b'dir' failed on the target"):
        app.apply(Op.write(7, b"dir", 0, b"data"))


def test_task_and_mark_callbacks_see_earlier_writes(tmp_path):
    seen = []

    def on_task(op):
        seen.append((bytes(op.path), (tmp_path / "base" / "f").read_bytes()))
    app = Applier(tmp_path / "base", on_task=on_task, on_mark=lambda op: seen.append(bytes(op.path)))
    app.apply_all([Op.create(1, b"f"), Op.write(2, b"f", 0, b"before"), Op.task(3, "snap"),
                   Op.mark(4, b"m1"), Op.write(5, b"f", 0, b"AFTER!")])
    assert seen == [(b"snap", b"before"), b"m1"]


def test_the_root_mtime_mark_sets_the_map_base_time_and_a_bad_one_is_logged(tmp_path, caplog):
    """No op names the root: its mtime travels as a MARK that the applier
    applies itself (the target connection and every other user of the
    applier get it alike); a payload that is not an integer time is an
    error in the log, never an exception out of the applier."""
    from smirror.ops import MARK_ROOT_MTIME
    seen = []
    a = Applier(tmp_path / "dst", on_mark=seen.append)
    a.apply(Op.mark(1, MARK_ROOT_MTIME, b'{"mtime_ns": 1234567890123456789}'))
    assert os.lstat(tmp_path / "dst").st_mtime_ns == 1234567890123456789
    bads = (b'{"mtime_ns": "soon"}', b"not json", b'{"other": 1}', b'{"mtime_ns": true}')
    for seq, bad in enumerate(bads, 2):
        a.apply(Op.mark(seq, MARK_ROOT_MTIME, bad))
    assert os.lstat(tmp_path / "dst").st_mtime_ns == 1234567890123456789
    assert caplog.text.count("root-mtime MARK has a bad payload") == 4
    a.apply(Op.mark(6, b"smirror.other", b"{}"))
    assert [bytes(op.path) for op in seen] == [b"smirror.other"]     # the root's is not passed on
