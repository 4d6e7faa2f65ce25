"""The destination service refuses to start on a store directory that does not exist, with a
message naming it (it failed with a bare FileNotFoundError on its key file before)."""

from __future__ import annotations

import pytest

from connector.cloud.auth import Authenticator
from connector.cloud.destinations import DestinationService, DestinationSettings, StoreError


def test_missing_store_directory_is_named(tmp_path):
    store = tmp_path / "absent" / "destinations.json"
    with pytest.raises(StoreError, match=f"destination store directory {tmp_path / 'absent'} does not exist"):
        DestinationService(Authenticator({}), Authenticator({}), settings=DestinationSettings(path=store, key_path=store.with_suffix(".key")))
    assert not (tmp_path / "absent").exists()  # nothing created on the way
