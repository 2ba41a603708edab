"""Tenancy: the worker's database role reaches no user's address, whatever it reads or calls;
only the mail role reads them, and only for an organisation whose limit tripped today and has
not been told yet; the roles table in docs/operations.md is what the catalogs say.

The roles are made by applying docs/database-roles.sql with psql, as an operator does; what a
role may reach is enumerated from the catalogs (``has_column_privilege``,
``has_function_privilege``, the row-level security policies), never from a hand-written list.
"""

from __future__ import annotations

import itertools
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from .conftest import ROLES_SQL, ensure_cross_org_role, require_binary
from .factories import make_org, make_project, make_queue_item, make_user

Conn = psycopg.Connection[dict[str, Any]]
ROOT = Path(__file__).resolve().parent.parent
OPERATIONS_MD = ROOT / "docs" / "operations.md"


@dataclass(frozen=True)
class Roles:
    """The login roles docs/database-roles.sql made for this test, as connection strings."""

    worker: str
    worker_url: str
    mail: str | None
    mail_url: str | None


def apply_roles_file(db_url: str, db: Conn, *, mail: bool) -> Iterator[Roles]:
    """Apply docs/database-roles.sql with fresh role names; with ``mail``, the mail role too
    (``-v mail_password=…``: the `email` notifier without MF_MAIL_TO)."""
    psql = require_binary("psql")
    suffix = uuid.uuid4().hex[:10]
    worker, mail_role = f"mf_test_worker_{suffix}", f"mf_test_mail_{suffix}"
    ensure_cross_org_role(db)  # cluster-wide: tolerate a concurrent creator (conftest)
    variables = ["-v", f"worker_role={worker}", "-v", "worker_password='x'",
                 "-v", f"mail_role={mail_role}"]
    if mail:
        variables += ["-v", "mail_password='y'"]
    applied = subprocess.run([psql, db_url, *variables, "-f", str(ROLES_SQL)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert applied.returncode == 0, applied.stderr
    base = conninfo_to_dict(db_url)
    made = [r["rolname"] for r in db.execute(
        "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", [[worker, mail_role]])]
    try:
        yield Roles(worker, make_conninfo("", **{**base, "user": worker}),
                    mail_role if mail_role in made else None,
                    make_conninfo("", **{**base, "user": mail_role}) if mail_role in made
                    else None)
    finally:
        for role in made:
            db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                       " WHERE usename = %s", [role])
            db.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.fixture
def roles(db_url: str, db: Conn) -> Iterator[Roles]:
    """The worker role and the mail role (the `email` notifier writes to users)."""
    yield from apply_roles_file(db_url, db, mail=True)


@pytest.fixture
def roles_without_mail(db_url: str, db: Conn) -> Iterator[Roles]:
    """The worker role only (MF_MAIL_TO, or no `email` notifier)."""
    yield from apply_roles_file(db_url, db, mail=False)


def organisations_with_addresses(db: Conn, count: int = 3) -> list[tuple[str, list[str]]]:
    """``count`` organisations with two users each, every address unique to this test (and
    sharing nothing with an id the worker may read), with a project and a due item each."""
    orgs = []
    for i in range(count):
        org = make_org(db, name=f"Tenant {i}")
        addresses = [f"addr{uuid.uuid4().hex[:12]}@tenant{i}.example" for _ in range(2)]
        users = [make_user(db, org, email=a) for a in addresses]
        make_queue_item(db, make_project(db, users[0]))
        orgs.append((org["id"], addresses))
    return orgs


def trip_today(db: Conn, org_id: str) -> None:
    db.execute("INSERT INTO cost_limit_trips (organization_id, date, spent_gbp, limit_gbp,"
               " next_notify_at) VALUES (%s, (now() AT TIME ZONE 'UTC')::date, 5, 5, now())",
               [org_id])


# ---------------------------------------------------------------------------------------------
# What a role can reach, from the catalogs
# ---------------------------------------------------------------------------------------------

# Every relation of which the role may read a column. information_schema is left out: its views
# are made of the pg_catalog tables read here (and are slow to read whole).
READABLE_RELATIONS = """
SELECT c.oid::regclass::text AS relation, n.nspname = 'pg_catalog' AS system,
       array_agg(quote_ident(a.attname) ORDER BY a.attnum) AS columns
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
  AND n.nspname NOT IN ('information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
  AND has_column_privilege(c.oid, a.attnum, 'SELECT')
GROUP BY c.oid, n.nspname
ORDER BY 1
"""

# Functions of the application's schemas the role may execute. The built-in ones of pg_catalog
# reach tables only with the caller's own rights (query_to_xml …), which the relations cover;
# trigger functions cannot be called, they run inside the writes they maintain.
CALLABLE_FUNCTIONS = """
SELECT p.oid::regprocedure::text AS signature, n.nspname AS schema, p.proname AS name,
       coalesce(p.proargtypes::regtype[]::text[], '{}') AS argtypes
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
  AND p.prokind = 'f' AND p.prorettype NOT IN ('trigger'::regtype, 'event_trigger'::regtype)
  AND has_function_privilege(p.oid, 'EXECUTE')
ORDER BY 1
"""

TEXT_TYPES = {"text", "character varying", "name"}


def connect_as(url: str) -> Conn:
    return psycopg.connect(url, autocommit=True, row_factory=dict_row)


def addresses_reachable(conn: Conn, org_ids: list[str], tokens: list[str]
                        ) -> tuple[set[tuple[str, str, str]], list[str], list[str]]:
    """Read every relation and call every function ``conn``'s role may, without an
    organisation and acting for each of ``org_ids`` (a session sets app.current_org_id as it
    likes), giving each text argument every organisation's id. Returns (where, acting for,
    token) for each token found, and what was read and called."""
    relations = conn.execute(READABLE_RELATIONS).fetchall()
    functions = conn.execute(CALLABLE_FUNCTIONS).fetchall()
    found: set[tuple[str, str, str]] = set()
    lowered = [t.lower() for t in tokens]

    def search(where: str, query: sql.Composable, params: list[Any], acting: str) -> None:
        probe = sql.SQL("SELECT p FROM unnest(%s::text[]) AS p WHERE EXISTS ("
                        "SELECT 1 FROM ({}) AS r WHERE strpos(lower(r::text), p) > 0)"
                        ).format(query)
        try:
            with conn.transaction():  # a savepoint: a refusal leaves the acting one intact
                hits = conn.execute(probe, [lowered, *params]).fetchall()
        except (errors.InsufficientPrivilege, errors.FeatureNotSupported,
                errors.ObjectNotInPrerequisiteState, errors.SyntaxError,
                errors.DatatypeMismatch, errors.InvalidParameterValue,
                errors.RaiseException) as exc:
            assert "email" not in str(exc).lower() or not any(t in str(exc) for t in tokens)
            return
        found.update((where, acting, h["p"]) for h in hits)

    for acting in [None, *org_ids]:
        with conn.transaction():
            if acting is not None:
                conn.execute("SELECT set_config('app.current_org_id', %s, true)", [acting])
            for rel in relations:
                if rel["system"] and acting is not None:
                    continue  # the catalogs know no organisation: read once
                columns = sql.SQL(", ").join(sql.SQL(c) for c in rel["columns"])
                search(rel["relation"], sql.SQL("SELECT {} FROM {}").format(
                    columns, sql.SQL(rel["relation"])), [], str(acting))
            for fn in functions:
                candidates = [org_ids if t in TEXT_TYPES else [None] for t in fn["argtypes"]]
                for args in itertools.product(*candidates):
                    call = sql.SQL("SELECT * FROM {}.{}({}) AS f").format(
                        sql.Identifier(fn["schema"]), sql.Identifier(fn["name"]),
                        sql.SQL(", ").join(sql.SQL("%s::{}").format(sql.SQL(t))
                                           for t in fn["argtypes"]))
                    search(fn["signature"], call, list(args), str(acting))
    return (found, [r["relation"] for r in relations],
            [f["signature"] for f in functions])


# ---------------------------------------------------------------------------------------------
# The worker role
# ---------------------------------------------------------------------------------------------


def test_the_worker_role_reaches_no_address_of_another_organisation_anywhere(
    db: Conn, roles: Roles
) -> None:
    """As the worker role (the `email` notifier's mail role made too): every relation it may
    read a column of and every function it may execute, without an organisation and acting for
    each one, with every organisation's id for each text argument, yield no user's address of
    any organisation: not of one whose limit tripped today (the trip is the mail role's key,
    not the worker's), not of another. The statistics the planner keeps (pg_stats) included."""
    orgs = organisations_with_addresses(db)
    trip_today(db, orgs[0][0])
    db.execute("ANALYZE users")
    tokens = [a for _, addresses in orgs for a in addresses]
    tokens += [a.split("@")[0] for a in tokens]
    with connect_as(roles.worker_url) as conn:
        found, relations, functions = addresses_reachable(conn, [o for o, _ in orgs], tokens)
    # What was tried: the worker's own tables, the catalogs, and the application's functions.
    assert {"users", "projects", "cost_limit_trips", "pg_stats"} <= set(relations)
    assert "mf_current_org_id()" in functions
    assert found == set(), f"the worker role reads addresses: {sorted(found)}"


def test_without_the_mail_role_no_role_but_the_owner_may_read_addresses(
    db: Conn, roles_without_mail: Roles
) -> None:
    """MF_MAIL_TO (or no `email` notifier): the roles file is applied without
    `mail_password`, makes no mail role and grants the address lookup to nobody."""
    assert roles_without_mail.mail is None
    grantees = db.execute(
        "SELECT p.oid::regprocedure::text AS function, r.rolname AS grantee"
        " FROM pg_proc p, aclexplode(p.proacl) a JOIN pg_roles r ON r.oid = a.grantee"
        " WHERE p.pronamespace = 'public'::regnamespace AND a.grantee <> p.proowner"
    ).fetchall()
    assert grantees == []
    with connect_as(roles_without_mail.worker_url) as conn:
        orgs = organisations_with_addresses(db, 2)
        for org_id, _ in orgs:
            trip_today(db, org_id)
        tokens = [a for _, addresses in orgs for a in addresses]
        found, _, _ = addresses_reachable(conn, [o for o, _ in orgs], tokens)
    assert found == set()


# ---------------------------------------------------------------------------------------------
# The mail role
# ---------------------------------------------------------------------------------------------


def test_the_mail_role_reads_only_a_tripped_unnotified_organisations_addresses_today(
    db: Conn, roles: Roles
) -> None:
    """The mail role reads an organisation's addresses acting for it, only while it has a trip
    of today that is not notified yet; nothing of an organisation without one, nothing once the
    trip is notified, nothing of yesterday's trip, and no table at all."""
    assert roles.mail_url is not None
    (tripped, tripped_addresses), (calm, calm_addresses), (old, _) = \
        organisations_with_addresses(db)
    trip_today(db, tripped)
    db.execute("INSERT INTO cost_limit_trips (organization_id, date, spent_gbp, limit_gbp)"
               " VALUES (%s, (now() AT TIME ZONE 'UTC')::date - 1, 5, 5)", [old])

    with connect_as(roles.mail_url) as conn:
        def recipients(acting_for: str | None, org: str) -> list[str]:
            with conn.transaction():
                if acting_for is not None:
                    conn.execute("SELECT set_config('app.current_org_id', %s, true)",
                                 [acting_for])
                rows = conn.execute("SELECT r FROM public.mf_trip_recipients(%s) AS r",
                                    [org]).fetchall()
            return [r["r"] for r in rows]

        assert recipients(tripped, tripped) == tripped_addresses
        assert recipients(None, tripped) == []
        assert recipients(calm, tripped) == []
        assert recipients(calm, calm) == []
        assert recipients(old, old) == []
        # Everything else it may reach holds no address of the organisation without a trip.
        found, relations, _ = addresses_reachable(conn, [calm, old], calm_addresses)
        assert found == set()
        assert not {"users", "organizations", "cost_limit_trips"} & set(relations)
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("INSERT INTO cost_limit_trips (organization_id, date, spent_gbp,"
                         " limit_gbp) VALUES (%s, current_date, 1, 1)", [calm])

    db.execute("UPDATE cost_limit_trips SET notified_at = now() WHERE organization_id = %s",
               [tripped])
    with connect_as(roles.mail_url) as conn, conn.transaction():
        conn.execute("SELECT set_config('app.current_org_id', %s, true)", [tripped])
        assert conn.execute("SELECT r FROM public.mf_trip_recipients(%s) AS r",
                            [tripped]).fetchall() == []


def test_the_recipients_function_is_a_pinned_definer_that_public_may_not_call(db: Conn) -> None:
    """SECURITY DEFINER with a fixed search_path (no caller's object can stand in for ours),
    EXECUTE revoked from PUBLIC; the older lookup, mf_organization_emails, is callable by no
    one but its owner."""
    rows = db.execute(
        "SELECT proname, prosecdef, proconfig, has_function_privilege('public', oid, 'EXECUTE')"
        " AS pub FROM pg_proc WHERE proname IN ('mf_trip_recipients', 'mf_organization_emails')"
        " ORDER BY proname").fetchall()
    assert rows == [
        {"proname": "mf_organization_emails", "prosecdef": True,
         "proconfig": ["search_path=pg_catalog, pg_temp"], "pub": False},
        {"proname": "mf_trip_recipients", "prosecdef": True,
         "proconfig": ["search_path=pg_catalog, pg_temp"], "pub": False},
    ]
    grants = db.execute(
        "SELECT count(*) AS n FROM pg_proc p, aclexplode(p.proacl) a"
        " WHERE p.proname = 'mf_organization_emails' AND a.grantee <> p.proowner").fetchone()
    assert grants == {"n": 0}




def test_the_email_notifier_mails_a_tripped_organisation_as_the_mail_role(
    db: Conn, roles: Roles
) -> None:
    """End to end under the documented roles: the worker (worker role) trips an organisation's
    limit; without MF_MAIL_DATABASE_URL its `email` notifier may not read the addresses and
    records why; the budget loop's next try, as the mail role, delivers to the users."""
    import asyncio
    from datetime import UTC, datetime, timedelta
    from decimal import Decimal

    from aiosmtpd.controller import Controller

    from mf_worker.cost.notify import build_notifier
    from mf_worker.db import open_pool
    from mf_worker.maintenance.budget import BudgetConfig, BudgetLoop

    from .conftest import settings_for
    from .test_notify_email import Inbox, email_settings, free_port, org_over_its_limit
    from .workers import run_burst

    assert roles.mail_url is not None
    port = free_port()
    org = org_over_its_limit(db, "ada@example.org", "bob@example.org")
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        run_burst(roles.worker_url, concurrency=1, **email_settings(port))
        trip = db.execute("SELECT * FROM cost_limit_trips WHERE organization_id = %s",
                          [org["id"]]).fetchone()
        assert trip is not None and trip["notified_at"] is None
        assert "MF_MAIL_DATABASE_URL" in trip["last_notify_error"]
        assert inbox.messages == []

        settings = settings_for(roles.worker_url, mail_database_url=roles.mail_url,
                                **email_settings(port))

        async def one_pass(now: datetime) -> None:
            pool = await open_pool(settings, max_size=2)
            try:
                await BudgetLoop(
                    pool, BudgetConfig(policy="resume", default_limit=Decimal(50),
                                       reserve_per_item=Decimal("0.5"), interval=60),
                    notifier=build_notifier(settings, pool),
                ).run_once(now)
            finally:
                await pool.close()

        asyncio.run(one_pass(max(trip["next_notify_at"], datetime.now(UTC))
                             + timedelta(seconds=1)))
    finally:
        controller.stop()
    assert [sorted(r) for r, _ in inbox.messages] == [["ada@example.org", "bob@example.org"]]
    assert db.execute("SELECT notified_at FROM cost_limit_trips WHERE organization_id = %s",
                      [org["id"]]).fetchone()["notified_at"] is not None  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# The roles table in docs/operations.md
# ---------------------------------------------------------------------------------------------

TABLE_HEADING = "#### Who can read what"
WRITES = ("INSERT", "UPDATE", "DELETE")


def documented_roles_table() -> dict[str, list[str]]:
    """The table under TABLE_HEADING in docs/operations.md: object -> its cells (the last one,
    why, is prose and not compared)."""
    text = OPERATIONS_MD.read_text(encoding="utf-8")
    assert TABLE_HEADING in text, f"docs/operations.md has no {TABLE_HEADING!r}"
    lines = text.split(TABLE_HEADING, 1)[1].splitlines()
    rows = list(itertools.dropwhile(lambda ln: not ln.startswith("|"), lines))
    rows = list(itertools.takewhile(lambda ln: ln.startswith("|"), rows))[2:]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split(" | ")]
        table[cells[0]] = cells[1:]
    return table


def _scope(db: Conn, table: str, role: str, command: str) -> str:
    """Whose rows ``role`` reaches in ``table`` for ``command``, from its policies."""
    rls = db.execute("SELECT relrowsecurity FROM pg_class WHERE oid = %s::regclass",
                     [table]).fetchone()
    if rls is None or not rls["relrowsecurity"]:
        return "all rows"
    policies = db.execute(
        "SELECT coalesce(qual, '') || ' ' || coalesce(with_check, '') AS expr FROM pg_policies"
        " WHERE schemaname = 'public' AND tablename = %s AND cmd IN (%s, 'ALL')"
        "   AND ('public' = ANY(roles) OR %s = ANY(roles))", [table, command, role]).fetchall()
    cross = db.execute("SELECT pg_has_role(%s, 'mf_cross_org', 'MEMBER') AS m",
                       [role]).fetchone()
    exprs = [p["expr"] for p in policies]
    cross_exprs = [e for e in exprs if "mf_has_cross_org_access" in e]
    if cross and cross["m"] and cross_exprs:
        # A cross-organisation policy limited to rows of no organisation (the console's
        # fleet-wide audit rows, migration 0015) adds those to the organisation's own.
        if all("organization_id IS NULL" in e for e in cross_exprs):
            return "its organisation's rows and fleet-wide rows"
        return "all rows"
    if any("mf_current_org_id" in e for e in exprs):
        return "its organisation's rows"
    return "none (no policy)"


def _columns(db: Conn, table: str, role: str, privilege: str) -> tuple[list[str], bool]:
    """The columns ``role`` holds ``privilege`` on, and whether that is all of them."""
    rows = db.execute(
        "SELECT a.attname, has_column_privilege(%s, a.attrelid, a.attnum, %s) AS ok"
        " FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0"
        "   AND NOT a.attisdropped ORDER BY a.attnum", [role, privilege, table]).fetchall()
    granted = [r["attname"] for r in rows if r["ok"]]
    return granted, len(granted) == len(rows)


def _listed(columns: list[str], whole: bool) -> str:
    return "" if whole else " (" + ", ".join(f"`{c}`" for c in columns) + ")"


def reads_cell(db: Conn, table: str, role: str) -> str:
    columns, whole = _columns(db, table, role, "SELECT")
    if not columns:
        return "—"
    return _scope(db, table, role, "SELECT") + _listed(columns, whole)


def writes_cell(db: Conn, table: str, role: str) -> str:
    groups: dict[str, list[str]] = {}
    for privilege in WRITES:
        if privilege == "UPDATE":
            columns, whole = _columns(db, table, role, "UPDATE")
            if not columns:
                continue
            granted = "UPDATE" + _listed(columns, whole)
        else:
            ok = db.execute("SELECT has_table_privilege(%s, %s::regclass, %s) AS ok",
                            [role, table, privilege]).fetchone()
            if not (ok and ok["ok"]):
                continue
            granted = privilege
        groups.setdefault(_scope(db, table, role, privilege), []).append(granted)
    return "; ".join(f"{', '.join(p)}: {scope}" for scope, p in groups.items()) or "—"


def computed_roles_table(db: Conn, roles: Roles) -> dict[str, list[str]]:
    """Every table of the schema and every function granted to a role of ours: what the worker
    reads and writes, and what the mail role may do, from the catalogs."""
    assert roles.mail is not None
    table: dict[str, list[str]] = {}
    for row in db.execute("SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                          " AND relkind = 'r' ORDER BY relname").fetchall():
        name = row["relname"]
        mail = reads_cell(db, name, roles.mail)
        mail_writes = writes_cell(db, name, roles.mail)
        table[f"`{name}`"] = [reads_cell(db, name, roles.worker),
                              writes_cell(db, name, roles.worker),
                              mail if mail_writes == "—" else f"{mail}; {mail_writes}"]
    for row in db.execute(
        "SELECT p.oid::regprocedure::text AS fn,"
        "       has_function_privilege(%s, p.oid, 'EXECUTE') AS worker,"
        "       has_function_privilege(%s, p.oid, 'EXECUTE') AS mail"
        " FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace"
        "   AND NOT has_function_privilege('public', p.oid, 'EXECUTE')"
        "   AND p.prorettype <> 'trigger'::regtype ORDER BY 1",
        [roles.worker, roles.mail]).fetchall():
        table[f"`{row['fn']}`"] = ["EXECUTE" if row["worker"] else "—", "—",
                                   "EXECUTE" if row["mail"] else "—"]
    return table


def test_the_roles_table_in_operations_md_is_what_the_database_grants(
    db: Conn, roles: Roles
) -> None:
    """docs/operations.md, "Who can read what": one row per table of the schema and per
    function granted to a role, with exactly the rows each role reaches and the privileges it
    holds, as the roles file and the policies make them (the last column, why, is prose)."""
    documented = {name: cells[:3] for name, cells in documented_roles_table().items()}
    computed = computed_roles_table(db, roles)
    missing = "\n".join(f"| {k} | {' | '.join(v)} | … |" for k, v in computed.items()
                        if k not in documented)
    assert set(documented) == set(computed), f"rows to add:\n{missing}"
    wrong = {k: (documented[k], v) for k, v in computed.items() if documented[k] != v}
    assert wrong == {}, "documented vs granted:\n" + "\n".join(
        f"{k}: {d} != {c}" for k, (d, c) in wrong.items())
