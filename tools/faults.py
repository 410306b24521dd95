"""Fault injection: SIGKILL, network faults, a full disk, fuzzed frames
(python tools/faults.py --help).

The code lives in tests/support/faults.py (the tests use it too);
this script is its command line.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests")]

from support.faults import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
