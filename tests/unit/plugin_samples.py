"""Sample generator plugins for the loader tests, one per shape `load_generator` accepts or rejects.

Loaded by `plugin_samples:<name>` specs with this directory on `sys.path`, exactly as an
operator's own module would be.
"""

from __future__ import annotations

import threading

from mf_worker.generation import (
    BlockDraft,
    GenerationRequest,
    GenerationResult,
    TokenUsage,
)


def make_result(label: str) -> GenerationResult:
    """A minimal valid result whose title says which sample produced it."""
    return GenerationResult(
        title=f"from {label}",
        blocks=[BlockDraft(f"written by {label}")],
        usage=TokenUsage(model="sample", prompt_tokens=1, completion_tokens=1),
    )


class SampleGenerator:
    """A generator class: the loader must instantiate it (a class is a factory)."""

    def __init__(self, label: str = "class") -> None:
        self.label = label

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return make_result(self.label)


instance = SampleGenerator("instance")
"""A ready generator object: the loader must return this very object."""


def factory() -> SampleGenerator:
    """A zero-argument factory: the loader must call it and use what it returns."""
    return SampleGenerator("factory")


async def async_generate(request: GenerationRequest) -> GenerationResult:
    """An async generate function: the loader must wrap it and await it."""
    return make_result(f"async {request.episode_number}")


sync_calls: list[int] = []
"""Thread ids `sync_generate` ran on, so a test can prove it left the event loop's thread."""


def sync_generate(request: GenerationRequest) -> GenerationResult:
    """A blocking generate function: the loader must run it in a worker thread."""
    sync_calls.append(threading.get_ident())
    return make_result(f"sync {request.episode_number}")


def failing_factory() -> SampleGenerator:
    """A factory that raises: the loader must report what it raised."""
    raise RuntimeError("no API key configured")


def factory_of_junk() -> object:
    """A factory returning something that is not a generator."""
    return 42


def two_parameters(request: GenerationRequest, extra: str) -> GenerationResult:
    """Neither a factory nor a generate function."""
    raise AssertionError("never called")


async def async_no_parameters() -> GenerationResult:
    """An async function with no parameter: neither a generate function nor a valid factory."""
    raise AssertionError("never called")


class SyncGenerateMethod:
    """Has a `generate` method, but not an async one."""

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return make_result("sync method")


sync_method_instance = SyncGenerateMethod()
"""An object whose `generate` is synchronous: rejected, not silently run on the loop."""

NOT_A_GENERATOR = 42
"""Neither callable nor a generator."""


class Estimating(SampleGenerator):
    """A generator with the optional cost-reservation method."""

    def estimate_max_usage(self, request: GenerationRequest) -> TokenUsage:
        return TokenUsage(model="sample", prompt_tokens=100, completion_tokens=50)
