"""`make mutants`: plant each named bug of tools/mutants.toml alone, and check the tests catch it.

A mutant is a small, deliberate bug in one of the promises mf-worker makes (the fence, the
claim, the cost limit, the backoff …): one or more exact text substitutions. For each mutant,
this tool copies the working tree (committed or not, as `git ls-files` sees it) into a scratch
folder, applies the mutant there — never in the working tree — and runs the mutant's own tests
against the copy. A test run that fails means the mutant was *caught*; one that passes means it
*survived*: the suite would have let that bug through, so a test is missing.

    tools/mutants.py                  every mutant (what `make mutants` runs)
    tools/mutants.py --only a,b       those mutants (`make mutants ONLY=a,b`)
    tools/mutants.py --list           name, promise and tests of each, nothing run
    tools/mutants.py --check          only check that every mutant still applies (fast)

Each substitution names its `file`, the exact `old` text and its `new` text; `after` (optional)
is an exact anchor the `old` text is looked for after, for text that occurs more than once.
When the code changed so that a mutant's text is gone (or is no longer unique), the tool stops
before running anything and says which mutant no longer applies: update its text in
tools/mutants.toml to plant the same bug in the new code.

Before the mutants, the selected mutants' tests run once on the unmutated copy (the baseline):
a test that already fails would "catch" every mutant. Exit status: 0 when every mutant was
caught, 1 when any survived (or timed out, or its run broke), 2 when a mutant no longer applies
or the baseline fails.

The copy imports its own ``src`` (a throwaway virtual environment that borrows this one's
installed packages), so worker processes the tests start run the mutated code too. Tests run
without xdist (``workers = N`` in a mutant: ``-n N``), and under ``flock /tmp/mf-heavy.lock``
when the mutant says ``heavy = true`` (its tests start processes).
"""

# ruff: noqa: S603, S607 - runs git, nice, flock and Pythons of its own making, by design

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
import venv
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "tools" / "mutants.toml"
HEAVY_LOCK = "/tmp/mf-heavy.lock"  # noqa: S108 - the machine-wide lock every heavy run shares


class NoLongerApplies(Exception):
    """A mutant's text is not in the code (exactly once) any more."""


@dataclass(frozen=True)
class Edit:
    file: str
    old: str
    new: str
    after: str | None = None


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str
    bug: str
    tests: tuple[str, ...]
    edits: tuple[Edit, ...]
    heavy: bool = False
    workers: int = 0
    timeout: float = 600.0


@dataclass
class Result:
    mutant: Mutant
    verdict: str  # caught | survived | timeout | error
    seconds: float
    detail: str = field(default="")


def load(path: Path = LIST) -> list[Mutant]:
    """The mutants of the list, validated (names unique, every field present)."""
    data = tomllib.loads(path.read_text())
    mutants: list[Mutant] = []
    for raw in data.get("mutant", []):
        name = raw["name"]
        edits = tuple(Edit(file=e["file"], old=e["old"], new=e["new"], after=e.get("after"))
                      for e in raw["edit"])
        if not edits or not raw.get("tests"):
            raise ValueError(f"mutant {name}: needs at least one edit and one test")
        for e in edits:
            if e.old == e.new:
                raise ValueError(f"mutant {name}: an edit of {e.file} changes nothing")
        mutants.append(Mutant(name=name, promise=raw["promise"], bug=raw["bug"],
                              tests=tuple(raw["tests"]), edits=edits,
                              heavy=bool(raw.get("heavy", False)),
                              workers=int(raw.get("workers", 0)),
                              timeout=float(raw.get("timeout", 600))))
    names = [m.name for m in mutants]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ValueError(f"mutant names used twice: {', '.join(sorted(duplicated))}")
    return mutants


def _once(text: str, needle: str, where: str) -> int:
    at = text.find(needle)
    if at < 0:
        raise NoLongerApplies(f"{where}: {needle!r} is not there")
    if text.find(needle, at + 1) >= 0:
        raise NoLongerApplies(f"{where}: {needle!r} occurs more than once (add or lengthen "
                              f"`after`)")
    return at


def mutate(mutant: Mutant, read: dict[str, str]) -> dict[str, str]:
    """The files a mutant changes, mutated: ``read`` maps each of its files to its text. Raises
    NoLongerApplies when an anchor or old text is missing or ambiguous."""
    out = dict(read)
    for edit in mutant.edits:
        text = out[edit.file]
        where = f"mutant {mutant.name} no longer applies to {edit.file}"
        start = 0
        if edit.after is not None:
            start = _once(text, edit.after, where) + len(edit.after)
            at = text.find(edit.old, start)
            if at < 0:
                raise NoLongerApplies(f"{where}: {edit.old!r} is not there after "
                                      f"{edit.after!r}")
        else:
            at = _once(text, edit.old, where)
        out[edit.file] = text[:at] + edit.new + text[at + len(edit.old):]
    return out


def check(mutants: list[Mutant], root: Path = ROOT) -> list[str]:
    """Why each mutant that no longer applies to the tree at ``root`` does not (empty: all
    apply)."""
    problems = []
    for mutant in mutants:
        files = {e.file for e in mutant.edits}
        missing = [f for f in sorted(files) if not (root / f).is_file()]
        if missing:
            problems.append(f"mutant {mutant.name} no longer applies: no file {missing[0]}")
            continue
        try:
            mutate(mutant, {f: (root / f).read_text() for f in files})
        except NoLongerApplies as exc:
            problems.append(str(exc))
    return problems


def _tree_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True).stdout.decode()
    return [f for f in listed.split("\0") if f and (ROOT / f).is_file()]


def _copy_tree(dest: Path, files: list[str]) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)


def _make_env(scratch: Path, tree: Path) -> Path:
    """A virtual environment whose Python imports ``tree/src`` first, then this environment's
    installed packages (not its editable mf-worker, which points at the working tree)."""
    env_dir = scratch / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(site, "mf_mutants.pth").write_text(f"{tree / 'src'}\n{ours}\n")
    return python


def _pytest(mutant: Mutant, python: Path, tree: Path, tests: tuple[str, ...],
            timeout: float, heavy: bool, workers: int) -> tuple[str, float, str]:
    command = [str(python), "-m", "pytest", *tests, "-q", "-x", "-p", "no:cacheprovider",
               "--no-header", "--tb=line", "--show-capture=no",
               "-o", "addopts=--strict-markers --strict-config"]
    command += ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    if heavy:
        command = ["flock", HEAVY_LOCK, *command]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(tree / "src")}
    env.pop("VIRTUAL_ENV", None)
    started = time.monotonic()
    try:
        done = subprocess.run(["nice", *command], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - started, f"no result after {timeout:g} s"
    seconds = time.monotonic() - started
    lines = (done.stdout + done.stderr).strip().splitlines()
    tail = "\n".join(lines[-15:])
    if done.returncode == 0:
        return "survived", seconds, tail
    if done.returncode == 1:  # tests ran and some failed: say which, and how
        failed = [ln for ln in lines if ln.startswith("FAILED ")]
        where = [ln.replace(str(tree) + "/", "") for ln in lines
                 if str(tree) in ln and ": " in ln][:1]
        return "caught", seconds, "\n".join(failed[:1] + where)[:400]
    return "error", seconds, f"pytest exited {done.returncode}\n{tail}"


def _mutated_imports(tree: Path, python: Path) -> str:
    """Where the copy's Python imports mf_worker from (must be the copy)."""
    return subprocess.run(
        [str(python), "-c", "import mf_worker; print(mf_worker.__file__)"],
        cwd=tree, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(tree / "src")}).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--check", action="store_true",
                        help="only check that every mutant still applies")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the run of the tests on the unmutated copy")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="say only the verdict of a caught mutant, not the test that failed")
    args = parser.parse_args(argv)

    mutants = load()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {m.name for m in mutants})
        if unknown:
            print(f"unknown mutant(s): {', '.join(unknown)}; --list shows them",
                  file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.name in wanted]

    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.promise}]{'  (heavy)' if m.heavy else ''}\n    {m.bug}")
            for t in m.tests:
                print(f"    test: {t}")
        return 0

    problems = check(mutants)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} mutant(s) no longer apply: update tools/mutants.toml",
              file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(mutants)} mutants apply")
        return 0

    files = _tree_files()
    with tempfile.TemporaryDirectory(prefix="mf-mutants-") as scratch_name:
        scratch = Path(scratch_name)
        tree = scratch / "tree"
        _copy_tree(tree, files)
        python = _make_env(scratch, tree)
        imported = _mutated_imports(tree, python)
        if not imported.startswith(str(tree)):
            print(f"the copy imports mf_worker from {imported}, not from the copy",
                  file=sys.stderr)
            return 2

        if not args.no_baseline:
            union = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            heavy = any(m.heavy for m in mutants)
            workers = max((m.workers for m in mutants), default=0)
            print(f"baseline: {len(union)} test selection(s) on the unmutated copy …",
                  flush=True)
            verdict, seconds, tail = _pytest(mutants[0], python, tree, union,
                                             timeout=3600, heavy=heavy, workers=workers)
            if verdict != "survived":  # "survived" here: every test passed
                print(f"baseline failed ({verdict}, {seconds:.0f} s): fix the tests first\n"
                      f"{tail}", file=sys.stderr)
                return 2
            print(f"baseline: passed in {seconds:.0f} s", flush=True)

        results: list[Result] = []
        width = max(len(m.name) for m in mutants)
        for mutant in mutants:
            _copy_tree(tree, files)  # every mutant alone, in a pristine copy
            changed = mutate(mutant, {e.file: (tree / e.file).read_text()
                                      for e in mutant.edits})
            for name, text in changed.items():
                (tree / name).write_text(text)
            verdict, seconds, tail = _pytest(mutant, python, tree, mutant.tests,
                                             timeout=mutant.timeout, heavy=mutant.heavy,
                                             workers=mutant.workers)
            results.append(Result(mutant, verdict, seconds, tail))
            print(f"{mutant.name:<{width}}  {verdict:<8}  {seconds:6.1f} s  [{mutant.promise}]",
                  flush=True)
            if tail and (verdict != "caught" or not args.quiet):
                print("    " + tail.replace("\n", "\n    "), flush=True)

    caught = sum(r.verdict == "caught" for r in results)
    print(f"\n{caught} of {len(results)} mutants caught")
    missed = [r for r in results if r.verdict != "caught"]
    for r in missed:
        print(f"  {r.verdict}: {r.mutant.name} — {r.mutant.bug}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
