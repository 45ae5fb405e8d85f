"""Time-ordered event ids (UUIDv7, RFC 9562).

Event ids sort by creation time, so a Kafka or Postgres scan by id is also a scan by time,
and two ids made in the same millisecond by one process still sort in creation order.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid

_lock = threading.Lock()
_rand = random.SystemRandom() if os.environ.get("MESH_CRYPTO_IDS") else random.Random()
# Ids must be unique, not unguessable: a seeded PRNG (seeded from os.urandom) is enough and
# costs a fraction of a syscall per id. MESH_CRYPTO_IDS=1 switches to the OS generator.
os.register_at_fork(after_in_child=_rand.seed)  # a forked child must not repeat its parent
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    """A UUIDv7: 48-bit Unix ms, a 12-bit counter for ids made in the same ms, random bits."""
    return uuid.UUID(int=_uuid7_int())


def _uuid7_int() -> int:
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = _rand.getrandbits(10)  # random start, leaving room to count up
        else:
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        rand = _rand.getrandbits(62)
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= _counter << 64
        value |= 0b10 << 62
        value |= rand
        return value


def new_event_id() -> str:
    """A UUIDv7 in canonical text form (made without a uuid.UUID object: it is on the path
    of every envelope the runtime builds)."""
    h = f"{_uuid7_int():032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_time_ms(value: str | uuid.UUID) -> int:
    """The creation time (Unix ms) encoded in a UUIDv7."""
    u = value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    return u.int >> 80
