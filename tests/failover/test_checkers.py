"""The drill checkers on hand-made records: each catches what it must and passes what is fine."""

from __future__ import annotations

import math

from tests.failover.harness import (
    FaultWindow,
    RequestResult,
    check_epoch_increased,
    check_fenced_after,
    check_requests,
    check_routing,
    percentile,
    takeover_time,
)


def entry(node: str, epoch: int | None, streams: int = 1) -> dict[str, object]:
    return {"node": node, "epoch": epoch, "first": 0.0, "last": 0.0, "streams": streams}


def req(seq: int, start: float, end: float, status: int | None, reason: str = "") -> RequestResult:
    return RequestResult(seq, f"/p/{seq}", start, end, status, reason)


def test_routing_moving_forward_is_fine() -> None:
    assert check_routing([entry("a", 2), entry("b", 5), entry("a", 9)]) == []
    assert check_routing([]) == []


def test_routing_going_back_to_a_lower_epoch_is_caught() -> None:
    problems = check_routing([entry("a", 2), entry("b", 5), entry("a", 2)])
    assert problems == ["routing[2]: epoch went back from 5 to 2 (a)"]


def test_routing_two_nodes_in_one_epoch_is_caught() -> None:
    problems = check_routing([entry("a", 2), entry("b", 2)])
    assert problems == ["routing[1]: epoch 2 served by both a and b"]


def test_routing_alternating_nodes_is_caught_even_when_epochs_rise_in_between() -> None:
    problems = check_routing([entry("a", 2), entry("b", 5), entry("a", 5)])
    assert problems == ["routing[2]: epoch 5 served by both b and a"]


def test_routing_without_epoch_is_caught() -> None:
    assert check_routing([entry("a", None)]) == ["routing[0]: stream to a recorded without an epoch"]


def test_epoch_must_increase() -> None:
    assert check_epoch_increased(3, 7) == []
    assert check_epoch_increased(3, 3) == ["new epoch 3 is not higher than the old epoch 3"]
    assert check_epoch_increased(3, None) == ["no new master after the fault (old epoch 3)"]


def test_requests_all_ok() -> None:
    assert check_requests([req(0, 0.0, 0.1, 200), req(1, 0.2, 0.3, 200)]) == []


def test_in_flight_502_connector_lost_is_allowed() -> None:
    results = [req(0, 0.9, 1.5, 502, "connector_connection_lost"), req(1, 0.95, 1.2, None, "BrokenResourceError")]
    assert check_requests(results, [FaultWindow.at(1.0)]) == []


def test_failure_outside_the_fault_window_is_caught() -> None:
    before = req(0, 0.1, 0.2, 502, "connector_connection_lost")
    after = req(1, 1.1, 1.2, 502, "connector_connection_lost")
    problems = check_requests([before, after], [FaultWindow.at(1.0)])
    assert len(problems) == 2 and problems[0].startswith("request 0 failed: status 502")


def test_hold_timeout_503_is_a_failure_even_in_flight() -> None:
    problems = check_requests([req(0, 0.9, 6.0, 503, "no_connector")], [FaultWindow.at(1.0)])
    assert len(problems) == 1 and "503 'no_connector'" in problems[0]


def test_timeout_and_other_502_reasons_are_failures() -> None:
    results = [req(0, 0.9, 16.0, None, "timeout"), req(1, 0.9, 1.1, 502, "internal_host_unreachable")]
    assert len(check_requests(results, [FaultWindow.at(1.0)])) == 2


def test_window_covers_requests_started_before_the_cloud_knew() -> None:
    late = req(0, 1.5, 3.0, 502, "connector_connection_lost")
    assert check_requests([late], [FaultWindow(1.0, 2.0)]) == []
    assert len(check_requests([late], [FaultWindow.at(1.0)])) == 1


def test_fenced_after() -> None:
    routing = [entry("a", 2), entry("b", 5), entry("a", 2)]
    assert check_fenced_after(routing, "a", 2, 5) == ["routing[2]: a served with its old epoch 2 after epoch 5 began"]
    assert check_fenced_after(routing[:2], "a", 2, 5) == []
    assert check_fenced_after(routing[:1], "a", 2, 5) == ["no stream was routed with the new epoch 5"]


def test_takeover_is_fault_to_first_request_served_by_the_new_master() -> None:
    results = [req(0, 0.5, 0.6, 200), req(1, 0.9, 1.4, 200), req(2, 1.1, 1.3, 200), req(3, 1.2, 1.25, 502)]
    served = {"/p/0": "a", "/p/1": "b", "/p/2": "b", "/p/3": "b"}
    assert takeover_time(results, 1.0, served, "b") == 1.3 - 1.0
    assert takeover_time(results, 1.0, served, "c") is None


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert percentile(values, 0.5) == 10.0
    assert percentile(values, 0.95) == 19.0
    assert percentile(values, 1.0) == 20.0
    assert math.isnan(percentile([], 0.5))
