"""The console's users: a file of names, roles and argon2 password hashes.

One user per line, ``name:role:hash`` (``#`` starts a comment), written by ``mf-worker console
add-user`` with mode 0600 and replaced atomically, so a console reading it never sees half a
file. The console reads it again when it changes: removing a line signs that user out at
their next request, and a changed role applies at once.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

__all__ = ["ROLES", "Role", "User", "UsersFile", "add_user", "validate_name"]

Role = Literal["operator", "viewer"]
ROLES: Final[tuple[Role, ...]] = ("operator", "viewer")
_NAME: Final = re.compile(r"[A-Za-z0-9._@+-]{1,100}")
_HASHER: Final = PasswordHasher()
# Verified against when the name is unknown, so a wrong name costs as long as a wrong password
# and the timing does not tell which names exist.
_DUMMY_HASH: Final = _HASHER.hash("not a password of anyone")


@dataclass(frozen=True, slots=True)
class User:
    """A signed-in user: what every page and the audit rows know of them."""

    name: str
    role: Role

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


def validate_name(name: str) -> str:
    """A user name: 1–100 letters, digits or ``._@+-`` (an email address fits)."""
    if not _NAME.fullmatch(name):
        raise ValueError("must be 1-100 letters, digits or . _ @ + - (an email address fits)")
    return name


def _parse(text: str, path: Path) -> dict[str, tuple[Role, str]]:
    users: dict[str, tuple[Role, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, role, hashed = [*line.split(":", 2), "", ""][:3]
        if not _NAME.fullmatch(name) or role not in ROLES or not hashed.startswith("$argon2"):
            raise ValueError(f"{path}:{number}: expected name:role:argon2-hash "
                             f"(role operator or viewer)")
        users[name] = (role, hashed)
    return users


class UsersFile:
    """The users file, read again whenever its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, tuple[Role, str]] = {}
        self._load()

    def _load(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._users = _parse(self.path.read_text(encoding="utf-8"), self.path)
            self._stamp = stamp

    def role_of(self, name: str) -> Role | None:
        """The user's role now, or None when the file no longer names them."""
        try:
            self._load()
        except (OSError, ValueError):
            return None  # an unreadable file admits nobody; the sign-in page says so in logs
        entry = self._users.get(name)
        return entry[0] if entry else None

    def verify(self, name: str, password: str) -> User | None:
        """The user when the password matches their hash; None otherwise (same cost)."""
        self._load()
        role, hashed = self._users.get(name, ("viewer", _DUMMY_HASH))
        try:
            _HASHER.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return None
        if name not in self._users:
            return None
        return User(name, role)


def add_user(path: Path, name: str, role: Role, password: str) -> bool:
    """Add ``name`` (or replace their role and password); True when they were new.

    The file is written next to itself and renamed over it, with mode 0600.
    """
    validate_name(name)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < 12:
        raise ValueError("the password must have at least 12 characters")
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else [
        "# mf-worker console users: name:role:argon2-hash (mf-worker console add-user)"]
    if path.exists():
        _parse("\n".join(lines), path)  # refuse to rewrite a file we cannot read
    kept = [line for line in lines if line.split(":", 1)[0].strip() != name]
    kept.append(f"{name}:{role}:{_HASHER.hash(password)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n".join(kept) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(kept) == len(lines) + 1
