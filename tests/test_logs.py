"""The repeat filter that keeps a broker outage from flooding the logs, and log output that
survives a swapped stderr (pure logic)."""

from __future__ import annotations

import importlib
import io
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from agentmesh.process.logs import RepeatFilter, configure


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


@pytest.fixture(autouse=True)
def _structlog_as_it_was() -> Iterator[None]:
    """These tests configure structlog globally: put back what other tests had."""
    before = structlog.get_config()
    yield
    structlog.configure(**before)


def test_a_log_line_after_stderr_was_swapped_and_closed_goes_to_the_current_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CLI runner swaps stderr for a stream it closes afterwards; an in-process relay that
    logs later must neither raise (it took the ValueError for a broker outage) nor lose the
    line."""
    swapped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", swapped)
    configure(fmt="json")
    log = structlog.get_logger("t")
    log.info("first")
    assert "first" in swapped.getvalue()
    swapped.close()
    monkeypatch.undo()
    log.warning("after the swap", n=1)  # raised ValueError: I/O operation on closed file
    assert "after the swap" in capsys.readouterr().err


def test_the_cli_sends_log_lines_to_stderr_never_into_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command that does not configure logs (a one-shot relay under `mesh outbox republish
    --json`) must not print a warning into the JSON it writes to stdout."""
    cli = importlib.import_module("agentmesh.cli.app")  # the module; the package exports `app`

    structlog.reset_defaults()  # as in a fresh process: structlog's default prints to stdout

    def command(standalone_mode: bool = False) -> int:
        structlog.get_logger("t").warning("relay: kafka unavailable")
        print('{"republished": 1}')
        return 0

    monkeypatch.setattr(cli, "app", command)
    cli.main()
    out, err = capsys.readouterr()
    assert out == '{"republished": 1}\n'
    assert "relay: kafka unavailable" in err
