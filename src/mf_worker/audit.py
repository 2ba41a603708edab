"""The audit trail of what operators do by hand: ``retry``, ``cancel``, ``enqueue`` (and the
item ``enqueue --replace`` cancels) each write one ``audit_log`` row, in the same transaction
as the change, naming the actor (``--actor``, else the OS user who ran the command), the
action, the queue item and its old and new status.
"""

from __future__ import annotations

import os
import pwd

from .db import Connection, act_for
from .db.sql import load_queries
from .ids import new_id

__all__ = [
    "default_actor", "record_fleet_action", "record_operator_action", "validate_actor",
]

_Q = load_queries(__package__ or "mf_worker", "audit.sql")


def default_actor() -> str:
    """The OS user running the command (its uid when the user database has no name for it,
    as in a container run with an arbitrary uid)."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def validate_actor(actor: str) -> str:
    """The actor, stripped; ValueError when it is blank or absurdly long."""
    text = actor.strip()
    if not text:
        raise ValueError("must name who is acting (e.g. an email address), not be blank")
    if len(text) > 200 or any(ord(c) < 32 for c in text):
        raise ValueError("must be one line of at most 200 characters")
    return text


async def record_operator_action(
    conn: Connection, *, actor: str, organization_id: str, action: str, item_id: str,
    old_status: str | None, new_status: str,
) -> None:
    """Write the audit row inside the caller's open transaction, acting for the item's
    organisation from here to the transaction's end."""
    await act_for(conn, organization_id)
    await conn.execute(_Q["insert_operator_action"], {
        "id": new_id("aud"), "organization_id": organization_id, "action": action,
        "resource_id": item_id, "old_value": old_status, "new_value": new_status,
        "actor": actor,
    })


async def record_fleet_action(
    conn: Connection, *, actor: str, action: str, resource_id: str, old_value: str | None,
    new_value: str,
) -> None:
    """The audit row of an action on the whole fleet (a provider limit key), which belongs to
    no organisation (organization_id NULL: only members of mf_cross_org see or write such
    rows, migration 0015). Inside the caller's open transaction."""
    await conn.execute(_Q["insert_fleet_action"], {
        "id": new_id("aud"), "action": action, "resource_id": resource_id,
        "old_value": old_value, "new_value": new_value, "actor": actor,
    })
