"""The ``newer`` rule of Storage Mirroring's mirrors, in one place: the
one-shot mirror (:mod:`smirror.mirror.engine`) and a connection's mirror
through its stream (the daemon's ``mirror-start --newer``) both use it."""
from __future__ import annotations


def source_is_newer(src_mtime_ns: int, src_size: int, dst_mtime_ns: int, dst_size: int) -> bool:
    """True when the source's copy of a file is sent over the target's: its
    mtime is later, or the same with another size (the same mtime and size:
    unchanged). A target copy with a later mtime is left as it is."""
    return src_mtime_ns > dst_mtime_ns or (src_mtime_ns == dst_mtime_ns and src_size != dst_size)
