"""The acceptance check of every mode: rsync -aHAX --checksum finds nothing to change."""
import subprocess

# rsync's exit status when files vanished while it listed them: a tree
# still being applied (the target's temporary files come and go)
VANISHED = 24


def _rsync(src, dst) -> subprocess.CompletedProcess:
    return subprocess.run(["rsync", "-aHAX", "--checksum", "--dry-run", "--itemize-changes",
                           "--delete", f"{src}/", f"{dst}/"], capture_output=True, text=True)


def rsync_differences(src, dst) -> str:
    """What rsync -aHAX --checksum would change to make DST equal SRC (the
    acceptance check): empty when every attribute it compares is equal."""
    proc = _rsync(src, dst)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def wait_rsync_same(src, dst, timeout=60, why=lambda: "") -> None:
    import time
    deadline = time.monotonic() + timeout
    while True:
        proc = _rsync(src, dst)
        assert proc.returncode in (0, VANISHED), proc.stderr
        out = proc.stdout.strip() if proc.returncode == 0 else f"(files vanished) {proc.stderr}"
        if not out:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"rsync -aHAX still finds differences:\n{out}\n{why()}")
        time.sleep(0.3)
