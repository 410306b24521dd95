"""Running out of file descriptors, for real, within one block."""
import os
import resource
from contextlib import contextmanager


@contextmanager
def no_free_descriptors():
    """Every new descriptor of this process fails with EMFILE in the block
    (the soft RLIMIT_NOFILE lowered to the lowest free descriptor; those
    open stay usable), as when a busy daemon runs out of them. Only calls
    that need no new descriptor may run in the block (no file opened, no
    module imported for the first time)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
