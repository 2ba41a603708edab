"""The retry rule, one object for every retry: exponential backoff, capped, jittered, honouring
a provider's Retry-After.

:class:`Backoff` is a small, immutable policy in psycopg_pool's manner (initial delay, growth
factor, cap, jitter): ``delay(n)`` is how long to wait after the n-th consecutive failure
(1-based). Every retry in mf-worker draws its delays from one, each with its own numbers:

* a queue item's transient failure (:data:`ITEM_RETRY`: 1 s · 2^(n−1), five-minute cap, ±20 %,
  a Retry-After up to an hour wins). The delay is computed by ``queue.defer_item`` under the
  item's row lock from the item's ``retry_count``, so the statement takes this policy's
  ``initial`` and ``cap`` and one jitter draw (:meth:`Backoff.jitter_factor`);
* a database call the engine retries while the database is away, the claim loop's retry after
  a failed claim, the LISTEN connection's reconnect, and the webhook and SMTP notifiers, each
  declared beside its retry loop.

Jitter spreads retries so many callers that failed together (a provider outage, a database
restart) do not come back together. It comes in two kinds, because both are in use: relative
(``jitter``: ±a share of the delay, as the item backoff does) and additive (``jitter_seconds``:
0 to that many seconds added, as tenacity's ``wait_exponential_jitter`` does). The cap bounds
the jittered delay.

This module imports nothing from the rest of mf-worker, so any layer may use it; a generator's
own retry loop can too (``delay(attempt, retry_after=…)`` honours the server's Retry-After).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["ITEM_RETRY", "Attempted", "Backoff"]


class Attempted(Protocol):
    """Anything that counts attempts (tenacity's ``RetryCallState`` does)."""

    @property
    def attempt_number(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait after the n-th consecutive failure; immutable, so shared freely."""

    # Seconds to wait after the first failure.
    initial: float = 1.0
    # Each further failure multiplies the wait by this (2: the wait doubles).
    factor: float = 2.0
    # No wait is longer than this many seconds, jitter included.
    cap: float = 300.0
    # Relative jitter: the wait is multiplied by a uniform draw in [1 − jitter, 1 + jitter].
    jitter: float = 0.0
    # Additive jitter: a uniform draw in [0, jitter_seconds] seconds is added to the wait.
    jitter_seconds: float = 0.0
    # A caller's Retry-After longer than the computed wait replaces it, up to this many seconds
    # (one absurd header must not park work for days). None: Retry-After is not honoured.
    retry_after_cap: float | None = None

    def __post_init__(self) -> None:
        if not (self.initial > 0 and math.isfinite(self.initial)):
            raise ValueError(f"backoff: initial must be a positive number, got {self.initial}")
        if not (self.factor >= 1 and math.isfinite(self.factor)):
            raise ValueError(f"backoff: factor must be at least 1, got {self.factor}")
        if not self.cap >= self.initial:
            raise ValueError(f"backoff: cap ({self.cap}) must be at least initial "
                             f"({self.initial})")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff: jitter must be in [0, 1), got {self.jitter}")
        if not self.jitter_seconds >= 0:
            raise ValueError(f"backoff: jitter_seconds must not be negative, got "
                             f"{self.jitter_seconds}")
        if self.retry_after_cap is not None and not self.retry_after_cap > 0:
            raise ValueError(f"backoff: retry_after_cap must be positive, got "
                             f"{self.retry_after_cap}")

    def base(self, attempt: int) -> float:
        """The wait after failure ``attempt`` (1-based) before jitter: initial · factor^(n−1),
        capped (no overflow however many failures)."""
        try:
            grown = self.initial * self.factor ** max(attempt - 1, 0)
        except OverflowError:
            return self.cap
        return min(grown, self.cap)

    def jitter_factor(self, rng: random.Random | None = None) -> float:
        """One draw of the relative jitter (1.0 without it)."""
        if not self.jitter:
            return 1.0
        return (rng or random).uniform(1 - self.jitter, 1 + self.jitter)

    def delay(self, attempt: int, retry_after: float | None = None,
              rng: random.Random | None = None) -> float:
        """Seconds to wait after failure ``attempt`` (1-based): the jittered base, at most
        the cap, or the caller's ``retry_after`` when that is longer (up to
        ``retry_after_cap``; ignored without one)."""
        wait = self.base(attempt) * self.jitter_factor(rng)
        if self.jitter_seconds:
            wait += (rng or random).uniform(0, self.jitter_seconds)
        wait = min(wait, self.cap)
        if self.retry_after_cap is not None and retry_after is not None and retry_after > wait:
            wait = min(retry_after, self.retry_after_cap)
        return wait

    def wait(self, state: Attempted) -> float:
        """The delay after ``state.attempt_number`` failures: usable as tenacity's ``wait=``."""
        return self.delay(state.attempt_number)


# A queue item's transient failure: 1, 2, 4, 8 … seconds ±20 %, capped at five minutes; a
# provider's longer Retry-After wins, up to an hour. (The statement that applies it,
# ``queue.defer_item``, grows the wait by 2 per retry itself: keep ``factor`` at 2.)
ITEM_RETRY: Final = Backoff(initial=1.0, factor=2.0, cap=300.0, jitter=0.2,
                            retry_after_cap=3600.0)
