"""Exact-order capture through a FUSE mount (issue 16): the application
uses the mount point as its data directory; every mutating call is applied
to the backing directory and emitted as an op, in the order served. See
docs/mount.md."""
from .mountpoint import MountError, mounted_at, prepare, unmount
from .runner import CaptureMount

__all__ = ["CaptureMount", "MountError", "mounted_at", "prepare", "unmount"]
