"""After a power loss the applied seq may be lost with the page cache (the
state file holds the synced seq only): the reservation, made durable every
RESERVE_OPS ops, says how far ops may have been applied, so the restarted
applier knows which ops it applies again over a later tree."""
import struct

from smirror.ops import Op
from smirror.stream.apply import RESERVE_OPS, Applier


def test_the_replay_window_reaches_the_reservation_when_the_applied_seq_was_lost(tmp_path):
    state = tmp_path / "applied"
    app = Applier(tmp_path / "dst", state_path=state)
    app.apply(Op.create(1, b"a", 0o644))
    app.sync_durable()
    for seq in range(2, 40):
        app.apply(Op.write(seq, b"a", seq, b"x"))
    app.close()
    raw = bytearray(state.read_bytes())
    raw[8:16] = struct.pack("<Q", 1)        # the applied store lost: the synced one
    raw[24:40] = b"\x09" * 16                 # in another boot
    state.write_bytes(bytes(raw))
    again = Applier(tmp_path / "dst", state_path=state)
    assert again.applied_seq == 1
    assert again.replay_until == 1 + RESERVE_OPS >= 39
    again.close()


def test_in_the_same_boot_the_applied_seq_is_trusted(tmp_path):
    state = tmp_path / "applied"
    app = Applier(tmp_path / "dst", state_path=state)
    app.apply(Op.create(1, b"a", 0o644))
    app.close()
    again = Applier(tmp_path / "dst", state_path=state)
    assert again.applied_seq == 1 and again.replay_until == 0      # (syncfs made it durable)
    again.close()


def test_a_clean_stop_with_everything_synced_leaves_nothing_to_replay_after_a_reboot(tmp_path):
    state = tmp_path / "applied"
    app = Applier(tmp_path / "dst", state_path=state)
    app.apply(Op.create(1, b"a", 0o644))
    app.sync_durable()
    app.close()
    raw = bytearray(state.read_bytes())
    raw[24:40] = b"\x09" * 16                 # in another boot
    state.write_bytes(bytes(raw))
    again = Applier(tmp_path / "dst", state_path=state)
    assert again.applied_seq == 1 and again.replay_until == 0
    again.close()


def test_a_delete_under_a_directory_the_target_lacks_is_done(tmp_path):
    # a watcher's stream (or a replay) can name a path whose directory went
    # first: nothing stands there, nothing to resync
    app = Applier(tmp_path / "dst")
    app.apply(Op.mkdir(1, b"d", 0o755))
    app.apply(Op.delete(2, b"gone/f"))
    app.apply(Op.rmdir(3, b"gone/sub"))
    app.apply(Op.delete(4, b"d/gone/f"))
    assert app.applied_seq == 4 and app.stats["repairs"] == 0
    app.close()
