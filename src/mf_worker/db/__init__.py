"""Database access: connections, the pool, and transactions that act for one organisation.

Row-level security isolates organisations by ``app.current_org_id``; :func:`as_org` sets it with
``set_config(..., true)`` (``SET LOCAL``) so it lives exactly as long as the transaction and is
safe behind a transaction-mode pooler. The organisation always comes from the worker's own data,
never from a client.

The pool discards a connection that met a read-only server (SQLSTATE 25006,
``ReadOnlySqlTransaction``): during a failover a connection can reach the standby before it is
promoted (a DNS name or load balancer that flipped early, a multi-host URL without
``target_session_attrs=read-write``), and keeping it would send the next unit of work there again.
The caller sees the error and retries on a fresh connection (the engine counts it as transient).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from ..errors import ConfigError

if TYPE_CHECKING:  # settings imports cost (smtp), whose budget imports this module
    from ..settings import Settings

Connection = psycopg.AsyncConnection[dict[str, Any]]


class Pool(AsyncConnectionPool[Connection]):
    """psycopg's pool, except that a connection whose work met a read-only server is closed
    (so the pool replaces it) instead of being handed out again."""

    @asynccontextmanager
    async def connection(
        self, timeout: float | None = None  # noqa: ASYNC109 - the overridden method's signature
    ) -> AsyncIterator[Connection]:
        async with super().connection(timeout) as conn:
            try:
                yield conn
            except psycopg.errors.ReadOnlySqlTransaction:
                await conn.close()  # the pool sees it closed and opens another
                raise


__all__ = [
    "Connection", "Pool", "act_for", "as_org", "connect", "connection_kwargs", "open_pool",
    "timeout_options",
]


# TCP keepalives: a peer that vanished without closing (a failover, a dropped NAT entry) is
# noticed within about a minute instead of the kernel's two hours.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
              "keepalives_count": 3}


def connection_kwargs(settings: Settings) -> dict[str, Any]:
    """Options every connection gets: dict rows, TCP keepalives, and no prepared statements if
    told so."""
    kwargs: dict[str, Any] = {"row_factory": dict_row, "autocommit": True, **KEEPALIVES}
    if not settings.prepared_statements:
        kwargs["prepare_threshold"] = None
    return kwargs


def timeout_options(settings: Settings) -> dict[str, str]:
    """The worker's pooled connections wait for no lock and run no statement for ever: a row
    someone else holds (an operator's open transaction) or a runaway query fails and is
    retried instead of wedging a loop. Sent as startup options (no extra round trip); a
    timeout of 0 sends nothing (for poolers that refuse options: set it on the role)."""
    settings_ms = {
        "lock_timeout": settings.db_lock_timeout,
        "statement_timeout": settings.db_statement_timeout,
        "idle_in_transaction_session_timeout": settings.db_statement_timeout,
    }
    ours = " ".join(f"-c {name}={max(1, round(seconds * 1000))}"  # 0 ms would mean "none"
                    for name, seconds in settings_ms.items() if seconds > 0)
    if not ours:
        return {}
    # Options already in the URL (`?options=-c search_path=…`, a provider's endpoint id) stay;
    # ours come after them.
    given = conninfo_to_dict(settings.require_database_url()).get("options")
    return {"options": f"{given} {ours}" if given else ours}


async def connect(settings: Settings, **extra: Any) -> Connection:
    """One connection outside the pool (migrations, LISTEN, CLI commands)."""
    conn: Connection = await psycopg.AsyncConnection.connect(
        settings.require_database_url(),
        application_name=f"mf-worker {settings.worker_id}"[:63],
        **connection_kwargs(settings),
        **extra,
    )
    return conn


async def open_pool(settings: Settings, *, max_size: int | None = None) -> Pool:
    """The process's connection pool, opened and checked (fails fast if the database is down)."""
    timeouts = timeout_options(settings)
    if timeouts:
        await _check_startup_options_accepted(settings, timeouts)
    size = max_size or settings.pool_size
    pool = Pool(
        settings.require_database_url(),
        connection_class=psycopg.AsyncConnection[dict[str, Any]],
        min_size=min(2, size),
        max_size=size,
        kwargs={
            # Pooled connections prepare from the first execution (psycopg's default waits for
            # the fifth): the pool hands its connections out in turn, so each of them planned
            # the engine's statements afresh four times first and short runs seldom had a plan.
            "prepare_threshold": 0,
            **connection_kwargs(settings),
            **timeouts,
            "application_name": f"mf-worker {settings.worker_id}"[:63],
        },
        open=False,
        name="mf-worker",
        timeout=30.0,
    )
    await pool.open(wait=True, timeout=30.0)
    return pool


async def _check_startup_options_accepted(settings: Settings, options: dict[str, str]) -> None:
    """A transaction-mode pooler (PgBouncer, Supavisor) refuses startup options outright; say
    what to do instead of letting the pool retry for half a minute."""
    try:
        conn = await connect(settings, **options)
    except psycopg.OperationalError as exc:
        if "unsupported startup parameter" in str(exc):
            raise ConfigError(
                "the database server (a pooler?) refuses startup options, so "
                "MF_DB_LOCK_TIMEOUT and MF_DB_STATEMENT_TIMEOUT cannot be sent: set both to 0 "
                "and set the timeouts on the worker's role instead (docs/database-roles.sql "
                "does; docs/operations.md, \"Behind PgBouncer or Supavisor\")"
            ) from None
        return  # any other failure: the pool reports it as it always has
    await conn.close()


@asynccontextmanager
async def as_org(conn: Connection, organization_id: str) -> AsyncIterator[Connection]:
    """A transaction in which row-level security admits only ``organization_id``'s rows.

    BEGIN and the setting travel in one round trip (a two-statement simple query with the id
    quoted as a literal by psycopg), and the block commits on success and rolls back on any
    exception. ``conn`` must be in autocommit mode (as every mf-worker connection is).
    """
    await conn.execute(
        pgsql.SQL("BEGIN; SELECT set_config('app.current_org_id', {}, true)").format(
            pgsql.Literal(organization_id)
        ),
        prepare=False,  # two statements: never a prepared statement
    )
    try:
        yield conn
    except BaseException:
        if not conn.closed and not conn.broken:
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


async def act_for(conn: Connection, organization_id: str) -> None:
    """Inside an open transaction, act for ``organization_id`` from the next statement on.

    Row-level security reads the setting per statement, so one transaction can write for
    several organisations in turn (the batched prepare and final write do, in org order); the
    setting still ends with the transaction.
    """
    await conn.execute("SELECT set_config('app.current_org_id', %s, true)", [organization_id])
