"""fallocate(2) through the capture mount: pyfuse3 (3.5) has no handler for
it, so libfuse answers ENOSYS and the kernel tells the application
EOPNOTSUPP. This module puts a handler into the low-level operations of
pyfuse3's libfuse session (the ``fallocate`` slot, left NULL by pyfuse3),
through ctypes:

* the session pointer and pyfuse3's own operations table are found by
  their symbols in the pyfuse3 extension's ELF symbol table (and the
  module's load address by its exported ``PyInit_pyfuse3``);
* libfuse copied that table into the session (``fuse_session_new``): the
  copy is found by comparing it with pyfuse3's, whole, so a different
  layout is detected, never written blindly.

The handler runs synchronously inside ``fuse_session_process_buf`` on the
mount's one trio thread, with the GIL held, like pyfuse3's own handlers, so
it is served in order with every other call. Where anything above does not
hold (another pyfuse3 or libfuse, a stripped extension), :func:`install`
says why and fallocate stays unsupported (EOPNOTSUPP), as before.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import struct

log = logging.getLogger("smirror.capture.mount")

# struct fuse_lowlevel_ops of libfuse 3.x: 44 function pointers; fallocate
# is the 41st. struct fuse_file_info: fh at byte 16 (checked against the
# libfuse 3.14 headers)
OPS_SIZE = 44 * 8
FALLOCATE_SLOT = 40 * 8
FI_FH_OFFSET = 16
SESSION_SEARCH = 1024           # bytes of struct fuse_session searched for its ops copy

_FALLOCATE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p)
_installed: list = []           # the ctypes callbacks: must live as long as the process


def _elf_symbols(path: str, names: set) -> dict:
    """{name: st_value} of ``names`` from the .symtab and .dynsym of a
    64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found = {}
    for sh in sections:
        if sh[1] not in (2, 11):            # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[sh[6]]            # sh_link: its string table
        str_off = strtab[4]
        off, size, entsize = sh[4], sh[5], sh[9] or 24
        for pos in range(off, off + size, entsize):
            st_name, _info, _other, _shndx, st_value, _size = struct.unpack_from("<IBBHQQ", data, pos)
            if not st_name or not st_value:
                continue
            end = data.index(b"\0", str_off + st_name)
            name = data[str_off + st_name:end].decode("ascii", "replace")
            if name in names:
                found[name] = st_value
    return found


def install(handler) -> str:
    """Make ``handler(fh, mode, offset, length) -> errno (0: done)`` serve
    fallocate on the current pyfuse3 session (after ``pyfuse3.init``).
    Returns "" when installed, else why not."""
    try:
        import pyfuse3
        path = pyfuse3.__file__
        syms = _elf_symbols(path, {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session",
                                   "__pyx_v_7pyfuse3_fuse_ops"})
        missing = {"PyInit_pyfuse3", "__pyx_v_7pyfuse3_session", "__pyx_v_7pyfuse3_fuse_ops"} - set(syms)
        if missing:
            return f"pyfuse3's extension {path} lacks the symbols {', '.join(sorted(missing))}"
        lib = ctypes.CDLL(path)
        base = ctypes.cast(lib.PyInit_pyfuse3, ctypes.c_void_p).value - syms["PyInit_pyfuse3"]
        session = ctypes.c_void_p.from_address(base + syms["__pyx_v_7pyfuse3_session"]).value
        if not session:
            return "pyfuse3 has no session (not mounted)"
        ours = ctypes.string_at(base + syms["__pyx_v_7pyfuse3_fuse_ops"], OPS_SIZE)
        area = ctypes.string_at(session, SESSION_SEARCH + OPS_SIZE)
        hits = [off for off in range(0, SESSION_SEARCH, 8) if area[off:off + OPS_SIZE] == ours]
        if len(hits) != 1:
            return f"the session's copy of pyfuse3's operations was found {len(hits)} times, not once"
        slot = session + hits[0] + FALLOCATE_SLOT
        if ctypes.c_void_p.from_address(slot).value:
            return "the session's fallocate slot is taken already"
        fuse = ctypes.CDLL("libfuse3.so.3")
        reply_err = fuse.fuse_reply_err
        reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        reply_err.restype = ctypes.c_int
    except (OSError, ValueError, AttributeError, IndexError, struct.error) as exc:
        return f"{type(exc).__name__}: {exc}"

    def fallocate(req, ino, mode, offset, length, fi):
        try:
            fh = ctypes.c_uint64.from_address(fi + FI_FH_OFFSET).value
            err = handler(fh, mode, offset, length)
        except BaseException:               # must answer the kernel
            log.exception("capture mount: fallocate failed")
            err = errno.EIO
        reply_err(req, err)
    callback = _FALLOCATE(fallocate)
    _installed.append(callback)
    ctypes.c_void_p.from_address(slot).value = ctypes.cast(callback, ctypes.c_void_p).value
    return ""
