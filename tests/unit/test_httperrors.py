"""What applications are told about failures: one table, generic sentences, no reset detail."""

from __future__ import annotations

import pytest

from connector.httperrors import (
    ERRORS,
    REASON_PHRASES,
    RESET_REASONS,
    RESETS,
    SOCKS5_CONNECTION_REFUSED,
    SOCKS5_GENERAL_FAILURE,
    SOCKS5_HOST_UNREACHABLE,
    SOCKS5_NETWORK_UNREACHABLE,
    SOCKS5_NOT_ALLOWED,
    reset_error,
)
from connector.tunnel.types import ErrorCode


def test_every_reason_has_a_status_phrase_and_every_reset_reason_a_message() -> None:
    assert all(status in REASON_PHRASES for status, _ in ERRORS.values())
    assert all(RESET_REASONS[code] == answer.reason for code, answer in RESETS.items())


def test_the_reset_table_has_a_row_for_every_error_code() -> None:
    assert set(RESETS) == set(ErrorCode)
    for code in ErrorCode:
        answer = RESETS[code]
        assert answer.status in REASON_PHRASES, code
        assert 0x01 <= answer.socks5 <= 0x08, code  # a failure reply of RFC 1928
        assert reset_error(code) == (answer.status, answer.reason, answer.message)
        if answer.reason in ERRORS:  # a reason the node answers with too: one status, one sentence
            assert ERRORS[answer.reason] == (answer.status, answer.message), code


@pytest.mark.parametrize(
    ("code", "status", "reason", "socks5"),
    [
        (ErrorCode.NO_MAPPING, 403, "no_mapping", SOCKS5_NOT_ALLOWED),
        (ErrorCode.DENIED, 403, "denied_by_allowlist", SOCKS5_NOT_ALLOWED),
        (ErrorCode.CONNECT_FAILED, 502, "internal_host_unreachable", SOCKS5_CONNECTION_REFUSED),
        (ErrorCode.CONNECT_TIMEOUT, 504, "internal_host_timeout", SOCKS5_HOST_UNREACHABLE),
        (ErrorCode.TUNNEL_LOST, 502, "connector_connection_lost", SOCKS5_NETWORK_UNREACHABLE),
        (ErrorCode.REFUSED, 502, "refused", SOCKS5_NETWORK_UNREACHABLE),
        (ErrorCode.INTERNAL_ERROR, 502, "internal_error", SOCKS5_GENERAL_FAILURE),
        (ErrorCode.STALE_EPOCH, 502, "stale_epoch", SOCKS5_GENERAL_FAILURE),
    ],
)
def test_both_proxies_read_one_row(code: ErrorCode, status: int, reason: str, socks5: int) -> None:
    answer = RESETS[code]
    assert (answer.status, answer.reason, answer.socks5) == (status, reason, socks5)


def test_the_generic_sentence_names_the_code_not_the_reset_text() -> None:
    assert reset_error(ErrorCode.INTERNAL_ERROR)[2] == "stream to the connector failed (INTERNAL_ERROR)"
