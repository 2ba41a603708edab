"""The layering rule: which package of mf_worker may import which, checked on the import graph.

Layers, lowest first; a module may import its own layer and the layers below it, never one
above. Within a layer, two packages may not import each other both ways (no cycles). The rule
is stated once, in ``LAYERS``; docs/architecture.md explains it. A name with no module (a
package not created yet) simply matches nothing, and a module that matches no name fails the
test, so a new package has to be given its place.

Every import counts: at module level, inside a function (a late import is still a
dependency), and under ``TYPE_CHECKING`` (a type names the module it comes from).

This is a small AST walk rather than import-linter: the whole rule, its allow-list and the
reasons fit in this one file that a reader finds next to the other tests; no dependency and
no second command for CI (``make test`` runs it); and the failure names the file and line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Final

PACKAGE: Final = "mf_worker"
SOURCE: Final = Path(__file__).resolve().parent.parent / "src"
HERE: Final = "tests/test_layering.py"

# Lowest first. Names are relative to mf_worker; a name covers a module or a whole package.
LAYERS: Final[tuple[tuple[str, ...], ...]] = (
    # Leaves: errors, ids, settings (and the systemd credentials, mail addresses and plugin
    # lookup they use), the backoff rule, connections and named SQL, logging; and the cadence
    # rule (scheduling/cadence.py: pure, pendulum and the standard library only), which the
    # scheduler, the engine, the preview and the openai generator's prompt all read.
    ("errors", "ids", "settings", "credentials", "smtp", "plugins", "backoff", "db", "logs",
     "scheduling.cadence"),
    # The generator plugin API (api, validate, loader): what a plugin author imports.
    ("generation",),
    # The built-in generators, written against the plugin API like any plugin.
    ("generators",),
    # The domain: the cadence rule and scheduler, the queue's state machine, flow control, the
    # cost check; and the audit rows and the memories migration, which are database features.
    ("scheduling", "queue", "flow", "cost", "audit", "memories"),
    # The worker: claim loop, prepare, generate, final write, publisher, events.
    ("engine",),
    # The background loops (heartbeat, reaper, pruner, scheduler, budget release, listener).
    ("maintenance",),
    # Metrics, health endpoints, systemd's notifications: subscribers of the engine's events.
    ("observability",),
    # The wiring of `run` and `run-once`: pool, worker, loops, HTTP, signals.
    ("daemon",),
    # The command line, with `status` (what the status, retry and cancel commands read and
    # write) and `python -m mf_worker`.
    ("cli", "status", "__main__"),
    # The operator console, a web application over all of the above (it reads through the
    # domain and observability, and acts through `status` and the scheduler's enqueue). The
    # CLI finds its command group by entry point (`mf_worker.commands`), so nothing imports it.
    ("console",),
)

# Imports that break the rule, each with the reason it must for now (none since #18: the
# restructuring emptied it). An entry that no longer happens fails
# `test_the_allow_list_holds_only_imports_that_still_happen`, a new violation fails
# `test_no_module_imports_a_layer_above_its_own`. (importer, imported), by module name.
ALLOWED: Final[frozenset[tuple[str, str]]] = frozenset()


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    imported: str
    where: str  # path:line, for the failure message


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((SOURCE / PACKAGE).rglob("*.py"))}


def imports() -> list[Import]:
    """Every import of an mf_worker module by an mf_worker module, resolved to module names
    (``from .. import queue`` is the package ``mf_worker.queue``; ``from ..generation import
    TokenUsage`` is ``mf_worker.generation``)."""
    modules = _modules()
    found: list[Import] = []
    for importer, path in modules.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from package import module` imports the module; anything else, the base.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            where = f"{path.relative_to(SOURCE.parent)}:{getattr(node, 'lineno', 0)}"
            found += [Import(importer, target, where) for target in targets
                      if target.split(".")[0] == PACKAGE and target != importer]
    return found


def _part(module: str) -> str | None:
    """The LAYERS name that covers ``module`` (the longest that matches), or None."""
    relative = module.removeprefix(f"{PACKAGE}.")
    names = [name for layer in LAYERS for name in layer
             if relative == name or relative.startswith(f"{name}.")]
    return max(names, key=len) if names else None


def layer_of(module: str) -> int | None:
    if module == PACKAGE:
        return 0  # the package itself holds only __version__
    part = _part(module)
    return None if part is None else next(i for i, layer in enumerate(LAYERS) if part in layer)


def violations() -> dict[tuple[str, str], list[str]]:
    """(importer, imported) → where, for every import that goes up a layer, or that closes a
    cycle between two packages of one layer."""
    found: dict[tuple[str, str], list[str]] = {}
    edges = imports()
    between_parts = {(_part(i.importer), _part(i.imported)) for i in edges
                     if _part(i.importer) != _part(i.imported)}
    for edge in edges:
        low, high = layer_of(edge.importer), layer_of(edge.imported)
        assert low is not None and high is not None  # test_every_module_has_a_layer says which
        part, other = _part(edge.importer), _part(edge.imported)
        upward = high > low
        cycle = high == low and part != other and (other, part) in between_parts
        if upward or cycle:
            found.setdefault((edge.importer, edge.imported), []).append(edge.where)
    return found


def test_every_module_has_a_layer() -> None:
    """A new package or top-level module must be placed in LAYERS (and the docs' rule)."""
    unplaced = sorted(m for m in _modules() if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {HERE}): {unplaced}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    """Lower layers never import higher ones, and packages of one layer import each other one
    way only; today's known exceptions are ALLOWED, anything else fails."""
    new = {pair: where for pair, where in violations().items() if pair not in ALLOWED}
    lines = [f"  {where[0]}: {importer} (layer {layer_of(importer)}) imports {imported} "
             f"(layer {layer_of(imported)}"
             f"{', which imports it back' if layer_of(importer) == layer_of(imported) else ''})"
             for (importer, imported), where in sorted(new.items())]
    assert not new, (
        "imports against the layering rule (tests/test_layering.py, docs/architecture.md); "
        "move the code to the layer it belongs to instead:\n" + "\n".join(lines))


def test_the_allow_list_holds_only_imports_that_still_happen() -> None:
    """An exception that has been fixed comes off the list, so it cannot come back unseen."""
    stale = sorted(ALLOWED - violations().keys())
    assert not stale, f"no longer violated; remove from ALLOWED in {HERE}: {stale}"
