"""The repeat filter that keeps a broker outage from flooding the logs (pure logic)."""

from __future__ import annotations

import logging

from agentmesh.process.logs import RepeatFilter


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(
        "aiokafka.consumer.fetcher", logging.ERROR, __file__, 1, msg, args, None
    )


def test_a_repeated_message_passes_once_per_window_and_counts_the_rest() -> None:
    now = [0.0]
    f = RepeatFilter(window_s=10, clock=lambda: now[0])
    failed = "Failed fetch messages from %s: %s"
    assert f.filter(_record(failed, 111, "closed"))
    for _ in range(300):
        now[0] += 0.01
        assert not f.filter(_record(failed, 111, "closed"))
    assert f.filter(_record(failed, 112, "closed"))  # other details: another message
    now[0] = 10.5
    again = _record(failed, 111, "closed")
    assert f.filter(again)
    assert again.getMessage() == (
        "Failed fetch messages from 111: closed (and 300 more like it in 10s)"
    )
    now[0] += 0.1
    assert not f.filter(_record(failed, 111, "closed"))
