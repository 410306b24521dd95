"""Who may write where on a target, with two daemons as real processes:
map bases only inside ``[target] allowed_roots`` (checked at connect, before
anything is registered or queued), link users with the ``replication`` role
and the source id bound to them, a scan failure that is an error for its
connection, and a connection whose set's root vanished."""
import contextlib
import json
import os
import shutil
import signal
import subprocess

import pytest

from smirror.daemon import handshake
from smirror.daemon.control import Client, RequestError
from smirror.daemon.target_access import MapBases, SourceBindings
from smirror.errors import AuthError, ConfinementError
from smirror.stream import wire
from support.daemons import PASSWORD, free_port, smirror, wait_for
from support.pair import login, make_source_tree, running_pair, wait_same


@contextlib.contextmanager
def pair(tmp_path, allowed=("backup", "target", "data"), target_allowed=None):
    """Source (admin 'admin', links as 'repl') and target (admin 'admin',
    replication user 'repl'), map bases allowed under TMP/<each of allowed>:
    the backup directory, the target daemon's own directory (its state dir is
    inside: refused for being the state dir, not for being outside) and the
    source's set (refused by the source, which knows it is its own root)."""
    for d in ("backup", "data"):
        (tmp_path / d).mkdir(exist_ok=True)
    roots = [tmp_path / a for a in allowed] if target_allowed is None else target_allowed
    with running_pair(tmp_path, target_options={"allowed_roots": roots}) as nodes:
        yield nodes


def status(node):
    return json.loads(node.cli("status", "--json").stdout)


def connect(source, target_address, base, check=False):
    return source.cli("connect", "data", "to", target_address, "map", "base", base, check=check)




def nothing_queued(source, target):
    """No connection registered or running on the source, no incoming one
    on the target, no queue on either side."""
    assert status(source)["sources"] == []
    assert json.loads((source.dir / "state" / "registry.json").read_text())["connections"] == []
    for node in (source, target):
        queues = node.dir / "state" / "queues"
        assert not queues.exists() or os.listdir(queues) == [], node.dir
    assert not (target.dir / "state" / "targets").exists()


def refused_cases(tmp):
    outside = tmp / "outside"
    outside.mkdir()
    os.symlink(outside, tmp / "backup" / "link")
    (tmp / "backup" / "afile").write_text("a file, not a directory")
    return [
        ("/", "contains the root", None),        # this host: the source refuses it first
        (f"{tmp}/backup/../../escape", "outside the allowed roots", tmp.parent / "escape"),
        (f"{tmp}/backup/link/sub", "outside the allowed roots", outside / "sub"),
        (f"{tmp}/target/state", "overlaps the daemon's state directory", None),
        (f"{tmp}/target", "overlaps the daemon's state directory", None),
        (f"{tmp}/backup/afile", "exists and is not a directory", None),
        (f"{tmp}/data/copy", "would replicate itself", tmp / "data" / "copy"),
    ]


@pytest.mark.slow
def test_map_bases_outside_the_allowed_roots_are_refused_at_connect(tmp_path):
    with pair(tmp_path) as (source, target, env):
        make_source_tree(tmp_path / "data")
        login(source, env)
        source.cli("repset", "create", "data", "--root", tmp_path / "data")
        for base, reason, not_made in refused_cases(tmp_path):
            r = connect(source, target.address, base)
            assert r.returncode == 3, (base, r.stdout, r.stderr)
            assert reason in r.stderr and "Traceback" not in r.stderr, (base, r.stderr)
            if "would replicate itself" not in r.stderr:   # the target's own words name the setting
                assert "allowed_roots" in r.stderr and "refused" in r.stderr, r.stderr
            assert not_made is None or not os.path.lexists(not_made), base
            nothing_queued(source, target)
        assert (tmp_path / "backup" / "afile").read_text() == "a file, not a directory"
        assert "refused" in target.log()
        # an allowed one is created (0755) and replicated into
        dst = tmp_path / "backup" / "new" / "replica"
        r = connect(source, target.address, dst)
        assert r.returncode == 0 and "accepted by the target" in r.stdout, r.stderr
        assert wait_same(tmp_path / "data", dst), source.log()[-3000:] + target.log()[-3000:]
        assert os.stat(tmp_path / "backup" / "new").st_mode & 0o777 == 0o755


@pytest.mark.slow
def test_a_daemon_without_allowed_roots_is_no_target(tmp_path):
    with pair(tmp_path, target_allowed=[]) as (source, target, env):
        make_source_tree(tmp_path / "data")
        login(source, env)
        source.cli("repset", "create", "data", "--root", tmp_path / "data")
        r = connect(source, target.address, tmp_path / "backup" / "replica")
        assert r.returncode == 3 and "this daemon is not a target" in r.stderr, r.stderr
        assert '[target] allowed_roots = ["/backup"' in r.stderr
        assert not (tmp_path / "backup" / "replica").exists()
        nothing_queued(source, target)
        # without a mirror (nothing to read on the target) the probe still asks it
        r = source.cli("connect", "data", "to", target.address, "map", "base",
                       tmp_path / "backup" / "replica", "nomirror", check=False)
        assert r.returncode == 3 and "this daemon is not a target" in r.stderr, r.stderr
        nothing_queued(source, target)


@pytest.mark.slow
def test_connect_to_a_dead_port_fails(tmp_path):
    with pair(tmp_path) as (source, target, env):
        make_source_tree(tmp_path / "data")
        login(source, env)
        source.cli("repset", "create", "data", "--root", tmp_path / "data")
        r = connect(source, f"127.0.0.1:{free_port()}", tmp_path / "backup" / "replica")
        assert r.returncode == 3 and "cannot connect" in r.stderr, r.stderr
        assert "mirror started" not in r.stdout
        nothing_queued(source, target)
        # a link user the target does not know: refused with the target's reason
        smirror("user", "remove", "repl", "--config", target.config, env=env)
        r = connect(source, target.address, tmp_path / "backup" / "replica")
        assert r.returncode == 3 and "refused the login of link user 'repl'" in r.stderr, r.stderr
        nothing_queued(source, target)


def test_replication_user_may_only_read_its_own_map_bases(tmp_path):
    with pair(tmp_path) as (source, target, env):
        state = str(target.dir / "state")
        with Client(target.address) as c:
            c.login("repl", PASSWORD)
            for verb, args in (("status", {}), ("repset.create", {"name": "x", "root": state}),
                               ("connect", {"repset": "x", "target": source.address,
                                            "map_base": "/"}),
                               ("session", {})):
                with pytest.raises(RequestError, match="role 'replication'"):
                    c.call(verb, **args)
            with pytest.raises(RequestError, match="overlaps the daemon's state directory"):
                c.call("target.scan", map_base=state, source="abc1")
            with pytest.raises(RequestError, match="overlaps the daemon's state directory"):
                c.call("target.signature", map_base=state, path="users.json", block_size=4096,
                       source="abc1")
            with pytest.raises(RequestError, match=r"\.\."):
                c.call("target.signature", map_base=str(tmp_path / "backup"),
                       path="../target/state/users.json", block_size=4096, source="abc1")
            assert c.call("target.scan", map_base=str(tmp_path / "backup"), source="abc1") == {}
            # that first use bound the user to source abc1: another id is refused
            with pytest.raises(RequestError, match="bound to source abc1"):
                c.call("target.scan", map_base=str(tmp_path / "backup"), source="abc2")
        assert not (tmp_path / "target" / "x").exists()
        # the CLI: a replication user gets no session either
        r = smirror("login", target.address, "--user", "repl", "--password-env", "PW",
                    env={**env, "PW": PASSWORD}, check=False)
        assert r.returncode == 3 and "role 'replication'" in r.stderr, r.stderr
        # an admin may not open a data link: it needs the replication role
        with wire.connect("127.0.0.1", target.port) as link:
            handshake.login(link, "admin", PASSWORD, purpose="data")
            with pytest.raises(wire.ProtocolError, match="--role replication"):
                link.recv_json(wire.MsgType.READY)
        wait_for(lambda: "data link refused for admin user 'admin'" in target.log(), what="the log")


def open_data_link(port, user, source, conid, base):
    link = wire.connect("127.0.0.1", port)
    handshake.login(link, user, PASSWORD, purpose="data")
    link.send_json(wire.MsgType.OPEN, {"conid": conid, "map_base": str(base), "source": source,
                                       "next_seq": 1})
    return link


@pytest.mark.slow
def test_a_source_id_belongs_to_one_replication_user(tmp_path):
    with pair(tmp_path) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "backup" / "replica"
        make_source_tree(src)
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        connect(source, target.address, dst, check=True)
        assert wait_same(src, dst), source.log()[-3000:]
        sid = source.daemon_id()
        bindings = target.dir / "state" / "source-bindings.json"
        assert json.loads(bindings.read_text()) == {"users": {"repl": sid},
                                                    "map_bases": {str(dst): sid}}
        assert os.stat(bindings).st_mode & 0o777 == 0o600
        target.add_user("mallory", "replication")
        other = tmp_path / "backup" / "other"
        attempts = [
            # another user claiming the source's id, for its connection 1
            ("mallory", sid, 1, dst, f"source {sid} is bound to another replication user"),
            ("mallory", sid, 1, other, f"source {sid} is bound to another replication user"),
            # the source's own user claiming another id
            ("repl", "f00d", 1, other, f"user 'repl' is bound to source {sid}"),
            # the source's connection 1 moved to another map base: refused,
            # the running connection is not closed
            ("repl", sid, 1, other, f"connection 1 of source {sid} writes to {dst}"),
        ]
        # another source (its own user and id) may not write, list or hash
        # where this one writes, nor around it
        attempts += [("mallory", "badd", 1, dst, f"map base {dst} overlaps {dst}, where another source"),
                     ("mallory", "badd", 2, tmp_path / "backup", "where another source writes")]
        for user, claimed, conid, base, message in attempts:
            with open_data_link(target.port, user, claimed, conid, base) as link:
                with pytest.raises(wire.ProtocolError, match=message):
                    link.recv_json(wire.MsgType.READY)
        wait_for(lambda: message in target.log(), what="the refusal in the log")
        with Client(target.address) as c:
            c.login("mallory", PASSWORD)
            for verb, extra in (("target.scan", {}), ("target.signature", {"path": "notes.txt",
                                                                            "block_size": 4096})):
                with pytest.raises(RequestError, match="where another source writes"):
                    c.call(verb, map_base=str(dst), source="badd", **extra)

        assert not other.exists()
        # the first source goes on replicating on its connection
        (src / "after.txt").write_text("written after the forged OPENs")
        assert wait_same(src, dst), source.log()[-3000:] + target.log()[-3000:]
        st = status(source)["sources"][0]
        assert st["state"] == "connected" and st["connects"] == 1, st
        # bound in advance: a second source with --source is refused its id
        r = target.add_user("eve", "replication", source=sid, check=False)
        assert r.returncode == 2 and "bound to user 'repl'" in r.stderr, r.stderr
        target.add_user("eve", "replication", source="beef")
        with open_data_link(target.port, "eve", "cafe", 1, other) as link:
            with pytest.raises(wire.ProtocolError, match="user 'eve' is bound to source beef"):
                link.recv_json(wire.MsgType.READY)


def deep_tree(base, levels=20):
    """A directory chain longer than PATH_MAX (made relative to each
    directory): a listing of BASE fails there, even for root."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d" * 250, dir_fd=fd)
            nfd = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def remove_deep_tree(base):
    shutil.rmtree(base / ("d" * 250))


@pytest.mark.slow
def test_a_target_that_cannot_be_listed_is_an_error_not_a_whole_set(tmp_path):
    with pair(tmp_path) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "backup" / "replica"
        make_source_tree(src)
        dst.mkdir()
        deep_tree(dst)
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        r = connect(source, target.address, dst)
        assert r.returncode == 3 and "cannot read map base" in r.stderr \
            and "failed at" in r.stderr, r.stderr
        nothing_queued(source, target)
        assert not (dst / "notes.txt").exists()
        remove_deep_tree(dst)
        connect(source, target.address, dst, check=True)
        assert wait_same(src, dst), source.log()[-3000:]
        # the source restarts while the target cannot be listed: the
        # connection says so and waits; nothing is sent whole
        source.kill(signal.SIGTERM)
        deep_tree(dst)
        (src / "while-down.txt").write_text("changed while the source was stopped")
        source.start()
        login(source, env)
        st = wait_for(lambda: [s for s in status(source)["sources"]
                               if "cannot read the target" in s.get("last_error", "")],
                      what="the listing error in status")[0]
        assert st["mirror"] is None, st
        assert "sending the whole set" not in source.log()
        assert not (dst / "while-down.txt").exists()
        assert "cannot read the target" in source.cli("status").stdout
        remove_deep_tree(dst)                      # listable again: the mirror runs
        assert wait_same(src, dst, 60), source.log()[-3000:]
        # the restart's RESET moved the target's received seq past any op:
        # the listing must not wait for ops that never come (it waited 30 s)
        assert "not applied yet" not in target.log(), target.log()[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"), reason="needs root and chattr")
def test_errors_on_the_target_show_in_the_source_status(tmp_path):
    with pair(tmp_path) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "backup" / "replica"
        make_source_tree(src)
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        connect(source, target.address, dst, check=True)
        assert wait_same(src, dst), source.log()[-3000:]
        # the replica's db directory made immutable: creating db/new fails there
        subprocess.run(["chattr", "+i", dst / "db"], check=True)
        try:
            (src / "db" / "new").write_text("x")
            st = wait_for(lambda: [s for s in status(source)["sources"]
                                   if "db/new" in s.get("last_error", "")], what="the apply error")[0]
            assert st["last_error"].startswith(f"target {target.address}: ") and st["last_error_at"], st
            assert "db/new" in source.cli("status").stdout
        finally:
            subprocess.run(["chattr", "-i", dst / "db"], check=True)
        assert wait_same(src, dst), target.log()[-3000:]
        # the target no longer allows the map base: its ERROR on the data
        # link is the connection's last error
        target.kill(signal.SIGTERM)
        config = target.config.read_text()
        target.config.write_text(config.replace(str(tmp_path / "backup"), str(tmp_path / "elsewhere")))
        target.start()
        st = wait_for(lambda: [s for s in status(source)["sources"]
                               if "outside the allowed roots" in s.get("last_error", "")],
                      what="the target's refusal")[0]
        assert st["last_error"].startswith(f"target {target.address}: ") and st["state"] != "connected", st


@pytest.mark.slow
def test_a_connection_whose_set_root_vanished_can_be_disconnected(tmp_path):
    with pair(tmp_path) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "backup" / "replica"
        make_source_tree(src)
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        connect(source, target.address, dst, check=True)
        conid = 1
        assert wait_same(src, dst), source.log()[-3000:]
        shutil.rmtree(src)
        st = wait_for(lambda: status(source)["sources"], what="status")[0]
        assert st["state"] == "root missing" and "is missing" in st["last_error"], st
        source.kill(signal.SIGTERM)
        source.start()                     # one broken connection does not stop the daemon
        login(source, env)
        st = status(source)["sources"]
        assert [s["conid"] for s in st] == [conid], st
        assert "is missing" in st[0]["last_error"] and st[0]["state"] == "not started", st
        assert "is missing" in source.cli("status").stdout
        r = source.cli("disconnect", conid, check=False)
        assert r.returncode == 0 and f"disconnected {conid}" in r.stdout, r.stderr
        assert status(source)["sources"] == []


@pytest.mark.slow
def test_a_connection_not_started_starts_once_its_set_root_is_back(tmp_path):
    """No daemon restart needed: the start is retried every retry_interval,
    its error shown meanwhile, and the connection mirrors once it starts."""
    with pair(tmp_path) as (source, target, env):
        src, dst = tmp_path / "data", tmp_path / "backup" / "replica"
        make_source_tree(src)
        login(source, env)
        source.cli("repset", "create", "data", "--root", src)
        connect(source, target.address, dst, check=True)
        assert wait_same(src, dst), source.log()[-3000:]
        source.kill(signal.SIGTERM)
        shutil.rmtree(src)
        source.start()
        login(source, env)
        st = wait_for(lambda: [s for s in status(source)["sources"] if "is missing" in s["last_error"]],
                      what="the start's error")[0]
        assert st["state"] == "not started", st
        make_source_tree(src)
        (src / "after").write_bytes(b"written while the connection could not start")
        wait_for(lambda: status(source)["sources"][0]["state"] == "connected", what="the retried start")
        assert wait_same(src, dst), source.log()[-3000:]
        assert "connection 1: started with a mirror" in source.log()


def test_map_base_check_resolves_on_the_target(tmp_path):
    """The check itself, on real paths: '..' after a symlink goes where the
    kernel goes, creation stays inside the allowed root."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    allowed.mkdir()
    os.symlink(outside / "deep", allowed / "jump")
    bases = MapBases([str(allowed)], forbidden=[(tmp_path / "allowed" / "state", "the state dir")],
                     repset_roots=lambda: [("db", str(allowed / "db"))])
    # lexically inside the allowed root, really in outside/
    with pytest.raises(ConfinementError, match="resolves to .*outside/x.*outside the allowed"):
        bases.check(f"{allowed}/jump/../x", create=True)
    assert not (outside / "x").exists()
    for base, reason in (("/", "is the root directory"), (tmp_path, "contains the allowed root"),
                         (allowed / "state" / "q", "overlaps the state dir"),
                         (allowed / "db" / "copy", "overlaps replication set 'db'"),
                         ("relative/path", "absolute")):
        with pytest.raises(ConfinementError, match=reason):
            bases.check(str(base), create=True)
    assert bases.check(str(allowed / "a" / "b"), create=True) == str(allowed / "a" / "b")
    assert (allowed / "a" / "b").is_dir()
    assert bases.check(str(allowed / "a")) == str(allowed / "a")


def test_source_bindings(tmp_path):
    b = SourceBindings(tmp_path)
    assert b.claim("repl", "abc") is True and b.claim("repl", "abc") is False
    with pytest.raises(AuthError, match="bound to source abc"):
        b.claim("repl", "def")
    with pytest.raises(AuthError, match="bound to another replication user"):
        b.claim("other", "abc")
    b.claim_map_base("abc", "/backup/a")
    b.claim_map_base("abc", "/backup/a/b")                  # its own, nested: fine
    for base in ("/backup/a", "/backup/a/x", "/backup"):
        with pytest.raises(AuthError, match="where another source writes"):
            b.claim_map_base("def", base, record=False)
    b.claim_map_base("def", "/backup/b")
    b.bind("repl", "abd")                                   # rebound: its map bases follow
    with pytest.raises(AuthError, match="where another source writes"):
        b.claim_map_base("abc", "/backup/a")
    b.claim_map_base("abd", "/backup/a")
    b.unbind("repl")                                        # released
    assert b.claim("other", "abc") is True
    b.claim_map_base("def", "/backup/a")
    with pytest.raises(Exception, match="1-64 letters or digits"):
        b.claim("x", "../etc")
