"""Decoding the shared mappings of etcd: invalid and overlapping values are skipped, named."""

from __future__ import annotations

import json

from connector.agent.sharedconfig import MAPPINGS_PREFIX, decode_mappings
from ha.store import KeyValue


def kv(name: str, **mapping: object) -> KeyValue:
    data = {"virtual_host": "mq.virtual", "internal_host": "10.0.0.5", "protocol": "TCP", **mapping}
    return KeyValue(MAPPINGS_PREFIX + name, json.dumps(data).encode(), 1, 1)


def test_of_two_values_sharing_a_port_the_lower_key_wins_on_every_node() -> None:
    values = [kv("mq.virtual:7005", virtual_port=7005, internal_port=1),
              kv("mq.virtual:7000-7009", virtual_port="7000-7009", internal_port=9000),
              kv("mq.virtual:7010", virtual_port=7010, internal_port=2),
              kv("mq.virtual:bad", virtual_port="x-y", internal_port=3)]
    for order in (values, values[::-1]):
        mappings, errors = decode_mappings(order)
        assert [m.name for m in mappings] == ["mq.virtual:7000-7009", "mq.virtual:7010"]
        assert errors == [
            f"{MAPPINGS_PREFIX}mq.virtual:7005: virtual_port: overlaps the mapping 'mq.virtual:7000-7009'",
            f"{MAPPINGS_PREFIX}mq.virtual:bad: virtual_port: 'x-y' is not a range of ports like \"7000-7009\" "
            "(low-high, 1..65535)"]
