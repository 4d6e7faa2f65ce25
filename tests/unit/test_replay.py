"""The replay rule, as a table: when may the proxy send a request to the connector once more?"""

from __future__ import annotations

import pytest

from connector.cloud.replay import IDEMPOTENT_METHODS, MAX_ATTEMPTS, Facts, Failure, may_replay

R, L, X = Failure.REFUSED, Failure.TUNNEL_LOST, Failure.OTHER  # X: any other reset

# failure, idempotent, response started, body consumed, body kept, attempts -> replay?
TABLE = [
    # refused: never processed, so any method is replayed while its body is at hand
    (R, False, False, False, True, 1, True),  # POST without body
    (R, False, False, True, True, 1, True),  # POST whose body is kept
    (R, False, False, True, False, 1, False),  # POST whose body was too large to keep
    (R, True, False, False, True, 1, True),  # GET
    (R, True, True, False, True, 1, False),  # the response had started (impossible, but never)
    (R, False, False, False, True, MAX_ATTEMPTS - 1, True),
    (R, False, False, False, True, MAX_ATTEMPTS, False),  # bounded
    # tunnel lost: maybe processed, so only what is safe to repeat
    (L, True, False, False, True, 1, True),  # GET
    (L, True, False, True, True, 1, False),  # PUT whose body was read: not replayed
    (L, False, False, False, True, 1, False),  # POST, even without a body
    (L, True, True, False, True, 1, False),  # part of the answer went out
    (L, True, False, False, True, MAX_ATTEMPTS, False),
    # any other reset is the node's answer: never replayed
    (X, True, False, False, True, 1, False),
    (X, False, False, False, True, 1, False),
]


@pytest.mark.parametrize(("failure", "idempotent", "started", "consumed", "kept", "attempts", "expected"), TABLE)
def test_replay_table(failure: Failure, idempotent: bool, started: bool, consumed: bool, kept: bool, attempts: int,
                      expected: bool) -> None:
    facts = Facts(failure=failure, idempotent=idempotent, response_started=started, body_consumed=consumed,
                  body_kept=kept, attempts=attempts)
    assert may_replay(facts) is expected


def test_every_combination_obeys_the_three_rules() -> None:
    """Exhaustively: nothing after a started response, nothing past the bound, nothing for OTHER;
    REFUSED replays whatever has its body; TUNNEL_LOST only idempotent requests without a body."""
    for failure in Failure:
        for idempotent in (False, True):
            for started in (False, True):
                for consumed in (False, True):
                    for kept in (False, True):
                        for attempts in range(1, MAX_ATTEMPTS + 2):
                            facts = Facts(failure, idempotent, started, consumed, kept, attempts)
                            allowed = not started and attempts < MAX_ATTEMPTS and (
                                (failure is R and (kept or not consumed))
                                or (failure is L and idempotent and not consumed))
                            assert may_replay(facts) is allowed, facts


def test_idempotent_methods_are_rfc_9110s() -> None:
    assert {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"} == IDEMPOTENT_METHODS
    assert b"POST" not in IDEMPOTENT_METHODS and b"PATCH" not in IDEMPOTENT_METHODS
