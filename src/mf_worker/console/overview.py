"""The overview page: the fleet at a glance.

Items by state, due and late now (the metrics' own reading, `observability.queue_depth`),
throughput and failures over the last hour, provider keys on hold, organisations blocked or
near their limit, and the next 24 hours of deliveries by hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from starlette.requests import Request
from starlette.responses import Response

from ..cost.budget import list_blocked_orgs
from ..db.sql import load_queries
from ..observability.queue_depth import STATUSES, read_queue_depth
from .app import Context
from .render import Bar, bar_chart

_Q = load_queries(__package__ or "mf_worker.console", "overview.sql")


async def show(request: Request, ctx: Context) -> Response:
    now = datetime.now(UTC)
    settings = ctx.console.settings
    async with ctx.console.connection() as conn:
        depth = await read_queue_depth(conn, now=now)
        finished = await (await conn.execute(_Q["count_finished_by_slot"], {"now": now}))\
            .fetchall()
        waves = await (await conn.execute(_Q["count_deliveries_by_hour"], {"now": now}))\
            .fetchall()
        near = await (await conn.execute(_Q["list_organizations_near_limit"], {
            "date": now.date(), "default_limit": settings.daily_cost_limit_gbp, "limit": 20,
        })).fetchall()
        blocked = await list_blocked_orgs(conn, day=now.date(),
                                          default_limit=settings.daily_cost_limit_gbp)
    slots = {(r["slot"], r["status"]): r["items"] for r in finished}
    throughput = [
        Bar((now - timedelta(minutes=5 * (11 - i))).strftime("%H:%M"),
            (slots.get((11 - i, "completed"), 0), slots.get((11 - i, "failed"), 0)))
        for i in range(12)
    ]
    hours = {r["hour"]: r["items"] for r in waves}
    deliveries = [Bar((now + timedelta(hours=h)).strftime("%H"), (hours.get(h, 0),))
                  for h in range(24)]
    return ctx.render(
        "overview.html", now=now, statuses=STATUSES, depth=depth,
        on_hold=[k for k in depth["limits"] if k["cooldown_until"]],
        near=near, blocked=blocked,
        completed_hour=sum(b.values[0] for b in throughput),
        failed_hour=sum(b.values[1] for b in throughput),
        throughput_chart=bar_chart(throughput, title="Finished per 5 minutes, last hour",
                                   series=("completed", "failed")),
        deliveries_chart=bar_chart(deliveries, title="Deliveries due per hour, next 24 h (UTC)",
                                   series=("due",)),
        deliveries_total=sum(hours.values()),
    )
