"""Named crash points for fault-injection tests: `MESH_CRASH_AT=after_commit` makes the
process die with SIGKILL semantics (os._exit, no cleanup) when it first reaches that point
(after `MESH_CRASH_AFTER` passes, default 1). Unset, each point costs one dict lookup.

Points: after_commit (Postgres committed, nothing published), after_publish (handoffs
XADDed, input not acked), relay_after_ack (Kafka acked a round, rows not marked published),
relay_before_send (a relay round read its rows, nothing sent yet),
projection_mid_batch (a projection runner halfway through folding a batch, not committed).

`MESH_CRASH_MODE=stop`: the process freezes there instead (SIGSTOP to itself, once), as a GC
pause or a frozen VM would, until it gets SIGCONT.
"""

from __future__ import annotations

import os
import signal

_target = os.environ.get("MESH_CRASH_AT", "")
_remaining = int(os.environ.get("MESH_CRASH_AFTER", "1") or 1)


def point(name: str) -> None:
    global _remaining
    if _target != name:
        return
    _remaining -= 1
    if _remaining <= 0:
        if os.environ.get("MESH_CRASH_MODE") == "stop":
            _remaining = 2**62  # once
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        os._exit(137)
