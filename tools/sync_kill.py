"""SIGKILL of ``smirror replicate --mount --sync MODE`` at random instants:
every transaction the application saw committed must be on the target
(python tools/sync_kill.py --mode fsync --trials 50; --mode async shows
what is lost without a synchronous mode).

The code lives in tests/support/synckill.py (the tests use it too);
this script is its command line.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "src")]

from support.synckill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
