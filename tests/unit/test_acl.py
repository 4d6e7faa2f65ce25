"""Access control: mapping lookup, resource matching, path canonicalisation, config validation."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.agent import acl
from connector.agent.acl import (
    AccessControl,
    BackendProtocol,
    Decision,
    HostInHeader,
    Mapping,
    PathRejected,
    Resource,
    normalise_path,
)
from connector.tunnel.types import StreamProtocol, Target

ERP = Mapping(
    virtual_host="erp.virtual",
    virtual_port=443,
    internal_host="10.0.0.7",
    internal_port=8443,
    protocol=BackendProtocol.HTTPS,
    host_in_header=HostInHeader.INTERNAL,
    resources=(
        Resource("/sap/opu"),
        Resource("/sap/opu/odata/admin", enabled=False),
        Resource("/exact", prefix=False),
        Resource("/ws", websocket_upgrade=True),
        Resource("/dir/"),
    ),
    trust_store="/etc/ca.pem",
)
EMPTY = Mapping("empty.virtual", 80, "10.0.0.8", 80)
DB = Mapping("db.virtual", 5432, "10.0.0.9", 5432, protocol=BackendProtocol.TCP)
ACL = AccessControl([ERP, EMPTY, DB])


def check(target: bytes, method: bytes = b"GET", headers: list[tuple[bytes, bytes]] | None = None) -> Decision:
    return ACL.check_request(ERP, method, target, headers or [])


# --- mapping lookup ----------------------------------------------------------------------------


def test_find_mapping_is_case_insensitive_and_default_deny() -> None:
    assert ACL.find_mapping(Target("ERP.Virtual", 443)) is ERP
    assert ACL.find_mapping(Target("erp.virtual", 444)) is None
    assert ACL.find_mapping(Target("other", 443)) is None


def test_find_mapping_respects_stream_protocol() -> None:
    assert ACL.find_mapping(Target("erp.virtual", 443, StreamProtocol.TCP)) is None
    assert ACL.find_mapping(Target("db.virtual", 5432, StreamProtocol.HTTP)) is None
    assert ACL.find_mapping(Target("db.virtual", 5432, StreamProtocol.TCP)) is DB


def test_duplicate_mappings_refused() -> None:
    with pytest.raises(ValueError, match="duplicate mapping"):
        AccessControl([ERP, Mapping("ERP.VIRTUAL", 443, "x", 1)])


def test_mapping_name() -> None:
    assert ERP.name == "erp.virtual:443"


# --- port ranges -------------------------------------------------------------------------------

RANGE = Mapping.from_dict({"virtual_host": "mq.virtual", "virtual_port": "7000-7009", "internal_host": "10.0.0.5",
                           "internal_port": 9000, "protocol": "TCP-TLS", "trust_store": "/etc/ca.pem"})


def test_a_range_maps_each_port_to_the_same_offset_inside() -> None:
    assert (RANGE.virtual_port, RANGE.internal_port, RANGE.port_count, RANGE.name) == (7000, 9000, 10, "mq.virtual:7000-7009")
    access = AccessControl([RANGE, DB])
    for port, internal in ((7000, 9000), (7003, 9003), (7009, 9009)):
        found = access.find_mapping(Target("MQ.virtual", port, StreamProtocol.TCP))
        assert found == attrs.evolve(RANGE, virtual_port=port, internal_port=internal, port_count=1)
        assert found is not None and found.name == f"mq.virtual:{port}" and found.trust_store == "/etc/ca.pem"
    for port in (6999, 7010):
        assert access.find_mapping(Target("mq.virtual", port, StreamProtocol.TCP)) is None
    assert access.find_mapping(Target("mq.virtual", 7001, StreamProtocol.HTTP)) is None
    assert access.mappings == (RANGE, DB)


def test_a_range_round_trips_and_an_internal_range_must_match_its_size() -> None:
    data = RANGE.to_dict()
    assert (data["virtual_port"], data["internal_port"]) == ("7000-7009", "9000-9009")
    assert Mapping.from_dict(data) == RANGE
    assert Mapping.from_dict({**data, "internal_port": 9000}) == RANGE
    assert Mapping.from_dict({**data, "virtual_port": "7000-7000", "internal_port": 9000}).to_dict()["virtual_port"] == 7000
    assert DB.to_dict()["virtual_port"] == 5432  # a single port is written as before


@pytest.mark.parametrize(("change", "message"), [
    ({"protocol": "HTTP", "trust_store": None}, "virtual_port: only TCP and TCP-TLS mappings may name a range"),
    ({"virtual_port": "7000-8024"}, "virtual_port: a range holds 1..1024 ports, not 1025"),
    ({"virtual_port": "7009-7000"}, "virtual_port: '7009-7000' is not a range of ports"),
    ({"virtual_port": "0-9"}, "virtual_port: '0-9' is not a range"),
    ({"virtual_port": "7000-"}, "virtual_port: '7000-' is not a range"),
    ({"virtual_port": "a-b"}, "virtual_port: 'a-b' is not a range"),
    ({"internal_port": "9000-9004"}, "internal_port: '9000-9004' holds 5 ports, virtual_port '7000-7009' holds 10"),
    ({"internal_port": 65530}, "internal_port: the range 65530-65539 goes past port 65535"),
    ({"port_count": 10}, "port_count: unknown key"),
])
def test_a_bad_range_is_refused_with_its_key(change: dict[str, object], message: str) -> None:
    data = {"virtual_host": "mq.virtual", "virtual_port": "7000-7009", "internal_host": "10.0.0.5",
            "internal_port": 9000, "protocol": "TCP", **change}
    with pytest.raises(ValueError) as caught:
        Mapping.from_dict({k: v for k, v in data.items() if v is not None})
    assert str(caught.value).startswith(message)


def test_mappings_may_not_share_a_port_of_a_virtual_host() -> None:
    single = Mapping("MQ.virtual", 7009, "10.0.0.6", 1, protocol=BackendProtocol.TCP)
    with pytest.raises(ValueError, match="overlapping mappings 'mq.virtual:7000-7009' and 'MQ.virtual:7009'"):
        AccessControl([RANGE, single])
    other = Mapping.from_dict({**RANGE.to_dict(), "virtual_port": "6990-7000", "internal_port": 9000})
    with pytest.raises(ValueError, match="overlapping mappings"):
        AccessControl([RANGE, other])
    assert acl.overlap(other, [DB, RANGE]) is RANGE and acl.overlap(single, [DB]) is None
    AccessControl([RANGE, attrs.evolve(single, virtual_port=7010), attrs.evolve(single, virtual_host="mq2.virtual")])


# --- resources -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "allowed", "reason", "path"),
    [
        (b"/sap/opu", True, "allowed", "/sap/opu"),
        (b"/sap/opu/", True, "allowed", "/sap/opu/"),
        (b"/sap/opu/odata/x?$top=1", True, "allowed", "/sap/opu/odata/x"),
        (b"/sap/opux", False, "no_resource", "/sap/opux"),
        (b"/sap", False, "no_resource", "/sap"),
        (b"/sap/opu/odata/admin", False, "resource_disabled", "/sap/opu/odata/admin"),
        (b"/sap/opu/odata/admin/users", False, "resource_disabled", "/sap/opu/odata/admin/users"),
        (b"/sap/opu/odata/adminx", True, "allowed", "/sap/opu/odata/adminx"),
        (b"/exact", True, "allowed", "/exact"),
        (b"/exact?q=1", True, "allowed", "/exact"),
        (b"/exact/more", False, "no_resource", "/exact/more"),
        (b"/dir/", True, "allowed", "/dir/"),
        (b"/dir/x", True, "allowed", "/dir/x"),
        (b"/dir", False, "no_resource", "/dir"),
        (b"/", False, "no_resource", "/"),
        (b"/sap/x/../opu/y", True, "allowed", "/sap/opu/y"),
        (b"/sap//opu///y", True, "allowed", "/sap/opu/y"),
        (b"/s%61p/opu", True, "allowed", "/sap/opu"),
        (b"/sap/opu/../../etc", False, "no_resource", "/etc"),
    ],
)
def test_resource_matching(target: bytes, allowed: bool, reason: str, path: str) -> None:
    decision = check(target)
    assert (decision.allowed, decision.reason, decision.path) == (allowed, reason, path)


def test_forward_target_is_canonical_path_plus_original_query() -> None:
    decision = check(b"/sap//opu/./a%7e?x=%2F..&y")
    assert decision.forward_target == b"/sap/opu/a~?x=%2F..&y"


def test_longest_match_wins_and_exact_beats_prefix_at_equal_length() -> None:
    m = Mapping("h", 80, "i", 80, resources=(Resource("/a"), Resource("/a", prefix=False, enabled=False)))
    acl_ = AccessControl([m])
    assert acl_.check_request(m, b"GET", b"/a", []).reason == "resource_disabled"
    assert acl_.check_request(m, b"GET", b"/a/b", []).allowed


def test_mapping_without_resources_allows_nothing() -> None:
    for target in (b"/", b"/x", b"*"):
        decision = ACL.check_request(EMPTY, b"OPTIONS", target, [])
        assert not decision.allowed
        assert decision.reason == "no_resource"


def test_websocket_upgrade_needs_resource_flag() -> None:
    upgrade = [(b"connection", b"Upgrade"), (b"upgrade", b"WebSocket")]
    allowed = check(b"/ws/chat", headers=upgrade)
    assert allowed.allowed and allowed.websocket
    denied = check(b"/sap/opu/x", headers=upgrade)
    assert (denied.allowed, denied.reason) == (False, "websocket_not_allowed")
    plain = check(b"/ws/chat")
    assert plain.allowed and not plain.websocket


def test_asterisk_form_only_for_options() -> None:
    assert check(b"*", b"OPTIONS") == Decision(True, "allowed", "*", forward_target=b"*")
    assert check(b"*", b"GET").reason == "bad_request"


def test_absolute_form_must_name_the_virtual_host() -> None:
    ok = check(b"https://ERP.virtual:443/sap/opu/x?q")
    assert ok.allowed and ok.forward_target == b"/sap/opu/x?q"
    assert check(b"http://erp.virtual/sap/opu").allowed
    assert check(b"http://erp.virtual:80/sap/opu").reason == "host_mismatch"
    assert check(b"http://evil.example/sap/opu").reason == "host_mismatch"
    assert check(b"http://user@erp.virtual/sap/opu").reason == "bad_request"
    assert check(b"http://erp.virtual:99999/sap/opu").reason == "bad_request"


def test_tcp_mapping_refuses_http_checks() -> None:
    assert ACL.check_request(DB, b"GET", b"/", []).reason == "bad_request"


HOSTILE = [
    (b"/sap/opu%2F..%2F..%2Fadmin", "ambiguous_path"),
    (b"/sap/opu/%2e%2e/%2e%2e/admin", "ambiguous_path"),
    (b"/sap/opu/.%2E/x", "ambiguous_path"),
    (b"/sap/opu/%2E/x", "ambiguous_path"),
    (b"/sap/opu\\..\\admin", "ambiguous_path"),
    (b"/sap/opu/%5c..%5cadmin", "ambiguous_path"),
    (b"/sap/opu/%00", "ambiguous_path"),
    (b"/sap/opu/\x00", "ambiguous_path"),
    (b"/sap/opu/..;/admin", "ambiguous_path"),
    (b"/sap/opu/.;x/admin", "ambiguous_path"),
    (b"/../sap/opu", "ambiguous_path"),
    (b"/sap/../../sap/opu", "ambiguous_path"),
    (b"/sap/opu/%zz", "ambiguous_path"),
    (b"/sap/opu/%4", "ambiguous_path"),
    (b"/sap/opu/%", "ambiguous_path"),
    (b"/sap/opu/x#frag", "bad_request"),
    (b"/sap/opu/\xc3\xa9", "bad_request"),
    (b"/sap/opu/a b", "bad_request"),
    (b"sap/opu", "bad_request"),
    (b"erp.virtual:443", "bad_request"),
    (b"", "bad_request"),
    (b"http://evil/sap/opu", "host_mismatch"),
]


@pytest.mark.parametrize(("target", "reason"), HOSTILE)
def test_hostile_paths_refused(target: bytes, reason: str) -> None:
    decision = check(target)
    assert not decision.allowed
    assert decision.reason == reason
    assert decision.reason in acl.REASONS


def test_connect_method_refused() -> None:
    assert check(b"erp.virtual:443", b"CONNECT").reason == "bad_request"


def test_encoded_dot_inside_a_name_is_fine() -> None:
    assert check(b"/sap/opu/file%2Ejson").path == "/sap/opu/file.json"


def test_reserved_escapes_kept_and_uppercased() -> None:
    assert normalise_path("/a%3fb%2a") == "/a%3Fb%2A"


# --- paths that must mean the same thing to every internal host ---------------------------------

# (request target, what the node does): a reason when it refuses, else the target it forwards.
# Refused: whatever a host that decodes twice, reads overlong UTF-8 or folds look-alike characters
# could read as another path. Accepted: byte for byte (mixed-case escapes of reserved characters
# are upper-cased, escapes of unreserved characters decoded, dot segments removed, as before).
PATH_CORPUS = [
    # percent-encoding that survives one decoding
    (b"/sap/opu/%252e%252e/admin", "ambiguous_path"),
    (b"/sap/opu/%252E%252e/admin", "ambiguous_path"),
    (b"/sap/opu/%25%32%65%25%32%65/admin", "ambiguous_path"),
    (b"/sap/opu/%252f..%252fadmin", "ambiguous_path"),
    (b"/sap/opu/%255c..%255cadmin", "ambiguous_path"),
    (b"/sap/opu/%2500", "ambiguous_path"),
    (b"/sap/opu/%25ef%25bc%258e", "ambiguous_path"),
    (b"/sap/opu/%%32%65", "ambiguous_path"),
    (b"/sap/opu/%uff0e%uff0e/admin", "ambiguous_path"),
    # single encoding of separators, dots and NUL (mixed-case hex too)
    (b"/sap/opu/%2e%2E/admin", "ambiguous_path"),
    (b"/sap/opu/%2f", "ambiguous_path"),
    (b"/sap/opu/%5C", "ambiguous_path"),
    (b"/sap/opu/%00", "ambiguous_path"),
    # bytes that are not UTF-8 once decoded: overlong forms, surrogates, stray bytes
    (b"/sap/opu/%c0%ae%c0%ae/admin", "ambiguous_path"),
    (b"/sap/opu/%e0%80%ae%e0%80%ae/admin", "ambiguous_path"),
    (b"/sap/opu/%f0%80%80%ae", "ambiguous_path"),
    (b"/sap/opu/%c0%af..%c0%afadmin", "ambiguous_path"),
    (b"/sap/opu/%e0%80%af", "ambiguous_path"),
    (b"/sap/opu/%c1%9c", "ambiguous_path"),
    (b"/sap/opu/%ed%a0%80", "ambiguous_path"),
    (b"/sap/opu/%ed%bf%bf", "ambiguous_path"),
    (b"/sap/opu/%ff", "ambiguous_path"),
    (b"/sap/opu/%c3", "ambiguous_path"),
    (b"/sap/opu/caf%e9", "ambiguous_path"),
    # control characters once decoded (header and log injection on hosts that echo the path)
    (b"/sap/opu/a%0d%0aset-cookie:x", "ambiguous_path"),
    (b"/sap/opu/a%09b", "ambiguous_path"),
    (b"/sap/opu/a%7f", "ambiguous_path"),
    (b"/sap/opu/a%c2%85", "ambiguous_path"),
    # look-alikes that fold (NFKC) or are best-fit mapped to dots and separators
    (b"/sap/opu/%ef%bc%8e%ef%bc%8e/admin", "ambiguous_path"),
    (b"/sap/opu/%e2%80%a5/admin", "ambiguous_path"),
    (b"/sap/opu/%ef%b9%92%ef%b9%92/admin", "ambiguous_path"),
    (b"/sap/opu/..%ef%bc%8fadmin", "ambiguous_path"),
    (b"/sap/opu/..%ef%bc%bcadmin", "ambiguous_path"),
    (b"/sap/opu/..%ef%b9%a8admin", "ambiguous_path"),
    (b"/sap/opu/..%e2%88%95admin", "ambiguous_path"),
    (b"/sap/opu/..%e2%81%84admin", "ambiguous_path"),
    (b"/sap/opu/..%c2%a5admin", "ambiguous_path"),
    (b"/sap/opu/..%e2%82%a9admin", "ambiguous_path"),
    # path parameters hiding a dot segment
    (b"/sap/opu/..%3b/admin", "ambiguous_path"),
    (b"/sap/opu/%2e%2e%3bx/admin", "ambiguous_path"),
    (b"/sap/opu/..;/admin", "ambiguous_path"),
    (b"/sap/opu/%ef%bc%8e%ef%bc%8e%3b/admin", "ambiguous_path"),
    # accepted: escapes that are data, valid UTF-8, parameters
    (b"/sap/opu/a%3Fb", b"/sap/opu/a%3Fb"),
    (b"/sap/opu/a%23b", b"/sap/opu/a%23b"),
    (b"/sap/opu/a%3f%23b", b"/sap/opu/a%3F%23b"),
    (b"/sap/opu/caf%C3%A9/%E2%82%AC", b"/sap/opu/caf%C3%A9/%E2%82%AC"),
    (b"/sap/opu/caf%c3%a9", b"/sap/opu/caf%C3%A9"),
    (b"/sap/opu/100%25", b"/sap/opu/100%25"),
    (b"/sap/opu/a%20b%2Bc", b"/sap/opu/a%20b%2Bc"),
    (b"/sap/opu/a;v=1/b", b"/sap/opu/a;v=1/b"),
    (b"/sap/opu/a%3Bv=1", b"/sap/opu/a%3Bv=1"),
    (b"/sap/opu/file%EF%BC%8Ejson", b"/sap/opu/file%EF%BC%8Ejson"),
    (b"/sap/opu/%E6%97%A5%E6%9C%AC", b"/sap/opu/%E6%97%A5%E6%9C%AC"),
    (b"/sap/opu;/../opu/x", b"/sap/opu/x"),
    (b"/sap/opu/file%2Ejson?q=%252e%c0%ae", b"/sap/opu/file.json?q=%252e%c0%ae"),
]


@pytest.mark.parametrize(("target", "outcome"), PATH_CORPUS)
def test_paths_mean_the_same_to_every_internal_host(target: bytes, outcome: str | bytes) -> None:
    decision = check(target)
    if isinstance(outcome, str):
        assert (decision.allowed, decision.reason) == (False, outcome)
    else:
        assert (decision.allowed, decision.forward_target) == (True, outcome)


def test_check_path_meaning_names_what_is_wrong() -> None:
    with pytest.raises(PathRejected, match="survives one decoding"):
        acl.check_path_meaning("/a/%252e")
    with pytest.raises(PathRejected, match="not UTF-8"):
        acl.check_path_meaning("/a/%C0%AE")
    acl.check_path_meaning("/a/%3F%E2%82%AC")  # accepted: returns without raising


def test_resource_paths_must_be_unambiguous_too() -> None:
    with pytest.raises(ValueError, match="survives one decoding"):
        Resource("/a%252e")
    for path in ("/a%3Fb", "/a%23"):  # a host cutting at the decoded "?" or "#" would see "/a"
        with pytest.raises(ValueError, match="encoded '\\?' or '#'"):
            Resource(path)


# --- normalisation properties --------------------------------------------------------------------

PATH_ALPHABET = st.sampled_from(["a", "b", ".", "..", "/", "//", "%2e", "%41", "%3f", "~", ";", "%7E", "-"])


@settings(max_examples=300, deadline=None)
@given(st.lists(PATH_ALPHABET, max_size=12))
def test_normalised_path_is_clean_and_idempotent(parts: list[str]) -> None:
    raw = "/" + "".join(parts)
    try:
        once = normalise_path(raw)
    except PathRejected as exc:
        assert exc.reason in acl.REASONS
        return
    assert once.startswith("/")
    assert "//" not in once
    assert "\\" not in once
    assert ".." not in once.split("/")
    assert "." not in once.split("/")
    assert normalise_path(once) == once


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=30))
def test_normalise_never_crashes_on_arbitrary_ascii(text: str) -> None:
    try:
        once = normalise_path("/" + text)
    except PathRejected as exc:
        assert exc.reason in acl.REASONS
        return
    assert normalise_path(once) == once
    assert "\\" not in once and "\x00" not in once


# --- configuration round trip and validation -------------------------------------------------------


def test_to_dict_from_dict_round_trip() -> None:
    for mapping in (ERP, EMPTY, DB):
        assert Mapping.from_dict(mapping.to_dict()) == mapping


def test_from_dict_enum_values_are_case_insensitive() -> None:
    m = Mapping.from_dict({**BASE, "protocol": "tcp-tls", "host_in_header": "Internal"})
    assert (m.protocol, m.host_in_header) == (BackendProtocol.TCP_TLS, HostInHeader.INTERNAL)


def test_from_dict_defaults() -> None:
    m = Mapping.from_dict({"virtual_host": "v", "virtual_port": 80, "internal_host": "i", "internal_port": 8080})
    assert m.protocol is BackendProtocol.HTTP
    assert m.host_in_header is HostInHeader.VIRTUAL
    assert m.resources == () and m.trust_store is None


BASE = {"virtual_host": "v", "virtual_port": 80, "internal_host": "i", "internal_port": 8080}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"virtual_port": 0}, "virtual_port: must be an integer port"),
        ({"virtual_port": "80"}, "virtual_port: must be an integer port"),
        ({"internal_port": True}, "internal_port: must be an integer port"),
        ({"internal_port": 70000}, "internal_port: must be an integer port"),
        ({"virtual_host": ""}, "virtual_host: must be a non-empty string"),
        ({"internal_host": "a b"}, "internal_host: 'a b' is not a valid host"),
        ({"protocol": "FTP"}, "protocol: 'FTP' is not one of"),
        ({"host_in_header": "both"}, "host_in_header: 'both' is not"),
        ({"resources": "/x"}, "resources: must be a list"),
        ({"resources": [{"path": "x"}]}, r"resources\[0\]\.path: must be a string starting with '/'"),
        ({"resources": [{"path": "/a/../b"}]}, r"resources\[0\]\.path: not in canonical form"),
        ({"resources": [{"path": "/a%2Fb"}]}, r"resources\[0\]\.path: encoded slash"),
        ({"resources": [{"path": "/a"}, {"path": "/b", "enabled": "yes"}]}, r"resources\[1\]\.enabled: must be true or false"),
        ({"resources": [{"prefix": True}]}, r"resources\[0\]\.path: missing"),
        ({"resources": [{"path": "/a", "colour": 1}]}, r"resources\[0\]\.colour: unknown key"),
        ({"resources": [{"path": "/a"}, {"path": "/a"}]}, r"resources\[1\]\.path: duplicate"),
        ({"resources": ["/a"]}, r"resources\[0\]\.must be a table"),
        ({"protocol": "TCP", "resources": [{"path": "/a"}]}, "resources: TCP and TCP-TLS mappings have no paths"),
        ({"trust_store": 5}, "trust_store: must be a file path"),
        ({"colour": "blue"}, "colour: unknown key"),
    ],
)
def test_from_dict_names_the_bad_key(change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mapping.from_dict({**BASE, **change})


@pytest.mark.parametrize("missing", ["virtual_host", "virtual_port", "internal_host", "internal_port"])
def test_from_dict_missing_key(missing: str) -> None:
    data = dict(BASE)
    del data[missing]
    with pytest.raises(ValueError, match=f"{missing}: missing"):
        Mapping.from_dict(data)


def test_from_dict_rejects_non_table() -> None:
    with pytest.raises(ValueError, match="must be a table"):
        Mapping.from_dict(["v", 80])
