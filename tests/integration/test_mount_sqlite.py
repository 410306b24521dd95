"""SQLite in WAL mode with its database on a daemon's capture mount: the
target, frozen at random instants (pause-target or SIGKILL of the target
daemon) and copied, always holds a database that opens, passes
integrity_check and holds a prefix of the committed rows."""
import os
import shutil

import pytest

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")

from support.sqlite_copies import run

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3") or os.geteuid() != 0,
    reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root")


def test_sqlite_wal_copies_of_the_frozen_target_open_and_hold_a_prefix(tmp_path):
    r = run(tmp_path, trials=6, kill_every=3, seed=1)
    assert r["copies"] == 6 and r["kills"] == 2 and r["pauses"] == 4, r
    assert max(r["rows"]) > 0, r
    assert r["final_rows"] == r["committed"], r

