from hypothesis import given, strategies as st

from vmnet_broker.backends.linux import names


def test_random_macs_are_unicast_locally_administered_and_never_a_host_side_mac():
    for _ in range(2000):
        mac = names.random_mac()
        first = int(mac[:2], 16)
        assert first & 0x02 and not first & 0x01
        assert first not in names.HOST_SIDE_FIRST_OCTETS


@given(st.binary(min_size=6, max_size=6))
def test_host_side_mac_always_differs_from_the_guest_mac(octets):
    mac = ":".join(f"{b:02x}" for b in octets)
    assert names.host_side_mac(mac) != mac
    assert names.host_side_mac(mac)[2:] == mac[2:]


def test_bridge_names_fill_the_lowest_free_number():
    assert names.free_bridge_name(set()) == "vmb-br0"
    assert names.free_bridge_name({"vmb-br0", "vmb-br2"}) == "vmb-br1"


def test_persistent_tap_names_skip_links_and_names_on_record():
    assert names.free_name(names.PERSIST, set()) == "vmb-p0"
    assert names.free_name(names.PERSIST, {"vmb-p0", "vmb-p1", "vmb-t2"}) == "vmb-p2"
    assert names.is_ours(names.free_name(names.PERSIST, set()))
