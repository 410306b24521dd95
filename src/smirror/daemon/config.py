"""The daemon's TOML configuration: every setting, its default and what it
means, in one table; loading checks each value and names the file, the key
and what was expected when one is wrong. Unknown keys are errors (a typo must
not silently fall back to a default)."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from smirror.errors import ConfigError
from smirror.units import parse_duration, parse_size

DEFAULT_PORT = 6320


def _listen(value, what):
    host, port = parse_hostport(value, what)
    return f"{host}:{port}"


def parse_hostport(value, what="address", default_port=DEFAULT_PORT):
    """``HOST[:PORT]`` or ``[V6]:PORT`` -> (host, port)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"{what}: missing host in {value!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{what}: port must be 1-65535, got {port_text!r} in {value!r}")
    return host, int(port_text)


def _choice(*allowed):
    def check(value, what):
        if value not in allowed:
            raise ConfigError(f"{what}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    return check


def _typed(kind, name):
    def check(value, what):
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{what}: expected {name}, got {value!r}")
        return value
    return check


def _percent(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise ConfigError(f"{what}: expected a percentage in (0, 100], got {value!r}")
    return float(value)


def _size(value, what):
    return parse_size(value, what)


def _optional_size(value, what):
    """A size, or "" (None): no value of its own."""
    if value in ("", None):
        return None
    return parse_size(value, what)


def _duration(value, what):
    return parse_duration(value, what)


def _days(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
        raise ConfigError(f"{what}: expected a number of days >= 0, got {value!r}")
    return float(value)


def _abs_paths(value, what):
    if not isinstance(value, list):
        raise ConfigError(f"{what}: expected a list of absolute paths, got {value!r}")
    for item in value:
        if not isinstance(item, str) or not os.path.isabs(item) or "\0" in item:
            raise ConfigError(f"{what}: expected absolute paths, got {item!r}")
    return [os.path.normpath(p) for p in value]


def _xattr_prefixes(value, what):
    if not isinstance(value, list):
        raise ConfigError(f"{what}: expected a list of xattr name prefixes, got {value!r}")
    for item in value:
        if not isinstance(item, str) or "\0" in item or not item.startswith(
                ("user.", "trusted.", "security.", "system.")):
            raise ConfigError(f"{what}: {item!r} is not an xattr name prefix in the user., "
                              f"trusted., security. or system. namespace")
    return value


def setid_allowed(map_base, setid_map_bases) -> bool:
    """Whether ``[target] setid_map_bases`` lets setuid/setgid bits through
    for ``map_base``: it is one of them or inside one (real paths)."""
    real = os.path.realpath(map_base)
    for allowed in setid_map_bases:
        top = os.path.realpath(allowed)
        if real == top or real.startswith(top.rstrip("/") + "/"):
            return True
    return False


_str = _typed(str, "a string")
_bool = _typed(bool, "true or false")


def _count(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}: expected a whole number of at least 1, got {value!r}")
    return value


@dataclass(frozen=True)
class Setting:
    default: Any
    check: Callable[[Any, str], Any]
    doc: str


# section -> key -> Setting. The text of `smirror config --defaults` is made from this.
SCHEMA: dict[str, dict[str, Setting]] = {
    "daemon": {
        "listen": Setting(f"127.0.0.1:{DEFAULT_PORT}", _listen,
                          "address the daemon listens on (control and data links)"),
        "state_dir": Setting("/var/lib/smirror", _str,
                             "users, replication sets, connections and queues live here"),
        "log_level": Setting("info", _choice("debug", "info", "warning", "error"),
                             "least severe level written to the log"),
        "log_file": Setting("", _str, "log file; empty = standard error"),
        "insecure": Setting(False, _bool, "allow listening on a non-loopback address without TLS "
                            "(everything after login, frames included, then travels unprotected)"),
    },
    "login": {
        "timeout": Setting("10s", _duration, "time a peer has for its whole login (TLS handshake "
                           "included) before it is dropped"),
        "max_pending": Setting(64, _count, "logins in progress at once, from all peers; more are "
                               "closed with an error"),
        "max_pending_per_peer": Setting(8, _count, "logins in progress at once from one peer address"),
        "first_delay": Setting("250ms", _duration, "delay before the next login attempt after a "
                               "failure (per user name and per peer address); doubles each time"),
        "max_delay": Setting("8s", _duration, "the longest such delay"),
    },
    "memory": {
        "limit": Setting("256MiB", _size, "RAM for queued data of this whole daemon, shared by every "
                         "source and target queue and the target's handoff buffers; past it the "
                         "queues spill to disk (the disk limits decide auto-disconnect)"),
    },
    "queues": {
        "source_memory_limit": Setting("", _optional_size, "cap on the RAM of one source queue, "
                                       "under [memory] limit; empty = the budget alone limits it"),
        "target_memory_limit": Setting("", _optional_size, "cap on the RAM of one target queue, "
                                       "under [memory] limit; empty = the budget alone limits it"),
        "disk_queue_dir": Setting("", _str, "spill directory; empty = STATE_DIR/queues"),
        "disk_queue_limit": Setting("10GiB", _size, "bytes on disk per queue before auto-disconnect"),
        "min_free_space": Setting("1GiB", _size, "free space kept on the queue volume; below it the "
                                  "queue counts as full"),
        "alert_threshold": Setting(50, _percent, "percent of the disk queue limit at which status warns"),
        "fsync": Setting("segment", _choice("none", "segment", "always"),
                         "when spilled queue data is fsynced: never, when a segment is closed, every record"),
    },
    "reconnect": {
        "auto_reconnect": Setting(True, _bool, "reconnect automatically after an auto-disconnect"),
        "retry_interval": Setting("10s", _duration, "time between reconnect attempts"),
        "remirror": Setting("checksum", _choice("none", "full", "different", "checksum"),
                            "mirror run after an auto-reconnect when the queue could not bridge the gap"),
    },
    "tasks": {
        "enabled": Setting(False, _bool, "run task commands (queued here, or arriving in the stream)"),
        "directory": Setting("", _str, "only executables inside this directory may run as tasks"),
        "stop_replication_on_failure": Setting(False, _bool, "pause applying when a task fails"),
        "group_wait": Setting("10m", _duration, "how long a task waits for the other connections "
                              "of its group to reach it before it runs without them"),
    },
    "target": {
        "allowed_roots": Setting([], _abs_paths, "directories under which sources may place map bases "
                                 "(none: this daemon refuses to be a target)"),
        "in_use_max_delay": Setting("0s", _duration, "hold back the ops of a file another process has "
                                    "open (a backup reading it) up to this long; 0 = never wait"),
        "orphans_dir": Setting("", _str, "where orphans moved aside go; empty = STATE_DIR/orphans"),
        "deleted_dir": Setting("", _str, "where deleted files of ignore-deletes connections go "
                               "when ignored_deletes = 'move'; empty = STATE_DIR/deleted"),
        "ignored_deletes": Setting("keep", _choice("keep", "move"),
                                   "what this target does with a delete a source ignores: 'keep' "
                                   "leaves the file in the map base, 'move' moves it to "
                                   "deleted_dir (the source's own keep/move choice is not obeyed)"),
        "deleted_keep_days": Setting(0, _days, "days files moved to deleted_dir are kept "
                                     "before they are purged; 0 = kept"),
        "orphans": Setting("move", _choice("move", "keep"),
                           "what this target does when a source's mirror asks to move an orphan: "
                           "'move' to orphans_dir, 'keep' leaves it in the map base"),
        "setid_map_bases": Setting([], _abs_paths, "map bases (absolute paths; their subdirectories "
                                   "too) where setuid/setgid bits sent by a source are kept; "
                                   "everywhere else they are stripped"),
        "xattr_namespaces": Setting(["user.", "system.posix_acl_"], _xattr_prefixes,
                                    "extended attributes (name prefixes) this target stores; "
                                    "add 'trusted.' or 'security.' to store those too "
                                    "(security.capability only in setid_map_bases)"),
        "devices": Setting(False, _bool, "make the character and block device nodes a source "
                           "sends (off: refused, like a nodev mount)"),
    },
    "links": {
        "user": Setting("", _str, "user this daemon logs in as on target daemons (data links)"),
        "password_file": Setting("", _str, "file holding that user's password; keep it mode 0600"),
    },
    "tls": {
        "enabled": Setting(False, _bool, "wrap data and control links in TLS"),
        "cert": Setting("", _str, "PEM certificate of this daemon"),
        "key": Setting("", _str, "PEM private key of this daemon"),
        "ca": Setting("", _str, "PEM CA bundle that peers' certificates must chain to; when set, "
                      "every peer must present a certificate"),
        "cert_users": Setting(False, _bool, "with ca: the common name (CN) of a peer's certificate "
                              "must be the user it logs in as (data links: links.user)"),
    },
}


@dataclass(frozen=True, repr=False)
class _Section:
    """One checked section; its fields are SCHEMA[section]'s keys, typed."""
    _name = ""

    def __repr__(self) -> str:
        items = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"[{self._name}] {items}"


@dataclass(frozen=True, repr=False)
class DaemonSection(_Section):
    _name = "daemon"
    listen: str
    state_dir: str
    log_level: str
    log_file: str
    insecure: bool


@dataclass(frozen=True, repr=False)
class LoginSection(_Section):
    _name = "login"
    timeout: float
    max_pending: int
    max_pending_per_peer: int
    first_delay: float
    max_delay: float


@dataclass(frozen=True, repr=False)
class MemorySection(_Section):
    _name = "memory"
    limit: int


@dataclass(frozen=True, repr=False)
class QueuesSection(_Section):
    _name = "queues"
    source_memory_limit: int | None
    target_memory_limit: int | None
    disk_queue_dir: str
    disk_queue_limit: int
    min_free_space: int
    alert_threshold: float
    fsync: str


@dataclass(frozen=True, repr=False)
class ReconnectSection(_Section):
    _name = "reconnect"
    auto_reconnect: bool
    retry_interval: float
    remirror: str


@dataclass(frozen=True, repr=False)
class TasksSection(_Section):
    _name = "tasks"
    enabled: bool
    directory: str
    stop_replication_on_failure: bool
    group_wait: float


@dataclass(frozen=True, repr=False)
class TargetSection(_Section):
    _name = "target"
    allowed_roots: list[str]
    in_use_max_delay: float
    orphans_dir: str
    deleted_dir: str
    ignored_deletes: str
    deleted_keep_days: float
    orphans: str
    setid_map_bases: list[str]
    xattr_namespaces: list[str]
    devices: bool


@dataclass(frozen=True, repr=False)
class LinksSection(_Section):
    _name = "links"
    user: str
    password_file: str


@dataclass(frozen=True, repr=False)
class TlsSection(_Section):
    _name = "tls"
    enabled: bool
    cert: str
    key: str
    ca: str
    cert_users: bool


class Config:
    """Checked settings: ``config.queues.source_memory_limit`` -> bytes.
    ``values`` holds every section of SCHEMA with every key (from_mapping
    makes it so)."""

    def __init__(self, values: dict[str, dict[str, Any]], source: str = "<defaults>"):
        self._values = values
        self.source = source
        self.daemon = DaemonSection(**values["daemon"])
        self.login = LoginSection(**values["login"])
        self.memory = MemorySection(**values["memory"])
        self.queues = QueuesSection(**values["queues"])
        self.reconnect = ReconnectSection(**values["reconnect"])
        self.tasks = TasksSection(**values["tasks"])
        self.target = TargetSection(**values["target"])
        self.links = LinksSection(**values["links"])
        self.tls = TlsSection(**values["tls"])

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {s: dict(k) for s, k in self._values.items()}

    @property
    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir)

    @property
    def queue_dir(self) -> Path:
        return Path(self.queues.disk_queue_dir) if self.queues.disk_queue_dir else self.state_dir / "queues"


def from_mapping(data: dict, source: str = "<mapping>") -> Config:
    """Check a parsed TOML mapping against SCHEMA and fill in defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a table of sections")
    unknown = sorted(set(data) - set(SCHEMA))
    if unknown:
        raise ConfigError(f"{source}: unknown section [{unknown[0]}]; known: {', '.join(SCHEMA)}")
    values: dict[str, dict[str, Any]] = {}
    for section, settings in SCHEMA.items():
        given = data.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {given!r}")
        bad = sorted(set(given) - set(settings))
        if bad:
            raise ConfigError(f"{source}: unknown key {section}.{bad[0]}; known: {', '.join(settings)}")
        values[section] = {}
        for key, setting in settings.items():
            raw = given.get(key, setting.default)
            values[section][key] = setting.check(raw, f"{source}: {section}.{key}")
    tls = values["tls"]
    if tls["enabled"] and not (tls["cert"] and tls["key"]):
        raise ConfigError(f"{source}: tls.enabled needs tls.cert and tls.key")
    if tls["cert_users"] and not (tls["enabled"] and tls["ca"]):
        raise ConfigError(f"{source}: tls.cert_users needs tls.enabled and tls.ca "
                          "(client certificates are checked against the CA)")
    login = values["login"]
    if login["timeout"] <= 0:
        raise ConfigError(f"{source}: login.timeout must be longer than 0 s")
    if login["first_delay"] > login["max_delay"]:
        raise ConfigError(f"{source}: login.first_delay ({login['first_delay']} s) is longer than "
                          f"login.max_delay ({login['max_delay']} s)")
    return Config(values, source)


def load(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """Load a TOML file (None = defaults only), then apply ``overrides``
    (``{"daemon": {"listen": ...}}``, from command-line flags)."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        # only when a file is read: keeps CLI start-up light
        if sys.version_info >= (3, 11):
            import tomllib
        else:                   # Python 3.10: the same parser, from PyPI
            import tomli as tomllib
        source = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for section, keys in (overrides or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in keys.items() if v is not None})
    return from_mapping(data, source)


def defaults_toml() -> str:
    """The default configuration as commented TOML."""
    lines = ["# smirror daemon configuration; every key is optional, shown with its default."]
    for section, settings in SCHEMA.items():
        lines.append(f"\n[{section}]")
        for key, setting in settings.items():
            lines.append(f"# {setting.doc}")
            lines.append(f"{key} = {_toml_value(setting.default)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)
