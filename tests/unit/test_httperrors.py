"""What applications are told about failures: one table, generic sentences, no reset detail."""

from __future__ import annotations

from connector.httperrors import ERRORS, REASON_PHRASES, RESET_REASONS


def test_every_reason_has_a_status_phrase_and_every_reset_reason_a_message() -> None:
    assert all(status in REASON_PHRASES for status, _ in ERRORS.values())
    assert set(RESET_REASONS.values()) <= set(ERRORS)
