"""The organisations page: today's spend (measured, estimated, reserved) against each limit,
the day's cost-limit trip and its notification, and the items it blocked."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from ..db.sql import load_queries
from .app import Context

_Q = load_queries(__package__ or "mf_worker.console", "organizations.sql")


async def show(request: Request, ctx: Context) -> Response:
    now = datetime.now(UTC)
    org = request.query_params.get("organization", "").strip() or None
    async with ctx.console.connection() as conn:
        rows = await (await conn.execute(_Q["list_organizations_today"], {
            "date": now.date(), "default_limit": ctx.console.settings.daily_cost_limit_gbp,
            "organization_id": org, "limit": 200,
        }, prepare=False)).fetchall()  # planned per filter, as the items list
    return ctx.render("organizations.html", rows=rows, today=now.date(), organization=org)
