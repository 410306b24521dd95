"""One embedded smbench run in a process of its own: the request as JSON on
stdin, ``{"result": ...}`` or ``{"error": ...}`` as JSON on stdout, the live
line (when asked and stderr is a terminal) on stderr."""
from __future__ import annotations

import json
import sys

from smirror.errors import SmirrorError

from .report import LiveLine
from .runner import measure
from .workloads import Params


def main() -> int:
    req = json.load(sys.stdin)
    try:
        result = measure(req["workload"], mode="embedded", source_memory=req["source_memory"],
                         target_memory=req["target_memory"], params=Params(**req["params"]),
                         base_dir=req["base_dir"], disk_limit=req["disk_limit"],
                         progress=LiveLine() if req["live"] else None)
    except (SmirrorError, OSError) as exc:
        json.dump({"error": f"{req['workload']}: {exc}"}, sys.stdout)
        return 1
    json.dump({"result": result}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
