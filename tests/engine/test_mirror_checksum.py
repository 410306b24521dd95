"""Checksum mirrors: block compare in place, rolling delta for shifted or
resized content, and the whole tree checked with rsync's itemize."""
import os
import shutil
import subprocess

import pytest

pytest.importorskip("smirror.kernels._checksum")

from smirror.mirror.engine import mirror
from support import gen_tree

RSYNC = shutil.which("rsync")
needs_rsync = pytest.mark.skipif(RSYNC is None, reason="rsync not installed")
MiB = 1 << 20


def rsync_diff(src, dst) -> str:
    out = subprocess.run(
        [RSYNC, "-a", "-H", "-X", "--checksum", "--dry-run", "--itemize-changes", "--delete",
         f"{src}/", f"{dst}/"], capture_output=True, check=True)
    return out.stdout.decode("utf-8", "backslashreplace")


@needs_rsync
@pytest.mark.parametrize("flags", [{"checksum": True}, {"checksum": True, "different": True}])
def test_checksum_mirror_of_every_kind_of_entry(tmp_path, flags):
    src, dst = tmp_path / "src", tmp_path / "dst"
    gen_tree.make_kinds_tree(src)
    assert mirror(src, dst, **flags).errors == []
    assert rsync_diff(src, dst) == ""
    gen_tree.mutate_kinds_tree(src)
    if flags.get("different"):
        # the quick check cannot see a same-size, same-mtime edit
        p = os.path.join(os.fsencode(src), b"odd", b"with space")
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    big_before = os.stat(dst / "a/b/c/large.bin").st_size
    summary = mirror(src, dst, orphans="delete", **flags)
    assert summary.errors == []
    assert rsync_diff(src, dst) == ""
    # 5600 bytes were inserted into an 8 MiB file: the delta sends little
    assert os.stat(dst / "a/b/c/large.bin").st_size == big_before + 5600
    assert summary.bytes_literal < 200_000
    assert summary.bytes_matched > 8 * MiB
    assert os.stat(dst / "sparse.img").st_blocks * 512 < MiB


def test_checksum_alone_finds_same_size_same_mtime_change(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    data = os.urandom(3 * MiB)
    (src / "f").write_bytes(data)
    mirror(src, dst)
    st = os.stat(src / "f")
    with open(src / "f", "r+b") as f:
        f.seek(MiB + 5)
        f.write(b"CHANGED")
    os.utime(src / "f", ns=(st.st_atime_ns, st.st_mtime_ns))
    quick = mirror(src, dst, different=True, checksum=True)
    assert quick.bytes_literal == 0 and (dst / "f").read_bytes() == data
    full = mirror(src, dst, checksum=True)
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert full.changed == 1 and full.bytes_literal <= 64 * 1024


@pytest.mark.parametrize("block_size", [None, 4096])
def test_one_percent_of_blocks_written_in_place(tmp_path, block_size):
    """1% of the 8 KiB blocks of a 64 MiB file change: the target is
    patched in place and the bytes written are the changed bytes."""
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    gen_tree.write_random(src / "db", 64 * MiB, __import__("numpy").random.default_rng(5))
    mirror(src, dst)
    ino = os.stat(dst / "db").st_ino
    changed = gen_tree.change_blocks(src / "db", 0.01, 8192)
    summary = mirror(src, dst, different=True, checksum=True, block_size=block_size)
    ratio = summary.bytes_written / changed
    print(f"\nblock-level: changed {changed} B, written {summary.bytes_written} B, "
          f"ratio {ratio:.3f} (block size {block_size or 'auto'})")
    assert (dst / "db").read_bytes() == (src / "db").read_bytes()
    assert os.stat(dst / "db").st_ino == ino, "not updated in place"
    assert ratio <= 1.1
    assert summary.bytes_literal == summary.bytes_written
    assert os.stat(dst / "db").st_mtime_ns == os.stat(src / "db").st_mtime_ns


def test_append_is_patched_in_place(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "log").write_bytes(os.urandom(4 * MiB))
    mirror(src, dst)
    ino = os.stat(dst / "log").st_ino
    with open(src / "log", "ab") as f:
        f.write(os.urandom(100_000))
    summary = mirror(src, dst, different=True, checksum=True)
    assert (dst / "log").read_bytes() == (src / "log").read_bytes()
    assert os.stat(dst / "log").st_ino == ino
    assert summary.bytes_written < 200_000


def test_truncate_is_patched_in_place(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(4 * MiB))
    mirror(src, dst)
    with open(src / "f", "r+b") as f:
        f.truncate(3 * MiB + 7)
    summary = mirror(src, dst, different=True, checksum=True)
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert summary.bytes_written < 64 * 1024


def test_shifted_content_of_same_size_uses_the_rolling_delta(tmp_path):
    """Bytes cut at the front and as many appended: every aligned block
    differs, yet the delta sends only the edges."""
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    data = os.urandom(4 * MiB)
    (src / "f").write_bytes(data)
    mirror(src, dst)
    (src / "f").write_bytes(data[1000:] + b"Z" * 1000)
    summary = mirror(src, dst, checksum=True)
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert summary.bytes_literal < 64 * 1024
    assert summary.bytes_matched > 3 * MiB


def test_target_file_with_foreign_hard_link_is_not_patched_in_place(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(2 * MiB))
    mirror(src, dst)
    os.link(dst / "f", tmp_path / "outside-link")
    before = (tmp_path / "outside-link").read_bytes()
    with open(src / "f", "r+b") as f:
        f.write(b"new head")
    mirror(src, dst, different=True, checksum=True)
    assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    assert (tmp_path / "outside-link").read_bytes() == before


def test_checksum_dry_run_changes_nothing_and_counts(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(4 * MiB))
    mirror(src, dst)
    before = (dst / "f").read_bytes()
    with open(src / "f", "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"x" * 10)
    summary = mirror(src, dst, checksum=True, dry_run=True)
    assert (dst / "f").read_bytes() == before
    assert ("patch", b"f") in summary.actions
    assert 0 < summary.bytes_literal <= 64 * 1024


def test_unchanged_tree_checksum_writes_nothing(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    info = gen_tree.make_bench_tree(src, scale=0.02, files=2000, big_size=256 * MiB)
    mirror(src, dst)
    summary = mirror(src, dst, checksum=True, threads=2)
    assert summary.bytes_written == 0 and summary.bytes_literal == 0
    assert summary.bytes_matched == info["bytes"]
    assert summary.changed == 0 and summary.errors == []


def test_delta_while_source_is_open_for_writing(tmp_path, monkeypatch):
    """No read lease can be had while a writer holds the file: the delta
    works from a private copy; past DELTA_COPY_MAX the file is copied whole."""
    import smirror.mirror.engine as mirror_mod
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "db").write_bytes(os.urandom(4 * MiB))
    mirror(src, dst)
    with open(src / "db", "r+b") as writer:
        writer.seek(0, 2)
        writer.write(os.urandom(5000))
        writer.flush()
        summary = mirror(src, dst, different=True, checksum=True)
        assert (dst / "db").read_bytes() == (src / "db").read_bytes()
        assert summary.bytes_literal < 64 * 1024
        monkeypatch.setattr(mirror_mod, "DELTA_COPY_MAX", 1024)
        writer.write(os.urandom(5000))
        writer.flush()
        summary = mirror(src, dst, different=True, checksum=True)
        assert (dst / "db").read_bytes() == (src / "db").read_bytes()
        assert summary.bytes_literal == 4 * MiB + 10000
        assert summary.errors == []


@pytest.mark.slow
def test_leased_mapping_holds_off_a_truncating_writer(tmp_path):
    """A writer that opens and truncates the file while it is hashed from a
    mapping waits for the lease: the hash completes (a truncation under the
    mapping would kill the process with SIGBUS)."""
    import threading
    import time

    from smirror.fs.files import _mapped_signature
    from smirror.kernels import checksum
    path = tmp_path / "big"
    gen_tree.write_random(path, 256 * MiB, __import__("numpy").random.default_rng(1))
    expect = checksum.file_signature(str(path), 4096, True)
    fd = os.open(path, os.O_RDONLY)
    waited = []

    def writer():
        time.sleep(0.005)
        t0 = time.monotonic()
        with open(path, "r+b") as f:
            waited.append(time.monotonic() - t0)
            f.truncate(0)
    t = threading.Thread(target=writer)
    try:
        t.start()
        sig = _mapped_signature(fd, 256 * MiB, 4096, True)
    finally:
        t.join()
        os.close(fd)
    assert sig is not None, "no lease on a file nobody writes"
    assert (sig.strong == expect.strong).all() and (sig.weak == expect.weak).all()
    assert os.path.getsize(path) == 0 and waited


def test_hard_linked_large_file_patched_in_place_keeps_its_links(tmp_path):
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(4 * MiB))
    os.link(src / "a", src / "b")
    mirror(src, dst)
    ino = os.stat(dst / "a").st_ino
    assert os.stat(dst / "b").st_ino == ino
    with open(src / "a", "r+b") as f:
        f.seek(MiB)
        f.write(b"patched")
    summary = mirror(src, dst, different=True, checksum=True)
    assert (dst / "a").read_bytes() == (src / "a").read_bytes() == (dst / "b").read_bytes()
    assert os.stat(dst / "a").st_ino == ino == os.stat(dst / "b").st_ino
    assert summary.bytes_written <= 8192


def test_large_file_the_quick_check_calls_unchanged_is_compared_by_digest(tmp_path, monkeypatch):
    """--checksum on a large file of equal size and mtime: one digest per
    side; a differing digest (content changed, mtime kept) still leads to the
    block compare, and only the changed block is written, in place."""
    import smirror.mirror.engine as mirror_mod
    src, dst = tmp_path / "s", tmp_path / "d"
    src.mkdir()
    gen_tree.write_random(src / "db", 40 * MiB, __import__("numpy").random.default_rng(7))
    mirror(src, dst)
    ino = os.stat(dst / "db").st_ino
    calls = []
    real_digest = mirror_mod.LocalTarget.digest

    def digest(self, rel, length):
        calls.append(rel)
        return real_digest(self, rel, length)
    monkeypatch.setattr(mirror_mod.LocalTarget, "digest", digest)
    unchanged = mirror(src, dst, checksum=True)
    assert calls == [b"db"] and unchanged.bytes_written == 0
    assert unchanged.bytes_matched == 40 * MiB and unchanged.unchanged == 1
    st = os.stat(src / "db")
    with open(src / "db", "r+b") as f:
        f.seek(33 * MiB + 10)
        f.write(b"same size, same mtime")
    os.utime(src / "db", ns=(st.st_atime_ns, st.st_mtime_ns))
    summary = mirror(src, dst, checksum=True)
    assert calls == [b"db", b"db"]
    assert (dst / "db").read_bytes() == (src / "db").read_bytes()
    assert os.stat(dst / "db").st_ino == ino, "not patched in place"
    assert summary.changed == 1 and 0 < summary.bytes_written <= 8192


def test_mapped_digest_windows_lease_and_fallbacks(tmp_path, monkeypatch):
    """The digest of a large file from leased mapping windows equals the
    one-shot XXH3-128: over several windows, when the lease breaks midway
    (the rest is read with preads) and without a lease (a writer holds the
    file: plain preads)."""
    import xxhash

    import smirror.fs.files as tl
    path = tmp_path / "big"
    gen_tree.write_random(path, 40 * MiB + 12345, __import__("numpy").random.default_rng(3))
    size = os.path.getsize(path)
    expect = xxhash.xxh3_128(path.read_bytes()).digest()
    monkeypatch.setattr(tl, "_MMAP_WINDOW", 8 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert tl._mapped_digest(fd, size) == expect
        assert tl.fd_digest(fd, size) == expect
        checks = iter([True, True])        # two windows, then the lease "breaks"
        monkeypatch.setattr(tl, "_lease_intact", lambda fd: next(checks, False))
        assert tl._mapped_digest(fd, size) == expect
        with pytest.raises(tl.MirrorError, match="changed length"):
            tl._mapped_digest(fd, size + 1)
        monkeypatch.undo()
        with open(path, "r+b"):
            assert tl._mapped_digest(fd, size) is None, "a lease while a writer holds the file"
            assert tl.fd_digest(fd, size) == expect
    finally:
        os.close(fd)
