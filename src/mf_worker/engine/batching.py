"""Group commit: items that reach the same step together share one transaction.

Each item runs as its own task, but a transaction per item costs a commit (a WAL flush) and
several round trips, and that — not the database's real work — bounded the worker's
throughput. A :class:`Batcher` lets every task submit its own value and await its own outcome,
while up to ``max_flushes`` flushes at a time send whatever has gathered as one batch each.
Nothing waits on a timer: values that arrive while the flushes run form the next batch, so a
lone item goes at once and a busy worker batches by itself.

A flush returns one outcome per value, an exception being the outcome of that value alone. If
the flush itself raises, the batch is split: each value is flushed on its own, so one bad item
(a constraint the data breaks) fails only itself. Errors listed in ``shared_errors`` (the
database being away, which the flush has already retried) are not worth splitting: every
value of the batch gets them — except those also in ``item_errors`` (a lock timeout on one
item's row), which are split like any other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from ..errors import describe_error
from ..logs import get_logger

V = TypeVar("V")
R = TypeVar("R")

Flush = Callable[[list[V]], Awaitable[Sequence[R | BaseException]]]


class Batcher(Generic[V, R]):
    """Submit values one by one; they are flushed in batches of up to ``max_batch``, by at
    most ``max_flushes`` flushes at a time, which share a wave of waiting values in batches of
    at least ``min_share``."""

    def __init__(
        self,
        flush: Flush[V, R],
        *,
        name: str,
        max_batch: int,
        max_flushes: int = 1,
        min_share: int = 1,
        shared_errors: tuple[type[BaseException], ...] = (),
        item_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._flush = flush
        self._name = name
        self._max_batch = max_batch
        self._max_flushes = max_flushes
        self._min_share = min_share
        self._shared_errors = shared_errors
        self._item_errors = item_errors
        self._waiting: list[tuple[V, asyncio.Future[R]]] = []
        self._flushers: set[asyncio.Task[None]] = set()  # running, strongly referenced
        self._busy = 0  # flushers inside a flush (the others are about to take a batch)

    async def submit(self, value: V) -> R:
        """Queue ``value`` for the next flush and return its outcome (raise its exception).
        Cancelling the caller before the flush takes the value withdraws it."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((value, future))
        if len(self._flushers) < self._max_flushes:
            self._flushers.add(asyncio.create_task(self._drain(), name="batch flusher"))
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                # Share what waits with the other flushers that are about to take (at least
                # this one): a wave of items goes out on several connections at once, in
                # batches of at least min_share (each batch costs a transaction).
                takers = len(self._flushers) - self._busy
                share = max(self._min_share, -(-len(self._waiting) // max(1, takers)))
                size = min(self._max_batch, share)
                taken = self._waiting[:size]
                del self._waiting[:size]
                batch = [(v, f) for v, f in taken if not f.done()]  # done: withdrawn
                if batch:
                    self._busy += 1
                    try:
                        await self._flush_batch(batch)
                    finally:
                        self._busy -= 1
        finally:
            # In the same step as the last look at _waiting (a done callback would run a loop
            # iteration later): a value submitted after it always finds room for a flusher.
            task = asyncio.current_task()
            assert task is not None
            self._flushers.discard(task)

    async def _flush_batch(self, batch: list[tuple[V, asyncio.Future[R]]]) -> None:
        values = [v for v, _ in batch]
        outcomes: Sequence[R | BaseException]
        try:
            outcomes = await self._flush(values)
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            shared = (isinstance(exc, self._shared_errors)
                      and not isinstance(exc, self._item_errors))
            if len(batch) == 1 or shared:
                outcomes = [exc] * len(batch)
            else:
                get_logger("mf_worker.batching").warning(
                    "batch_split", batch=self._name, size=len(batch), error=describe_error(exc)
                )
                for pair in batch:  # split: each value stands or falls alone
                    await self._flush_batch([pair])
                return
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the submitter was cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
