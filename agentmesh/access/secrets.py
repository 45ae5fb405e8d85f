"""Passwords of the generated credentials: from the environment, else a file, else a new one
written to a file only its owner can read. They are never printed: what the generators show
is a hash (Redis) or a SCRAM verifier (PostgreSQL), which the servers store instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

_ENV_UNSAFE = re.compile(r"[^A-Z0-9]")


def env_name(kind: str, user: str) -> str:
    """MESH_SECRET_<KIND>_<USER>: a password given by the environment (a CI secret, a
    Kubernetes Secret as env) instead of the file."""
    return f"MESH_SECRET_{kind.upper()}_{_ENV_UNSAFE.sub('_', user.upper())}"


class Secrets:
    """Passwords under `root/<kind>/<user>` (mode 0600); `kind` is redis or postgres."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, kind: str, user: str) -> Path:
        return self.root / kind / user

    def password(self, kind: str, user: str) -> str:
        """The user's password: the environment's, else its file's, else a new random one
        (written to its file)."""
        given = os.environ.get(env_name(kind, user))
        if given:
            return given
        path = self.path(kind, user)
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return text
        new = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new + "\n")
        return new


def redis_hash(password: str) -> str:
    """What `ACL SETUSER ... #<hash>` takes: the SHA-256 of the password, in hex."""
    return hashlib.sha256(password.encode()).hexdigest()


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """A PostgreSQL SCRAM-SHA-256 verifier (what `CREATE ROLE ... PASSWORD` stores), so the
    password itself never travels in SQL text or reaches the server's logs."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
