"""The retry rule: exponential backoff with jitter, capped, honouring a provider's Retry-After.

Attempt n (1-based) that failed transiently waits about min(1 s · 2^(n−1), 300 s): 1, 2, 4, 8 …
capped at five minutes. Jitter of ±20 % spreads retries so many items that failed together (a
provider outage) do not come back together. A provider's ``retry_after`` wins when it is longer,
up to an hour, so one absurd header cannot park an item for days.
"""

from __future__ import annotations

import random
from typing import Final

BASE_SECONDS: Final = 1.0
CAP_SECONDS: Final = 300.0
JITTER: Final = 0.2
RETRY_AFTER_CAP_SECONDS: Final = 3600.0


def retry_delay(
    attempt: int, retry_after: float | None = None, rng: random.Random | None = None
) -> float:
    """Seconds to wait before the next attempt after attempt ``attempt`` failed."""
    exponent = max(attempt - 1, 0)
    base = CAP_SECONDS if exponent >= 9 else min(BASE_SECONDS * 2**exponent, CAP_SECONDS)
    jitter = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    delay = min(base * jitter, CAP_SECONDS)
    if retry_after is not None and retry_after > delay:
        delay = min(retry_after, RETRY_AFTER_CAP_SECONDS)
    return delay


def transient_backoff(rng: random.Random | None = None) -> tuple[float, float, float]:
    """(base, cap, jitter factor) for a transient failure whose exponent is read under the
    item's row lock (``queue.defer_item``: the item's ``retry_count``): the same rule as
    `retry_delay`, 1 s · 2^n capped at five minutes, ±20 %."""
    return BASE_SECONDS, CAP_SECONDS, (rng or random).uniform(1 - JITTER, 1 + JITTER)
