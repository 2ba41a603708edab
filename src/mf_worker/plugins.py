"""Finding plugin objects: by entry-point name or by ``package.module:attribute`` path.

The generic half of plugin loading, shared by the generator loader (`generation.loader`), the
notifiers (`cost.notify`) and the plugin settings (`settings`), so none of them borrows another's
loader. Every failure is a `PluginLoadError` whose message names the kind of plugin, the spec
and what went wrong, because loading happens at start-up and the message is all an operator
sees. What an object must *be* (a generator, a notifier) is the caller's business.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from .errors import PluginLoadError

__all__ = ["describe_exception", "entry_point_targets", "import_target", "load_entry_point"]


def entry_point_targets(group: str) -> dict[str, str]:
    """Every entry point of ``group`` installed, name to ``module:attribute``, first one wins."""
    found: dict[str, str] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name, ep.value)
    return found


def load_entry_point(group: str, name: str, *, kind: str) -> object | None:
    """The object the entry point ``name`` of ``group`` names; None when none is installed.

    Raises `PluginLoadError` naming the ``kind``, the name and the target when loading fails.
    """
    matches: list[EntryPoint] = list(entry_points(group=group, name=name))
    if not matches:
        return None
    ep = matches[0]
    try:
        loaded: object = ep.load()
    except Exception as exc:
        raise PluginLoadError(
            f"{kind} {name!r}: entry point {ep.value!r} failed to load: "
            f"{describe_exception(exc)}"
        ) from exc
    return loaded


def import_target(spec: str, target: str, *, kind: str) -> object:
    """Import ``package.module:attr.path``; PluginLoadError names the ``kind`` and the spec."""
    module_name, _, attr_path = (part.strip() for part in target.partition(":"))
    if not module_name or not attr_path:
        raise PluginLoadError(
            f"{kind} {spec!r}: malformed path {target!r}, expected 'package.module:attribute'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(exc.name + ".")
        ):
            raise PluginLoadError(f"{kind} {spec!r}: module {module_name!r} not found") from exc
        raise PluginLoadError(
            f"{kind} {spec!r}: importing module {module_name!r} failed: "
            f"{describe_exception(exc)}"
        ) from exc
    except Exception as exc:
        raise PluginLoadError(
            f"{kind} {spec!r}: importing module {module_name!r} failed: "
            f"{describe_exception(exc)}"
        ) from exc
    obj: object = module
    owner = f"module {module_name!r}"
    walked = f"{module_name}:"
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginLoadError(
                f"{kind} {spec!r}: {owner} has no attribute {part!r}"
            ) from None
        walked += part if walked.endswith(":") else f".{part}"
        owner = repr(walked)
    return obj


def describe_exception(exc: BaseException) -> str:
    """An exception on one line for a message: its type and the first line of its text."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
