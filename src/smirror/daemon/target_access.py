"""Who may write where on a target daemon.

* **Map bases** (:class:`MapBases`): a map base is resolved on the target
  (``..`` and symlinks, with ``os.path.realpath``: the deepest existing
  ancestor resolved, the rest appended) and must lie inside one of the
  administrator's ``[target] allowed_roots``; it may never be ``/``, contain
  an allowed root, or overlap the daemon's own directories (state, queues,
  orphans, deleted files, tasks, log) or a replication set of this daemon.
  None configured: the daemon is no target at all.
* **Source ids** (:class:`SourceBindings`): a ``replication`` user speaks for
  one source id, and a source id belongs to one user, kept in
  ``STATE_DIR/source-bindings.json`` (0600). The first data link (or scan) of
  a user binds the id it claims; ``smirror user add NAME --role replication
  --source ID`` binds it in advance. So one source cannot open, close or take
  over another's connections or reuse their applied-sequence state.
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
from pathlib import Path
from typing import NoReturn, TypeGuard

from smirror.errors import AuthError, ConfigError, ConfinementError
from smirror.fs.atomic import write_atomic

SETTING = "[target] allowed_roots"


def resolve(path: str) -> str:
    """``path`` as the kernel would reach it now: symlinks and ``..`` of its
    existing part resolved, the missing rest appended."""
    return os.path.realpath(path)


def inside(path: str, root: str) -> bool:
    """True when resolved ``path`` is ``root`` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def overlaps(a: str, b: str) -> bool:
    return inside(a, b) or inside(b, a)


class MapBases:
    """The map base check of one target daemon. ``forbidden`` gives the
    daemon's own paths as (path, what it is); ``repset_roots`` returns the
    (name, root) of this daemon's replication sets when called."""

    def __init__(self, allowed_roots, forbidden=(), repset_roots=lambda: ()):
        self.allowed_roots = list(allowed_roots)
        self.forbidden = [(str(p), what) for p, what in forbidden if p]
        self.repset_roots = repset_roots

    def _refuse(self, map_base, reason: str) -> NoReturn:
        roots = ", ".join(self.allowed_roots) or "none"
        raise ConfinementError(f"map base {map_base!r} refused: {reason} "
                               f"(this target's {SETTING}: {roots})", path=map_base)

    def check(self, map_base, *, create: bool = False) -> str:
        """The resolved map base if this target may write there; with
        ``create``, a missing one is made (0755, its missing parents too,
        all inside the allowed root). Raises ConfinementError naming the map
        base, the reason and the setting."""
        self._check_form(map_base)
        base = resolve(map_base)
        shown = map_base if base == map_base else f"{map_base} (resolves to {base})"
        root = self._allowed_root(map_base, base, shown)
        try:
            st = os.stat(base)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self._refuse(map_base, f"{shown} cannot be examined: {exc.strerror}")
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self._refuse(map_base, f"{shown} exists and is not a directory")
        if st is None and create:
            self._create(map_base, base, root)
        return base

    def _check_form(self, map_base) -> None:
        """An absolute path, on a daemon that is a target at all."""
        if not isinstance(map_base, str) or not map_base or "\0" in map_base:
            self._refuse(map_base, "it must be an absolute path")
        if not os.path.isabs(map_base):
            self._refuse(map_base, "it must be an absolute path on the target")
        if not self.allowed_roots:
            raise ConfinementError(
                f"map base {map_base!r} refused: this daemon is not a target: it writes only under "
                f"the directories its administrator allows; add {SETTING} = [\"/backup\", ...] "
                f"to its configuration", path=map_base)

    def _allowed_root(self, map_base: str, base: str, shown: str) -> str:
        """The allowed root that holds resolved ``base``, which overlaps
        none of the daemon's own paths and replication sets."""
        if base == "/":
            self._refuse(map_base, f"{shown} is the root directory")
        roots = [resolve(r) for r in self.allowed_roots]
        for r in roots:
            if r != base and inside(r, base):
                self._refuse(map_base, f"{shown} contains the allowed root {r}")
        root = next((r for r in roots if inside(base, r)), None)
        if root is None:
            self._refuse(map_base, f"{shown} is outside the allowed roots")
        for path, what in self.forbidden:
            if overlaps(base, resolve(path)):
                self._refuse(map_base, f"{shown} overlaps {what} {path}")
        for name, rroot in self.repset_roots():
            if overlaps(base, resolve(rroot)):
                self._refuse(map_base, f"{shown} overlaps replication set {name!r} of this "
                                       f"daemon (root {rroot})")
        return root

    def _create(self, map_base: str, base: str, root: str) -> None:
        """mkdir each missing component below ``root``; a component that
        turned into something else meanwhile (a symlink) is refused."""
        if not os.path.isdir(root):
            self._refuse(map_base, f"the allowed root {root} does not exist")
        path = root
        for part in os.path.relpath(base, root).split("/"):
            path = os.path.join(path, part)
            try:
                os.mkdir(path, 0o755)
                os.chmod(path, 0o755)
            except FileExistsError:
                pass
            except OSError as exc:
                self._refuse(map_base, f"cannot create {path}: {exc.strerror}")
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                self._refuse(map_base, f"{path} changed while the map base was created")
        if resolve(map_base) != base:
            self._refuse(map_base, "its path changed while it was created")


def check_source_id(source) -> str:
    if not isinstance(source, str) or not source or len(source) > 64 or not source.isascii() \
            or not source.isalnum():
        raise ConfigError(f"a source id is 1-64 letters or digits, got {source!r}")
    return source


def _str_table(table) -> TypeGuard[dict[str, str]]:
    return isinstance(table, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in table.items())


class SourceBindings:
    """``STATE_DIR/source-bindings.json`` (0600): replication user -> the
    source id it speaks for, and map base -> the source that writes there
    (a map base is claimed by the first source that opens it; no other
    source may open, list or hash a map base overlapping it). The daemon
    and ``smirror user add`` both write it, under a lock file, replacing it
    atomically. Removing a user (or rebinding it) releases or moves its
    source's map bases."""

    def __init__(self, state_dir):
        self.path = Path(state_dir) / "source-bindings.json"
        self._lock = threading.Lock()

    def _read(self) -> tuple[dict, dict]:
        """(users, map_bases)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}, {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: source bindings are damaged: {exc}") from None
        users, bases = (data.get("users", {}), data.get("map_bases", {})) \
            if isinstance(data, dict) else (None, None)
        if not (_str_table(users) and _str_table(bases)):
            raise ConfigError(f"{self.path}: source bindings are damaged: expected "
                              "{'users': {NAME: SOURCE}, 'map_bases': {PATH: SOURCE}}")
        return users, bases

    def _write(self, users: dict, bases: dict) -> None:
        write_atomic(self.path, json.dumps({"users": users, "map_bases": bases}, indent=1, sort_keys=True))

    def _update(self, change):
        """Run ``change(users, bases)`` under the thread and file locks; the
        tables are written back when it returns True as its first value."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.with_name(".source-bindings.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                users, bases = self._read()
                changed, result = change(users, bases)
                if changed:
                    self._write(users, bases)
                return result
            finally:
                os.close(fd)

    def bound(self, user: str) -> str | None:
        return self._read()[0].get(user)

    def owner(self, source: str) -> str | None:
        return next((u for u, s in self._read()[0].items() if s == source), None)

    def claim(self, user: str, source: str) -> bool:
        """Check that ``user`` may speak for ``source``, binding it on the
        first use; True when it was bound now. AuthError otherwise."""
        check_source_id(source)

        def change(users, bases):
            mine = users.get(user)
            if mine is not None and mine != source:
                raise AuthError(f"user {user!r} is bound to source {mine}, not {source}: "
                                f"each replication user speaks for one source")
            if any(s == source and u != user for u, s in users.items()):
                raise AuthError(f"source {source} is bound to another replication user, not {user!r}")
            if mine is None:
                users[user] = source
            return mine is None, mine is None
        return self._update(change)

    def claim_map_base(self, source: str, base: str, *, record: bool = True) -> None:
        """Refuse (AuthError) a resolved map base overlapping one that
        another source writes to; with ``record``, ``base`` is this
        source's from now on."""
        def change(users, bases):
            for other, owner in bases.items():
                if owner != source and overlaps(base, other):
                    raise AuthError(f"map base {base} overlaps {other}, where another source "
                                    f"writes: a source may use only its own map bases")
            new = record and bases.get(base) != source
            if new:
                bases[base] = source
            return new, None
        self._update(change)

    def bind(self, user: str, source: str) -> None:
        """Bind in advance (``user add --source``), replacing the user's
        earlier binding (its map bases follow it); a source bound to another
        user is refused."""
        check_source_id(source)

        def change(users, bases):
            owner = next((u for u, s in users.items() if s == source and u != user), None)
            if owner is not None:
                raise ConfigError(f"source {source} is bound to user {owner!r} already "
                                  f"(remove that user first)")
            old = users.get(user)
            users[user] = source
            for b, s in bases.items():
                if old is not None and s == old:
                    bases[b] = source
            return True, None
        self._update(change)

    def unbind(self, user: str) -> None:
        """Forget the user's binding and release its source's map bases."""
        def change(users, bases):
            old = users.pop(user, None)
            for b in [b for b, s in bases.items() if s == old]:
                del bases[b]
            return old is not None, None
        self._update(change)
