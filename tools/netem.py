"""Command line of tests/support/netem.py (python tools/netem.py --help); the
code lives there because the tests use it too."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests")]

from support.netem import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
