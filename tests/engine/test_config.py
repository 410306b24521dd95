import sys

if sys.version_info >= (3, 11):
    import tomllib
else:       # Python 3.10: the tomli backport, a dependency there (pyproject.toml)
    import tomli as tomllib

import pytest

from smirror.daemon import config
from smirror.errors import ConfigError
from smirror.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize("text,expect", [
    ("0", 0), (4096, 4096), ("256MiB", 256 << 20), ("1.5 GB", 1_500_000_000),
    ("10GiB", 10 << 30), ("4k", 4000), ("2 TiB", 2 << 40), ("7b", 7),
])
def test_parse_size(text, expect):
    assert parse_size(text) == expect


@pytest.mark.parametrize("bad", ["", "MiB", "-1", -5, "12 parsecs", "1e3", True, None, 3.5, "1..5GB"])
def test_parse_size_rejects_with_the_setting_named(bad):
    with pytest.raises(ConfigError, match="queues.disk_queue_limit"):
        parse_size(bad, "queues.disk_queue_limit")


def test_parse_duration():
    assert parse_duration("250ms") == 0.25
    assert parse_duration("5m") == 300
    assert parse_duration(3) == 3.0
    assert parse_duration("7d") == 7 * 86400
    with pytest.raises(ConfigError, match="retry"):
        parse_duration("soon", "retry")


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(256 << 20) == "256 MiB"
    # rates are floats: the progress bar shows them through the same formatter
    assert format_size(512.4) == "512 B"
    assert format_size(1.5 * 1024 * 1024) == "1.5 MiB"


def test_defaults_load_and_round_trip(tmp_path):
    cfg = config.load()
    assert cfg.daemon.listen == "127.0.0.1:6320"
    assert cfg.memory.limit == 256 << 20 and cfg.queues.source_memory_limit is None
    assert cfg.queue_dir == cfg.state_dir / "queues"
    # the printed defaults are valid TOML and load to the same values
    path = tmp_path / "defaults.toml"
    path.write_text(config.defaults_toml())
    tomllib.loads(path.read_text())
    assert config.load(path).as_dict() == cfg.as_dict()


def test_file_values_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[queues]\nsource_memory_limit = "64MiB"\n[daemon]\nlisten = "0.0.0.0"\n')
    cfg = config.load(path, overrides={"daemon": {"listen": "127.0.0.1:7000", "state_dir": None}})
    assert cfg.queues.source_memory_limit == 64 << 20
    assert cfg.daemon.listen == "127.0.0.1:7000"
    assert config.load(path).daemon.listen == "0.0.0.0:6320"


@pytest.mark.parametrize("toml,message", [
    ('[queues]\nsource_memory_limt = "1MiB"\n', "unknown key queues.source_memory_limt"),
    ('[queue]\n', r"unknown section \[queue\]"),
    ('[queues]\nalert_threshold = 150\n', "queues.alert_threshold"),
    ('[reconnect]\nremirror = "fast"\n', "reconnect.remirror"),
    ('[daemon]\nlisten = "host:99999"\n', "port must be 1-65535"),
    ('[tasks]\nenabled = "yes"\n', "tasks.enabled: expected true or false"),
    ('[tls]\nenabled = true\n', "tls.enabled needs tls.cert"),
    ('[daemon\n', "not valid TOML"),
])
def test_bad_config_names_file_and_key(tmp_path, toml, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message) as info:
        config.load(path)
    assert str(path) in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml")


@pytest.mark.parametrize("text,expect", [
    ("a:1", ("a", 1)), ("a", ("a", 6320)), ("[::1]:99", ("::1", 99)), ("[::1]", ("::1", 6320)),
])
def test_parse_hostport(text, expect):
    assert config.parse_hostport(text) == expect


def test_sections_are_typed_and_follow_the_schema():
    # each section is a frozen dataclass whose fields are SCHEMA's keys in
    # SCHEMA's order, so mypy sees `cfg.queues.fsync` as a str
    import dataclasses
    cfg = config.from_mapping({"queues": {"fsync": "always"}})
    for section, settings in config.SCHEMA.items():
        typed = getattr(cfg, section)
        assert [f.name for f in dataclasses.fields(typed)] == list(settings), section
        assert repr(typed).startswith(f"[{section}] ")
    assert cfg.queues.fsync == "always"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.queues.fsync = "none"
