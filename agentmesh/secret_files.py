"""Secrets from files: MESH_X_FILE names a file whose content is the secret X.

Docker and Kubernetes mount secrets as files; an environment variable is visible to every
process that can read /proc/PID/environ of the same user, and leaks into crash reports.
Reading the file at start keeps the value out of the environment altogether."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PREFIX = "MESH_"


def read_into(data: Any, fields: Iterable[str]) -> Any:
    """`data` (the settings' raw input) with each field in `fields` filled from the file named
    by MESH_<FIELD>_FILE, when that variable is set. Setting both the value and the file is
    an error: which one wins would be a guess. The file's trailing newline is not part of the
    secret (`echo pw > file` is how most people write one)."""
    if not isinstance(data, dict):
        return data
    for name in fields:
        var = f"{PREFIX}{name.upper()}_FILE"
        path = os.environ.get(var)
        if not path:
            continue
        if data.get(name) is not None:
            raise ValueError(f"set {PREFIX}{name.upper()} or {var}, not both")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ValueError(f"{var}: cannot read {path}: {reason}") from None
        secret = text.rstrip("\r\n")
        if not secret:
            raise ValueError(f"{var}: {path} is empty")
        data = {**data, name: secret}
    return data
