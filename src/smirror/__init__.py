"""smirror: continuous, write-order-preserving file replication.

The compiled kernels are imported by the modules that use them
(:mod:`smirror.checksum`, :mod:`smirror.journal`, :mod:`smirror.memqueue`);
there is no silent pure-Python fallback at runtime.
"""
from importlib import metadata as _metadata

from .errors import (  # noqa: F401
    SmirrorError, FrameError, DeltaError, QueueError, QueueFull, QueueClosed,
    QueueCorrupt, ConfigError, MirrorError,
)

try:
    __version__ = _metadata.version("smirror")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.1.0+src"

KERNELS = ("_checksum", "_journal", "_memqueue")


def native_status():
    """Map each kernel name to True (compiled module loaded) or the import
    error text."""
    import importlib
    status = {}
    for name in KERNELS:
        try:
            mod = importlib.import_module(f"smirror.{name}")
            status[name] = mod.__file__.endswith((".so", ".pyd"))
        except ImportError as exc:
            status[name] = str(exc)
    return status
