"""Check that a target tree equals the source after some prefix of an op log
(python tools/prefixcheck.py OPS.pickle TARGET_DIR APPLIED_FILE).

The code lives in tests/support/prefixcheck.py (the tests use it too);
this script is its command line.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests")]

from support.prefixcheck import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
