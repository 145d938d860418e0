"""Who may use the console and the API: users (argon2 password hashes) and API tokens (stored
as SHA-256 of 256 random bits: a token is not a password to guess, and a check per request
must be cheap), in one JSON file readable by the relay's user only ([console] users_file)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("viewer", "operator", "admin")
_hasher = PasswordHasher()


@functools.cache
def dummy_hash() -> str:
    """Compared against when the user does not exist: the same time either way. Made once,
    when the console starts (ConsoleServer), not at import: an argon2id hash costs ~0.1 s of
    CPU and 64 MiB, which every start of the relay and every CLI verb had paid."""
    return _hasher.hash("no such user")


@dataclass(frozen=True)
class Principal:
    """Someone authenticated: a user or a token, with a role."""

    name: str
    role: str

    def may(self, role: str) -> bool:
        """At least `role` (viewer < operator < admin)."""
        return ROLES.index(self.role) >= ROLES.index(role)


class UsersFileError(ValueError):
    pass


class Users:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = {"users": {}, "tokens": {}}
        if path.exists():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UsersFileError(f"{path}: not a users file ({exc})") from None
            if not isinstance(loaded, dict):
                raise UsersFileError(f"{path}: expected a JSON object")
            self.data["users"] = dict(loaded.get("users") or {})
            self.data["tokens"] = dict(loaded.get("tokens") or {})

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    # --- users -------------------------------------------------------------------------------

    def add_user(self, name: str, role: str, password: str) -> None:
        _check(name, role)
        if len(password) < 8:
            raise ValueError("a password of at least 8 characters")
        self.data["users"][name] = {"role": role, "password": _hasher.hash(password)}

    def remove(self, name: str) -> bool:
        """A user or a token of that name; False: none."""
        found = self.data["users"].pop(name, None) or self.data["tokens"].pop(name, None)
        return found is not None

    def login(self, name: str, password: str) -> Principal | None:
        user = self.data["users"].get(name)
        digest = (user["password"] if isinstance(user, dict) and "password" in user
                  else dummy_hash())
        try:
            _hasher.verify(digest, password)
        except (VerificationError, InvalidHashError):
            return None
        if not isinstance(user, dict) or user.get("role") not in ROLES:
            return None
        return Principal(name, user["role"])

    # --- tokens ------------------------------------------------------------------------------

    def add_token(self, name: str, role: str) -> str:
        """A new token (shown once; only its hash is kept)."""
        _check(name, role)
        token = "drt_" + secrets.token_urlsafe(32)
        self.data["tokens"][name] = {"role": role, "sha256": _sha(token)}
        return token

    def bearer(self, token: str) -> Principal | None:
        digest = _sha(token)
        for name, entry in self.data["tokens"].items():
            if (isinstance(entry, dict) and entry.get("role") in ROLES
                    and hmac.compare_digest(str(entry.get("sha256", "")), digest)):
                return Principal(name, entry["role"])
        return None

    def names(self) -> list[tuple[str, str, str]]:
        """(name, 'user'|'token', role) of each."""
        return ([(n, "user", e.get("role", "?")) for n, e in self.data["users"].items()]
                + [(n, "token", e.get("role", "?")) for n, e in self.data["tokens"].items()])


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check(name: str, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"a role among {', '.join(ROLES)}")
    if not name or len(name) > 64 or not name.isprintable() or name != name.strip():
        raise ValueError("a name of 1-64 printable characters, no spaces around it")
