-- Readiness (mf_worker.observability.health): whether the server behind a connection takes writes.

-- name: read_server_role
-- A standby in recovery (pg_is_in_recovery) refuses every write, and so does a server whose
-- transactions are read-only by default; during a failover a connection may reach either.
SELECT pg_is_in_recovery() AS in_recovery,
       current_setting('transaction_read_only')::boolean AS read_only;
