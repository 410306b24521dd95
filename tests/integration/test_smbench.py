

def test_run_in_daemons_mode_pauses_the_target_daemon_and_measures_each_side(tmp_path):
    """Two 'smirror serve' processes, the watcher capturing plain writes; the
    backup window pauses the target daemon and the drain after the resume is
    measured; RSS and CPU are each daemon's own."""
    r = smbench("run", "backup-window", "--mode", "daemons", "--quick", "--duration", "3s",
                "--json", tmp_path / "run.json", timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["mode"] == "daemons" and data["shared_process"] is False
    assert data["target_equals_source"] is True and data["errors"] == []
    assert data["paused_s"] > 0.5 and data["drain_after_resume_s"] is not None
    assert data["lag_ms"]["max"] >= 500          # probes waited out the pause
    assert data["bytes_sent"] > 0 and data["auto_disconnects"] == 0
    for side in ("source", "target"):
        assert data[side]["rss_idle"] > 10 * MiB and data[side]["cpu_s"] > 0
        assert data[side]["spilled_frames"] is None      # the daemons' status does not count them
    assert data["source"]["rss_idle"] != data["target"]["rss_idle"]   # two processes
    assert "backup-window (daemons)" in r.stdout and "drain after resume" in r.stdout
