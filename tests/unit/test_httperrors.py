"""What applications are told about failures: one table, generic sentences, no reset detail."""

from __future__ import annotations

import pytest

from connector.cloud.proxy import reset_status
from connector.httperrors import ERRORS, REASON_PHRASES, RESET_REASONS, reset_error
from connector.tunnel.types import ErrorCode, StreamResetError


@pytest.mark.parametrize("code", list(ErrorCode))
def test_the_proxy_never_passes_a_reset_reason_on(code: ErrorCode) -> None:
    # an older node may put the internal host, resolver text or a trust store path there
    detail = "erp-db.corp.example:5432 unreachable: [Errno -2] Name or service not known /etc/pki/ca.pem"
    status, reason, message = reset_status(StreamResetError(code, detail))
    assert (status, reason, message) == reset_error(code)
    assert "corp" not in message and "Errno" not in message and "/etc" not in message


def test_every_reason_has_a_status_phrase_and_every_reset_reason_a_message() -> None:
    assert all(status in REASON_PHRASES for status, _ in ERRORS.values())
    assert set(RESET_REASONS.values()) <= set(ERRORS)
