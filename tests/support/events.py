"""Reading a watcher (inotify or fanotify) until it is quiet."""
import time


def collect(w, settle=0.15, limit=5.0):
    """Events until none arrive for ``settle`` seconds."""
    out, deadline = [], time.monotonic() + limit
    while time.monotonic() < deadline:
        got = w.read(timeout=settle)
        if not got:
            break
        out.extend(got)
    return out
