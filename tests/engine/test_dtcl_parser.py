"""DTCL parsing and checking: golden error messages (line, column, caret)
and what the note's scripts resolve to. Nothing here talks to a daemon."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smirror.dtcl.check import VarRef, check_text
from smirror.errors import DtclError

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "dtcl"


def error_of(text, name="s.dtcl"):
    with pytest.raises(DtclError) as exc:
        check_text(textwrap.dedent(text), name)
    return str(exc.value)


GOLDEN = {
    "unknown verb": (
        '$T = "h";\nlogin $T admin;\npausetraget $T;\n',
        "s.dtcl:3:1: unknown verb 'pausetraget' (did you mean 'pausetarget'?)\n"
        "    pausetraget $T;\n"
        "    ^"),
    "missing semicolon mid-file": (
        '$T = "h";\nlogin $T admin\ntarget $T;\n',
        "s.dtcl:2:15: missing ';' at the end of this statement (line 3 starts another one)\n"
        "    login $T admin\n"
        "                  ^"),
    "undefined variable with hint": (
        '$TheDomain = "d";\n$T = "h";\nlogin $T admin $P $TheDomainName;\n',
        "s.dtcl:3:16: undefined variable $P (set it first: $P = \"...\";)\n"
        "    login $T admin $P $TheDomainName;\n"
        "                   ^"),
    "undefined variable, close to a defined one": (
        '$TheDomain = "d";\n$T = "h";\n$P = "pw";\nlogin $T admin $P $TheDomainName;\n',
        "s.dtcl:4:19: undefined variable $TheDomainName (did you mean $TheDomain?)\n"
        "    login $T admin $P $TheDomainName;\n"
        "                      ^"),
    "unterminated string": (
        '$T = "h";\n$Repset = "data;\n',
        "s.dtcl:2:11: unterminated string: no closing '\"' on this line\n"
        "    $Repset = \"*****\n"
        "              ^"),
    "windows path": (
        'login h admin;\nsource h;\n$C = connect data to t map base c:\\noon_mirror, nomirror;\n',
        "s.dtcl:3:33: map base 'c:\\noon_mirror' is a Windows path: smirror paths are POSIX "
        "(write it as /noon_mirror, under a directory the target allows)\n"
        "    $C = connect data to t map base c:\\noon_mirror, nomirror;\n"
        "                                    ^"),
    "wrong argument count (too many)": (
        'login h admin;\nsource h;\ndisconnect 1 2;\n',
        "s.dtcl:3:14: too many arguments: '2' (usage: disconnect ID;)\n"
        "    disconnect 1 2;\n"
        "                 ^"),
    "wrong argument count (missing)": (
        'login h admin;\nlogout;\n',
        "s.dtcl:2:7: logout: missing HOST (usage: logout HOST;)\n"
        "    logout;\n"
        "          ^"),
}


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_errors(case):
    text, expected = GOLDEN[case]
    assert error_of(text) == expected


def test_more_errors_name_what_and_where():
    assert "s.dtcl:2:1: pausetarget: which target?" in error_of("login h u;\npausetarget;\n")
    assert "disconnect goes to a source daemon, and none is named" in error_of("disconnect 3;\n")
    e = error_of('$X = "abc";\nlogin h u;\ndisconnect $X;\n')
    assert "s.dtcl:3:12: expected a connection ID" in e and "'abc'" in e
    e = error_of('login h u;\n$C = conid r to t map base /x;\nlogin $C u;\n')
    assert "s.dtcl:3:7: HOST: $C holds a connection id (set on line 2)" in e
    assert "full sends everything" in error_of("login h u;\nmirror start 1 full, checksum;\n")
    assert "s.dtcl:2:22: mirror start: full sends everything; newer cannot go with it" in \
        error_of("login h u;\nmirror start 1 full, newer;\n")
    assert "s.dtcl:2:23: mirror start: newer given twice" in \
        error_of("login h u;\nmirror start 1 newer, newer;\n")
    assert "timeout=soon" in error_of("login h u;\nqueuetask t to h onexecute=x timeout=soon;\n")
    assert "onexecute=CMD is required" in error_of("login h u;\nqueuetask t to h onqueue=x;\n")
    assert "did you mean onexecute=?" in error_of("login h u;\nqueuetask t to h onexecut=x;\n")
    assert "login returns no value" in error_of("$X = login h u;\n")
    assert "port must be 1-65535" in error_of("login h:99999 u;\n")
    assert "is not an absolute path" in error_of("login h u;\nconnect r to t map base rel/dir;\n")
    assert "empty statement" in error_of("login h u;;\n")
    assert "s.dtcl:2:20: repset create: expected 'root', got 'from'" in \
        error_of("login h u;\nrepset create data from /srv;\n")       # found by Hypothesis
    assert "s.dtcl:2:13: expected a connection ID" in error_of('login h u;\nmirror stop abc;\n')
    assert "too many arguments: '2'" in error_of('login h u;\nmirror stop 1 2;\n')
    assert "s.dtcl:2:1: mirror stop goes to a source daemon" in error_of('$C = 1;\nmirror stop $C;\n')


def test_a_password_is_masked_in_the_line_an_error_shows():
    e = error_of('login h admin "hunter2" dom extra;\n')
    assert "hunter2" not in e and 'login h admin "*******" dom extra;' in e
    e = error_of('$Pass = "hunter2";\nlogin h admin $Pass;\n$X = $Pass; bogus;\n')
    assert "hunter2" not in e and "$X = $Pass; bogus;" in e


def test_the_windows_path_check_follows_a_variable():
    e = error_of('$Base = "d:\\\\replica";\nlogin h u;\nconnect r to t map base $Base;\n')
    assert e.startswith("s.dtcl:3:25: map base 'd:\\\\replica' is a Windows path ($Base is set on line 1)")
    assert "write it as /replica" in e


def test_comments_case_and_optional_final_semicolon():
    actions, checker = check_text(textwrap.dedent("""\
        REM a comment line; with a semicolon
        rem another
        # a hash comment #
        $TheTarget = "backup:7000";   # trailing comment
        $User = "username";
        LOGIN $TheTarget $User;
        Target $TheTarget;
        PauseTarget"""))
    assert [a.verb for a in actions] == ["set", "set", "login", "target", "pausetarget"]
    assert actions[-1].host == "backup:7000" and actions[-1].line == 8
    assert actions[2].args == {"user": "username", "password": None}


def test_the_notes_rotation_script_resolves_to_control_requests():
    actions, checker = check_text(textwrap.dedent("""\
        $TheSource = "source_name";
        $TheTarget = "target_name";
        $User = "username";
        $Pass = "password";
        $TheDomain = "domain";
        $TheRepSet = "repset_name";
        login $TheSource $User $Pass $TheDomain;
        login $TheTarget $User $Pass $TheDomain;
        source $TheSource;
        $MidConID = conid $TheRepSet to $TheTarget map base /midnight_mirror;
        disconnect $MidConID;
        $NoonConID = connect $TheRepSet to $TheTarget map base /noon_mirror, nomirror;
        mirror start $NoonConID different, checksum;
        """), default_port=6400)
    run = [a for a in actions if a.verb not in ("set",)]
    assert [a.verb for a in run] == ["login", "login", "source", "conid", "disconnect", "connect",
                                     "mirror start"]
    conid, disc, conn, mirror = run[3:]
    assert conid.host == "source_name:6400" and conid.assign == "MidConID"
    assert conid.args == {"repset": "repset_name", "target": "target_name:6400",
                          "map_base": "/midnight_mirror"}
    assert disc.args["conid"] == VarRef("MidConID", 10)
    assert conn.args["map_base"] == "/noon_mirror" and conn.args["nomirror"] is True
    assert mirror.args["mode"] == "checksum"
    assert checker.holds_password
    assert any("domain 'domain' is accepted and ignored" in n for n in checker.notes)
    # the password is in no summary (what "already ran" prints)
    assert not any("password" in a.summary for a in actions)


@pytest.mark.parametrize("text", ["connect r to t map base /x nomirror;",
                                  "connect r to t map base /x,nomirror;",
                                  "connect r to t map base /x , nomirror;", "connect r to t map base /x,;"])
def test_connect_comma_forms_never_end_the_path(text):
    actions, _ = check_text("login h u;\n" + text)
    assert actions[-1].args["map_base"] == "/x"
    assert actions[-1].args["nomirror"] == ("nomirror" in text)


def test_mirror_modes():
    def mode(opts):
        return check_text(f"login h u;\nmirror start 1 {opts};")[0][-1].args["mode"]
    assert mode("") == "full" and mode("full") == "full"       # DTCL: neither full nor different is full
    assert mode("different") == "different"
    assert mode("different, checksum") == mode("different checksum") == mode("checksum") == "checksum"


def test_mirror_newer_and_stop_are_statements():
    # newer compares with the target: alone it is a difference mirror (files sent whole)
    def args(opts):
        return check_text(f"login h u;\nmirror start 1 {opts};")[0][-1].args
    assert args("newer") == {"conid": 1, "mode": "different", "newer": True}
    assert args("different, newer") == {"conid": 1, "mode": "different", "newer": True}
    assert args("different, checksum, newer") == {"conid": 1, "mode": "checksum", "newer": True}
    assert args("different")["newer"] is False
    actions, _ = check_text("login h u;\n$C = conid r to t map base /x;\nmirror stop $C;\nmirror stop 4;\n")
    assert [(a.verb, a.host, a.summary) for a in actions[-2:]] == [
        ("mirror stop", "h:6320", "mirror stop $C"), ("mirror stop", "h:6320", "mirror stop 4")]


def run_cli(*args, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "smirror", "dtcl", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=60, env={**os.environ, **(env or {})})


def test_cli_check_errors_exit_2_without_traceback(tmp_path):
    script = tmp_path / "bad.dtcl"
    script.write_text('$T = "h";\nlogin $T admin;\npausetraget $T;\n')
    r = run_cli("-f", script)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{script}:3:1: unknown verb 'pausetraget'") and r.stdout == ""
    r = run_cli("-f", tmp_path / "missing.dtcl")
    # the file and the OS's reason; no line or column of a script never read
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == f"{tmp_path / 'missing.dtcl'}: cannot read the script: No such file or directory\n"
    r = run_cli("-f", tmp_path, "--json")
    assert r.returncode == 2 and r.stderr == f"{tmp_path}: cannot read the script: Is a directory\n"
    assert json.loads(r.stdout) == {"ok": False, "error": "cannot read the script: Is a directory",
                                    "ran": [], "script": str(tmp_path), "line": None, "column": None}
    script.write_bytes(b'$T = "h";\n$U = "\xff";\n')
    r = run_cli("-f", script)
    assert r.returncode == 2 and f"{script}:2:7: not UTF-8 text" in r.stderr
    r = run_cli("-f", script, "--json")
    assert r.returncode == 2 and '"line": 2' in r.stdout


def test_cli_check_warns_of_a_password_readable_by_others(tmp_path):
    script = tmp_path / "pre.txt"
    script.write_text('$T = "name";\n$User = "u";\n$Pass = "hunter2";\n$D = "dom";\n'
                      'login $T $User $Pass $D;\ntarget $T;\npausetarget $T;\n')
    os.chmod(script, 0o644)
    r = run_cli("-f", script, "--check")
    assert r.returncode == 0, r.stderr
    assert "holds a password" in r.stdout and "readable by others" in r.stdout
    assert "domain 'dom' is accepted and ignored" in r.stdout
    assert "3 statement(s)" not in r.stdout and "nothing was run" in r.stdout
    assert "hunter2" not in r.stdout + r.stderr
    os.chmod(script, 0o600)
    r = run_cli("-f", script, "--check")
    assert "holds a password" in r.stdout and "readable by others" not in r.stdout


def test_cli_check_of_standard_input_runs_nothing():
    # nothing listens on port 1: running the login would fail with exit code 3
    r = run_cli("--check", input='login 127.0.0.1:1 admin "secret-pw" dom;\nsource 127.0.0.1:1;\nstatus\n')
    assert r.returncode == 0, r.stderr
    assert "checked; nothing was run" in r.stdout and "domain 'dom' is accepted" in r.stdout
    assert "secret-pw" not in r.stdout + r.stderr


def test_cli_interactive_reads_statements_up_to_each_semicolon():
    # a check error stops piped input at once; what came before ran (nothing here talks to a daemon)
    r = run_cli(input='$A = "x";\n$B =\n  "y"; bogus 1;\n')
    assert r.returncode == 2 and "<stdin>:3:8: unknown verb 'bogus'" in r.stderr, r.stderr


@pytest.mark.parametrize("name", ["prebackup.dtcl", "postbackup.dtcl", "task.dtcl", "noon.dtcl",
                                  "midnight.dtcl"])
def test_the_examples_check(name):
    actions, checker = check_text((REFERENCE / name).read_text(), name)
    assert actions


def test_cli_interactive_at_a_terminal_shows_an_error_and_goes_on():
    import pty
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "smirror", "dtcl"], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    os.close(slave)
    # a statement over two lines, an error, then more input; ^D ends it
    os.write(master, b'$A = "x";\nbogus;\n$B =\n  $A; $C = $Nope;\nsource h;\n\x04')
    out, err = proc.communicate(timeout=60)
    os.close(master)
    assert proc.returncode == 2, err          # input went on, the exit code remembers the error
    assert "<stdin>:2:1: unknown verb 'bogus'" in err
    assert "<stdin>:4:12: undefined variable $Nope" in err
    assert "dtcl> " in err and "Traceback" not in err


def test_connect_takes_a_sync_mode():
    actions, _ = check_text("login h u;\nconnect r to t map base /x, nomirror, sync fsync;")
    assert actions[-1].args["sync"] == "fsync" and actions[-1].args["nomirror"] is True
    assert actions[-1].summary.endswith(", sync fsync")
    assert check_text("login h u;\nconnect r to t map base /x sync every-write;")[0][-1].args["sync"] \
        == "every-write"
    assert check_text("login h u;\nconnect r to t map base /x;")[0][-1].args["sync"] is None
    for bad, said in (("sync always", "the mode is async, fsync or every-write"),
                      ("sync", "sync needs a mode")):
        with pytest.raises(Exception, match=said):
            check_text(f"login h u;\nconnect r to t map base /x, {bad};")
