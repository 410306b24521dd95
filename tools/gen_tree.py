"""Generate test and benchmark trees (python tools/gen_tree.py --help).

The code lives in tests/support/gen_tree.py (the tests use it too);
this script is its command line.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests")]

from support.gen_tree import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
