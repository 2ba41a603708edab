"""Group commit: items that reach the same step together share one transaction.

Each item runs as its own task, but a transaction per item costs a commit (a WAL flush) and
several round trips, and that — not the database's real work — bounded the worker's
throughput. A :class:`Batcher` lets every task submit its own value and await its own outcome,
while one flush at a time sends whatever has gathered as one batch. Nothing waits on a timer:
values that arrive while a flush runs form the next batch, so a lone item goes at once and a
busy worker batches by itself.

A flush returns one outcome per value, an exception being the outcome of that value alone. If
the flush itself raises, the batch is split: each value is flushed on its own, so one bad item
(a constraint the data breaks) fails only itself. Errors listed in ``shared_errors`` (the
database being away, which the flush has already retried) are not worth splitting: every
value of the batch gets them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

V = TypeVar("V")
R = TypeVar("R")

Flush = Callable[[list[V]], Awaitable[Sequence[R | BaseException]]]


class Batcher(Generic[V, R]):
    """Submit values one by one; they are flushed in batches of up to ``max_batch``."""

    def __init__(
        self,
        flush: Flush[V, R],
        *,
        max_batch: int,
        shared_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._shared_errors = shared_errors
        self._waiting: list[tuple[V, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, value: V) -> R:
        """Queue ``value`` for the next flush and return its outcome (raise its exception).
        Cancelling the caller before the flush takes the value withdraws it."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((value, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._drain(), name="batch flusher")
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                taken = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                batch = [(v, f) for v, f in taken if not f.done()]  # done: withdrawn
                if batch:
                    await self._flush_batch(batch)
        finally:
            # In the same step as the last look at _waiting (a done callback would run a loop
            # iteration later): a value submitted after it always finds no flusher, starts one.
            self._flusher = None

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
            if len(batch) == 1 or isinstance(exc, self._shared_errors):
                outcomes = [exc] * len(batch)
            else:
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
