"""The acceptance check of every mode: rsync -aHAX --checksum finds nothing to change."""
import subprocess


def rsync_differences(src, dst) -> str:
    """What rsync -aHAX --checksum would change to make DST equal SRC (the
    acceptance check): empty when every attribute it compares is equal."""
    proc = subprocess.run(["rsync", "-aHAX", "--checksum", "--dry-run", "--itemize-changes",
                           "--delete", f"{src}/", f"{dst}/"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def wait_rsync_same(src, dst, timeout=60, why=lambda: "") -> None:
    import time
    deadline = time.monotonic() + timeout
    while True:
        out = rsync_differences(src, dst)
        if not out:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"rsync -aHAX still finds differences:\n{out}\n{why()}")
        time.sleep(0.3)
