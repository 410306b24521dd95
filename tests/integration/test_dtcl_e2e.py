"""DTCL scripts run by 'smirror dtcl' against two daemons started as real
processes: the note's prebackup/postbackup (pause and resume the target),
its task script (the on-execute command runs on the target), its noon and
midnight rotating replicas, a script with an error on its last line (it
changes nothing), runtime failures that say what already ran, and the
password kept out of every output and log."""
import json
import os

from support.daemons import PASSWORD, smirror, wait_for
from support.pair import login, replicate_data, running_pair, wait_same
from support.tasks import task_script, tasks_config
from support.treestate import diff, snapshot


def dtcl(tmp_path, env, text, *args, name="script.dtcl", check=True, extra_env=None):
    script = tmp_path / name
    script.write_text(text)
    os.chmod(script, 0o600)
    r = smirror("dtcl", "-f", script, *args, env={**env, **(extra_env or {})}, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    assert PASSWORD not in r.stdout + r.stderr
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def status(node):
    return json.loads(node.cli("status", "--json").stdout)


def no_password_in_logs(*nodes):
    for n in nodes:
        assert PASSWORD not in n.log()


def note_login(host):
    """The note's login form: the password in the script, a domain."""
    return (f'$TheTarget = "{host}";\n$User = "admin";\n$Pass = "{PASSWORD}";\n$TheDomain = "domain";\n'
            f"login $TheTarget $User $Pass $TheDomain;\n")


def test_prebackup_pauses_the_target_and_postbackup_resumes_it(tmp_path):
    with running_pair(tmp_path) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        # the note's scripts, with the host's port from --host-default-port
        pre = note_login("127.0.0.1") + "target $TheTarget;\npausetarget $TheTarget;\n"
        r = dtcl(tmp_path, env, pre, "--host-default-port", target.port, "--json", name="prebackup.txt")
        out = json.loads(r.stdout)
        assert out["ok"] and [x["statement"] for x in out["ran"]] == [
            f"login {target.address} as admin", f"pausetarget {target.address}"]
        login(target, env)
        assert status(target)["paused"]
        before = snapshot(dst)
        (src / "during-backup").write_text("queued on the target while paused")
        (src / "notes.txt").write_text("changed while paused")
        wait_for(lambda: status(target)["targets"][0]["seq_received"]
                 > status(target)["targets"][0]["seq_applied"], what="the target to receive")
        assert snapshot(dst) == before                     # received, not applied
        post = note_login("127.0.0.1") + "target $TheTarget;\nresumetarget $TheTarget;\n"
        r = dtcl(tmp_path, env, post, "--host-default-port", target.port, name="postbackup.txt")
        assert f"{target.address}: resumed" in r.stdout
        assert not status(target)["paused"]
        assert wait_same(src, dst, 60)
        no_password_in_logs(source, target)


def test_task_script_runs_its_on_execute_on_the_target(tmp_path):
    tdir = tmp_path / "target-tasks"
    backup = tmp_path / "backup"
    task_script(tdir, "backup-command", f'cp -a "$SMIRROR_MAP_BASE" "{backup}"\n'
                                        f'echo "$SMIRROR_TASK_NAME" > "{backup}.done"\n')
    with running_pair(tmp_path, target_extra=tasks_config(tdir)) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        state = snapshot(src)
        # the note's task.txt (with $TheDomainName fixed, and no password in
        # it: 'login HOST USER;' takes SMIRROR_PASSWORD); no 'source'
        # statement: queuetask goes to the first host logged in to
        text = (f'$TheSource = "{source.address}";\n$TheTarget = "{target.address}";\n'
                f'$TheUserName = "admin";\n'
                f"login $TheSource $TheUserName;\nlogin $TheTarget $TheUserName;\n"
                f"queuetask backup_process to $TheTarget onexecute=backup-command timeout=forever;\n")
        r = dtcl(tmp_path, env, text, extra_env={"SMIRROR_PASSWORD": PASSWORD})
        assert "task backup_process" in r.stdout and "queued on connection(s) 1 at seq" in r.stdout
        assert "received by the target" in r.stdout
        wait_for(lambda: (tmp_path / "backup.done").exists(), what="the task on the target")
        assert (tmp_path / "backup.done").read_text().strip() == "backup_process"
        assert diff(state, snapshot(backup)) == []
        no_password_in_logs(source, target)


def test_a_task_the_target_refuses_fails_the_script(tmp_path):
    tdir = tmp_path / "target-tasks"
    task_script(tdir, "backup-command", "true\n")
    with running_pair(tmp_path, target_extra=tasks_config(tdir, enabled=False)) as (source, target, env):
        replicate_data(source, target, env, tmp_path)
        text = (f"login {source.address} admin;\nsource {source.address};\n"
                f"queuetask backup_process to {target.address} onexecute=backup-command;\nstatus;\n")
        r = dtcl(tmp_path, env, text, check=False, extra_env={"SMIRROR_PASSWORD": PASSWORD})
        assert r.returncode == 3, r.stdout + r.stderr
        assert "script.dtcl:3: queuetask backup_process" in r.stderr
        assert "the target refused it" in r.stderr and "task processing is disabled" in r.stderr
        assert "REPSET" not in r.stdout                         # status, after it, did not run


def test_noon_and_midnight_scripts_rotate_between_two_replicas(tmp_path):
    noon, midnight = tmp_path / "noon_mirror", tmp_path / "midnight_mirror"
    with running_pair(tmp_path) as (source, target, env):
        src = tmp_path / "data"
        (src / "db").mkdir(parents=True)
        (src / "db" / "main.db").write_bytes(os.urandom(200_000))
        (src / "log.txt").write_text("first\n")
        # set-up as a script: the repset and the midnight connection
        setup = (f'$S = "{source.address}";\nlogin $S admin;\nsource $S;\n'
                 f"repset create repset_name root {src} exclude *.tmp;\n")
        dtcl(tmp_path, env, setup, name="setup.dtcl", extra_env={"SMIRROR_PASSWORD": PASSWORD})
        # ... and the midnight connection with the CLI, in the note's form
        # "PATH, nomirror": the comma is not part of the map base
        login(source, env)
        source.cli("connect", "repset_name", "to", target.address, "map", "base", f"{midnight},")
        assert wait_same(src, midnight)
        assert not (tmp_path / "midnight_mirror,").exists()

        def script(active, inactive, comma):
            return (f'$TheSource = "{source.address}";\n$TheTarget = "{target.address}";\n'
                    f'$User = "admin";\n$Pass = "{PASSWORD}";\n$TheDomain = "domain";\n'
                    f'$TheRepSet = "repset_name";\n'
                    f"login $TheSource $User $Pass $TheDomain;\nlogin $TheTarget $User $Pass $TheDomain;\n"
                    f"source $TheSource;\n"
                    f"$Old = conid $TheRepSet to $TheTarget map base {inactive};\ndisconnect $Old;\n"
                    f"$New = connect $TheRepSet to $TheTarget map base {active}{comma} nomirror;\n"
                    f"mirror start $New different, checksum;\n")

        for active, inactive, comma in ((noon, midnight, ","), (midnight, noon, "")):
            # the source changes before the script too: the new replica is behind
            (src / "log.txt").write_text((src / "log.txt").read_text() + f"before {active.name}\n")
            dtcl(tmp_path, env, script(active, inactive, comma), name=f"{active.name}.dtcl")
            assert wait_same(src, active, 60), source.log()[-3000:]
            still = snapshot(inactive)
            with open(src / "db" / "main.db", "r+b") as f:      # the source keeps changing
                f.seek(4096)
                f.write(os.urandom(8192))
            (src / "new-file").write_text(f"after {active.name}")
            assert wait_same(src, active, 60)
            assert snapshot(inactive) == still                  # the inactive replica is untouched
            assert diff(snapshot(src), still) != []
        rows = [s for s in status(source)["sources"]]
        assert len(rows) == 1 and rows[0]["conid"] == 3     # one live connection: the last one
        no_password_in_logs(source, target)


def test_a_script_with_an_error_on_its_last_line_changes_nothing(tmp_path):
    with running_pair(tmp_path) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        text = (f'$S = "{source.address}";\n$T = "{target.address}";\n'
                f'login $S admin "{PASSWORD}";\nlogin $T admin "{PASSWORD}";\nsource $S;\n'
                f"pausetarget $T;\nrepset create other root {tmp_path};\ndisconnect 1;\n"
                f"mirror start 1 different, chekcsum;\n")
        r = dtcl(tmp_path, env, text, check=False)
        assert r.returncode == 2
        assert r.stderr.startswith(f"{tmp_path / 'script.dtcl'}:9:27: mirror start: unknown option "
                                   f"'chekcsum'"), r.stderr
        assert r.stderr.splitlines()[1].strip() == "mirror start 1 different, chekcsum;"
        login(target, env)
        assert not status(target)["paused"]
        assert [s["conid"] for s in status(source)["sources"]] == [1]
        assert [r["name"] for r in json.loads(source.cli("repset", "list", "--json").stdout)] == ["data"]
        no_password_in_logs(source, target)


def test_runtime_failures_name_the_line_and_what_already_ran(tmp_path):
    with running_pair(tmp_path) as (source, target, env):
        src, dst = replicate_data(source, target, env, tmp_path)
        wrong = "not-the-password-42"
        r = dtcl(tmp_path, env, f'login {target.address} admin "{wrong}";\npausetarget {target.address};\n',
                 check=False)
        assert r.returncode == 3 and wrong not in r.stdout + r.stderr
        assert f"script.dtcl:1: login {target.address} as admin:" in r.stderr
        assert "nothing had run before it" in r.stderr
        text = (f'login {source.address} admin;\nsource {source.address};\n'
                f"$C = conid data to {target.address} map base /no/such/base;\ndisconnect $C;\n")
        r = dtcl(tmp_path, env, text, "--json", check=False, extra_env={"SMIRROR_PASSWORD": PASSWORD})
        assert r.returncode == 3
        assert (f"script.dtcl:3: conid data to {target.address} map base /no/such/base:" in r.stderr
                and "no connection of 'data'" in r.stderr)
        assert f"already ran: line 1 (login {source.address} as admin)" in r.stderr
        out = json.loads(r.stdout)
        assert not out["ok"] and [x["line"] for x in out["ran"]] == [1]
        r = dtcl(tmp_path, env, "login 127.0.0.1:1 admin;\n", check=False,
                 extra_env={"SMIRROR_PASSWORD": PASSWORD})
        assert r.returncode == 3 and "script.dtcl:1: login 127.0.0.1:1 as admin:" in r.stderr
        # a login from the saved session of 'smirror login', no password anywhere
        login(source, env)
        r = dtcl(tmp_path, env, f"login {source.address} admin;\nsource {source.address};\n"
                                f"$C = conid data to {target.address} map base {dst};\n"
                                "$D = $C;\nstatus $D;\n")
        assert "logged in to" in r.stdout and "REPSET" in r.stdout and "data" in r.stdout
        no_password_in_logs(source, target)
