"""PostgreSQL under pgbench on a daemon's capture mount: the target frozen
(pause-target, or SIGKILL of the target daemon) at random instants and
copied; on every copy a PostgreSQL must start and recover, pg_amcheck
must pass and the history rows be a prefix of the committed history
(python tools/pg_copies.py [--trials 50] [--capture watch]; root,
/dev/fuse, the FUSE binding (libfuse3-dev at build) and Debian's postgresql needed).

The code lives in tests/support/pg_copies.py (the tests use it too);
this script is its command line.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "src")]
# the daemons it starts run this checkout's smirror too
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.join(REPO, "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

from support.pg_copies import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
