"""Unpaced workload storms against live replication, and the time each takes to converge
(python tools/storms.py --help).

The code lives in tests/support/storms.py (the tests use it too);
this script runs it on the checkout's smirror (src/, ahead of any installed one),
as it did before the move.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "src"), os.path.join(REPO, "tests")]

from support.storms import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
