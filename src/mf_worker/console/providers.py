"""The providers page: each limit key's buckets, rates, cooldown and quota pauses (the fleet's
shared limiter, `flow.limiter`), and the items waiting on them."""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from ..db.sql import load_queries
from ..flow.limiter import read_limits
from .app import Context

_Q = load_queries(__package__ or "mf_worker.console", "providers.sql")


async def show(request: Request, ctx: Context) -> Response:
    now = datetime.now(UTC)
    async with ctx.console.connection() as conn:
        keys = await read_limits(conn, now=now)
        deferred = await (await conn.execute(_Q["count_deferred_by_reason"], {"now": now}))\
            .fetchall()
    done = ("Reset: the key admits calls again, with full buckets and no learnt rates."
            if request.query_params.get("done") == "reset" else None)
    return ctx.render("providers.html", keys=keys, deferred=deferred, now=now, done=done)
