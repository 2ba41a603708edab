"""Versioned schema migrations shipped in the package, applied in order, each exactly once.

Migrations are ``migrations/NNNN_name.sql`` files. Each is applied in its own transaction that
first takes a transaction-scoped advisory lock and re-checks whether the version is already
recorded, so any number of ``mf-worker migrate`` processes may start at the same moment: one
applies each migration, the others wait on the lock and then find it done. Nothing holds a
session-level lock, so this also works through a transaction-mode pooler.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Final, LiteralString

from ..errors import MigrationError, SchemaNotCurrentError
from . import Connection
from .sql import load_queries

_FILE_NAME: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_Q = load_queries(__package__ or "mf_worker.db", "migrate.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its version, name, SQL text and the checksum of that text."""

    version: int
    name: str
    sql: LiteralString
    checksum: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    version: int
    name: str
    checksum: str
    applied_at: datetime


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """Where the database stands relative to the migrations this code ships."""

    applied: list[AppliedMigration]
    pending: list[Migration]
    # Applied in the database but unknown to this code: a newer mf-worker migrated it.
    unknown: list[AppliedMigration]
    # Applied, but the shipped file has changed since: someone edited a released migration.
    modified: list[Migration]


def load_migrations() -> list[Migration]:
    """The migrations shipped in the package, in version order."""
    found: list[Migration] = []
    for entry in resources.files("mf_worker.db.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if not match:
            continue
        text = entry.read_text(encoding="utf-8")
        found.append(
            Migration(
                version=int(match.group(1)),
                name=match.group(2),
                sql=text,  # shipped in the package: a literal
                checksum=hashlib.sha256(text.encode()).hexdigest(),
            )
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a version: {versions}")
    return found


async def _applied(conn: Connection) -> list[AppliedMigration]:
    row = await (await conn.execute(_Q["migrations_table_exists"])).fetchone()
    if not row or not row["present"]:
        return []
    cur = await conn.execute(_Q["list_applied_migrations"])
    return [AppliedMigration(**r) for r in await cur.fetchall()]


async def migration_status(conn: Connection) -> MigrationStatus:
    """Compare the database's record with the shipped migrations (read-only)."""
    shipped = load_migrations()
    applied = await _applied(conn)
    by_version = {a.version: a for a in applied}
    shipped_versions = {m.version for m in shipped}
    return MigrationStatus(
        applied=applied,
        pending=[m for m in shipped if m.version not in by_version],
        unknown=[a for a in applied if a.version not in shipped_versions],
        modified=[
            m
            for m in shipped
            if m.version in by_version and by_version[m.version].checksum != m.checksum
        ],
    )


async def apply_migrations(conn: Connection, log: Any = None) -> list[Migration]:
    """Apply every pending migration; return the ones this call applied (maybe none).

    ``conn`` must be in autocommit mode: each migration gets its own transaction, so a failure
    leaves the database at the last good version with a message naming the migration.
    """
    applied_now: list[Migration] = []
    for migration in load_migrations():
        async with conn.transaction():
            await conn.execute(_Q["lock_migrations"])
            await conn.execute(_Q["create_migrations_table"])
            cur = await conn.execute(_Q["is_migration_applied"], {"version": migration.version})
            row = await cur.fetchone()
            if row and row["applied"]:
                continue
            try:
                await conn.execute(migration.sql)
            except Exception as exc:
                raise MigrationError(
                    f"migration {migration.label} failed and was rolled back: {exc}"
                ) from exc
            await conn.execute(
                _Q["record_migration"],
                {
                    "version": migration.version,
                    "name": migration.name,
                    "checksum": migration.checksum,
                },
            )
        applied_now.append(migration)
        if log is not None:
            log.info("migration_applied", migration=migration.label)
    return applied_now


async def ensure_schema_current(conn: Connection) -> MigrationStatus:
    """Refuse to run against a database with pending migrations, saying how to fix it."""
    status = await migration_status(conn)
    if status.pending:
        labels = ", ".join(m.label for m in status.pending)
        raise SchemaNotCurrentError(
            f"the database has {len(status.pending)} pending migration(s) ({labels}); "
            "run `mf-worker migrate` first"
        )
    return status
