"""Power-loss trials: a target daemon's state and map base on a LazyFS-style
layer, SIGKILL + power loss at random moments (python tools/powerloss.py --help).

The code lives in tests/support/powerloss.py (the tests use it too);
this script is its command line.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "tests")]

from support.powerloss import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
