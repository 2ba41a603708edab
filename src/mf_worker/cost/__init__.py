"""Cost control: what each model costs (``pricing``) and the per-organisation daily limit.

The engine sees this surface and never the cost SQL: :func:`reserve` an attempt's worst case
(:class:`Granted`, or a refusal: :class:`CostLimitReached`, :class:`LeaseLost`),
:func:`settle` what an attempt that did not succeed owes (:func:`settlement`: each provider
call booked by what the provider did with it), and on a refusal :func:`trip_breaker` (block the
organisation, record the day's trip) and :func:`deliver_trip` (notify). A reservation is
released by the database: a trigger gives it back when its item leaves ``processing``.
"""

from ..errors import LeaseLost
from .budget import (
    Booking,
    Budget,
    CostLimitReached,
    Granted,
    PendingReservation,
    Reservation,
    Trip,
    TripNotifier,
    booking_rows,
    deliver_trip,
    reserve,
    settle,
    settlement,
    trip_breaker,
    usage_rows,
)

__all__ = [
    "Booking",
    "Budget",
    "CostLimitReached",
    "Granted",
    "LeaseLost",
    "PendingReservation",
    "Reservation",
    "Trip",
    "TripNotifier",
    "booking_rows",
    "deliver_trip",
    "reserve",
    "settle",
    "settlement",
    "trip_breaker",
    "usage_rows",
]
