"""The list of `make mutants` stays plantable: every mutant of tools/mutants.toml still applies
to the code and names tests that exist, and the tool refuses a mutant whose text is gone.

Running the mutants takes minutes and is not part of the suite; checking that each one still
applies takes milliseconds, so a change that moves a mutant's text says so here, at once,
instead of at the next `make mutants`.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mf_mutants", ROOT / "tools" / "mutants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


mutants = _tool()


def test_every_mutant_still_applies_to_the_code() -> None:
    listed = mutants.load()
    assert len(listed) >= 20
    assert mutants.check(listed) == []


def test_every_mutant_names_tests_that_exist() -> None:
    for mutant in mutants.load():
        for selection in mutant.tests:
            path, _, name = selection.partition("::")
            source = ROOT / path
            assert source.is_file(), f"{mutant.name}: no {path}"
            if name:
                assert re.search(rf"^def {re.escape(name)}\(", source.read_text(), re.M), (
                    f"{mutant.name}: no test {name} in {path}")


def _mutant(**edit: str) -> object:
    return mutants.Mutant(name="m", promise="p", bug="b", tests=("t",),
                          edits=(mutants.Edit(file="f", **edit),))


def test_a_mutant_whose_text_is_gone_or_ambiguous_no_longer_applies() -> None:
    text = "-- name: a\nWHERE x = 1;\n-- name: b\nWHERE x = 1;\n"
    with pytest.raises(mutants.NoLongerApplies, match="mutant m no longer applies to f"):
        mutants.mutate(_mutant(old="WHERE y = 1", new="WHERE true"), {"f": text})
    with pytest.raises(mutants.NoLongerApplies, match="more than once"):
        mutants.mutate(_mutant(old="WHERE x = 1", new="WHERE true"), {"f": text})
    with pytest.raises(mutants.NoLongerApplies, match="is not there after"):
        mutants.mutate(_mutant(after="-- name: b", old="x = 2", new="true"), {"f": text})
    planted = mutants.mutate(_mutant(after="-- name: b", old="x = 1", new="true"), {"f": text})
    assert planted == {"f": "-- name: a\nWHERE x = 1;\n-- name: b\nWHERE true;\n"}
