from ipaddress import IPv4Network as N

from vmnet_broker.backends.linux import subnets


def test_first_pool_candidate_when_nothing_is_taken():
    assert subnets.choose([]) == N("192.168.105.0/24")


def test_a_route_covering_the_first_candidate_moves_to_the_next():
    assert subnets.choose([N("192.168.104.0/23")]) == N("192.168.106.0/24")


def test_vpn_supernet_route_skips_everything_it_covers():
    assert subnets.choose([N("192.168.0.0/17")]) == N("192.168.128.0/24")


def test_default_route_collides_with_nothing():
    assert subnets.choose([N("0.0.0.0/0")]) == N("192.168.105.0/24")


def test_previous_choice_is_kept_when_still_free():
    assert subnets.choose([N("192.168.105.0/24")], N("192.168.200.0/24")) == N("192.168.200.0/24")


def test_previous_choice_is_dropped_when_it_now_collides():
    assert subnets.choose([N("192.168.200.0/22")], N("192.168.200.0/24")) == N("192.168.105.0/24")


def test_exhausted_pool_gives_none():
    assert subnets.choose([N("192.168.0.0/16")]) is None


def test_pool_is_documented_range():
    pool = list(subnets.pool())
    assert pool[0] == subnets.POOL_FIRST and pool[-1] == subnets.POOL_LAST and len(pool) == 150
