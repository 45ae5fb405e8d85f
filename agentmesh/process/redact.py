"""Redaction: no password or token reaches a log line, a CLI message or `mesh config`.

Two nets, because one is not enough:
- the secrets this process knows (the SecretStr settings, passwords inside the Redis URL
  and the DSN) are remembered when the settings load, and replaced wherever they appear,
  even in a library's error message that quotes them;
- shapes that hold a secret whatever its value: the password of `scheme://user:pw@host`,
  `password=...` in a key/value DSN, `Authorization: Bearer ...`.
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

MASK = "***"
#: Shorter values are not remembered: masking "ab" everywhere would garble every line.
MIN_SECRET_LEN = 4

_known: set[str] = set()
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:@/]*:)[^\s@/]*@")
_KEY_VALUE = re.compile(
    r"(?i)(?P<head>\b(?:password|passwd|pwd|secret|token|sasl_plain_password)\s*[=:]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&)]+)"
)
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)[A-Za-z0-9._~+/=-]+")


def remember(*secrets: str) -> None:
    """Secrets to mask from now on, wherever they appear (also URL-encoded)."""
    for s in secrets:
        if len(s) >= MIN_SECRET_LEN:
            _known.update({s, quote(s, safe="")})


def url_passwords(*urls: str) -> list[str]:
    """The passwords inside URLs (`redis://:pw@h`, `postgresql://u:pw@h/db`), decoded."""
    found = []
    for url in urls:
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            found.append(unquote(password))
    return found


def redact(text: str) -> str:
    """`text` with every known secret and every password-shaped value masked."""
    for secret in sorted(_known, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    if "://" in text:
        text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK + "@", text)
    text = _KEY_VALUE.sub(lambda m: m["head"] + MASK, text)
    return _BEARER.sub(lambda m: m["head"] + MASK, text)
