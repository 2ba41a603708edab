"""Ids: prefix, 26 Crockford base-32 digits, the creation millisecond in front."""

from __future__ import annotations

import re
import time

from mf_worker.ids import new_id

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def test_an_id_carries_its_creation_millisecond_and_sorts_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_id("ep")
    time.sleep(0.002)
    second = new_id("ep")
    after = time.time_ns() // 1_000_000

    for made in (first, second):
        assert re.fullmatch(r"ep_[0-9a-hjkmnp-tv-z]{26}", made), made
        value = 0
        for digit in made.removeprefix("ep_"):
            value = value * 32 + ALPHABET.index(digit)
        assert before <= value >> 80 <= after  # 48 bits of milliseconds, then 80 random
    assert first < second
    assert len({new_id("blk") for _ in range(1000)}) == 1000
