"""Flow control at the LLM provider: the fleet-wide limiter (``limiter.py``, SQL beside it).

Workers pace their calls through per-key token buckets in PostgreSQL, share a cooldown after a
429 or an exhausted quota, and adapt how many calls they keep in flight per key.
"""

from .control import INITIAL_WINDOW, FlowControl, FlowEvent, KeyCoolingDown
from .limiter import (
    BURST_SECONDS,
    CONFIGURED_TTL_SECONDS,
    PACE,
    CoolDown,
    Grant,
    KeyState,
    Limits,
    acquire,
    cool_down,
    correct,
    read_limits,
)

__all__ = [
    "BURST_SECONDS",
    "CONFIGURED_TTL_SECONDS",
    "INITIAL_WINDOW",
    "PACE",
    "CoolDown",
    "FlowControl",
    "FlowEvent",
    "Grant",
    "KeyCoolingDown",
    "KeyState",
    "Limits",
    "acquire",
    "cool_down",
    "correct",
    "read_limits",
]
