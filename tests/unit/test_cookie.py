"""The reference SYN cookie: SipHash, option encoding, validation."""

from __future__ import annotations

import itertools

import pytest

from ipvs_synproxy.kernel import cookie
from ipvs_synproxy.kernel.cookie import SynOptions

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


def test_the_announced_window_scale_is_part_of_the_key() -> None:
    s1 = bytes(range(16))
    keys = {cookie.epoch_key(s1, 100, ws) for ws in range(cookie.WSCALE_MAX + 1)}
    assert len(keys) == cookie.WSCALE_MAX + 1
    assert cookie.epoch_key(s1, 100) == cookie.epoch_key(s1, 100, cookie.DEFAULT_WSCALE)
    assert cookie.current_keys(s1, 64, 6400, wscale=3)[0] == cookie.epoch_key(s1, 100, 3)
    with pytest.raises(ValueError, match="window scale"):
        cookie.epoch_key(s1, 100, 15)


@pytest.mark.parametrize("tup", [V4, V6], ids=["ipv4", "ipv6"])
def test_a_timestamp_ack_must_echo_the_tsval_hash_bits(tup: tuple[str, str, int, int]
                                                       ) -> None:
    opts = SynOptions(1460, 7, True)
    for isn in (0, 77, 0xFFFFFFFF, 123456789):
        c = cookie.make_cookie(KEY, *tup, isn, opts)
        tsval = cookie.make_tsval(KEY, *tup, isn, 0x12345678)
        assert tsval & ~cookie.TS_BITS == 0x12345600, "the clock keeps the high bits"
        ack = ((isn + 1) & 0xFFFFFFFF, (c + 1) & 0xFFFFFFFF)
        assert cookie.check_cookie([KEY], *tup, *ack, tsecr=tsval) == opts
        # every other low byte fails: 8 more bits to guess
        bad = [b for b in range(256)
               if cookie.check_cookie([KEY], *tup, *ack, tsecr=(tsval & ~0xFF) | b)]
        assert bad == [tsval & 0xFF]
        # without a timestamp the ISN alone decides
        assert cookie.check_cookie([KEY], *tup, *ack) == opts


def test_a_forged_ack_matches_one_in_2_to_the_24_without_and_2_to_the_32_with_ts() -> None:
    # Counted, not assumed: over 2**16 random ISNs of one tuple, how many of
    # 256 ack values sharing the top 16 bits of a real cookie pass is what the
    # 24 bits predict (1 in 256 of those), and with a random TSecr 1 in 256 less.
    import random

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    isn = rng.getrandbits(32)
    c = cookie.make_cookie(KEY, *V4, isn, SynOptions())
    top = c & 0xFFFF0000
    passed = [a for a in range(top, top + 0x10000)
              if cookie.check_cookie([KEY], *V4, isn + 1, a + 1)]
    # the 8 option bits are not checked: exactly the 256 values of the cookie's
    # own 24-bit prefix pass
    assert len(passed) == 256 and all(a >> 8 == c >> 8 for a in passed), seed
    with_ts = [a for a in passed
               if cookie.check_cookie([KEY], *V4, isn + 1, a + 1, tsecr=rng.getrandbits(32))]
    assert len(with_ts) <= 8, (seed, len(with_ts))
