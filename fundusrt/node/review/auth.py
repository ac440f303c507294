"""Who may use the review page: a user list with scrypt password hashes, or a token printed at start-up.

A user list is a text file, one user a line: ``login:scrypt$N$r$p$SALT$HASH:Family^Given`` (salt and
hash in hex; the name is what sign-offs record as the observer). `hash_password` writes the middle
field (`fundusrt review --hash-password`). Lines starting with ``#`` and blank lines are ignored.
Without a list, a random token is printed at start-up; whoever has it signs in and types their name.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

# scrypt cost (RFC 7914): N=2**14, r=8, p=1 is the interactive-login setting (about 16 MiB, ~50 ms).
_N, _R, _P = 2**14, 8, 1


class UsersFileError(ValueError):
    """The user list cannot be used; the message names the file and line."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """The ``scrypt$N$r$p$SALT$HASH`` field of a user list line for `password`."""
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """True when `password` matches a ``scrypt$...`` field (compared in constant time)."""
    _, n, r, p, salt, digest = stored.split("$")
    computed = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                              dklen=len(digest) // 2, maxmem=256 * 1024 * 1024)
    return hmac.compare_digest(computed.hex(), digest)


@dataclass(frozen=True)
class User:
    """A user of the list: login, password hash, the name sign-offs record."""

    login: str
    password_hash: str
    name: str


def load_users(path: str | Path) -> dict[str, User]:
    """Read a user list (format: module docstring).

    Raises:
        UsersFileError: the file is unreadable, a line is malformed, or a login is repeated.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError(f"cannot read the user list {path}: {exc}") from exc
    users: dict[str, User] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(":")
        fields = parts[1].split("$") if len(parts) == 3 else []
        if len(fields) != 6 or fields[0] != "scrypt" or not all(f.isdigit() for f in fields[1:4]) or not parts[0]:
            raise UsersFileError(f"{path} line {number}: expected login:scrypt$N$r$p$SALT$HASH:Family^Given "
                                 "(make the hash with `fundusrt review --hash-password`)")
        if parts[0] in users:
            raise UsersFileError(f"{path} line {number}: login {parts[0]!r} appears twice")
        users[parts[0]] = User(parts[0], parts[1], parts[2].strip() or parts[0])
    if not users:
        raise UsersFileError(f"{path} lists no users (one line per user: login:scrypt$...:Family^Given)")
    return users


class Authenticator:
    """Checks sign-in attempts against a user list, or against a start-up token when there is none."""

    def __init__(self, users: dict[str, User] | None = None) -> None:
        self.users = users
        self.token = None if users else secrets.token_urlsafe(18)

    @property
    def uses_token(self) -> bool:
        """True when sign-in is by the start-up token (the grader types their name)."""
        return self.token is not None

    def check(self, login: str, secret: str) -> str | None:
        """The grader's name when `secret` is right for `login` (with a token: `login` is the typed name)."""
        if self.token is not None:
            name = " ".join(login.split())
            return name if name and hmac.compare_digest(secret.encode(), self.token.encode()) else None
        user = (self.users or {}).get(login)
        if user is None:
            check_password(secret, hash_password("", b"\0" * 16))  # same work for unknown logins: no timing hint
            return None
        return user.name if check_password(secret, user.password_hash) else None
