"""The operator's actions: retry, cancel (with a reason), enqueue now for a project, and
reset a provider limit key.

Each one is a GET that shows what will happen and asks for confirmation, and a POST (an
operator's, with the form's CSRF token: `app.action`) that does it through the command line's
own code, `status.retry_queue_item`, `status.cancel_queue_item` and
`scheduling.scheduler.enqueue_item` — the same transitions and the same audit rows as
``mf-worker retry|cancel|enqueue``, with the signed-in user as the actor — then shows the result
on the item's page. A refusal (the item moved on meanwhile) is shown on the confirmation page.
A key reset goes through `flow.limiter.reset_limit` and writes a fleet-wide audit row
(`audit.record_fleet_action`: it belongs to no organisation).
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..audit import record_fleet_action
from ..errors import MfWorkerError
from ..flow.limiter import reset_limit
from ..logs import get_logger
from ..queue import get_item
from ..scheduling.scheduler import enqueue_item
from ..status import cancel_queue_item, retry_queue_item
from .app import Context, action, page

__all__ = ["routes"]

log = get_logger("mf_worker.console")

async def _confirm_item(request: Request, ctx: Context, verb: str) -> Response:
    item_id = request.path_params["item_id"]
    async with ctx.console.connection() as conn:
        item = await get_item(conn, item_id)
    if item is None:
        return ctx.render("error.html", status=404, heading="Not found",
                          message=f"No queue item {item_id}.")
    return ctx.render("confirm.html", verb=verb, item=item, project=None, error=None,
                      reason="")


async def confirm_retry(request: Request, ctx: Context) -> Response:
    return await _confirm_item(request, ctx, "retry")


async def confirm_cancel(request: Request, ctx: Context) -> Response:
    return await _confirm_item(request, ctx, "cancel")


async def _refused(ctx: Context, verb: str, error: MfWorkerError, *, item_id: str | None = None,
                   project_id: str | None = None, reason: str = "") -> Response:
    async with ctx.console.connection() as conn:
        item = await get_item(conn, item_id) if item_id else None
    return ctx.render("confirm.html", status=409, verb=verb, item=item,
                      project={"id": project_id} if project_id else None, error=str(error),
                      reason=reason)


async def retry(request: Request, ctx: Context, form: FormData) -> Response:
    item_id = request.path_params["item_id"]
    try:
        async with ctx.console.connection() as conn:
            await retry_queue_item(conn, item_id, actor=ctx.actor)
    except MfWorkerError as exc:
        return await _refused(ctx, "retry", exc, item_id=item_id)
    log.info("console_item_retried", item_id=item_id, actor=ctx.actor)
    return RedirectResponse(f"/items/{item_id}?done=retried", status_code=303)


async def cancel(request: Request, ctx: Context, form: FormData) -> Response:
    item_id = request.path_params["item_id"]
    reason = str(form.get("reason") or "").strip()[:500]
    if not reason:
        return await _refused(ctx, "cancel", MfWorkerError("give a reason for the cancel"),
                              item_id=item_id)
    try:
        async with ctx.console.connection() as conn:
            await cancel_queue_item(conn, item_id, reason, actor=ctx.actor)
    except MfWorkerError as exc:
        return await _refused(ctx, "cancel", exc, item_id=item_id, reason=reason)
    log.info("console_item_cancelled", item_id=item_id, actor=ctx.actor)
    return RedirectResponse(f"/items/{item_id}?done=cancelled", status_code=303)


async def confirm_enqueue(request: Request, ctx: Context) -> Response:
    return ctx.render("confirm.html", verb="enqueue", item=None, error=None, reason="",
                      project={"id": request.path_params["project_id"]})


async def enqueue(request: Request, ctx: Context, form: FormData) -> Response:
    project_id = request.path_params["project_id"]
    try:
        async with ctx.console.connection() as conn:
            item_id, _due = await enqueue_item(
                conn, project_id, at=None, replace=False, now=datetime.now(UTC),
                actor=ctx.actor, lead_seconds=ctx.console.settings.lead_seconds)
    except MfWorkerError as exc:
        return await _refused(ctx, "enqueue", exc, project_id=project_id)
    log.info("console_item_enqueued", item_id=item_id, project_id=project_id, actor=ctx.actor)
    return RedirectResponse(f"/items/{item_id}?done=enqueued", status_code=303)


async def confirm_reset(request: Request, ctx: Context) -> Response:
    return ctx.render("confirm.html", verb="reset", item=None, project=None, error=None,
                      reason="", key=request.query_params.get("key", ""))


async def reset(request: Request, ctx: Context, form: FormData) -> Response:
    key = str(form.get("key") or "")
    async with ctx.console.connection() as conn, conn.transaction():
        old = await reset_limit(conn, key)
        if old is not None:
            await record_fleet_action(
                conn, actor=ctx.actor, action="provider_limit.reset", resource_id=key,
                old_value=old["old_cooldown_reason"] or "no cooldown", new_value="reset")
    if old is None:
        return ctx.render("confirm.html", status=409, verb="reset", item=None, project=None,
                          reason="", key=key, error=f"no provider limit key {key!r}")
    log.info("console_provider_key_reset", limit_key=key, actor=ctx.actor,
             ended=old["old_cooldown_reason"])
    return RedirectResponse("/providers?done=reset", status_code=303)


def routes() -> list[Route]:
    return [
        Route("/items/{item_id}/retry", page(confirm_retry), methods=["GET"]),
        Route("/items/{item_id}/retry", action(retry), methods=["POST"]),
        Route("/items/{item_id}/cancel", page(confirm_cancel), methods=["GET"]),
        Route("/items/{item_id}/cancel", action(cancel), methods=["POST"]),
        Route("/projects/{project_id}/enqueue", page(confirm_enqueue), methods=["GET"]),
        Route("/projects/{project_id}/enqueue", action(enqueue), methods=["POST"]),
        Route("/providers/reset", page(confirm_reset), methods=["GET"]),
        Route("/providers/reset", action(reset), methods=["POST"]),
    ]
