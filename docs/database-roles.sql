-- Database roles for mf-worker. Run it as a superuser (or a role with CREATEROLE) in the
-- application database, after `mf-worker migrate` has created the tables:
--
--   psql "$ADMIN_URL" -v worker_password="'change-me'" -f docs/database-roles.sql
--   psql "$ADMIN_URL" -v worker_role=mf_worker_eu -v worker_password="'…'" -f docs/database-roles.sql
--
-- With the `email` notifier writing to the organisations' users (MF_NOTIFIER=…,email without
-- MF_MAIL_TO), also give the mail role a password; the notifier logs in as it through
-- MF_MAIL_DATABASE_URL:
--
--   psql "$ADMIN_URL" -v worker_password="'…'" -v mail_password="'…'" -f docs/database-roles.sql
--
-- Without mail_password (MF_MAIL_TO, or no `email` notifier) no role is granted the addresses,
-- and a mail role made by an earlier run loses its grant.
--
-- Roles are cluster-wide, which is why `mf-worker migrate` does not create them. Safe to run
-- again (after an upgrade that added tables, for example): roles are created only if missing.
--
-- mf_cross_org  NOLOGIN capability role. Row-level security lets its members read and update
--               the queue, and read projects, users, organisations, the daily usage aggregate
--               and cost-limit trips across organisations: exactly what claiming, reaping,
--               scheduling and `status` need, and read and write the fleet-wide provider
--               limiter (provider_limits). Everything else (episodes, blocks, usage rows,
--               notes, memory, events, audit, budget reservations) is written inside a
--               transaction that acts for one organisation
--               (set_config('app.current_org_id', …, true)), so a bug that writes another
--               organisation's id is rejected by the database itself.
-- worker role   The daemon's login role (default name mf_worker): no superuser, no BYPASSRLS,
--               not the tables' owner (owners bypass RLS), member of mf_cross_org. It reads no
--               user's address: of users only id, organization_id and timezone, and no
--               function that returns an address (tests/test_tenancy.py checks every relation
--               and function it can reach).
-- mail role     The `email` notifier's login role (default name mf_mail, made only with
--               mail_password): may execute mf_trip_recipients(org), the addresses of an
--               organisation whose daily limit tripped today and has not been told yet, acting
--               for it; nothing else. Not a member of mf_cross_org; the worker role is not a
--               member of it either (it must never be: SET ROLE would give the worker the
--               addresses).
-- docs/operations.md, "Who can read what", has the whole table.

\set ON_ERROR_STOP on
\if :{?worker_role}
\else
  \set worker_role mf_worker
\endif
\if :{?mail_role}
\else
  \set mail_role mf_mail
\endif

SELECT 'CREATE ROLE mf_cross_org NOLOGIN'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mf_cross_org') \gexec

SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE',
              :'worker_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'worker_role') \gexec

ALTER ROLE :"worker_role" PASSWORD :worker_password;
GRANT mf_cross_org TO :"worker_role";

-- Temporary objects are how a session shadows the tables a function names; nobody here needs
-- them. (The SECURITY DEFINER functions also pin their search_path since migration 0004: this
-- is the second lock on the same door.) Affects every role of this database that relies on
-- PUBLIC's default TEMP; grant it back to a role that really needs it.
REVOKE TEMPORARY ON DATABASE :"DBNAME" FROM PUBLIC;

GRANT USAGE ON SCHEMA public TO :"worker_role";
-- What the worker reads: everything it works on, but of users only what scheduling needs (the
-- zone), never an address or a name, and none of the app's chats and highlights, which it
-- never reads (docs/operations.md, "Who can read what").
SELECT format('GRANT SELECT ON %s TO %I',
              string_agg(format('%I.%I', schemaname, tablename), ', '), :'worker_role')
FROM pg_tables
WHERE schemaname = 'public'
  AND tablename NOT IN ('users', 'chat_sessions', 'chat_messages', 'highlights') \gexec
REVOKE SELECT ON users, chat_sessions, chat_messages, highlights FROM :"worker_role";
GRANT SELECT (id, organization_id, timezone) ON users TO :"worker_role";
-- Claims draw their claim token from this sequence (migration 0004 grants it to mf_cross_org
-- too, when the role exists at migration time).
GRANT USAGE ON SEQUENCE episode_schedule_queue_claim_token_seq TO mf_cross_org;
-- What the worker writes.
GRANT INSERT, UPDATE, DELETE ON episode_schedule_queue TO :"worker_role";
GRANT INSERT, UPDATE ON episodes, planning_notes, token_usage_daily, cost_limit_trips
    TO :"worker_role";
GRANT INSERT ON blocks, token_usage, agent_memory, user_events, audit_log TO :"worker_role";
-- The fleet-wide provider limiter: one row per limit key (an account and model), not per
-- organisation; its policy admits only members of mf_cross_org.
GRANT INSERT, UPDATE ON provider_limits TO :"worker_role";
-- The scheduler only maintains the next_scheduled_at cache on projects, drains its change log
-- (filled by triggers, migration 0009) and paces the fleet's passes.
GRANT UPDATE (next_scheduled_at) ON projects TO :"worker_role";
GRANT UPDATE, DELETE ON scheduler_project_changes TO :"worker_role";
GRANT UPDATE ON scheduler_state TO :"worker_role";
-- No address for the worker, whatever an older version of this file granted: the `email`
-- notifier reads them as the mail role (below). The old lookup (migration 0006) is revoked
-- from everyone by migration 0011; this repeats it for the worker role.
REVOKE EXECUTE ON FUNCTION mf_organization_emails(text), mf_trip_recipients(text)
    FROM :"worker_role";

-- The mail role: only with mail_password (the `email` notifier writing to the organisations'
-- users). It reads the addresses of an organisation whose limit tripped today, not yet told,
-- through mf_trip_recipients(org) acting for it, and nothing else: no table, no membership.
\if :{?mail_password}
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE',
              :'mail_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'mail_role') \gexec
ALTER ROLE :"mail_role" PASSWORD :mail_password;
GRANT USAGE ON SCHEMA public TO :"mail_role";
GRANT EXECUTE ON FUNCTION mf_trip_recipients(text) TO :"mail_role";
ALTER ROLE :"mail_role" SET lock_timeout = '5s';
ALTER ROLE :"mail_role" SET statement_timeout = '30s';
ALTER ROLE :"mail_role" SET idle_in_transaction_session_timeout = '30s';
\else
-- MF_MAIL_TO (or no `email` notifier): a mail role an earlier run made keeps no grant.
SELECT format('REVOKE EXECUTE ON FUNCTION mf_trip_recipients(text) FROM %I', :'mail_role')
WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'mail_role') \gexec
\endif

-- No statement of the worker waits for a lock or runs for ever, whichever way it connects:
-- mf-worker sends these as startup options (MF_DB_LOCK_TIMEOUT, MF_DB_STATEMENT_TIMEOUT), but
-- a transaction-mode pooler refuses startup options, and the role's own defaults still apply.
ALTER ROLE :"worker_role" SET lock_timeout = '5s';
ALTER ROLE :"worker_role" SET statement_timeout = '30s';
ALTER ROLE :"worker_role" SET idle_in_transaction_session_timeout = '30s';

-- `mf-worker migrate` is best run as the schema owner: a separate role that is not a superuser
-- (see docs/operations.md, "Database roles"). Running it as the worker role would make that
-- role the owner of new tables, and owners bypass RLS; running it as a superuser makes the
-- SECURITY DEFINER functions run as a superuser, which their pinned search_path makes safe
-- but which is more power than they need.

-- ---------------------------------------------------------------------------------------------
-- The operator console's role (`mf-worker console`, docs/console.md). Created only when a
-- password is given for it; the worker's part above is unchanged without one:
--
--   psql "$ADMIN_URL" -v worker_password="'…'" -v console_password="'…'" -f docs/database-roles.sql
--   psql "$ADMIN_URL" … -v console_role=mf_console_eu -v console_password="'…'" -f …
--
-- console role  The console's login role (default name mf_console): no superuser, no
--               BYPASSRLS, not an owner, member of mf_cross_org, so it reads the queue,
--               projects, organisations, the daily aggregate, trips and provider limits across
--               organisations; an item's episode, blocks, usage and audit rows it reads acting
--               for the item's organisation. Of users it reads the zone, never an address or a
--               name. It writes only what an operator's retry, cancel, enqueue and provider
--               key reset write: the queue row, the episode they reopen or fail, the limit
--               key, the audit row; nothing else.
\if :{?console_password}
\if :{?console_role}
\else
  \set console_role mf_console
\endif
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE',
              :'console_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'console_role') \gexec
ALTER ROLE :"console_role" PASSWORD :console_password;
GRANT mf_cross_org TO :"console_role";
GRANT USAGE ON SCHEMA public TO :"console_role";
-- What its pages read.
GRANT SELECT ON episode_schedule_queue, projects, organizations, episodes, blocks, token_usage,
    token_usage_daily, cost_limit_trips, provider_limits, audit_log TO :"console_role";
REVOKE SELECT ON users FROM :"console_role";
GRANT SELECT (id, organization_id, timezone) ON users TO :"console_role";
-- What its actions write (the same statements as `mf-worker retry|cancel|enqueue`).
GRANT INSERT, UPDATE ON episode_schedule_queue TO :"console_role";
GRANT UPDATE ON episodes TO :"console_role";
GRANT INSERT ON audit_log TO :"console_role";
GRANT UPDATE (next_scheduled_at) ON projects TO :"console_role";
GRANT UPDATE ON provider_limits TO :"console_role";
-- A page is a few indexed reads: nothing it runs waits long or runs long.
ALTER ROLE :"console_role" SET lock_timeout = '5s';
ALTER ROLE :"console_role" SET statement_timeout = '10s';
ALTER ROLE :"console_role" SET idle_in_transaction_session_timeout = '30s';
\endif
