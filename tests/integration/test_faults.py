"""Faults (issue 11), scaled down from tools/faults.py: SIGKILL of each
process under a workload, and a target whose disk fills up. The full runs
and their figures are in the README's "Faults" section."""
import io
import os
import shutil
import subprocess

import pytest

from support import faults


def kill_trials(victim, trials, tmp_path, deadline=30, stop_on_failure=False):
    out = io.StringIO()
    res = faults.run_kill(trials, seed=7, victims=(victim,), deadline=deadline, out=out,
                          workdir=tmp_path, stop_on_failure=stop_on_failure)[victim]
    return res, out.getvalue() + "".join(f"\n{f['left']}\n{f['logs']}" for f in res["failures"])


@pytest.mark.slow
def test_sigkill_of_the_target_keeps_a_prefix_of_the_library_history_and_converges(tmp_path):
    res, report = kill_trials("target-lib", 4, tmp_path)
    assert res["failures"] == [], report
    assert res["prefixes_checked"] == 4 and res["ops"] > 0


@pytest.mark.slow
def test_sigkill_of_the_target_daemon_converges(tmp_path):
    res, report = kill_trials("target", 4, tmp_path, deadline=10, stop_on_failure=True)
    assert res["failures"] == [], report


@pytest.mark.slow
def test_sigkill_of_the_source_daemon_converges(tmp_path):
    res, report = kill_trials("source", 3, tmp_path, deadline=10, stop_on_failure=True)
    assert res["failures"] == [], report


def test_sigkill_of_replicate_converges(tmp_path):
    res, report = kill_trials("replicate", 3, tmp_path, deadline=10, stop_on_failure=True)
    assert res["failures"] == [], report


@pytest.mark.slow
def test_sigkill_of_replicate_restarted_under_the_workload_converges(tmp_path):
    """`replicate` killed and restarted while the workload goes on: its
    mirror and capture start on a changing tree (hard links made, written
    through and unlinked meanwhile: 'hf' and '>fc.t' before)."""
    res, report = kill_trials("replicate-live", 4, tmp_path, deadline=20, stop_on_failure=True)
    assert res["failures"] == [], report


def can_mount_loop():
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        return "needs root and mkfs.ext4 (e2fsprogs) for a loop filesystem"
    probe = subprocess.run(["losetup", "-f"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no loop device here: {probe.stderr.strip()}"
    return ""


@pytest.mark.slow
@pytest.mark.skipif(bool(can_mount_loop()), reason=can_mount_loop() or "-")
def test_a_full_target_disk_is_reported_nothing_half_applied_and_replication_goes_on(tmp_path):
    res = faults.run_diskfull(fs_mb=24, data_mb=6, workdir=tmp_path, out=io.StringIO())
    assert "No space left on device" in res["source_error"], res
    assert res["failed_op_not_acknowledged"], res
    assert res["converged_after_free_s"] is not None, (res["left"], res["logs"])
    assert res["target_up"]


def test_fuzzed_frames_leave_the_target_up_bounded_and_replicating(tmp_path):
    res = faults.run_fuzz(3000, bad_every=100, workdir=tmp_path, out=io.StringIO())
    assert res["target_up"] and res["tracebacks"] == 0, res
    assert res["refused"] > 5, res                     # damaged frames were refused...
    assert res["other_connection_converged_s"] is not None, res["left"]   # ...the rest replicated
    assert res["rss_max_mib"] < res["rss_start_mib"] + 64, res


@pytest.mark.slow
@pytest.mark.skipif(bool(faults.net_unavailable()), reason=faults.net_unavailable() or "-")
def test_link_flaps_between_namespaces_resume_by_sequence_and_converge(tmp_path):
    out = io.StringIO()
    res = faults.run_net(seconds=6, flaps=(1, 2), workdir=tmp_path, out=out)
    assert res["flaps"] >= 1 and res["prefix_checks"] >= 1, out.getvalue()
    assert res["converged_s"] is not None, (res["left"], res["target_log"])
    # every recorded op applied once: the target's applied seq is the last one
    assert res["exact"], res
