
import pytest

from smirror.daemon.registry import Registry, RepsetRule
from smirror.errors import ConfigError


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return str(d)


def test_repsets_and_connections_survive_reload(tmp_path, src):
    reg = Registry(tmp_path / "state")
    reg.create_repset("db", src, [("exclude", "*.tmp", True)])
    c1 = reg.connect("db", "127.0.0.1:7000", "/backup/a")
    c2 = reg.connect("db", "127.0.0.1:7000", "/backup/b", mirror=False)   # rotating replica
    c3 = reg.connect("db", "otherhost", "/backup/a")                        # fan-out
    assert (c1.conid, c2.conid, c3.conid) == (1, 2, 3)
    again = Registry(tmp_path / "state")
    assert again.repset("db").rules == [RepsetRule("exclude", "*.tmp", True)]
    assert again.find("db", "127.0.0.1:7000", "/backup/b") == 2
    assert again.find("db", "otherhost:6320", "/backup/a/") == 3          # default port, normalised path
    assert again.find("db", "127.0.0.1:7000", "/backup/c") is None
    again.disconnect(2)
    assert Registry(tmp_path / "state").connect("db", "127.0.0.1:7000", "/backup/b").conid == 4


def test_rules_compile_and_match(tmp_path, src):
    reg = Registry(tmp_path)
    r = reg.create_repset("r", src, [("exclude", "logs/old", True), ("include", "logs", False),
                                     ("include", "db", True)])
    rules = r.compiled_rules()
    assert not rules.excluded(b"db/x/y.dat", False)
    assert not rules.excluded(b"logs/today.log", False)
    assert rules.excluded(b"logs/old/a.log", False)
    assert rules.excluded(b"logs/deep/a.log", False)        # not recursive
    assert rules.excluded(b"other.txt", False)              # includes present: the rest is out
    no_rules = reg.create_repset("all", src).compiled_rules()
    assert not no_rules.excluded(b"anything/at/all", False)


@pytest.mark.parametrize("call,message", [
    (lambda reg, src: reg.create_repset("bad name", src), "replication set name"),
    (lambda reg, src: reg.create_repset("r", "relative/path"), "absolute"),
    (lambda reg, src: reg.create_repset("r", src + "/missing"), "not a directory"),
    (lambda reg, src: reg.create_repset("r", src, [("maybe", "x", True)]), "include or exclude"),
    (lambda reg, src: reg.create_repset("r", src, [("exclude", "[ab", True)]), "unclosed"),
    (lambda reg, src: reg.connect("nope", "h:1", "/b"), "no replication set 'nope'"),
    (lambda reg, src: reg.disconnect(99), "no connection with id 99"),
])
def test_bad_requests_are_clear(tmp_path, src, call, message):
    reg = Registry(tmp_path)
    with pytest.raises(ConfigError, match=message):
        call(reg, src)


def test_duplicates_and_in_use(tmp_path, src):
    reg = Registry(tmp_path)
    reg.create_repset("r", src)
    with pytest.raises(ConfigError, match="exists already"):
        reg.create_repset("r", src)
    reg.connect("r", "h:1", "/b")
    with pytest.raises(ConfigError, match="already connected"):
        reg.connect("r", "h:1", "/b")
    with pytest.raises(ConfigError, match="map base must be an absolute"):
        reg.connect("r", "h:1", "b")
    with pytest.raises(ConfigError, match="port must be"):
        reg.connect("r", "h:0", "/b")
    with pytest.raises(ConfigError, match="used by connection"):
        reg.delete_repset("r")


def test_damaged_registry_is_reported(tmp_path):
    (tmp_path / "registry.json").write_text('{"repsets": 1}')
    with pytest.raises(ConfigError, match="registry is damaged"):
        Registry(tmp_path)
