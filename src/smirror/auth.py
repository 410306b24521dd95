"""Users and logins of a daemon: roles ``admin`` (everything) and ``monitor``
(read-only status), passwords kept only as salted scrypt hashes, a growing
delay after each failed login. Passwords never reach a log or an error."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import AuthError, ConfigError

# replication: a source daemon's link user: data links, and the reads of its
# own map bases its mirrors need (target.scan, target.signature), nothing else
ROLES = ("admin", "monitor", "replication")
# scrypt cost: ~50 ms and 16 MiB per check here; stored with each hash so it can
# be raised later without breaking existing users
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
_MIN_PASSWORD = 8


def _salted(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * 1024 * 1024, dklen=32)


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
    proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored_key, auth_message)))
    return proof, _hmac(_hmac(salted, b"Server Key"), auth_message)


def server_check(record: dict, auth_message: bytes, proof: bytes) -> bytes | None:
    """Server side: the server signature if ``proof`` is right, else None."""
    stored_key = bytes.fromhex(record["stored_key"])
    if len(proof) != len(stored_key):
        return None
    client_key = bytes(a ^ b for a, b in zip(proof, _hmac(stored_key, auth_message)))
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
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"users": users}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

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


    def challenge(self, name: str) -> tuple[bytes, list]:
        """(salt, scrypt params) for a login of ``name``. An unknown user gets
        a stable made-up salt, so a peer cannot tell which users exist."""
        record = self._read().get(name)
        if record is None:
            return _hmac(_FAKE_SALT_KEY, name.encode())[:16], [SCRYPT_N, SCRYPT_R, SCRYPT_P]
        return bytes.fromhex(record["salt"]), list(record["scrypt"])

    def verify_proof(self, name: str, auth_message: bytes, proof: bytes) -> tuple[User, bytes]:
        """(user, server signature) when ``proof`` is right; AuthError otherwise."""
        record = self._read().get(name)
        signature = server_check(record, auth_message, proof) if record else None
        if signature is None:
            raise AuthError(f"login failed for user {name!r}: unknown user or wrong password")
        return User(name, record["role"]), signature


_DUMMY = hash_password("not-a-password", salt=b"\0" * 16)
_FAKE_SALT_KEY = secrets.token_bytes(32)


class LoginThrottle:
    """Growing delay after failed logins, per key (user name or peer address):
    0.25 s after the first failure, doubling up to ``max_delay``; a success
    resets it. ``wait(key)`` sleeps the delay that is due."""

    def __init__(self, first_delay: float = 0.25, max_delay: float = 8.0):
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def delay(self, key: str) -> float:
        with self._lock:
            n = self._failures.get(key, 0)
        return 0.0 if n == 0 else min(self.max_delay, self.first_delay * 2 ** (n - 1))

    def failed(self, key: str) -> float:
        with self._lock:
            self._failures[key] = self._failures.get(key, 0) + 1
        return self.delay(key)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def wait(self, key: str) -> None:
        d = self.delay(key)
        if d:
            time.sleep(d)


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
        value = getpass.getpass("Password: ")
        if confirm and getpass.getpass("Again: ") != value:
            raise ConfigError("the two passwords differ")
        return value
    raise ConfigError("no password source: use a prompt, --password-stdin or --password-env VAR")


class Sessions:
    """Login sessions of a running daemon: a token given out after a
    password login lets later CLI calls in without the password. Only the
    token's hash is kept, in memory (a daemon restart ends every session)."""

    def __init__(self, lifetime: float = 12 * 3600):
        self.lifetime = lifetime
        self._tokens: dict[str, tuple[User, float]] = {}
        self._lock = threading.Lock()

    def new(self, user: User) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[hashlib.sha256(token.encode()).hexdigest()] = (user, time.time() + self.lifetime)
        return token

    def check(self, name: str, token: str) -> User:
        key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            found = self._tokens.get(key)
            if found is not None and found[1] < time.time():
                del self._tokens[key]
                found = None
        if found is None or found[0].name != name:
            raise AuthError(f"session of user {name!r} is unknown or expired: log in again")
        return found[0]
