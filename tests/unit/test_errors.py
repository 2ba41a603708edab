"""The exception hierarchy: every exception mf-worker defines is an ``MfWorkerError``.

A caller that wants "anything mf-worker raised on purpose" catches the one base; a class that
slips outside it (a ``ValueError`` subclass of its own, say) is caught by nobody who relies on
that. The walk reads the source tree, not ``pkgutil``: ``engine/`` is a namespace package, which
``pkgutil.walk_packages`` does not descend into.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

import mf_worker
from mf_worker.errors import MfWorkerError, describe_error

PACKAGE_ROOT = Path(mf_worker.__file__).parent


def _module_names() -> Iterator[str]:
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
        if parts[-1] == "__main__":  # importing it runs the command line
            continue
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exception_classes() -> Iterator[type[BaseException]]:
    for name in _module_names():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                yield obj


def test_the_walk_sees_every_subsystem() -> None:
    """Guards the test below: the walk reaches the namespace package and the plugin API."""
    modules = {c.__module__ for c in _exception_classes()}
    assert {"mf_worker.errors", "mf_worker.generation.api"} <= modules
    assert any(name.startswith("mf_worker.engine.") for name in modules)


def test_every_exception_class_defined_in_mf_worker_is_an_mf_worker_error() -> None:
    outside = sorted(
        f"{c.__module__}.{c.__qualname__}" for c in _exception_classes()
        if not issubclass(c, MfWorkerError)
    )
    assert outside == [], f"exceptions outside MfWorkerError: {outside}"


def test_an_error_raised_without_a_message_says_its_docstring() -> None:
    from mf_worker.errors import LeaseLost

    class Stalled(MfWorkerError):
        """The thing stalled
        while doing its work.

        Details nobody needs in a log line."""

    assert str(Stalled()) == "The thing stalled while doing its work."
    assert str(Stalled("item queue_1 stalled")) == "item queue_1 stalled"
    assert describe_error(LeaseLost()) == (
        "LeaseLost: The claim no longer holds: the item was reaped, cancelled or taken over.")


def test_a_lost_lease_names_the_item_and_is_caught_as_the_base() -> None:
    from mf_worker.errors import InvalidItemError, LeaseLost

    with pytest.raises(MfWorkerError) as raised:
        raise LeaseLost("queue_1")
    assert raised.value.queue_id == "queue_1"  # type: ignore[attr-defined]
    assert str(raised.value) == "queue_1"
    assert not isinstance(raised.value, InvalidItemError)
