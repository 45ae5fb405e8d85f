"""How deeply an envelope's JSON nests arrays and objects, measured on the raw bytes before
anything parses them.

Python's JSON parser recurses once per level and raises `RecursionError` at about 1,000
levels, which is a 2 kB entry, far under the size limit; pydantic recurses as well. So the
depth is capped before parsing (`MAX_DEPTH`, docs/wire-format.md): deeper is poison
(`too_deep`), whatever else the entry holds.

The check costs two C-level `bytes.count` calls for a normal envelope: it cannot nest deeper
than it has opening brackets. Only an entry with more brackets than the cap is scanned
precisely, still without a Python loop per byte: strings are cut out by a regular expression
(brackets inside them do not nest), the remaining brackets become +1/-1, and the deepest
running sum is the depth.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

MAX_DEPTH = 64
"""Most levels of arrays and objects an envelope may nest, the envelope's own object included."""

# A JSON string, escapes included; one left open runs to the end (that JSON fails to parse
# anyway, and no bracket after its quote is structure). Unrolled, so it never backtracks.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # as signed bytes: +1, +1, -1, -1


def depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in `raw`, brackets inside strings not counted."""
    steps = _STRING.sub(b"", raw).translate(_STEP, _NOT_BRACKET)
    if not steps:
        return 0
    return max(0, max(accumulate(array("b", steps))))


def too_deep(raw: bytes, limit: int = MAX_DEPTH) -> bool:
    """True when `raw` nests arrays and objects more than `limit` levels deep."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # the fast path: every normal envelope
        return False
    return depth(raw) > limit
