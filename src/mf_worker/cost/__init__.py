"""Cost control: what each model costs (``pricing``) and the per-organisation daily limit.

The engine sees this surface and never the cost SQL: :func:`reserve` an attempt's worst case
(:class:`Granted`, or a refusal: :class:`CostLimitReached`, :class:`LeaseLost`),
:func:`settle` a failed attempt's known usage, and on a refusal :func:`trip_breaker` (block the
organisation, record the day's trip) and :func:`deliver_trip` (notify). A reservation is
released by the database: a trigger gives it back when its item leaves ``processing``.
"""

from ..errors import LeaseLost
from .budget import (
    Budget,
    CostLimitReached,
    Granted,
    PendingReservation,
    Reservation,
    Trip,
    TripNotifier,
    deliver_trip,
    reserve,
    settle,
    trip_breaker,
    usage_rows,
)

__all__ = [
    "Budget",
    "CostLimitReached",
    "Granted",
    "LeaseLost",
    "PendingReservation",
    "Reservation",
    "Trip",
    "TripNotifier",
    "deliver_trip",
    "reserve",
    "settle",
    "trip_breaker",
    "usage_rows",
]
