"""The incident log's rate limit, with a clock we move by hand."""

from __future__ import annotations

import logging

import pytest

from rngd.incidents import IncidentLog


def test_held_back_count_is_told_when_the_connection_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    incidents = IncidentLog(
        logging.getLogger("test.incidents"), "sock0: ", burst=3, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="test.incidents"):
        for i in range(10):
            incidents("bad request %d", i)
        assert [r.getMessage() for r in caplog.records] == [
            "sock0: bad request 0",
            "sock0: bad request 1",
            "sock0: bad request 2",
        ]
        incidents.flush()
        incidents.flush()  # told once, not again
    assert [r.getMessage() for r in caplog.records][3:] == [
        "sock0: 7 more incidents not logged in the last 10 s"
    ]


def test_a_new_window_tells_the_count_then_logs_again(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    incidents = IncidentLog(
        logging.getLogger("test.incidents"), "", burst=1, interval=10, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="test.incidents"):
        incidents("a")
        incidents("b")
        now[0] = 10.0
        incidents("c")
    assert [r.getMessage() for r in caplog.records] == [
        "a",
        "1 more incidents not logged in the last 10 s",
        "c",
    ]
