-- Flow control at the LLM provider: one row per limit key (an account and model at a provider,
-- as the generator names it), shared by every worker on every host.
--
-- The row is a token bucket for requests and one for tokens, refilled continuously at a little
-- under the configured per-minute limits and holding only a few seconds' worth, so a fleet that
-- starts together cannot burst past the provider. A worker takes from it in one statement
-- (flow/limiter.sql: acquire), which locks this row, so any number of processes share it
-- exactly. A NULL level means "full" (a new row, or a limit that is not configured).
-- cooldown_until holds every worker's new calls under the key after a 429 until the provider's
-- reset, or for a while after an exhausted quota (cooldown_reason says which).
--
-- The table is fleet-wide, not a tenant table: provider limits are per account, not per
-- organisation, and no organisation's data is in it. Row-level security admits the members of
-- mf_cross_org (the worker role) and nobody else; docs/database-roles.sql grants the writes.
CREATE TABLE provider_limits (
    limit_key           text PRIMARY KEY CHECK (length(limit_key) BETWEEN 1 AND 200),
    -- The paced rates last used (per second; NULL = no configured limit on that dimension).
    requests_per_second double precision CHECK (requests_per_second > 0),
    tokens_per_second   double precision CHECK (tokens_per_second > 0),
    request_level       double precision,
    token_level         double precision,
    refilled_at         timestamptz NOT NULL,
    cooldown_until      timestamptz,
    cooldown_reason     text CHECK (cooldown_reason IN ('rate_limited', 'quota_exhausted')),
    -- Counters for `mf-worker status`: 429s answered under this key, quota pauses started.
    rate_limited_count  bigint NOT NULL DEFAULT 0 CHECK (rate_limited_count >= 0),
    quota_pauses        bigint NOT NULL DEFAULT 0 CHECK (quota_pauses >= 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((cooldown_until IS NULL) = (cooldown_reason IS NULL))
);

ALTER TABLE provider_limits ENABLE ROW LEVEL SECURITY;
CREATE POLICY fleet_worker ON provider_limits FOR ALL
    USING ((SELECT mf_has_cross_org_access())) WITH CHECK ((SELECT mf_has_cross_org_access()));

-- What happened to an item besides its attempts. attempt_count keeps counting the calls that
-- ended for a reason retrying cannot fix (MF_MAX_ATTEMPTS bounds those); a rate-limit answer,
-- an exhausted quota and a transient failure give their attempt back and are counted here
-- instead (transient failures are bounded by time, MF_RETRY_DEADLINE, not by a count), and so
-- is a lost worker (the reaper). deferred_reason says why a pending item is waiting.
ALTER TABLE episode_schedule_queue
    ADD COLUMN retry_count    integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    ADD COLUMN deferred_count integer NOT NULL DEFAULT 0 CHECK (deferred_count >= 0),
    ADD COLUMN lost_count     integer NOT NULL DEFAULT 0 CHECK (lost_count >= 0),
    ADD COLUMN deferred_reason text
        CHECK (deferred_reason IN ('rate_limited', 'quota_exhausted', 'transient'));

-- Serves the fair claim: each organisation's due pending items in run_after order (a range
-- scan per organisation that stops at its first item not yet due).
CREATE INDEX episode_schedule_queue_org_due_pending
    ON episode_schedule_queue (organization_id, run_after, id) WHERE status = 'pending';

-- Serves the fair claim's "served recently": an organisation's items completed in the last
-- minutes count toward its turn.
CREATE INDEX episode_schedule_queue_org_completed
    ON episode_schedule_queue (organization_id, completed_at) WHERE status = 'completed';
