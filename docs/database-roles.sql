-- Database roles for mf-worker. Run once per cluster as a superuser (or a role with CREATEROLE),
-- after `mf-worker migrate` has created the tables, e.g.:
--
--   psql "$ADMIN_URL" -v worker_password="'change-me'" -f docs/database-roles.sql
--
-- Roles are cluster-wide, which is why `mf-worker migrate` does not create them.
--
-- mf_cross_org  NOLOGIN capability role. Row-level security lets its members read and update
--               the queue, and read projects, users, organisations and the daily usage
--               aggregate across organisations: exactly what claiming, reaping, scheduling and
--               `status` need. Everything else (episodes, blocks, usage rows, notes, memory,
--               events, audit) is written inside a transaction that acts for one organisation
--               (set_config('app.current_org_id', …, true)), so a bug that writes another
--               organisation's id is rejected by the database itself.
-- mf_worker     The daemon's login role: no superuser, no BYPASSRLS, not the tables' owner
--               (owners bypass RLS), member of mf_cross_org.

CREATE ROLE mf_cross_org NOLOGIN;
CREATE ROLE mf_worker LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE
    PASSWORD :worker_password IN ROLE mf_cross_org;

GRANT USAGE ON SCHEMA public TO mf_worker;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO mf_worker;
-- What the worker writes.
GRANT INSERT, UPDATE, DELETE ON episode_schedule_queue TO mf_worker;
GRANT INSERT, UPDATE ON episodes, planning_notes TO mf_worker;
GRANT INSERT ON blocks, token_usage, agent_memory, user_events, audit_log TO mf_worker;
-- The scheduler only maintains the next_scheduled_at cache on projects.
GRANT UPDATE (next_scheduled_at) ON projects TO mf_worker;
-- `mf-worker migrate` is best run as the schema owner; to run it as mf_worker instead, make
-- mf_worker the owner of the schema's objects (it then bypasses RLS, so prefer a separate role).
