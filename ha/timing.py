"""HA timings, validated when they are built (Patroni-style), not discovered in production.

Theory of operation
-------------------
A master holds the leader key through a lease of ``ttl`` seconds and renews it every
``loop_wait`` seconds; one renewal attempt (with retries) may take up to ``retry_timeout``.
The rules below guarantee that a master which cannot renew notices it, and (if configured to)
steps down, before its lease can run out and another node can be elected:

* ``ttl`` is a whole number of seconds >= 2: etcd grants whole seconds and, with its default
  timers, never less than 2 s (a TTL of 1 is silently granted as 2).
* ``loop_wait + 2 * retry_timeout <= ttl`` (Patroni's rule): a cycle that starts just before a
  renewal failure still ends, retries included, well inside the lease.
* ``probe_interval * probe_failures < ttl``: a probe must be able to declare the master lost
  before the lease would say so anyway, otherwise probing is pointless.
* ``priority_step`` is the delay per rank a lower-priority shadow waits before trying for a
  vacant leader key; ``priority_step < ttl``.

Each violation raises a ValueError that names the rule and the values that broke it.
"""

from __future__ import annotations

import math

import attrs


def _positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@attrs.frozen
class HATiming:
    """Validated timings of the HA loop (seconds). Defaults: takeover by lease in <= 3 s."""

    ttl: int = 3
    loop_wait: float = 0.5
    retry_timeout: float = 1.0
    probe_interval: float = 0.5
    probe_failures: int = 3
    priority_step: float = 0.25
    keep_serving_without_store: bool = True

    def __attrs_post_init__(self) -> None:
        for name in ("loop_wait", "retry_timeout", "probe_interval"):
            _positive(name, getattr(self, name))
        if isinstance(self.ttl, bool) or not isinstance(self.ttl, int | float) or self.ttl != int(self.ttl):
            raise ValueError(f"ttl must be a whole number of seconds (etcd grants whole seconds), got {self.ttl!r}")
        if self.ttl < 2:
            raise ValueError(f"ttl must be >= 2 (etcd grants at least 2 s with default timers), got {self.ttl!r}")
        if isinstance(self.probe_failures, bool) or not isinstance(self.probe_failures, int) or self.probe_failures < 1:
            raise ValueError(f"probe_failures must be an integer >= 1, got {self.probe_failures!r}")
        if (isinstance(self.priority_step, bool) or not isinstance(self.priority_step, int | float)
                or not 0 <= self.priority_step < self.ttl):
            raise ValueError(f"priority_step must be >= 0 and < ttl ({self.ttl}), got {self.priority_step!r}")
        if not isinstance(self.keep_serving_without_store, bool):
            raise ValueError(
                f"keep_serving_without_store must be true or false, got {self.keep_serving_without_store!r}"
            )
        if self.loop_wait + 2 * self.retry_timeout > self.ttl:
            raise ValueError(
                f"loop_wait + 2*retry_timeout <= ttl is violated: {self.loop_wait} + 2*"
                f"{self.retry_timeout} = {self.loop_wait + 2 * self.retry_timeout} > ttl {self.ttl}"
            )
        if self.probe_interval * self.probe_failures >= self.ttl:
            raise ValueError(
                f"probe_interval * probe_failures < ttl is violated: {self.probe_interval} * "
                f"{self.probe_failures} = {self.probe_interval * self.probe_failures} >= ttl {self.ttl}"
            )

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> HATiming:
        """Build from configuration; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown HA timing setting(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)  # type: ignore[arg-type]
