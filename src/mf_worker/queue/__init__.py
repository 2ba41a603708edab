"""The queue layer: claiming, leasing, fenced transitions, reaping and pruning of queue items.

Plain async functions over a connection; the SQL is in ``queries.sql`` beside this file. The
engine, the CLI and the benchmarks drive the queue only through these functions.
"""

from .store import (
    ClaimedItem,
    Deferral,
    DueState,
    LeaseRenewal,
    OrganizationRotation,
    ReapedItem,
    cancel_item_by_operator,
    claim_due_items,
    claim_item_by_id,
    complete_items,
    defer_item,
    extend_leases,
    fence,
    finish_item,
    get_item,
    prune_finished_items,
    read_due_state,
    reap_expired_leases,
    release_item,
    retry_item,
)

__all__ = [
    "ClaimedItem",
    "Deferral",
    "DueState",
    "LeaseRenewal",
    "OrganizationRotation",
    "ReapedItem",
    "cancel_item_by_operator",
    "claim_due_items",
    "claim_item_by_id",
    "complete_items",
    "defer_item",
    "extend_leases",
    "fence",
    "finish_item",
    "get_item",
    "prune_finished_items",
    "read_due_state",
    "reap_expired_leases",
    "release_item",
    "retry_item",
]
