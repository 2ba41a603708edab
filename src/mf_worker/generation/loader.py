"""Turning the `MF_GENERATOR` / `--generator` setting into a `Generator` object.

A spec is either a name or a `package.module:attribute` path:

* a name is looked up among the built-in generators first (so `template` works even when
  mf-worker runs from a source tree without installed metadata), then among the
  `mf_worker.generators` entry points of installed distributions;
* a path is imported directly, which needs no packaging at all.

The object found may be a generator (anything with an `async def generate(request)`), a
factory or class that returns one (called with no arguments, or with ``settings=`` — the one
`Settings` object — when it declares that keyword), or a plain function taking the request,
which is wrapped in `FunctionGenerator`. Loading happens once at startup, so every failure is
a `PluginLoadError` whose message names the spec and says what went wrong: a bad setting
should stop the worker before it takes any queue item, not fail every item later.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import cast

from mf_worker.errors import ConfigError, PluginLoadError
from mf_worker.generation.api import GenerationRequest, GenerationResult, Generator, GeneratorFn
from mf_worker.plugins import (
    describe_exception,
    entry_point_targets,
    import_target,
    load_entry_point,
)
from mf_worker.settings import Settings

__all__ = ["ENTRY_POINT_GROUP", "FunctionGenerator", "available_generators",
           "load_fallback_generator", "load_generator"]

ENTRY_POINT_GROUP = "mf_worker.generators"
"""The entry-point group other distributions publish generators under."""

_BUILTINS: dict[str, str] = {
    "template": "mf_worker.generators.template:TemplateGenerator",
}


def available_generators() -> dict[str, str]:
    """Every name `load_generator` accepts, mapped to its `module:attribute` target, by name.

    Built-ins win over an entry point of the same name, exactly as `load_generator` resolves.
    """
    found = entry_point_targets(ENTRY_POINT_GROUP)
    found.update(_BUILTINS)
    return dict(sorted(found.items()))


def load_generator(spec: str, settings: Settings | None = None) -> Generator:
    """Load the generator `spec` names: an entry-point name or `package.module:attribute`.

    A factory (or class) with a keyword parameter named ``settings`` is called with
    ``settings=settings``, the one validated `Settings` object, from which the plugin reads its
    own section (`Settings.plugin`, docs/plugins.md); it is never given the environment.

    Raises `PluginLoadError` naming the spec and the problem (unknown name, with the
    available ones; module not found; import failed; attribute missing; the object is not a
    generator, a factory or a function; the factory raised).
    """
    spec = spec.strip()
    if not spec:
        raise PluginLoadError("generator spec is empty; set MF_GENERATOR or --generator")
    obj = import_target(spec, spec, kind="generator") if ":" in spec else _load_named(spec)
    return _as_generator(spec, obj, settings)


def load_fallback_generator(settings: Settings) -> Generator | None:
    """The fallback generator ``MF_FALLBACK_GENERATOR`` names (None when unset), loaded like
    `load_generator` but handed `Settings.as_fallback()`: a plugin reading its section with
    `Settings.plugin` gets its fallback variables (``MF_LLM_FALLBACK_*`` for ``openai``).
    Raises `ConfigError` (exit 2) naming the setting when it cannot be loaded."""
    spec = settings.fallback_generator
    if spec is None:
        return None
    try:
        return load_generator(spec, settings.as_fallback())
    except PluginLoadError as exc:
        raise ConfigError(f"MF_FALLBACK_GENERATOR={spec!r}: {exc}") from None


class FunctionGenerator:
    """Adapts a plain function `fn(request) -> GenerationResult` to the `Generator` protocol.

    An `async def` is awaited on the worker's loop. A plain `def` is assumed to block (an
    HTTP client without asyncio, a local model) and runs in a worker thread through
    `asyncio.to_thread`, so it cannot stall other generations; if it returns an awaitable,
    that is awaited too.
    """

    __slots__ = ("_fn", "_is_async", "name")

    def __init__(self, fn: GeneratorFn, *, name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"expected a function, got {type(fn).__name__}")
        self._fn = fn
        self._is_async = _is_async_callable(fn)
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Call the wrapped function with `request` (awaited, or in a thread if synchronous)."""
        if self._is_async:
            fn = cast(Callable[[GenerationRequest], Awaitable[GenerationResult]], self._fn)
            return await fn(request)
        result: object = await asyncio.to_thread(self._fn, request)
        if inspect.isawaitable(result):
            result = await result
        # Not checked here: validate_result reports a wrong return type with a proper message.
        return cast(GenerationResult, result)

    def __repr__(self) -> str:
        return f"FunctionGenerator({self.name})"


# --------------------------------------------------------------------------------------------
# Finding the object


def _load_named(name: str) -> object:
    target = _BUILTINS.get(name)
    if target is not None:
        return import_target(name, target, kind="generator")
    found = load_entry_point(ENTRY_POINT_GROUP, name, kind="generator")
    if found is None:
        names = ", ".join(available_generators()) or "none"
        raise PluginLoadError(
            f"generator {name!r}: unknown name (available: {names}); "
            "use 'package.module:attribute' to load a Python object directly"
        )
    return found


# --------------------------------------------------------------------------------------------
# Making a generator of it


def _as_generator(spec: str, obj: object, settings: Settings | None) -> Generator:
    if not inspect.isclass(obj) and _is_generator_object(obj):
        return cast(Generator, obj)
    if inspect.isclass(obj):
        return _call_factory(spec, obj, settings)
    if not callable(obj):
        if callable(getattr(obj, "generate", None)):
            raise PluginLoadError(
                f"generator {spec!r}: the object is {_kind(obj)}, {_missing_generate(obj)}"
            )
        raise PluginLoadError(
            f"generator {spec!r}: the object is {_kind(obj)}, "
            "not a generator, a factory or a function"
        )
    required = _required_parameters(spec, obj)
    if required == 0:
        if _is_async_callable(obj):
            raise PluginLoadError(
                f"generator {spec!r}: async function without a required parameter; a generate "
                "function takes the request, and a factory must be synchronous"
            )
        return _call_factory(spec, obj, settings)
    if required == 1:
        return FunctionGenerator(cast(GeneratorFn, obj), name=spec)
    raise PluginLoadError(
        f"generator {spec!r}: callable takes {required} required parameters; expected none "
        "(a factory) or one (the request)"
    )


def _call_factory(
    spec: str, factory: Callable[..., object], settings: Settings | None
) -> Generator:
    wants_settings = _settings_parameter(factory)
    if wants_settings is not None and settings is None and wants_settings.default is _EMPTY:
        raise PluginLoadError(
            f"generator {spec!r}: its factory needs the settings; load it with "
            "load_generator(spec, settings)"
        )
    try:
        made: object = (factory(settings=settings)
                        if wants_settings is not None and settings is not None else factory())
    except Exception as exc:
        raise PluginLoadError(
            f"generator {spec!r}: factory raised {describe_exception(exc)}"
        ) from exc
    if inspect.isawaitable(made):
        if inspect.iscoroutine(made):
            made.close()
        raise PluginLoadError(
            f"generator {spec!r}: factory returned an awaitable; factories must be synchronous"
        )
    if inspect.isclass(made) or not _is_generator_object(made):
        raise PluginLoadError(
            f"generator {spec!r}: factory returned {_kind(made)}, {_missing_generate(made)}"
        )
    return cast(Generator, made)


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_EMPTY = inspect.Parameter.empty
SETTINGS_PARAMETER = "settings"
"""The keyword a factory declares to receive the `Settings` object."""


def _settings_parameter(factory: Callable[..., object]) -> inspect.Parameter | None:
    try:
        param = inspect.signature(factory).parameters.get(SETTINGS_PARAMETER)
    except (TypeError, ValueError):
        return None
    return param if param is not None and param.kind in _BY_KEYWORD else None


def _required_parameters(spec: str, fn: Callable[..., object]) -> int:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise PluginLoadError(
            f"generator {spec!r}: cannot inspect the signature of {_kind(fn)}: {exc}"
        ) from exc
    required = 0
    for param in signature.parameters.values():
        if param.default is not inspect.Parameter.empty:
            continue
        if param.kind in _BY_KEYWORD and param.name == SETTINGS_PARAMETER:
            continue  # given by _call_factory
        if param.kind is inspect.Parameter.KEYWORD_ONLY:
            raise PluginLoadError(
                f"generator {spec!r}: callable has a required keyword-only parameter "
                f"{param.name!r}; expected none (a factory) or one positional (the request)"
            )
        if param.kind in _POSITIONAL:
            required += 1
    return required


def _missing_generate(obj: object) -> str:
    if callable(getattr(obj, "generate", None)):
        return "whose 'generate' method is not 'async def'"
    return "which has no 'async def generate(request)' method"


def _is_generator_object(obj: object) -> bool:
    generate = getattr(obj, "generate", None)
    return generate is not None and _is_async_callable(generate)


def _is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or inspect.isclass(fn) or not callable(fn):
        return False
    # A callable instance whose __call__ is `async def` counts too.
    return inspect.iscoroutinefunction(type(fn).__call__)


def _kind(obj: object) -> str:
    """How a message names an object: "function 'f'", "class 'C'", "an int"."""
    name = getattr(obj, "__qualname__", None)
    if isinstance(name, str) and inspect.isclass(obj):
        return f"class {name!r}"
    if isinstance(name, str) and inspect.isroutine(obj):
        return f"function {name!r}"
    type_name = type(obj).__name__
    return f"{'an' if type_name[:1].lower() in 'aeiou' else 'a'} {type_name}"
