"""PostgreSQL under pgbench with its data directory on a daemon's capture
mount: the target, frozen at random instants (pause-target or SIGKILL of
the target daemon) and copied, always holds a data directory on which a
PostgreSQL starts and recovers, pg_amcheck finds nothing, and the history
rows are a prefix of the committed history (tests/support/pg_copies.py)."""
import os
import shutil
import subprocess

import pytest

from support import postgres

pytest.importorskip("smirror.capture.mount._fuse", reason="the capture mount needs smirror "
                    "built with libfuse 3 (Debian: libfuse3-dev, pkg-config)")

from support.pg_copies import run

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3")
                       or os.geteuid() != 0, reason="needs /dev/fuse, fusermount3 (Debian's fuse3) and root"),
    pytest.mark.skipif(bool(postgres.unavailable()), reason=postgres.unavailable() or "-"),
]


@pytest.fixture
def work():
    """A directory the postgres user can reach (tmp_path is root's alone)."""
    d = postgres.open_dir("smirror-pg-test-")
    yield d
    subprocess.run(["fusermount3", "-u", "-z", os.path.join(d, "mnt")], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_postgres_copies_of_the_frozen_target_recover_and_hold_a_prefix(work):
    r = run(work, trials=3, kill_every=3, seed=1)
    assert not r["failures"], "\n".join(r["failures"])
    assert r["copies"] == 3 and r["kills"] == 1 and r["pauses"] == 2, r
    assert max(r["rows"]) > 0, r
    assert r["converged"], r
