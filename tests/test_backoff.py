"""The one backoff object: every retry's delays, in literal seconds, as they were before the
retries shared it (the item backoff's own test is in test_engine)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from mf_worker.backoff import Backoff
from mf_worker.cost.notify import WebhookNotifier
from mf_worker.engine.worker import DB_RETRY
from mf_worker.maintenance.listener import RECONNECT


def test_listener_reconnects_after_1_2_4_seconds_up_to_half_a_minute() -> None:
    assert [RECONNECT.delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_webhook_waits_half_a_second_then_doubles_without_jitter_up_to_ten() -> None:
    backoff = WebhookNotifier("http://127.0.0.1:9/", backoff=0.5).backoff
    assert [backoff.wait(SimpleNamespace(attempt_number=n)) for n in range(1, 8)] == [
        0.5, 1, 2, 4, 8, 10, 10]


def test_database_retries_add_up_to_a_second_of_jitter_and_stay_under_five_seconds() -> None:
    """tenacity's wait_exponential_jitter(multiplier=0.2, max=5): 0.2 · 2^(n−1) + U(0, 1)."""
    rng = random.Random(3)
    for attempt, base in [(1, 0.2), (2, 0.4), (3, 0.8), (4, 1.6)]:
        delays = [DB_RETRY.delay(attempt, rng=rng) for _ in range(300)]
        assert base <= min(delays) < base + 0.05 and base + 0.95 < max(delays) <= base + 1.0
    assert {DB_RETRY.delay(n, rng=rng) for n in range(6, 2000, 7)} == {5.0}  # no overflow


def test_retry_after_is_ignored_unless_the_policy_honours_it() -> None:
    assert Backoff(initial=1, cap=10).delay(1, retry_after=7) == 1
    assert Backoff(initial=1, cap=10, retry_after_cap=60).delay(1, retry_after=7) == 7
    assert Backoff(initial=1, cap=10, retry_after_cap=60).delay(1, retry_after=600) == 60


@pytest.mark.parametrize("kwargs", [
    {"initial": 0}, {"initial": -1}, {"factor": 0.5}, {"initial": 5, "cap": 1},
    {"jitter": 1.0}, {"jitter": -0.1}, {"jitter_seconds": -1}, {"retry_after_cap": 0},
])
def test_an_invalid_policy_is_refused_when_declared(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(**kwargs)
