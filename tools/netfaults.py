"""Command line of tests/support/netfaults.py (python tools/netfaults.py --help); the
code lives there because the tests use it too."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests")]

from support.netfaults import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
