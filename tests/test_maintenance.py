"""The shape every maintenance loop shares, and the event hub they publish on: no database
needed (each loop's run_once against a real database is tested beside its feature)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from mf_worker.engine.events import EventHub, TripNotified
from mf_worker.maintenance.budget import BudgetConfig
from mf_worker.maintenance.listener import ListenerConfig
from mf_worker.maintenance.loop import PeriodicLoop
from mf_worker.maintenance.pruner import PrunerConfig
from mf_worker.maintenance.publisher import PublisherConfig
from mf_worker.maintenance.reaper import ReaperConfig
from mf_worker.maintenance.scheduler import SchedulerConfig


@dataclass(frozen=True)
class Base:
    n: int


@dataclass(frozen=True)
class Derived(Base):
    pass


def test_a_subscriber_gets_its_type_and_its_subtypes_in_order() -> None:
    hub, seen = EventHub(), []
    hub.subscribe(Base, lambda e: seen.append(("base", e.n)))
    hub.subscribe(Derived, lambda e: seen.append(("derived", e.n)))
    hub.subscribe(TripNotified, lambda e: seen.append(("trip", e.delivered)))
    hub.publish(Base(1))
    hub.publish(Derived(2))
    hub.publish(object())  # nobody listens: nothing happens
    assert seen == [("base", 1), ("derived", 2), ("base", 2)]


def test_a_failing_subscriber_does_not_fail_the_producer_or_the_others() -> None:
    hub, seen = EventHub(), []

    def broken(_event: Base) -> None:
        raise RuntimeError("a bug in a metric")

    hub.subscribe(Base, broken)
    hub.subscribe(Base, lambda e: seen.append(e.n))
    hub.publish(Base(3))
    assert seen == [3]


@pytest.mark.parametrize(("config", "kwargs"), [
    (ReaperConfig, {"lease_seconds": 0, "max_attempts": 3}),
    (ReaperConfig, {"lease_seconds": 60, "max_attempts": 0}),
    (PrunerConfig, {"retention_days": 0}),
    (PrunerConfig, {"retention_days": 30, "batch_size": 0}),
    (PublisherConfig, {"max_wait": 0}),
    (ListenerConfig, {"ping_interval": -1}),
    (SchedulerConfig, {"interval": 0}),
    (SchedulerConfig, {"lead_seconds": -1}),
    (BudgetConfig, {"policy": "forgive", "default_limit": Decimal(50),
                    "reserve_per_item": Decimal("0.5")}),
    (BudgetConfig, {"policy": "resume", "default_limit": Decimal(50),
                    "reserve_per_item": Decimal("0.5"), "interval": 0}),
])
def test_a_config_is_validated_when_it_is_built(config: Any, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"must|policy"):
        config(**kwargs)


def test_the_reaper_polls_a_quarter_of_the_lease_between_half_a_second_and_30_s() -> None:
    assert [ReaperConfig(lease_seconds=s, max_attempts=3).interval for s in (1, 60, 600)] == [
        0.5, 15.0, 30.0]


class Counting(PeriodicLoop[int]):
    name = "counting"

    def __init__(self) -> None:
        super().__init__(0.01)
        self.passes: list[datetime | None] = []

    async def run_once(self, now: datetime | None = None) -> int:
        self.passes.append(now)
        if len(self.passes) == 2:
            raise RuntimeError("one bad pass")
        if len(self.passes) == 4:
            self.stop()
            self.stop()  # twice is fine
        return len(self.passes)


def test_run_repeats_run_once_past_a_failed_pass_until_stopped() -> None:
    loop = Counting()
    asyncio.run(asyncio.wait_for(loop.run(), 5))
    assert loop.passes == [None] * 4
    instant = datetime(2030, 1, 1, tzinfo=UTC)
    assert asyncio.run(loop.run_once(instant)) == 5 and loop.passes[-1] == instant
