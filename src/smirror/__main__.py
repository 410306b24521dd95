import sys

from smirror.cli.main import main

sys.exit(main())
