"""Users and logins of a daemon: roles ``admin`` (everything) and ``monitor``
(read-only status), passwords kept only as salted scrypt hashes, a growing
delay before each login attempt that follows a failure (per user name and per
peer address, across connections), and session tokens that are proved, never
sent. Passwords and tokens never reach a log or an error."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from smirror.errors import AuthError, ConfigError
from smirror.fs.atomic import write_atomic

# replication: a source daemon's link user: data links, and the reads of its
# own map bases its mirrors need (target.scan, target.signature), nothing else
ROLES = ("admin", "monitor", "replication")
# scrypt cost: ~50 ms and 16 MiB per check here; stored with each hash so it can
# be raised later without breaking existing users
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
ScryptParams = list[int]     # [N, r, p]; a name, since UserStore.list hides the builtin
_MIN_PASSWORD = 8
_SCRYPT_MAXMEM = 256 * 1024 * 1024
# what a client accepts from a server: below the floor a fake server could
# crack a captured proof cheaply; above the ceiling it could exhaust the client
SCRYPT_FLOOR = {"n": 1 << 14, "r": 8, "p": 1}
SCRYPT_CEILING = {"n": 1 << 21, "r": 64, "p": 16}


def _salted(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                          maxmem=_SCRYPT_MAXMEM, dklen=32)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def hash_password(password: str, *, salt: bytes | None = None,
                  n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> dict:
    """A storable record (SCRAM-style, RFC 5802 with scrypt as the KDF):
    ``{"scrypt": [n, r, p], "salt", "stored_key", "server_key"}`` in hex.
    Neither key lets anyone log in: a login proves knowledge of ClientKey,
    of which only its hash (stored_key) is kept."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = _salted(password, salt, n, r, p)
    client_key = _hmac(salted, b"Client Key")
    return {"scrypt": [n, r, p], "salt": salt.hex(),
            "stored_key": hashlib.sha256(client_key).hexdigest(),
            "server_key": _hmac(salted, b"Server Key").hex()}


def check_password(password: str, record: dict) -> bool:
    n, r, p = record["scrypt"]
    salted = _salted(password, bytes.fromhex(record["salt"]), n, r, p)
    client_key = _hmac(salted, b"Client Key")
    return hmac.compare_digest(hashlib.sha256(client_key).hexdigest(), record["stored_key"])


# -- challenge-response login over a link: the password never crosses it ----

def client_proof(password: str, salt: bytes, params, auth_message: bytes) -> tuple[bytes, bytes]:
    """Client side: (proof to send, server signature to expect back)."""
    n, r, p = params
    salted = _salted(password, salt, n, r, p)
    client_key = _hmac(salted, b"Client Key")
    stored_key = hashlib.sha256(client_key).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored_key, auth_message), strict=True))
    return proof, _hmac(_hmac(salted, b"Server Key"), auth_message)


def check_scrypt_params(params, peer: str) -> tuple[int, int, int]:
    """The (n, r, p) a server offered, if a client may compute with them:
    n a power of two in [2^14, 2^21], r in [8, 64], p in [1, 16] and at most
    256 MiB of memory; ValueError naming the peer and the values otherwise."""
    if not isinstance(params, (list, tuple)) or len(params) != 3 or \
            not all(isinstance(x, int) and not isinstance(x, bool) for x in params):
        raise ValueError(f"{peer} offered scrypt settings {params!r}: expected three integers [n, r, p]")
    n, r, p = params
    weak = n < SCRYPT_FLOOR["n"] or r < SCRYPT_FLOOR["r"] or p < SCRYPT_FLOOR["p"]
    huge = n > SCRYPT_CEILING["n"] or r > SCRYPT_CEILING["r"] or p > SCRYPT_CEILING["p"] \
        or 128 * n * r > _SCRYPT_MAXMEM
    if weak or huge or n & (n - 1):
        raise ValueError(
            f"{peer} offered {'weak' if weak else 'unusable'} scrypt settings n={n}, r={r}, p={p}; "
            f"refused (need n a power of two from 2^14 to 2^21, r from 8 to 64, p from 1 to 16, "
            f"at most 256 MiB)")
    return n, r, p


def server_check(record: dict, auth_message: bytes, proof: bytes) -> bytes | None:
    """Server side: the server signature if ``proof`` is right, else None."""
    stored_key = bytes.fromhex(record["stored_key"])
    if len(proof) != len(stored_key):
        return None
    client_key = bytes(a ^ b for a, b in zip(proof, _hmac(stored_key, auth_message), strict=True))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), stored_key):
        return None
    return _hmac(bytes.fromhex(record["server_key"]), auth_message)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role


def check_username(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-" for c in name) or name[0] == "-":
        raise ConfigError(f"user name must be 1-64 letters, digits, '.', '_' or '-' "
                          f"(not starting with '-'), got {name!r}")
    return name


@dataclass(frozen=True)
class User:
    name: str
    role: str

    # who may do what a role may do: an admin may read too; a replication
    # user may do nothing else, and nobody else may do what it does
    _MAY = {"admin": ("admin",), "monitor": ("admin", "monitor"), "replication": ("replication",)}

    def require(self, role: str) -> None:
        """Raise AuthError unless this user may do what ``role`` may do."""
        if self.role not in self._MAY[role]:
            raise AuthError(f"user {self.name!r} has role {self.role!r}; this request needs {role}")


class UserStore:
    """``users.json`` in the state directory, mode 0600, replaced atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fake_key: bytes | None = None

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{self.path}: user store is damaged: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("users", {}), dict):
            raise ConfigError(f"{self.path}: user store is damaged: expected {{'users': {{...}}}}")
        return data.get("users", {})

    def _write(self, users: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"users": users}, indent=1, sort_keys=True))

    def add(self, name: str, role: str, password: str, *, replace: bool = False) -> User:
        check_username(name)
        check_role(role)
        if len(password) < _MIN_PASSWORD:
            raise ConfigError(f"password of {name!r} must have at least {_MIN_PASSWORD} characters")
        with self._lock:
            users = self._read()
            if name in users and not replace:
                raise ConfigError(f"user {name!r} exists already (use --replace to change it)")
            users[name] = {"role": role, **hash_password(password)}
            self._write(users)
        return User(name, role)

    def remove(self, name: str) -> None:
        with self._lock:
            users = self._read()
            if name not in users:
                raise ConfigError(f"no user {name!r}")
            del users[name]
            self._write(users)

    def list(self) -> list[User]:
        return [User(n, u["role"]) for n, u in sorted(self._read().items())]

    def verify(self, name: str, password: str) -> User:
        """The user if the password matches; AuthError otherwise (same message
        for unknown user and wrong password, and the same scrypt work)."""
        record = self._read().get(name)
        if record is None:
            check_password(password, _DUMMY)   # same cost: no user enumeration by timing
            raise AuthError(f"login failed for user {name!r}: unknown user or wrong password")
        if not check_password(password, record):
            raise AuthError(f"login failed for user {name!r}: unknown user or wrong password")
        return User(name, record["role"])


    def record(self, name: str) -> dict | None:
        return self._read().get(name)

    def current(self, name: str) -> tuple[User, str] | None:
        """(user with its role now, fingerprint of its record) or None when
        the user is gone. The fingerprint changes when the user is replaced
        (a new salt), so what was granted to the old record can be refused."""
        record = self._read().get(name)
        if record is None:
            return None
        return User(name, record["role"]), fingerprint(record)

    def _fake_salt_key(self) -> bytes:
        """The key that makes up salts for unknown users: kept in the state
        directory (0600) so that the same name gets the same salt across
        restarts (a new salt would tell that the name does not exist)."""
        if self._fake_key is None:
            path = self.path.with_name("fake-salt.key")
            try:
                key = bytes.fromhex(path.read_text().strip())
            except FileNotFoundError:
                key = _create_secret_file(path)
            except ValueError:
                raise ConfigError(f"{path}: damaged (expected 64 hex digits)") from None
            if len(key) != 32:
                raise ConfigError(f"{path}: damaged (expected 64 hex digits)")
            self._fake_key = key
        return self._fake_key

    def challenge(self, name: str) -> tuple[bytes, ScryptParams]:
        """(salt, scrypt params) for a login of ``name``. An unknown user gets
        a stable made-up salt, so a peer cannot tell which users exist."""
        record = self._read().get(name)
        if record is None:
            return _hmac(self._fake_salt_key(), name.encode())[:16], [SCRYPT_N, SCRYPT_R, SCRYPT_P]
        return bytes.fromhex(record["salt"]), list(record["scrypt"])

    def verify_proof(self, name: str, auth_message: bytes, proof: bytes) -> tuple[User, bytes]:
        """(user, server signature) when ``proof`` is right; AuthError otherwise."""
        record = self._read().get(name)
        signature = server_check(record, auth_message, proof) if record else None
        if record is None or signature is None:
            raise AuthError(f"login failed for user {name!r}: unknown user or wrong password")
        return User(name, record["role"]), signature


def fingerprint(record: dict) -> str:
    """Names one version of a user's record (its salt and keys)."""
    return hashlib.sha256(f"{record['salt']}:{record['stored_key']}".encode()).hexdigest()[:32]


def _create_secret_file(path: Path) -> bytes:
    """32 random bytes in a new 0600 file, as hex; when another process made
    the file first, its key wins (link() does not replace)."""
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key.hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    except FileExistsError:
        key = bytes.fromhex(path.read_text().strip())
    finally:
        os.unlink(tmp)
    return key


_DUMMY = hash_password("not-a-password", salt=b"\0" * 16)


class _Attempts:
    __slots__ = ("failures", "not_before", "seen")

    def __init__(self, now: float):
        self.failures = 0
        self.not_before = now
        self.seen = now


class LoginThrottle:
    """Growing delay before login attempts, shared by every connection of a
    daemon, per key (a user name and a peer address): each attempt counts as
    a failure until it succeeds, so a client that gives up early is slowed
    all the same; the delay after n failures is ``first_delay * 2**(n-1)``
    up to ``max_delay``, and attempts of one key are spaced one after
    another (parallel connections queue up instead of guessing at once).

    The table is bounded: keys unused for ``forget_after`` seconds are
    dropped, and past ``max_entries`` the least recently used goes first."""

    def __init__(self, first_delay: float = 0.25, max_delay: float = 8.0,
                 forget_after: float = 900.0, max_entries: int = 10_000):
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.max_entries = max_entries
        self._keys: OrderedDict[str, _Attempts] = OrderedDict()
        self._lock = threading.Lock()

    def _delay_for(self, failures: int) -> float:
        return 0.0 if failures <= 0 else min(self.max_delay, self.first_delay * 2 ** min(failures - 1, 64))

    def delay(self, key: str) -> float:
        """The delay the next attempt of ``key`` alone would get."""
        with self._lock:
            found = self._keys.get(key)
        return self._delay_for(found.failures if found else 0)

    def __len__(self) -> int:
        return len(self._keys)

    def _expire(self, now: float) -> None:
        while self._keys:
            key, oldest = next(iter(self._keys.items()))
            if len(self._keys) <= self.max_entries and oldest.seen + self.forget_after > now:
                return
            del self._keys[key]

    def attempt(self, *keys: str) -> float:
        """Reserve one login attempt for ``keys``: the seconds to wait before
        it may go on (before the challenge is sent). Raises AuthError, without
        counting anything, when earlier attempts have queued up so much that
        the wait would pass ``max_delay``."""
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            entries = []
            for key in keys:
                entry = self._keys.get(key)
                if entry is None:
                    entry = self._keys[key] = _Attempts(now)
                self._keys.move_to_end(key)
                entry.seen = now
                entries.append(entry)
            start = max([now] + [e.not_before for e in entries])
            wait = start - now + self._delay_for(max(e.failures for e in entries))
            if wait > self.max_delay + 1e-3:
                raise AuthError(f"too many login attempts for {' and '.join(map(repr, keys))}: "
                                f"try again in {wait:.0f} s")
            for e in entries:
                e.failures += 1
                e.not_before = now + wait
            self._expire(now)
        return wait

    def succeeded(self, user_key: str, *other_keys: str) -> None:
        """The attempt was right: the user's count starts again; for the
        other keys (the peer address) only this attempt is taken back."""
        with self._lock:
            self._keys.pop(user_key, None)
            for key in other_keys:
                entry = self._keys.get(key)
                if entry is not None:
                    entry.failures = max(0, entry.failures - 1)


def password_from(*, env: str | None = None, stdin=None, prompt: bool = False,
                  confirm: bool = False) -> str:
    """Read a password from an environment variable, a file object (stdin) or
    a terminal prompt; never from a command-line argument (visible in ps)."""
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env} is not set")
        return value
    if stdin is not None:
        value = stdin.readline().rstrip("\r\n")
        if not value:
            raise ConfigError("no password on standard input")
        return value
    if prompt:
        import getpass
        if not os.isatty(0):
            raise ConfigError("no terminal to ask for the password: use --password-stdin "
                              "or --password-env VAR")
        try:
            value = getpass.getpass("Password: ")
            if confirm and getpass.getpass("Again: ") != value:
                raise ConfigError("the two passwords differ")
        except EOFError:
            raise ConfigError("no password given (input ended)") from None
        return value
    raise ConfigError("no password source: use a prompt, --password-stdin or --password-env VAR")


def token_key(token: str) -> bytes:
    """The HMAC key of a session token: its hash. The daemon keeps only this,
    the client derives it from the token; the token never crosses a link."""
    return hashlib.sha256(token.encode()).digest()


def token_id(key: bytes) -> str:
    """Names a token in a HELLO without giving away anything that proves it."""
    return hashlib.sha256(b"smirror token id:" + key).hexdigest()[:32]


def token_proofs(key: bytes, auth_message: bytes) -> tuple[bytes, bytes]:
    """(client proof, server proof) of a token login over ``auth_message``
    (both nonces, the user and the purpose): two labels, so neither side can
    reflect the other's proof."""
    return (_hmac(key, b"smirror token client proof," + auth_message),
            _hmac(key, b"smirror token server proof," + auth_message))


@dataclass
class _Session:
    key: bytes
    user: str
    record: str          # fingerprint of the user's record when it was minted
    expires: float


class Sessions:
    """Login sessions of a running daemon: a token given out after a
    password login lets later CLI calls in without the password. Only the
    token's hash is kept, in memory (a daemon restart ends every session).
    Each use checks the user against the user store: a removed or replaced
    user's tokens stop working, and the role is always the current one.

    Bounded: at most ``per_user`` live tokens per user (the oldest goes) and
    ``max_total`` in all."""

    def __init__(self, lifetime: float = 12 * 3600, per_user: int = 16, max_total: int = 4096):
        self.lifetime = lifetime
        self.per_user = per_user
        self.max_total = max_total
        self._tokens: OrderedDict[str, _Session] = OrderedDict()    # token id -> session
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tokens)

    def new(self, name: str, record: str) -> str:
        """A new token for user ``name`` whose record has fingerprint ``record``."""
        token = secrets.token_urlsafe(32)
        key = token_key(token)
        now = time.time()
        with self._lock:
            for tid in [t for t, s in self._tokens.items() if s.expires < now]:
                del self._tokens[tid]
            mine = [t for t, s in self._tokens.items() if s.user == name]
            for tid in mine[:max(0, len(mine) - self.per_user + 1)]:
                del self._tokens[tid]
            while len(self._tokens) >= self.max_total:
                self._tokens.popitem(last=False)
            self._tokens[token_id(key)] = _Session(key, name, record, now + self.lifetime)
        return token

    def find(self, name: str, tid: str) -> bytes:
        """The key of token ``tid`` of user ``name``; AuthError if there is none."""
        with self._lock:
            found = self._tokens.get(tid)
            if found is not None and found.expires < time.time():
                del self._tokens[tid]
                found = None
        if found is None or found.user != name:
            raise AuthError(f"session of user {name!r} is unknown or expired: log in again")
        return found.key

    def check_user(self, name: str, tid: str, store: UserStore) -> User:
        """The user behind token ``tid`` as the store has it now; the token
        is revoked and AuthError raised when the user was removed or replaced."""
        with self._lock:
            found = self._tokens.get(tid)
        now = store.current(name)
        if found is None or now is None or now[1] != found.record:
            self.revoke(tid)
            raise AuthError(f"session of user {name!r} ended: the user was removed or changed; "
                            "log in again")
        return now[0]

    def revoke(self, tid: str) -> bool:
        with self._lock:
            return self._tokens.pop(tid, None) is not None
