"""Replication lag of smirror vs lsyncd under the same workload
(python tools/lag_compare.py --help).

The code lives in tests/support/lag_compare.py (the tests use it too);
this script runs it on the checkout's smirror (src/, ahead of any installed one),
as it did before the move.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "src"), os.path.join(REPO, "tests")]

from support.lag_compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
