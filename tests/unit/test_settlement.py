"""The settlement rule (`cost.settlement`): what an attempt books for each provider call, by
what the provider did with it. Pure: no database."""

from __future__ import annotations

from decimal import Decimal

from mf_worker.cost import Booking, settlement
from mf_worker.cost.pricing import load_price_table
from mf_worker.generation import CallOutcome, ProviderCall, TokenUsage

PRICES = load_price_table()
MODEL = "gpt-4o"  # £2.00 / £8.00 per million tokens in the shipped table
DRAFT = TokenUsage(MODEL, 1_000, 500)
BOUND = TokenUsage(MODEL, 4_000, 1_000)


def call(outcome: CallOutcome, usage: TokenUsage | None = None,
         bound: TokenUsage | None = BOUND) -> ProviderCall:
    made = ProviderCall("call", max_usage=bound)
    if outcome is CallOutcome.ANSWERED:
        assert usage is not None
        made.answered(usage)
    elif outcome is CallOutcome.REFUSED:
        made.refused()
    return made


def test_an_answered_call_books_its_usage_a_refused_one_nothing_an_unknown_one_its_bound() -> None:
    booked = settlement([call(CallOutcome.ANSWERED, DRAFT), call(CallOutcome.REFUSED),
                         call(CallOutcome.UNKNOWN)], reserved=Decimal(1), prices=PRICES)
    assert booked == (Booking(PRICES.cost(DRAFT), DRAFT), Booking(PRICES.cost(BOUND)))
    assert [b.estimated for b in booked] == [False, True]


def test_an_unknown_call_without_a_bound_books_what_is_left_of_the_reservation() -> None:
    reserved = Decimal("0.05")
    booked = settlement([call(CallOutcome.ANSWERED, DRAFT), call(CallOutcome.UNKNOWN, bound=None)],
                        reserved=reserved, prices=PRICES)
    assert sum(b.cost for b in booked) == reserved
    assert booked[1] == Booking(reserved - PRICES.cost(DRAFT))


def test_nothing_is_booked_for_refused_calls_or_a_free_attempt() -> None:
    assert settlement([call(CallOutcome.REFUSED)] * 3, reserved=Decimal(1), prices=PRICES) == ()
    assert settlement([call(CallOutcome.UNKNOWN, bound=None)], reserved=Decimal(0),
                      prices=PRICES) == ()
