-- Database roles for mf-worker. Run it as a superuser (or a role with CREATEROLE) in the
-- application database, after `mf-worker migrate` has created the tables:
--
--   psql "$ADMIN_URL" -v worker_password="'change-me'" -f docs/database-roles.sql
--   psql "$ADMIN_URL" -v worker_role=mf_worker_eu -v worker_password="'…'" -f docs/database-roles.sql
--
-- Roles are cluster-wide, which is why `mf-worker migrate` does not create them. Safe to run
-- again (after an upgrade that added tables, for example): roles are created only if missing.
--
-- mf_cross_org  NOLOGIN capability role. Row-level security lets its members read and update
--               the queue, and read projects, users, organisations, the daily usage aggregate
--               and cost-limit trips across organisations: exactly what claiming, reaping,
--               scheduling and `status` need. Everything else (episodes, blocks, usage rows,
--               notes, memory, events, audit, budget reservations) is written inside a
--               transaction that acts for one organisation
--               (set_config('app.current_org_id', …, true)), so a bug that writes another
--               organisation's id is rejected by the database itself.
-- worker role   The daemon's login role (default name mf_worker): no superuser, no BYPASSRLS,
--               not the tables' owner (owners bypass RLS), member of mf_cross_org.

\set ON_ERROR_STOP on
\if :{?worker_role}
\else
  \set worker_role mf_worker
\endif

SELECT 'CREATE ROLE mf_cross_org NOLOGIN'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mf_cross_org') \gexec

SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE',
              :'worker_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'worker_role') \gexec

ALTER ROLE :"worker_role" PASSWORD :worker_password;
GRANT mf_cross_org TO :"worker_role";

GRANT USAGE ON SCHEMA public TO :"worker_role";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"worker_role";
-- What the worker writes.
GRANT INSERT, UPDATE, DELETE ON episode_schedule_queue TO :"worker_role";
GRANT INSERT, UPDATE ON episodes, planning_notes, token_usage_daily, cost_limit_trips
    TO :"worker_role";
GRANT INSERT ON blocks, token_usage, agent_memory, user_events, audit_log TO :"worker_role";
-- The scheduler only maintains the next_scheduled_at cache on projects.
GRANT UPDATE (next_scheduled_at) ON projects TO :"worker_role";

-- `mf-worker migrate` is best run as the schema owner (a separate role). Running it as the
-- worker role would make that role the owner of new tables, and owners bypass RLS.
