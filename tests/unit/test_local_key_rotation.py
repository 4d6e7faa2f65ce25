"""`connector cloud-keys rotate` of a single cloud (no [shared]): it rotates the ring in [oauth]
signing_keys, and the running cloud's keys (`LocalKeys`) follow the file at their next use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from connector.cli import main
from connector.cloud.jwks import FileKeyStore, LocalKeys, rotation
from connector.config import load_cloud_config

T0 = 1_800_000_000.0


def write_cloud(tmp_path: Path) -> Path:
    for name in ("ca.pem", "server.pem", "server.key"):
        (tmp_path / name).write_text("placeholder")
    path = tmp_path / "cloud.toml"
    path.write_text('[tunnel]\ncert = "server.pem"\nkey = "server.key"\n[[subaccounts]]\nid = "acme"\n'
                    'ca = "ca.pem"\n[oauth]\n')
    return path


def listed(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_rotate_of_a_single_cloud_changes_the_ring_the_running_cloud_uses(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_cloud_config(write_cloud(tmp_path))
    assert config.oauth is not None
    running = LocalKeys(FileKeyStore(config.oauth.signing_keys), T0)  # the cloud, started before
    first = running.ring.current.kid
    assert main(["cloud-keys", "rotate", "--config", str(tmp_path / "cloud.toml"), "--overlap", "600"]) == 0
    rotated, *keys = listed(capsys)
    assert "rotated" in rotated
    assert [k["kid"] for k in keys][1] == first and keys[0]["signs"] and not keys[1]["signs"]
    assert keys[1]["retires"] is not None
    # the running cloud signs with the new key now and still trusts the old one
    assert running.ring.current.kid == keys[0]["kid"]
    assert running.ring.trusted(first, float(keys[1]["retires"]) - 1) is not None  # type: ignore[arg-type]
    assert main(["cloud-keys", "--config", str(tmp_path / "cloud.toml")]) == 0
    assert [k["kid"] for k in listed(capsys)] == [k["kid"] for k in keys]


async def test_the_clouds_own_change_starts_from_the_file_it_follows(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    running, operator = LocalKeys(store, T0), LocalKeys(FileKeyStore(store.path), T0)
    await operator.update(rotation(T0 + 1, 600))
    await running.update(rotation(T0 + 2, 600))  # the cloud rotates too: the operator's key is kept
    assert len(running.ring.keys) == 3 and store.load() == running.ring


def test_an_unusable_replacement_keeps_the_ring_in_use(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    running = LocalKeys(store, T0)
    ring = running.ring
    store.path.write_text("not json")
    os.chmod(store.path, 0o600)
    assert running.ring is ring


def test_without_oauth_there_are_no_keys_to_rotate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cloud(tmp_path)
    path.write_text(path.read_text().replace("[oauth]\n", ""))
    assert main(["cloud-keys", "rotate", "--config", str(path)]) == 2
    assert "no [oauth] section" in capsys.readouterr().err
