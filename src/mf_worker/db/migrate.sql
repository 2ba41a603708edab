-- Queries of the migration runner (mf_worker.db.migrate).

-- name: lock_migrations
-- Held until the transaction ends: one migration is applied at a time, cluster-wide for this
-- database, however many replicas start at once. Transaction-scoped, so it is pooler-safe.
SELECT pg_advisory_xact_lock(hashtext('mf_worker.migrate'), hashtext(current_database()));

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS mf_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_table_exists
SELECT to_regclass('mf_schema_migrations') IS NOT NULL AS present;

-- name: list_applied_migrations
SELECT version, name, checksum, applied_at FROM mf_schema_migrations ORDER BY version;

-- name: is_migration_applied
SELECT EXISTS (SELECT 1 FROM mf_schema_migrations WHERE version = %(version)s) AS applied;

-- name: record_migration
INSERT INTO mf_schema_migrations (version, name, checksum)
VALUES (%(version)s, %(name)s, %(checksum)s);
