"""The items list (filtered, keyset-paginated), one item's page and one project's page.

An item's page answers "why did this project get no episode, and what did it cost?": a
timeline assembled from the queue row (planned, claimed by which worker with which claim
token, deferrals, the last error, finished, published or withdrawn), the episode's attempt
history, the usage booked for it (real or estimated) and the audit rows, then the episode
itself with its blocks rendered as sanitised markdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response

from ..db import as_org
from ..db.sql import load_queries
from ..observability.queue_depth import STATUSES
from .app import Context, query_args
from .render import render_markdown

_Q = load_queries(__package__ or "mf_worker.console", "items.sql")
PAGE: Final = 50
# What the item page says after an action (chosen by key: no text from the URL is shown).
DONE: Final = {
    "retried": "Retried: the item is pending and due now, with fresh attempts.",
    "cancelled": "Cancelled: the scheduler plans the project's next occurrence.",
    "enqueued": "Enqueued: a new item is due now.",
}


def _instant(text: str | None) -> datetime | None:
    """An ISO date or date-time from a filter field (UTC when it names no zone)."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


async def list_items(request: Request, ctx: Context) -> Response:
    q = request.query_params
    texts: dict[str, str | None] = {
        "status": q.get("status") if q.get("status") in STATUSES else None,
        "organization": q.get("organization", "").strip() or None,
        "project": q.get("project", "").strip() or None,
        "error": q.get("error", "").strip()[:200] or None,
        "since": q.get("since", "").strip() or None,
        "until": q.get("until", "").strip() or None,
    }
    after_at, _, after_id = q.get("after", "").partition("~")
    params = {"status": texts["status"], "organization_id": texts["organization"],
              "project_id": texts["project"], "error": texts["error"],
              "since": _instant(texts["since"]), "until": _instant(texts["until"]),
              "after_at": _instant(after_at), "after_id": after_id or None, "limit": PAGE + 1}
    async with ctx.console.connection() as conn:
        # Unprepared: planned for these values every time, so each filter left empty folds
        # away and the plan uses the index that filter needs (a prepared statement would
        # settle on one generic plan for every combination of filters).
        rows = await (await conn.execute(_Q["list_items_page"], params,
                                         prepare=False)).fetchall()
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    shown = texts
    next_link = None
    if more:
        last = rows[-1]
        cursor = f"{last['scheduled_for'].astimezone(UTC).isoformat()}~{last['id']}"
        next_link = "/items?" + query_args({**shown, "after": cursor})
    return ctx.render("items.html", rows=rows, filters=shown, statuses=STATUSES,
                      next_link=next_link, first_link="/items?" + query_args(shown),
                      paged=bool(q.get("after")))


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a timeline."""

    at: datetime | None
    kind: str
    text: str


def timeline(item: dict[str, Any], episode: dict[str, Any] | None,
             usage: list[dict[str, Any]], audit: list[dict[str, Any]]) -> list[Event]:
    """What happened to an item, in order (events without an instant keep their place)."""
    now = datetime.now(UTC)
    events = [Event(item["created_at"], "planned",
                    f"planned for {item['scheduled_for'].astimezone(UTC):%Y-%m-%d %H:%M}Z"
                    + (f" ({item['metadata'].get('local_time')} {item['metadata'].get('zone')})"
                       if item["metadata"].get("zone") else "")
                    + f", claimable from {item['run_after'].astimezone(UTC):%H:%M:%S}Z")]
    if item["picked_up_at"]:
        events.append(Event(item["picked_up_at"], "claimed",
                            f"claimed by {item['locked_by'] or 'a worker'}"
                            + (f" with claim token {item['claim_token']}"
                               if item["claim_token"] is not None else "")
                            + f"; attempt {item['attempt_count']}"))
    if episode is not None:
        for n, error in enumerate(episode["generation_errors"], 1):
            events.append(Event(None, "attempt failed", f"attempt {n}: {error}"))
    if item["deferred_count"] or item["deferred_reason"]:
        events.append(Event(item["run_after"] if item["deferred_reason"] else None, "deferred",
                            f"deferred {item['deferred_count']} time(s) without using an "
                            f"attempt; last reason: {item['deferred_reason'] or '—'}"))
    if item["lost_count"]:
        events.append(Event(None, "lease lost",
                            f"{item['lost_count']} lease(s) expired and were reaped"))
    if item["last_attempt_at"]:
        events.append(Event(item["last_attempt_at"], "last attempt",
                            item["last_error"] or "no error"))
    if item["reserved_cost_gbp"] is not None:
        events.append(Event(None, "reserved",
                            f"£{item['reserved_cost_gbp']:.4f} worst case reserved on "
                            f"{item['reserved_on']}"))
    for u in usage:
        events.append(Event(u["created_at"], "usage estimated" if u["estimated"] else "usage",
                            f"{u['model']}: {u['prompt_tokens']} + {u['completion_tokens']} "
                            f"tokens, £{u['cost_gbp']:.4f}"
                            + (" (the reserved worst case: the provider's count is unknown)"
                               if u["estimated"] else "")
                            + f", billed to {u['billing_date']}"))
    for a in audit:
        events.append(Event(a["created_at"], "audit",
                            f"{a['action']} by {a['actor']}: {a['old_value']} → "
                            f"{a['new_value']}"))
    if item["status"] == "blocked":
        events.append(Event(item["updated_at"], "blocked",
                            f"cost limit reached on {item['blocked_on']}: "
                            f"{item['last_error'] or ''}"))
    if item["finished_at"]:
        events.append(Event(item["finished_at"], item["status"],
                            item["last_error"] or f"item {item['status']}"))
    if item["delivery"] == "scheduled":
        events.append(Event(item["scheduled_for"], "to publish",
                            "finished early: becomes visible at the delivery instant"))
    elif item["delivery"] == "published" or (episode and episode["published_at"]):
        events.append(Event(item["published_at"] or (episode or {}).get("published_at"),
                            "published", "the episode is visible to the user"))
    elif item["delivery"] == "withdrawn":
        events.append(Event(item["updated_at"], "withdrawn",
                            (episode or {}).get("withdrawn_reason") or "withdrawn"))
    dated = sorted((e for e in events if e.at is not None), key=lambda e: e.at or now)
    # Undated facts (an attempt's error, a reservation) go just before the item's end.
    end = next((i for i, e in enumerate(dated) if e.kind in
                (item["status"], "published", "withdrawn", "to publish")), len(dated))
    return dated[:end] + [e for e in events if e.at is None] + dated[end:]


async def show_item(request: Request, ctx: Context) -> Response:
    item_id = request.path_params["item_id"]
    episode: dict[str, Any] | None = None
    blocks: list[dict[str, Any]] = []
    usage: list[dict[str, Any]] = []
    async with ctx.console.connection() as conn:
        item = await (await conn.execute(_Q["get_item_detail"], {"id": item_id})).fetchone()
        if item is None:
            return ctx.render("error.html", status=404, heading="Not found",
                              message=f"No queue item {item_id}.")
        async with as_org(conn, item["organization_id"]):
            if item["episode_id"]:
                episode = await (await conn.execute(
                    _Q["get_episode"], {"episode_id": item["episode_id"]})).fetchone()
                blocks = list(await (await conn.execute(
                    _Q["list_episode_blocks"], {"episode_id": item["episode_id"]})).fetchall())
                usage = list(await (await conn.execute(
                    _Q["list_episode_usage"], {"episode_id": item["episode_id"]})).fetchall())
            audit = list(await (await conn.execute(_Q["list_item_audit"], {
                "organization_id": item["organization_id"], "id": item_id,
                "created_at": item["created_at"]})).fetchall())
    rendered = [{**b, "html": render_markdown(b["content"])} for b in blocks]
    cost = sum((u["cost_gbp"] for u in usage), start=0)
    return ctx.render("item.html", item=item, episode=episode, blocks=rendered, usage=usage,
                      cost=cost, events=timeline(item, episode, usage, audit),
                      done=DONE.get(request.query_params.get("done", "")))


async def show_project(request: Request, ctx: Context) -> Response:
    project_id = request.path_params["project_id"]
    async with ctx.console.connection() as conn:
        project = await (await conn.execute(_Q["get_project_detail"], {"id": project_id}))\
            .fetchone()
        if project is None:
            return ctx.render("error.html", status=404, heading="Not found",
                              message=f"No project {project_id}.")
        items = await (await conn.execute(_Q["list_project_items"],
                                          {"id": project_id, "limit": PAGE})).fetchall()
    return ctx.render("project.html", project=project, items=items)
