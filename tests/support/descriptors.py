"""Running out of file descriptors, for real, within one block."""
import gc
import os
import resource
from contextlib import contextmanager

from smirror.stream import reclaim


@contextmanager
def no_free_descriptors():
    """Every new descriptor of this process fails with EMFILE in the block
    (the soft RLIMIT_NOFILE lowered to the lowest free descriptor; those
    open stay usable), as when a busy daemon runs out of them. Only calls
    that need no new descriptor may run in the block (no file opened, no
    module imported for the first time).

    A descriptor closed during the block by anything else in the process
    frees a slot below the limit, and the code under test gets it: the
    applier's reclaimer threads close the inodes a test's applied DELETEs
    left them (late, under load), and the garbage collector closes the
    files of unreachable objects. So the reclaimer is drained first, and
    the collector runs first and not in the block."""
    reclaim.shared().drain()
    gc.collect()
    collecting = gc.isenabled()
    gc.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.dup(0)
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if collecting:
            gc.enable()
