"""The migrations, the schema snapshot and the code's named queries agree with each other.

Three checks, as procrastinate does for its schema: the migrations applied to an empty database
produce exactly the committed ``src/mf_worker/db/schema.sql``; every named query in every
``.sql`` file beside a module parses and plans against that migrated database (so a query that
names a column no migration creates fails here, not in production); and every named query is
used by some code, so none is left behind when its caller goes.
"""

from __future__ import annotations

import ast
import difflib
import re
from pathlib import Path
from typing import Any, Final

import psycopg
import pytest
from psycopg import pq

from mf_worker.db.sql import load_queries

from .conftest import REQUIRE_ALL, require_binary
from .schema_snapshot import (
    REGENERATE,
    SNAPSHOT,
    dump_schema,
    pg_dump_for,
    server_major,
    snapshot_major,
)

ROOT: Final = Path(__file__).resolve().parent.parent
PACKAGE_DIR: Final = ROOT / "src" / "mf_worker"
# Where code that runs named queries lives: the package, and the benchmarks that measure a
# query on its own (bench_cost's read_daily_budget).
CALLERS: Final = (PACKAGE_DIR, ROOT / "bench")


def query_files() -> list[Path]:
    """Every file of named queries: each ``.sql`` beside a module (not migrations, not the
    snapshot)."""
    return sorted(
        path for path in PACKAGE_DIR.rglob("*.sql")
        if "migrations" not in path.relative_to(PACKAGE_DIR).parts and path != SNAPSHOT
    )


def queries_in(path: Path) -> dict[str, str]:
    """The named queries of one file, loaded the way the module that owns it loads them."""
    package = ".".join(("mf_worker", *path.parent.relative_to(PACKAGE_DIR).parts))
    return dict(load_queries(package, path.name))


def _label(path: Path) -> str:
    return str(path.relative_to(PACKAGE_DIR))


# psycopg's placeholders: %s, %(name)s (also %b / %t), and %% for a literal percent sign.
_PLACEHOLDER: Final = re.compile(r"%%|%(?:\((\w+)\))?[sbt]")


def to_server_placeholders(query: str) -> str:
    """The query as the server sees it: ``$1``, ``$2``… (one number per distinct name)."""
    numbers: dict[str, int] = {}

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        name = match.group(1) or f"#{len(numbers)}"  # positional: each its own parameter
        return f"${numbers.setdefault(name, len(numbers) + 1)}"

    return _PLACEHOLDER.sub(replace, query)


# Errors about a parameter's type, not about the schema: psycopg sends each value with its type
# (a Decimal as numeric, a str as unknown), which a bare prepare does not have.
_INCONSISTENT: Final = re.compile(r"parameter \$(\d+)")
_VERSUS: Final = re.compile(r"(\S[^\n]*) versus (\S[^\n]*)")


def prepare(conn: psycopg.Connection[Any], query: str) -> str | None:
    """Prepare ``query`` (parse, analyse, plan; not run) on ``conn``: None, or the error.

    A parameter the server cannot type by itself is declared as the type psycopg would send
    (the wider of two deduced types, else text), and the prepare is tried again."""
    types: dict[int, int] = {}
    while True:
        oids = [types.get(n, 0) for n in range(1, max(types, default=0) + 1)]
        result = conn.pgconn.prepare(b"mf_check", query.encode(), oids or None)
        if result.status == pq.ExecStatus.COMMAND_OK:
            conn.execute("DEALLOCATE mf_check")
            return None
        message = (result.error_message or b"").decode(errors="replace").strip()
        state = result.error_field(pq.DiagnosticField.SQLSTATE)
        parameter = _INCONSISTENT.search(message)
        if state not in (b"42P08", b"42P18") or parameter is None:
            return message
        number = int(parameter.group(1))
        versus = _VERSUS.search(message)
        wanted = versus.group(2) if versus else "text"
        row = conn.execute("SELECT %s::regtype::oid", [wanted]).fetchone()
        assert row is not None
        oid = int(row[0])
        if types.get(number) == oid:
            return message  # declaring it did not help: a real problem
        types[number] = oid


def test_the_migrations_produce_the_committed_schema_snapshot(db_url: str) -> None:
    """``db_url`` is a copy of a database built by the migrations alone (conftest's template);
    its normalised dump must equal the snapshot, line for line."""
    require_binary("pg_dump")
    committed = SNAPSHOT.read_text(encoding="utf-8")
    major = server_major(db_url)
    made_with = snapshot_major(committed)
    if made_with != major:
        # pg_dump lays the same schema out differently across major versions: a developer on
        # another version skips; CI, which must compare, fails (and says how to move on).
        message = (f"the snapshot was made with PostgreSQL {made_with}, this server is {major}: "
                   f"compare on {made_with}, or run `{REGENERATE}` after an upgrade")
        if REQUIRE_ALL:
            pytest.fail(message)
        pytest.skip(message)
    pg_dump = pg_dump_for(major)
    assert pg_dump is not None
    actual = dump_schema(db_url, pg_dump)
    diff = "".join(difflib.unified_diff(
        committed.splitlines(keepends=True), actual.splitlines(keepends=True),
        fromfile=f"{SNAPSHOT.relative_to(ROOT)} (committed)", tofile="the migrations produce",
    ))
    if actual != committed:  # pytest.fail: one diff, not pytest's own as well
        pytest.fail(f"the migrations no longer produce the committed schema snapshot; if the "
                    f"migrations are right, run `{REGENERATE}` and commit the file:\n{diff}")


@pytest.mark.parametrize("path", query_files(), ids=_label)
def test_every_named_query_parses_against_the_migrated_schema(db_url: str, path: Path) -> None:
    """Each query is prepared (parsed, analysed and planned: every table, column, function and
    type it names resolved) on the migrated database, without running it."""
    queries = queries_in(path)
    assert queries, f"{_label(path)} has no `-- name:` blocks"
    failures: list[str] = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        for name, query in queries.items():
            error = prepare(conn, to_server_placeholders(query))
            if error is not None:
                failures.append(f"{_label(path)}: {name}: {error}")
    assert not failures, "named queries that do not fit the migrated schema:\n" + "\n".join(
        failures)


def _string_constants(directory: Path) -> set[str]:
    found: set[str] = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return found


def test_every_named_query_is_used_by_the_code() -> None:
    """A query is called by name (``_Q["claim_due_items"]``), so a name that appears as a
    string nowhere in the package or the benchmarks is a query nothing runs: delete it."""
    used = set().union(*(_string_constants(directory) for directory in CALLERS))
    unused = [f"{_label(path)}: {name}" for path in query_files()
              for name in queries_in(path) if name not in used]
    assert not unused, "named queries that no code runs:\n" + "\n".join(unused)
