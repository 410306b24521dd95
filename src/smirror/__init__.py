"""smirror: continuous, write-order-preserving file replication.

The compiled kernels are imported by the modules that use them
(:mod:`smirror.kernels.checksum`, :mod:`smirror.kernels.frames`, :mod:`smirror.kernels.memqueue`);
there is no silent pure-Python fallback at runtime.
"""
from smirror.errors import (  # noqa: F401
    ConfigError,
    DeltaError,
    FrameError,
    MirrorError,
    QueueClosed,
    QueueCorrupt,
    QueueError,
    QueueFull,
    SmirrorError,
)


def __getattr__(name):
    # importlib.metadata costs ~30 ms: only commands that print the version pay it
    if name == "__version__":
        from importlib import metadata
        try:
            return metadata.version("smirror")
        except metadata.PackageNotFoundError:  # running from a source tree
            return "0.1.0+src"
    if name in ("Replication", "Recorder"):
        from smirror import replication as replicate
        from smirror.capture import recorder as capture
        return {"Replication": replicate.Replication, "Recorder": capture.Recorder}[name]
    raise AttributeError(f"module 'smirror' has no attribute {name!r}")

KERNELS = ("_checksum", "_journal", "_memqueue")


def native_status():
    """Map each kernel name to True (compiled module loaded) or the import
    error text."""
    import importlib
    status: dict[str, bool | str] = {}
    for name in KERNELS:
        try:
            mod = importlib.import_module(f"smirror.kernels.{name}")
            status[name] = (mod.__file__ or "").endswith((".so", ".pyd"))
        except ImportError as exc:
            status[name] = str(exc)
    return status
