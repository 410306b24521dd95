"""Replication sets and connections of a daemon, kept in
``STATE_DIR/registry.json`` (replaced atomically, so a crash leaves the old
or the new registry, never half of one).

A replication set (repset) is a source root directory plus ordered
include/exclude rules relative to it, and how its changes are captured:
``watch`` (a watcher on the root) or ``mount`` (the root is the backing
directory of a capture mount at the repset's mount point, which the
application uses: exact write order, see docs/mount.md); a connection maps one repset to a
target (``host:port``) and a map base (directory on the target). One repset
may have many connections: fan-out, or rotating replicas on one target.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from smirror.daemon.config import parse_hostport
from smirror.errors import ConfigError
from smirror.fs.atomic import write_atomic
from smirror.fs.tree import Rules

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def check_name(name, what="replication set name") -> str:
    if not isinstance(name, str) or not name or len(name) > 64 or set(name) - _NAME_CHARS or name[0] in ".-":
        raise ConfigError(f"{what} must be 1-64 letters, digits, '.', '_' or '-' "
                          f"(not starting with '.' or '-'), got {name!r}")
    return name


@dataclass(frozen=True)
class RepsetRule:
    """``include``/``exclude`` of a glob relative to the repset root.
    ``recursive``: the rule also covers everything below a matching
    directory; otherwise only the directory's direct entries."""
    kind: str
    pattern: str
    recursive: bool = True

    def __post_init__(self):
        if self.kind not in ("include", "exclude"):
            raise ConfigError(f"rule kind must be include or exclude, got {self.kind!r}")
        if not isinstance(self.pattern, str) or not self.pattern.strip("/"):
            raise ConfigError(f"{self.kind} rule needs a pattern, got {self.pattern!r}")

    def patterns(self) -> list[str]:
        """tree.Rules patterns (first match wins) this rule expands to."""
        base = self.pattern.rstrip("/")
        return [base, base + ("/**" if self.recursive else "/*")]


CAPTURES = ("watch", "mount")


@dataclass
class Repset:
    name: str
    root: str
    rules: list[RepsetRule] = field(default_factory=list)
    capture: str = "watch"
    mount: str = ""             # the mount point, with capture = "mount"

    def compiled_rules(self) -> Rules:
        """tree.Rules for scanning and watching. With include rules present,
        everything they do not cover is excluded."""
        pairs = [(r.kind, p) for r in self.rules for p in r.patterns()]
        if any(r.kind == "include" for r in self.rules):
            pairs += [("include", "*/"), ("exclude", "**")]   # keep walking into directories
        return Rules.from_patterns(pairs)


def _inside(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or beneath it (both real paths)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _check_mounts_apart(new: Repset, other: Repset) -> None:
    """A new mount set's mount point apart from every other set's root and
    mount point, and its root apart from another mount set's mount point: a
    mount inside another would capture (or hide) the other's files, a root
    inside a mount point would be read back through the mount."""
    mine = os.path.realpath(new.mount)
    places = [("root", other.root)] + ([("mount point", other.mount)] if other.capture == "mount" else [])
    for what, place in places:
        theirs = os.path.realpath(place)
        if _inside(mine, theirs) or _inside(theirs, mine):
            raise ConfigError(f"repset {new.name!r}: mount point {new.mount} overlaps the {what} "
                              f"{place} of replication set {other.name!r}")
    if other.capture == "mount" and (_inside(os.path.realpath(new.root), os.path.realpath(other.mount))
                                     or _inside(os.path.realpath(other.mount), os.path.realpath(new.root))):
        raise ConfigError(f"repset {new.name!r}: root {new.root} overlaps the mount point "
                          f"{other.mount} of replication set {other.name!r}")


def check_capture(name: str, root: str, capture, mount, rules) -> tuple[str, str]:
    """(capture, mount point) of a repset, checked: a mount point is an
    absolute path, neither inside the root nor holding it, and goes with
    capture = "mount" (which replicates the whole root: no rules)."""
    if capture is None:
        capture = "mount" if mount else "watch"
    if capture not in CAPTURES:
        raise ConfigError(f"repset {name!r}: capture must be one of {', '.join(CAPTURES)}, "
                          f"got {capture!r}")
    if capture == "watch":
        if mount:
            raise ConfigError(f"repset {name!r}: a mount point needs capture = \"mount\"")
        return capture, ""
    if not isinstance(mount, str) or not os.path.isabs(mount) or "\0" in mount:
        raise ConfigError(f"repset {name!r}: capture = \"mount\" needs an absolute mount point "
                          f"(where the application works), got {mount!r}")
    mount = os.path.normpath(mount)
    real_mount, real_root = os.path.realpath(mount), os.path.realpath(root)
    if real_mount == real_root or real_mount.startswith(real_root.rstrip("/") + "/") \
            or real_root.startswith(real_mount.rstrip("/") + "/"):
        raise ConfigError(f"repset {name!r}: mount point {mount} and root {root} must be apart "
                          f"(neither inside the other): the root is the mount's backing directory")
    if rules:
        raise ConfigError(f"repset {name!r}: capture = \"mount\" replicates its whole root: "
                          f"include/exclude rules are not supported with it")
    return capture, mount


ORPHAN_POLICIES = ("report", "delete", "move")
IGNORE_DELETES = ("off", "keep", "move")


@dataclass
class Connection:
    conid: int
    repset: str
    target: str            # "host:port", or "local" for an embedded target
    map_base: str          # absolute directory on the target
    mirror_on_connect: bool = True
    # deletes of the source not applied on the target: off, keep (left in
    # the replica) or move (to the target's deleted_dir, purged after
    # deleted_keep_days; 0 = kept); a move out of the set still deletes
    ignore_deletes: str = "off"
    deleted_keep_days: float = 0.0
    # what mirrors do with orphans (entries only the target has): report,
    # delete, or move (to the target's orphans_dir), only those older than
    # orphans_older_than_days (0 = all)
    orphans: str = "report"
    orphans_older_than_days: float = 0.0
    # synchronous mode (stream.syncwait): async, fsync or every-write; other
    # than async only for a repset captured through the mount
    sync: str = "async"

    OPTIONS = ("ignore_deletes", "deleted_keep_days", "orphans", "orphans_older_than_days", "sync")

    def options(self) -> dict:
        return {k: getattr(self, k) for k in self.OPTIONS}


def check_options(options: object) -> dict:
    """Connection options from a request or the registry file, checked."""
    if not isinstance(options, dict):
        raise ConfigError(f"connection options must be a table of option = value, got {options!r}")
    out = {}
    for key, value in options.items():
        if value is None:
            continue
        if key == "ignore_deletes":
            if value is True:
                value = "keep"
            elif value is False:
                value = "off"
            if value not in IGNORE_DELETES:
                raise ConfigError(f"ignore deletes must be one of {', '.join(IGNORE_DELETES)}, got {value!r}")
        elif key == "orphans":
            if value not in ORPHAN_POLICIES:
                raise ConfigError(f"orphan policy must be one of {', '.join(ORPHAN_POLICIES)}, got {value!r}")
        elif key == "sync":
            from smirror.stream.sender import SYNC_MODES
            if value not in SYNC_MODES:
                raise ConfigError(f"sync must be one of {', '.join(SYNC_MODES)}, got {value!r}")
        elif key in ("deleted_keep_days", "orphans_older_than_days"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{key.replace('_', ' ')} must be a number of days >= 0, got {value!r}")
            value = float(value)
        else:
            raise ConfigError(f"unknown connection option {key!r}; known: {', '.join(Connection.OPTIONS)}")
        out[key] = value
    return out


class Registry:
    def __init__(self, state_dir):
        self.path = Path(state_dir) / "registry.json"
        self._lock = threading.RLock()
        self.repsets: dict[str, Repset] = {}
        self.connections: dict[int, Connection] = {}
        self._next_conid = 1
        self._load()

    # -- persistence -----------------------------------------------------
    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: registry is damaged: {exc}") from None
        try:
            for r in data["repsets"]:
                rules = [RepsetRule(**x) for x in r["rules"]]
                capture, mount = check_capture(r["name"], r["root"], r.get("capture", "watch"),
                                               r.get("mount", ""), rules)
                self.repsets[r["name"]] = Repset(r["name"], r["root"], rules, capture, mount)
            for c in data["connections"]:
                conn = Connection(**c)
                check_options(conn.options())
                self.connections[c["conid"]] = conn
            self._next_conid = int(data["next_conid"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{self.path}: registry is damaged: {exc}") from None

    def _save(self) -> None:
        data = {"repsets": [asdict(r) for r in self.repsets.values()],
                "connections": [asdict(c) for c in self.connections.values()],
                "next_conid": self._next_conid}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=1), mode=0o666)

    # -- repsets ---------------------------------------------------------
    def create_repset(self, name: object, root: object, rules=(), capture=None, mount=None) -> Repset:
        """``capture``: "watch" or "mount" (None: "mount" when ``mount``, a
        mount point, is given). The arguments may come from a request as
        they are: each is checked."""
        name = check_name(name)
        if not isinstance(root, str) or not os.path.isabs(root):
            raise ConfigError(f"repset {name!r}: root must be an absolute path, got {root!r}")
        if not os.path.isdir(root):
            raise ConfigError(f"repset {name!r}: root {root!r} is not a directory")
        rules = [r if isinstance(r, RepsetRule) else RepsetRule(*r) for r in rules]
        capture, mount = check_capture(name, root, capture, mount, rules)
        repset = Repset(name, os.path.normpath(root), rules, capture, mount)
        repset.compiled_rules()             # bad patterns fail here, not later
        with self._lock:
            if name in self.repsets:
                raise ConfigError(f"replication set {name!r} exists already")
            if capture == "mount":
                for other in self.repsets.values():
                    _check_mounts_apart(repset, other)
            self.repsets[name] = repset
            self._save()
        return repset

    def set_rules(self, name: str, rules) -> Repset:
        with self._lock:
            repset = self.repset(name)
            new = Repset(repset.name, repset.root,
                         [r if isinstance(r, RepsetRule) else RepsetRule(*r) for r in rules],
                         repset.capture, repset.mount)
            check_capture(name, new.root, new.capture, new.mount, new.rules)
            new.compiled_rules()
            self.repsets[name] = new
            self._save()
            return new

    def repset(self, name: object) -> Repset:
        # a request's name may be any JSON value (a list is not hashable)
        found = self.repsets.get(name) if isinstance(name, str) else None
        if found is None:
            raise ConfigError(f"no replication set {name!r}")
        return found

    def delete_repset(self, name: object) -> Repset:
        """Forget the repset ``name``, unused by connections; returns it."""
        with self._lock:
            repset = self.repset(name)
            used = [c.conid for c in self.connections.values() if c.repset == repset.name]
            if used:
                raise ConfigError(f"replication set {repset.name!r} is used by connection(s) "
                                  f"{', '.join(map(str, used))}: disconnect them first")
            del self.repsets[repset.name]
            self._save()
            return repset

    # -- connections -----------------------------------------------------
    def check_connect(self, repset: object, target: object, map_base: object) -> tuple[Repset, str, str]:
        """(repset, target, map base) of a connection that may be made, in
        their normal forms, without making it (a daemon asks the target
        before it registers anything)."""
        target = _check_target(target)
        if not isinstance(map_base, str) or not os.path.isabs(map_base) or "\0" in map_base:
            raise ConfigError(f"map base must be an absolute path on the target, got {map_base!r}")
        map_base = os.path.normpath(map_base)
        with self._lock:
            found = self.repset(repset)
            conid = self.find(found.name, target, map_base)
            if conid is not None:
                raise ConfigError(f"{found.name} is already connected to {target} at map base {map_base} "
                                  f"(connection {conid})")
        return found, target, map_base

    def connect(self, repset: str, target: str, map_base: str, mirror: bool = True,
                options: dict | None = None) -> Connection:
        options = check_options(options or {})
        with self._lock:
            _, target, map_base = self.check_connect(repset, target, map_base)
            conn = Connection(self._next_conid, repset, target, map_base, mirror, **options)
            self._next_conid += 1
            self.connections[conn.conid] = conn
            self._save()
        return conn

    def find(self, repset: object, target: object, map_base: object) -> int | None:
        """The conid of repset -> target at map base, or None."""
        target = _check_target(target)
        if not isinstance(map_base, str):
            raise ConfigError(f"map base must be a path on the target, got {map_base!r}")
        map_base = os.path.normpath(map_base)
        for c in self.connections.values():
            if (c.repset, c.target, c.map_base) == (repset, target, map_base):
                return c.conid
        return None

    def connection(self, conid: object) -> Connection:
        """Connection ``conid``: an int, or (from a request) its digits."""
        found = None
        if isinstance(conid, (int, float, str)):
            try:
                found = self.connections.get(int(conid))
            except (ValueError, OverflowError):     # "x", NaN; infinity
                pass
        if found is None:
            raise ConfigError(f"no connection with id {conid!r}")
        return found

    def set_options(self, conid: object, options: object) -> Connection:
        options = check_options(options)
        with self._lock:
            conn = self.connection(conid)
            for k, v in options.items():
                setattr(conn, k, v)
            self._save()
            return conn

    def disconnect(self, conid: object) -> Connection:
        with self._lock:
            conn = self.connection(conid)
            del self.connections[conn.conid]
            self._save()
            return conn


def _check_target(target: object) -> str:
    if target == "local":
        return target
    host, port = parse_hostport(target, "target")
    return f"{host}:{port}"
