"""Compare the full pipeline of two revisions side by side, interleaved, as per-pair ratios.

On a shared 2-core VM the same code can measure 335 episodes/s and then 500 twenty minutes
later (the CPU time per episode itself moves by up to 2x), so two medians taken one after the
other compare the machine's moments, not the code. This script alternates the two revisions
run by run (base, head, head, base, …), each run in a fresh process with its own checkout on
``PYTHONPATH``, and reports for every pair head ÷ base: the noise then hits both sides of a
pair alike. Two tables: episodes/s, and the PostgreSQL backends' CPU per episode (bench_engine's
*PG CPU ms*, the #16 target), which a loaded machine disturbs far less than a rate, since it
counts CPU time, not wall time.

    .venv/bin/python bench/compare_revisions.py --base HEAD~3 [--head REV] [--pairs 4]
        [--items N] [--orgs N]

``--base``/``--head`` name git revisions; the default head is the working tree (uncommitted
changes included). A revision is checked out with ``git worktree add --detach`` into a
temporary directory, removed at the end. Each run is ``bench_engine.py --only pipeline
--runs 1`` of that revision (its own migrations, its own throwaway database).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"
# A row of bench_engine.py's pipeline table: "concurrency 8   295  ≥ 500 …"; its eighth cell,
# when the revision prints one, is the PostgreSQL backends' CPU per episode ("2.48" or "n/a").
ROW = re.compile(r"^concurrency (\d+)\s+([\d,]+)\s.*$", re.MULTILINE)
PG_CPU_CELL = 7


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """The tree of ``revision`` (the working tree itself for WORKTREE)."""
    if revision == WORKTREE:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="mf-compare-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                        str(tree), revision], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False)


Run = dict[int, tuple[float, float | None]]


def _pg_cpu(row: str) -> float | None:
    cells = re.split(r"\s{2,}", row.strip())
    try:
        return float(cells[PG_CPU_CELL])
    except (IndexError, ValueError):
        return None  # an older revision without the column, or "n/a"


def pipeline_run(tree: Path, items: int | None, orgs: int | None) -> Run:
    """One ``--only pipeline --runs 1`` of the revision in ``tree``: by concurrency, episodes/s
    and PostgreSQL CPU ms per episode (None where the revision does not print it)."""
    command = [sys.executable, str(tree / "bench" / "bench_engine.py"), "--only", "pipeline",
               "--runs", "1"]
    if items is not None:
        command += ["--items", str(items)]
    if orgs is not None:  # both revisions' bench_engine.py must know --orgs
        command += ["--orgs", str(orgs)]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the pipeline benchmark of {tree} failed ({done.returncode})")
    rates = {int(m[1]): (float(m[2].replace(",", "")), _pg_cpu(m[0]))
             for m in ROW.finditer(done.stdout)}
    if not rates:
        raise SystemExit(f"no pipeline rows in the output of {tree}:\n{done.stdout}")
    return rates


def _report(runs: dict[str, list[Run]], field: int, title: str) -> None:
    levels = sorted(runs["base"][0])
    if any(r[level][field] is None for side in runs.values() for r in side for level in levels):
        print(f"\n{title}: not printed by both revisions")
        return
    print(f"\n{title}")
    print(f"{'concurrency':>11}  {'base median':>11}  {'head median':>11}  {'ratio median':>12}"
          "  per-pair ratios")
    for level in levels:
        base = [float(r[level][field] or 0) for r in runs["base"]]
        head = [float(r[level][field] or 0) for r in runs["head"]]
        ratios = [h / b if b else float("nan") for h, b in zip(head, base, strict=True)]
        print(f"{level:>11}  {statistics.median(base):>11,.2f}  {statistics.median(head):>11,.2f}"
              f"  {statistics.median(ratios):>12.2f}  " + " ".join(f"{r:.2f}" for r in ratios))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", default=WORKTREE,
                        help="git revision to measure (default: the working tree)")
    parser.add_argument("--pairs", type=int, default=4, help="interleaved pairs of runs (≥ 1)")
    parser.add_argument("--items", type=int, default=None, help="items per run (default 3000)")
    parser.add_argument("--orgs", type=int, default=None,
                        help="organisations (default 50; both revisions must have --orgs)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be positive")

    runs: dict[str, list[Run]] = {"base": [], "head": []}
    with checkout(args.base) as base_tree, checkout(args.head) as head_tree:
        trees = {"base": base_tree, "head": head_tree}
        for pair in range(args.pairs):
            order = ("base", "head") if pair % 2 == 0 else ("head", "base")
            for side in order:
                runs[side].append(pipeline_run(trees[side], args.items, args.orgs))
                shown = {level: f"{rate:.0f}/s, PG {pg} ms"
                         for level, (rate, pg) in runs[side][-1].items()}
                print(f"pair {pair + 1}/{args.pairs} {side}: {shown}", flush=True)

    _report(runs, 0, f"Full pipeline, head ({args.head}) vs base ({args.base}), {args.pairs}"
            " interleaved pairs; episodes/s (higher is better)")
    _report(runs, 1, "PostgreSQL CPU ms per episode (lower is better; #16's target ≤ 2.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
