"""`.ci/run` as CI runs it: on Debian's python3 with a system PATH, tests and lint both reported."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_a_test_failure_does_not_hide_the_lint_results() -> None:
    """Before: `set -e` stopped at the first failure and lint never ran."""
    env = {k: v for k, v in os.environ.items() if k != "CONNECTOR_CI_CLEAN_ENV"}  # let it clean up itself
    result = subprocess.run(
        ["bash", str(REPO / ".ci" / "run"), "-k", "no_test_has_this_name"],  # pytest: nothing selected, exit 5
        capture_output=True, text=True, env=env, timeout=280, check=False)
    out = result.stdout
    assert result.returncode != 0
    assert "CI: python3 is /usr/bin/python3 " in out  # not pyenv's, not a venv's
    assert "CI summary: tests FAILED (exit 5), lint passed" in out, out + result.stderr
