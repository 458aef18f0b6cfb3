"""The reference SYN cookie: SipHash, option encoding, validation."""

from __future__ import annotations

import itertools

import pytest

from ipvs_synproxy import cookie
from ipvs_synproxy.cookie import SynOptions

KEY = bytes(range(16))
OTHER = bytes(range(1, 17))
V4 = ("198.51.100.2", "198.51.100.10", 40000, 80)
V6 = ("2001:db8:1::2", "2001:db8:1::10", 40000, 80)


def test_siphash_matches_the_reference_vectors() -> None:
    # From the SipHash paper (Aumasson & Bernstein), appendix A, and the
    # reference implementation's vectors.h: key 00..0f, message 00..(n-1).
    assert cookie.siphash24(KEY, bytes(range(15))) == 0xA129CA6149BE45E5
    assert cookie.siphash24(KEY, b"") == 0x726FDB47DD0E0E31
    assert cookie.siphash24(KEY, bytes(range(8))) == 0x93F5F5799A932462


def test_siphash_rejects_a_short_key() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        cookie.siphash24(b"short", b"")


OPTION_SPACE = [
    SynOptions(mss, ws, sack, ecn)
    for mss, ws, sack, ecn in itertools.product(
        cookie.MSS_TABLE, [None, *range(15)], [False, True], [False, True])
]


@pytest.mark.parametrize("tup", [V4, V6], ids=["ipv4", "ipv6"])
def test_every_option_combination_round_trips(tup: tuple[str, str, int, int]) -> None:
    for i, opts in enumerate(OPTION_SPACE):
        isn = 1000 + 7919 * i
        c = cookie.make_cookie(KEY, *tup, isn, opts)
        assert cookie.check_cookie([KEY], *tup, isn + 1, c + 1) == opts


def test_client_mss_maps_to_the_largest_class_not_above_it() -> None:
    assert [cookie.mss_index(m) for m in (100, 536, 1299, 1300, 1452, 1460, 9000)] == \
        [0, 0, 0, 1, 2, 3, 3]


def test_wscale_above_14_is_clamped() -> None:
    assert SynOptions.decode(SynOptions(wscale=15 + 3).encode()).wscale == 14


def test_previous_secret_is_accepted_and_others_are_not() -> None:
    c = cookie.make_cookie(OTHER, *V4, 5, SynOptions())
    assert cookie.check_cookie([KEY, OTHER], *V4, 6, c + 1) == SynOptions()
    assert cookie.check_cookie([KEY], *V4, 6, c + 1) is None


@pytest.mark.parametrize("change", ["saddr", "sport", "dport", "isn", "cookie"])
def test_any_changed_field_invalidates_the_cookie(change: str) -> None:
    saddr, daddr, sport, dport = V4
    c = cookie.make_cookie(KEY, saddr, daddr, sport, dport, 77, SynOptions(1460, 7, True))
    seq, ack = 78, c + 1
    if change == "saddr":
        saddr = "198.51.100.3"
    elif change == "sport":
        sport += 1
    elif change == "dport":
        dport += 1
    elif change == "isn":
        seq += 1
    else:
        ack ^= 1 << 20
    assert cookie.check_cookie([KEY], saddr, daddr, sport, dport, seq, ack) is None


def test_wrapping_sequence_numbers() -> None:
    c = cookie.make_cookie(KEY, *V4, 0xFFFFFFFF, SynOptions())
    assert cookie.check_cookie([KEY], *V4, 0, (c + 1) & 0xFFFFFFFF) == SynOptions()


def test_mixed_families_are_rejected() -> None:
    with pytest.raises(ValueError, match="families"):
        cookie.make_cookie(KEY, "198.51.100.2", "2001:db8:1::10", 1, 2, 3, SynOptions())


def test_epoch_keys_differ_per_epoch_and_secret() -> None:
    s1, s2 = bytes(range(16)), bytes(range(1, 17))
    k = cookie.epoch_key(s1, 100)
    assert len(k) == 16
    assert k != cookie.epoch_key(s1, 101)
    assert k != cookie.epoch_key(s2, 100)
    assert cookie.current_keys(s1, 64, 64 * 100 + 5.5) == [k, cookie.epoch_key(s1, 99)]
