"""Readable, time-ordered ids with a prefix that says what they are (``queue_…``, ``ep_…``).

26 lowercase base-32 characters after the prefix: 48 bits of milliseconds then 80 random bits,
so ids sort roughly by creation time (friendly to B-tree indexes) and never collide in practice.
The schema only requires text: ids written by other software work as well.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base 32, lowercase
# Two digits per 10 bits, from a table: a dozen ids per final write made the digit-by-digit
# loop show in profiles.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
_SHIFTS = range(120, -1, -10)  # 13 pairs: the 130-bit big-endian value


def new_id(prefix: str) -> str:
    """A new id such as ``queue_01jd3k…``."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return prefix + "_" + "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])
