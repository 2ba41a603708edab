"""The group-commit batcher on its own: how values gather, and how a failing batch splits."""

from __future__ import annotations

import asyncio

import pytest

from mf_worker.engine.batching import Batcher


class Transient(Exception):
    pass


def test_values_submitted_together_share_a_flush_and_get_their_own_outcomes() -> None:
    flushed: list[list[int]] = []

    async def flush(values: list[int]) -> list[int | BaseException]:
        flushed.append(values)
        await asyncio.sleep(0.01)
        return [ValueError(f"odd {v}") if v % 2 else v * 10 for v in values]

    async def main() -> list[object]:
        batcher: Batcher[int, int] = Batcher(flush, name="t", max_batch=3)
        return await asyncio.gather(*(batcher.submit(v) for v in range(5)),
                                    return_exceptions=True)

    outcomes = asyncio.run(main())
    assert flushed == [[0, 1, 2], [3, 4]]  # max_batch, then what gathered meanwhile
    assert [o if isinstance(o, int) else str(o) for o in outcomes] == [
        0, "odd 1", 20, "odd 3", 40]


def test_a_failing_batch_is_split_so_only_the_bad_value_fails() -> None:
    flushed: list[list[int]] = []

    async def flush(values: list[int]) -> list[int | BaseException]:
        flushed.append(values)
        if 13 in values:
            raise RuntimeError("constraint violated by 13")
        return list(values)

    async def main() -> list[object]:
        batcher: Batcher[int, int] = Batcher(flush, name="t", max_batch=10)
        return await asyncio.gather(*(batcher.submit(v) for v in (1, 13, 2)),
                                    return_exceptions=True)

    outcomes = asyncio.run(main())
    assert flushed == [[1, 13, 2], [1], [13], [2]]
    assert outcomes[0] == 1 and outcomes[2] == 2
    assert isinstance(outcomes[1], RuntimeError)


def test_shared_errors_reach_every_value_without_a_split() -> None:
    calls = 0

    async def flush(values: list[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        raise Transient("database away")

    async def main() -> list[object]:
        batcher: Batcher[int, int] = Batcher(flush, name="t", max_batch=10,
                                            shared_errors=(Transient,))
        return await asyncio.gather(*(batcher.submit(v) for v in (1, 2, 3)),
                                    return_exceptions=True)

    outcomes = asyncio.run(main())
    assert calls == 1
    assert all(isinstance(o, Transient) for o in outcomes)


@pytest.mark.parametrize("max_flushes", [1, 2])
def test_flushes_run_at_most_max_flushes_at_once_and_none_is_stranded(max_flushes: int) -> None:
    running = peak = 0

    async def flush(values: list[int]) -> list[int | BaseException]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return list(values)

    async def main() -> list[int]:
        batcher: Batcher[int, int] = Batcher(flush, name="t", max_batch=2,
                                            max_flushes=max_flushes)
        first = await asyncio.gather(*(batcher.submit(v) for v in range(7)))
        # Submitted after every flusher finished: a new one must start.
        return [*first, await batcher.submit(99)]

    assert asyncio.run(main()) == [*range(7), 99]
    assert peak == max_flushes


def test_a_cancelled_submitter_is_withdrawn_before_its_flush() -> None:
    flushed: list[list[int]] = []

    async def flush(values: list[int]) -> list[int | BaseException]:
        flushed.append(values)
        await asyncio.sleep(0.01)
        return list(values)

    async def main() -> int:
        batcher: Batcher[int, int] = Batcher(flush, name="t", max_batch=1)
        first = asyncio.create_task(batcher.submit(1))
        doomed = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0)  # both queued; the flush of 1 is running
        doomed.cancel()
        return await first

    assert asyncio.run(main()) == 1
    assert flushed == [[1]]


@pytest.mark.parametrize(("min_share", "expected"), [(1, [[0, 1, 2], [3, 4, 5]]),
                                                     (4, [[0, 1, 2, 3], [4, 5]])])
def test_a_wave_is_shared_between_free_flushers_in_batches_of_at_least_min_share(
    min_share: int, expected: list[list[int]]
) -> None:
    flushed: list[list[int]] = []

    async def flush(values: list[int]) -> list[int | BaseException]:
        flushed.append(values)
        await asyncio.sleep(0.005)
        return list(values)

    async def main() -> None:
        batcher: Batcher[int, int] = Batcher(flush, name="t", max_batch=32, max_flushes=2,
                                            min_share=min_share)
        await asyncio.gather(*(batcher.submit(v) for v in range(6)))

    asyncio.run(main())
    assert flushed == expected
