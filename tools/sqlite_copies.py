"""SQLite in WAL mode on a daemon's capture mount: the target frozen
(pause-target, or SIGKILL of the target daemon) at random instants and
copied; every copy must open, pass integrity_check and hold a prefix of
the committed rows (python tools/sqlite_copies.py [--trials 50]; root,
/dev/fuse and the FUSE binding (libfuse3-dev at build) needed).

The code lives in tests/support/sqlite_copies.py (the tests use it too);
this script is its command line.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "src")]
# the daemons it starts run this checkout's smirror too
os.environ["PYTHONPATH"] = os.pathsep.join(
    [os.path.join(REPO, "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

from support.sqlite_copies import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
