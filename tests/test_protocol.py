"""Request validation: every malformed shape gets code 4 and a reason."""

import json

import pytest
from hypothesis import given, strategies as st

from vmnet_broker import protocol
from vmnet_broker.errors import Code
from vmnet_broker.protocol import Acquire, Attach, Detach, ProtocolError, Release, Status


def parse(obj):
    return protocol.parse_request(json.dumps(obj).encode())


def refused(data: bytes, truncated: bool = False) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(data, truncated)
    assert info.value.code == Code.INVALID_REQUEST
    assert info.value.message
    return info.value


def test_acquire_is_parsed():
    assert parse({"command": "acquire", "network_name": "shared"}).command == Acquire("shared")


def test_release_detach_status_are_parsed():
    assert parse({"command": "release", "network_name": "x"}).command == Release("x")
    assert parse({"command": "detach", "interface": "vmb-t0"}).command == Detach("vmb-t0")
    assert parse({"command": "status"}).command == Status()


def test_attach_defaults_match_the_protocol():
    assert parse({"command": "attach", "network_name": "shared"}).command == Attach(
        "shared", kind="tap", mac=None, vnet_hdr=False, queues=1
    )


def test_attach_options_are_parsed_and_mac_normalised():
    req = parse(
        {"command": "attach", "network_name": "n", "kind": "tap", "mac": "52:54:00:AB:CD:EF",
         "vnet_hdr": True, "queues": 4}
    )  # fmt: skip
    assert req.command == Attach("n", "tap", "52:54:00:ab:cd:ef", True, 4)


def test_persist_is_parsed_and_the_owner_never_comes_from_the_wire():
    req = parse({"command": "attach", "network_name": "n", "persist": True, "owner_uid": 0, "mac": "52:54:00:00:00:01"})
    assert req.command == Attach("n", "tap", "52:54:00:00:00:01", persist=True)
    assert req.command.owner_uid is None  # the broker sets it from SO_PEERCRED
    assert parse({"command": "attach", "network_name": "n", "persist": False}).command == Attach("n")


def test_empty_names_are_well_formed_and_left_to_the_lookup():
    # Upstream answers 4 only for a missing or non-string name; "" is not found (5).
    assert parse({"command": "acquire", "network_name": ""}).command == Acquire("")
    assert parse({"command": "detach", "interface": ""}).command == Detach("")


def test_unknown_keys_are_ignored_for_forward_compatibility():
    assert parse({"command": "acquire", "network_name": "a", "future": 1}).command == Acquire("a")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b'{"command": "acquire", "network_name": "shared"',
        b"[]",
        b'"acquire"',
        b"42",
        b"null",
        b'{"command": NaN}',
    ],
)
def test_not_a_json_object_is_refused(data):
    refused(data)


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"command": 1},
        {"command": None},
        {"command": "acquire"},
        {"command": "acquire", "network_name": 5},
        {"command": "acquire", "network_name": ["shared"]},
        {"command": "launch", "network_name": "shared"},
        {"command": "ACQUIRE", "network_name": "shared"},
        {"command": "detach"},
        {"command": "release", "network_name": {}},
        {"command": "attach", "network_name": "s", "kind": "vde"},
        {"command": "attach", "network_name": "s", "kind": 1},
        {"command": "attach", "network_name": "s", "mac": "01:00:5e:00:00:01"},
        {"command": "attach", "network_name": "s", "mac": "00:00:00:00:00:00"},
        {"command": "attach", "network_name": "s", "mac": "52:54:00:12:34"},
        {"command": "attach", "network_name": "s", "mac": 5},
        {"command": "attach", "network_name": "s", "vnet_hdr": "yes"},
        {"command": "attach", "network_name": "s", "vnet_hdr": 1},
        {"command": "attach", "network_name": "s", "queues": 0},
        {"command": "attach", "network_name": "s", "queues": 17},
        {"command": "attach", "network_name": "s", "queues": True},
        {"command": "attach", "network_name": "s", "queues": 2.0},
        {"command": "attach", "network_name": "s", "queues": 2, "kind": "dgram"},
        {"command": "attach", "network_name": "s", "persist": 1},
        {"command": "attach", "network_name": "s", "persist": True, "kind": "dgram"},
        {"command": "attach", "network_name": "s", "persist": True, "vnet_hdr": True},
        {"command": "attach", "network_name": "s", "persist": True, "queues": 2},
        {"command": "acquire", "network_name": "s", "id": {"a": 1}},
        {"command": "acquire", "network_name": "s", "id": [1]},
        {"command": "status", "id": 1e400},
    ],
)
def test_malformed_request_is_refused(obj):
    refused(json.dumps(obj).encode())


def test_oversize_request_is_refused():
    assert "65536" in refused(b"{}", truncated=True).message
    big = json.dumps({"command": "status", "pad": "x" * 70000}).encode()
    refused(big)


def test_error_reply_echoes_the_id():
    err = refused(json.dumps({"command": "nope", "id": "abc"}).encode())
    assert json.loads(err.reply()) == {"error": 4, "message": err.message, "id": "abc"}


def test_error_reply_without_id_has_no_id():
    err = refused(b"[]")
    assert "id" not in json.loads(err.reply())


@given(st.one_of(st.text(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.none()))
def test_any_scalar_id_is_echoed(request_id):
    req = parse({"command": "status", "id": request_id})
    assert json.loads(protocol.encode_reply({}, req))["id"] == request_id


@given(st.text(alphabet="0123456789e+-.", min_size=1, max_size=12))
def test_numeric_ids_either_echo_as_valid_json_or_get_code_4(text):
    data = b'{"command": "status", "id": ' + text.encode() + b"}"
    try:
        req = protocol.parse_request(data)
    except ProtocolError as e:
        assert e.code == Code.INVALID_REQUEST
        json.loads(e.reply())  # the error reply itself is valid JSON
        return
    json.loads(protocol.encode_reply({}, req), parse_constant=lambda c: pytest.fail(f"{c} in reply"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=10,
)


@given(json_values)
def test_arbitrary_json_parses_or_is_refused_with_code_4(value):
    try:
        protocol.parse_request(json.dumps(value).encode())
    except ProtocolError as e:
        assert e.code == Code.INVALID_REQUEST


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_parser(data):
    try:
        protocol.parse_request(data)
    except ProtocolError as e:
        assert e.code == Code.INVALID_REQUEST


@given(
    st.fixed_dictionaries(
        {"command": st.sampled_from(["acquire", "attach", "release", "detach", "status"])},
        optional={
            "network_name": json_values,
            "interface": json_values,
            "kind": json_values,
            "mac": json_values,
            "vnet_hdr": json_values,
            "queues": json_values,
        },
    )
)
def test_fuzzed_commands_parse_to_typed_values_or_code_4(obj):
    try:
        cmd = parse(obj).command
    except ProtocolError as e:
        assert e.code == Code.INVALID_REQUEST
        return
    if isinstance(cmd, Attach):
        assert cmd.kind in ("tap", "dgram") and isinstance(cmd.vnet_hdr, bool)
        assert type(cmd.queues) is int and 1 <= cmd.queues <= 16
    for key in ("network_name", "interface"):
        if hasattr(cmd, key):
            assert isinstance(getattr(cmd, key), str)
