"""FUSE over io_uring for a test: the fuse module's ``enable_uring``
parameter set for its duration (root; Linux 6.14 and later built with
CONFIG_FUSE_IO_URING), and smirror built with liburing; else the test is
skipped, saying which is missing."""
import contextlib
import os

import pytest

PARAM = "/sys/module/fuse/parameters/enable_uring"


@contextlib.contextmanager
def _enable_uring_set(value: str):
    """``enable_uring`` set to ``value`` for the block, then as it was."""
    with open(PARAM) as f:
        old = f.read().strip()
    try:
        with open(PARAM, "w") as f:
            f.write(value)
    except OSError as exc:
        pytest.skip(f"cannot set {PARAM} to {value}: {exc}")
    try:
        yield
    finally:
        with open(PARAM, "w") as f:
            f.write(old)


@contextlib.contextmanager
def uring_enabled():
    from smirror.capture.mount import _fuse
    if not _fuse.URING_BUILT:
        pytest.skip("smirror was built without liburing (Debian: liburing-dev)")
    if not os.path.exists(PARAM):
        pytest.skip(f"this kernel has no FUSE over io_uring ({PARAM})")
    with _enable_uring_set("Y"):
        yield


@contextlib.contextmanager
def uring_disabled():
    """The kernel offers no FUSE over io_uring for the test's duration
    (its default: ``enable_uring`` N; nothing to do where it has none)."""
    if not os.path.exists(PARAM):
        yield
        return
    with _enable_uring_set("N"):
        yield
