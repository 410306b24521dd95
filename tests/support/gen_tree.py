#!/usr/bin/env python3
"""Data generators for mirror tests and benchmarks.

    python tools/gen_tree.py DIR [--scale 0.1] [--seed 1]     # benchmark tree
    python tools/gen_tree.py DIR --kinds                      # every kind of entry

* ``make_bench_tree``: about 2,000 files of 1 KiB - 4 MiB (log-uniform sizes,
  random content, spread over nested directories) plus one 1 GiB file;
  ``scale`` multiplies the file count and the big file's size.
* ``change_blocks``: overwrite a fraction of the aligned blocks of a file
  with new random bytes (whole blocks: the changed bytes are exactly
  ``blocks * block_size``); size unchanged, mtime bumped.
* ``change_small``: rewrite ``count`` of the small files.
* ``make_kinds_tree`` / ``mutate_kinds_tree``: a tree with every kind of
  entry a mirror must preserve, and the changes a second mirror must carry
  over (bytes inserted in a large file, a file that became a directory, ...).
"""
from __future__ import annotations

import argparse
import errno
import os
import random
import sys

import numpy as np

MiB = 1 << 20


def _rng_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.bytes(n)


def write_random(path, size: int, rng: np.random.Generator, chunk: int = 64 * MiB):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(_rng_bytes(rng, n))
            left -= n


def make_bench_tree(root, scale: float = 1.0, seed: int = 1, files: int = 2000,
                    big_size: int = 1 << 30) -> dict:
    """The benchmark tree; returns {"files": [...small paths], "big": path, "bytes": n}."""
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    count = max(1, int(files * scale))
    small = []
    total = 0
    for i in range(count):
        # log-uniform 1 KiB .. 4 MiB: many small files, a few large ones
        size = int(2 ** pyrng.uniform(10, 22))
        d = os.path.join(root, f"d{i % 20:02d}", f"s{i % 7}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"file{i:05d}.dat")
        write_random(path, size, rng)
        small.append(path)
        total += size
    big = os.path.join(root, "big.db")
    big_bytes = max(MiB, int(big_size * scale))
    write_random(big, big_bytes, rng)
    total += big_bytes
    return {"files": small, "big": big, "bytes": total}


def change_blocks(path, fraction: float, block_size: int = 8192, seed: int = 2) -> int:
    """Overwrite ``fraction`` of the aligned blocks of ``path`` with new
    random content; returns the bytes changed."""
    rng = np.random.default_rng(seed)
    size = os.path.getsize(path)
    nblocks = size // block_size
    want = max(1, int(nblocks * fraction))
    picks = np.sort(rng.choice(nblocks, size=want, replace=False))
    fd = os.open(path, os.O_WRONLY)
    try:
        for i in picks.tolist():
            os.pwrite(fd, _rng_bytes(rng, block_size), i * block_size)
    finally:
        os.close(fd)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    return want * block_size


def change_small(paths, count: int, seed: int = 3) -> int:
    """Rewrite ``count`` of ``paths`` (same size, new content, new mtime)."""
    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    picked = pyrng.sample(list(paths), min(count, len(paths)))
    total = 0
    for path in picked:
        size = os.path.getsize(path)
        st = os.stat(path)
        write_random(path, size, rng)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        total += size
    return total


# ------------------------------------------------------------ every kind of entry

def xattrs_supported(directory) -> bool:
    probe = os.path.join(directory, ".xattr-probe")
    with open(probe, "wb"):
        pass
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.unlink(probe)


ODD_NAMES = [b"with space", b"new\nline", b"not-utf8-\xff\xfe", b"-leading-dash",
             b"--", b"\xc3\xa9t\xc3\xa9", b"tab\tname", b"back\\slash", b"*glob?[x]"]


def make_kinds_tree(root, seed: int = 7, xattrs: bool | None = None) -> dict:
    """A tree with regular files (empty, small, large), nested and empty
    directories, symlinks (relative, to a directory, dangling), a hard-link
    group across directories, a sparse file, special modes, ns mtimes, a
    fifo, odd names, other owners (when root) and user.* xattrs (when the
    filesystem has them). Returns facts the tests check."""
    rng = np.random.default_rng(seed)
    r = os.fsencode(root)
    os.makedirs(r, exist_ok=True)
    j = lambda *p: os.path.join(r, *p)  # noqa: E731
    for d in (b"a/b/c", b"empty", b"e1/e2", b"modes", b"odd", b"links"):
        os.makedirs(j(d), exist_ok=True)
    open(j(b"empty.txt"), "wb").close()
    with open(j(b"a/small.txt"), "wb") as f:
        f.write(b"hello mirror\n")
    write_random(j(b"a/b/medium.bin"), 100_000, rng)
    write_random(j(b"a/b/c/large.bin"), 8 * MiB + 123, rng)
    # sparse: 64 MiB with data at two places only
    sparse = j(b"sparse.img")
    with open(sparse, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(5 * MiB)
        f.write(b"S" * 4096)
        f.seek(40 * MiB + 17)
        f.write(b"T" * 100)
    # hard links across directories
    with open(j(b"links/h1"), "wb") as f:
        f.write(b"linked content\n" * 100)
    os.link(j(b"links/h1"), j(b"links/h2"))
    os.link(j(b"links/h1"), j(b"a/h3"))
    # symlinks: relative, to a directory, dangling, absolute
    os.symlink(b"../a/small.txt", j(b"links/rel"))
    os.symlink(b"a/b", j(b"dirlink"))
    os.symlink(b"/nonexistent/target", j(b"links/dangling"))
    os.symlink(b"no-such-file", j(b"links/dangling-rel"))
    # modes
    for name, mode in ((b"m600", 0o600), (b"m755", 0o755), (b"m444", 0o444), (b"m4755", 0o4755)):
        with open(j(b"modes", name), "wb") as f:
            f.write(name)
        os.chmod(j(b"modes", name), mode)
    os.makedirs(j(b"modes/sticky"), exist_ok=True)
    os.chmod(j(b"modes/sticky"), 0o1777)
    os.makedirs(j(b"modes/setgid"), exist_ok=True)
    os.chmod(j(b"modes/setgid"), 0o2750)
    # odd names
    for i, name in enumerate(ODD_NAMES):
        with open(j(b"odd", name), "wb") as f:
            f.write(b"odd %d\n" % i)
    os.makedirs(j(b"odd", b"dir with space", b"-sub"), exist_ok=True)
    os.mkfifo(j(b"fifo"))
    owners = os.geteuid() == 0
    if owners:
        os.chown(j(b"a/small.txt"), 4321, 4322)
        os.chown(j(b"e1"), 4323, 4324)
        os.chown(j(b"links/rel"), 4325, 4326, follow_symlinks=False)
    has_xattrs = xattrs_supported(root) if xattrs is None else xattrs
    if has_xattrs:
        os.setxattr(j(b"a/small.txt"), "user.color", b"blue")
        os.setxattr(j(b"a/small.txt"), "user.empty", b"")
        os.setxattr(j(b"a/b"), "user.dir", b"\x00\x01binary")
    # ns-precision mtimes, set last (children first so parents keep theirs)
    t = 1_600_000_000_123_456_789
    for d, _dirs, files in sorted(os.walk(r), key=lambda w: -len(w[0])):
        for name in files + _dirs:
            p = os.path.join(d, name)
            os.utime(p, ns=(t, t), follow_symlinks=False)
            t += 1_000_003_001
        os.utime(d, ns=(t, t))
        t += 7
    return {"xattrs": has_xattrs, "owners": owners, "sparse": sparse}


def mutate_kinds_tree(root, seed: int = 8) -> None:
    """Changes a second mirror must carry over."""
    rng = np.random.default_rng(seed)
    r = os.fsencode(root)
    j = lambda *p: os.path.join(r, *p)  # noqa: E731
    # bytes inserted in the middle of a large file (content shifts)
    big = j(b"a/b/c/large.bin")
    with open(big, "rb") as f:
        data = f.read()
    mid = len(data) // 2
    with open(big, "wb") as f:
        f.write(data[:mid] + b"INSERTED" * 700 + data[mid:])
    # a file that became a directory, a directory that became a file
    os.unlink(j(b"a/b/medium.bin"))
    os.makedirs(j(b"a/b/medium.bin/inner"))
    with open(j(b"a/b/medium.bin/inner/x"), "wb") as f:
        f.write(b"now a dir")
    os.rmdir(j(b"e1/e2"))
    with open(j(b"e1/e2"), "wb") as f:
        f.write(b"now a file")
    # symlink retargeted, symlink became a file, file became a symlink
    os.unlink(j(b"links/rel"))
    os.symlink(b"../empty.txt", j(b"links/rel"))
    os.unlink(j(b"dirlink"))
    with open(j(b"dirlink"), "wb") as f:
        f.write(b"was a symlink")
    os.unlink(j(b"modes/m444"))
    os.symlink(b"m600", j(b"modes/m444"))
    # mode, mtime-only, same-size-same-mtime content change
    os.chmod(j(b"modes/m600"), 0o640)
    st = os.stat(j(b"a/small.txt"))
    os.utime(j(b"a/small.txt"), ns=(st.st_atime_ns, st.st_mtime_ns + 5))
    p = j(b"odd", b"with space")
    st = os.stat(p)
    with open(p, "r+b") as f:
        f.write(b"ODD")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    # hard link group grows, a file removed (orphan on the target), new files
    os.link(j(b"links/h1"), j(b"odd/h4"))
    os.unlink(j(b"links/h2"))
    os.unlink(j(b"empty.txt"))
    write_random(j(b"a/new.bin"), 3000, rng)
    try:
        os.setxattr(j(b"a/small.txt"), "user.color", b"red")
        os.removexattr(j(b"a/small.txt"), "user.empty")
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
            raise
    # sparse file grows a new data extent; still sparse
    with open(j(b"sparse.img"), "r+b") as f:
        f.seek(20 * MiB)
        f.write(b"U" * 8192)
    os.utime(j(b"a"), ns=(1, 1_700_000_000_000_000_001))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", action="store_true", help="the every-kind-of-entry tree")
    args = ap.parse_args(argv)
    if args.kinds:
        print(make_kinds_tree(args.dir))
    else:
        info = make_bench_tree(args.dir, args.scale, args.seed)
        print(f"{len(info['files'])} files + {info['big']}: {info['bytes'] / MiB:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
