"""HATiming refuses timings that would let a lease expire before its master notices."""

from __future__ import annotations

import pytest

from ha.timing import HATiming


def test_defaults_are_valid() -> None:
    timing = HATiming()
    assert timing.loop_wait + 2 * timing.retry_timeout <= timing.ttl
    assert timing.keep_serving_without_store is True


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"ttl": 1}, "ttl must be >= 2"),
        ({"ttl": 2.5}, "whole number of seconds"),
        ({"ttl": True}, "whole number of seconds"),
        ({"ttl": 3, "loop_wait": 1.5, "retry_timeout": 1.0}, "loop_wait + 2*retry_timeout <= ttl"),
        ({"loop_wait": 0}, "loop_wait must be > 0"),
        ({"retry_timeout": -1}, "retry_timeout must be > 0"),
        ({"loop_wait": float("nan")}, "loop_wait must be a finite number"),
        ({"probe_interval": 1.0, "probe_failures": 3}, "probe_interval * probe_failures < ttl"),
        ({"probe_failures": 0}, "probe_failures must be an integer >= 1"),
        ({"priority_step": 3}, "priority_step must be >= 0 and < ttl"),
        ({"priority_step": -0.1}, "priority_step must be >= 0 and < ttl"),
        ({"priority_step": True}, "priority_step must be >= 0 and < ttl"),
    ],
)
def test_each_rule_is_named(kwargs: dict[str, object], rule: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        HATiming(**kwargs)  # type: ignore[arg-type]
    assert rule in str(info.value)


def test_boundary_is_allowed() -> None:
    timing = HATiming(ttl=2, loop_wait=0.5, retry_timeout=0.75, probe_interval=0.25, probe_failures=3)
    assert timing.ttl == 2


def test_from_dict_rejects_unknown_keys() -> None:
    assert HATiming.from_dict({"ttl": 5, "loop_wait": 1}).ttl == 5
    with pytest.raises(ValueError, match="unknown HA timing setting.*'tll'"):
        HATiming.from_dict({"tll": 5})
