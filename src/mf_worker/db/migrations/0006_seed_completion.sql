-- The rest of the seed (issue #17): the busiest hour on the daily aggregate, who did what in the
-- audit log, retried cost-limit notifications and the email lookup they need, and what makes
-- the memory migration idempotent (agent_memory.source) and visible to status
-- (memory_migrations).
--
-- Every SECURITY DEFINER function here runs with search_path = pg_catalog, pg_temp and names
-- each table and function of ours as public.…, so no object a caller creates in a schema of its
-- own (or in pg_temp) can stand in for ours.

------------------------------------------------------------------------------------------------
-- token_usage_daily: hourly_peak and peak_hour
------------------------------------------------------------------------------------------------

-- hourly_tokens[h + 1] is the day's tokens in UTC hour h (0-23); hourly_peak is the largest of
-- them and peak_hour its hour (the earliest, on a tie; NULL while the day has no usage row: a
-- row created by a budget reservation alone has none).
ALTER TABLE token_usage_daily
    ADD COLUMN hourly_tokens bigint[] NOT NULL
        DEFAULT pg_catalog.array_fill(0::bigint, ARRAY[24])
        CHECK (pg_catalog.array_length(hourly_tokens, 1) = 24
               AND pg_catalog.array_lower(hourly_tokens, 1) = 1),
    ADD COLUMN hourly_peak bigint NOT NULL DEFAULT 0 CHECK (hourly_peak >= 0),
    ADD COLUMN peak_hour smallint CHECK (peak_hour BETWEEN 0 AND 23);

-- Existing days, from the raw rows (the aggregate's own source of truth).
WITH per_hour AS (
    SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date AS date,
           extract(hour FROM created_at AT TIME ZONE 'UTC')::int AS hour,
           sum(total_tokens)::bigint AS tokens
    FROM public.token_usage
    GROUP BY 1, 2, 3
), per_day AS (
    SELECT organization_id, date,
           array_agg(coalesce(p.tokens, 0) ORDER BY h.hour) AS hourly
    FROM (SELECT DISTINCT organization_id, date FROM per_hour) d
    CROSS JOIN generate_series(0, 23) AS h(hour)
    LEFT JOIN per_hour p USING (organization_id, date, hour)
    GROUP BY organization_id, date
), peak AS (
    SELECT DISTINCT ON (organization_id, date) organization_id, date, hour, tokens
    FROM per_hour
    ORDER BY organization_id, date, tokens DESC, hour
)
UPDATE public.token_usage_daily t
SET hourly_tokens = per_day.hourly, hourly_peak = peak.tokens, peak_hour = peak.hour
FROM per_day JOIN peak USING (organization_id, date)
WHERE t.organization_id = per_day.organization_id AND t.date = per_day.date;

-- The aggregate trigger, with everything it did before (tokens, cost, episode count, the
-- per-operation breakdown) and the hour. Still one INSERT … ON CONFLICT DO UPDATE: the day's
-- row lock serialises concurrent inserts, and every new value is computed from the locked row
-- (`d`), so no increment and no peak is lost. An hour's total only grows, so the peak only
-- moves to the hour that just grew: when it passes the peak, or equals it from an earlier hour.
-- SECURITY DEFINER: whoever may insert usage may move the aggregate, whatever their grants on
-- it; the row written is always the inserted row's own organisation.
CREATE OR REPLACE FUNCTION public.mf_token_usage_daily_add() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    day   date := (NEW.created_at AT TIME ZONE 'UTC')::date;
    hour  int := extract(hour FROM NEW.created_at AT TIME ZONE 'UTC')::int;
    entry jsonb := jsonb_build_object(NEW.operation,
                       jsonb_build_object('tokens', NEW.total_tokens, 'cost', NEW.cost_gbp));
    first_hours bigint[] := array_fill(0::bigint, ARRAY[24]);
BEGIN
    IF TG_RELID <> 'public.token_usage'::regclass THEN
        RAISE EXCEPTION 'mf_token_usage_daily_add() maintains public.token_usage only';
    END IF;
    first_hours[hour + 1] := NEW.total_tokens;
    INSERT INTO public.token_usage_daily AS d
        (organization_id, date, total_tokens, total_cost_gbp, episode_count,
         operation_breakdown, hourly_tokens, hourly_peak, peak_hour, last_updated)
    VALUES (NEW.organization_id, day, NEW.total_tokens, NEW.cost_gbp,
            CASE WHEN NEW.operation = 'episode_generation' THEN 1 ELSE 0 END,
            entry, first_hours, NEW.total_tokens, hour, now())
    ON CONFLICT (organization_id, date) DO UPDATE SET
        total_tokens   = d.total_tokens + EXCLUDED.total_tokens,
        total_cost_gbp = d.total_cost_gbp + EXCLUDED.total_cost_gbp,
        episode_count  = d.episode_count + EXCLUDED.episode_count,
        operation_breakdown = coalesce(d.operation_breakdown, '{}'::jsonb) || jsonb_build_object(
            NEW.operation, jsonb_build_object(
                'tokens', coalesce((d.operation_breakdown -> NEW.operation ->> 'tokens')::bigint, 0)
                          + NEW.total_tokens,
                'cost',   coalesce((d.operation_breakdown -> NEW.operation ->> 'cost')::numeric, 0)
                          + NEW.cost_gbp)),
        hourly_tokens[hour + 1] = d.hourly_tokens[hour + 1] + NEW.total_tokens,
        hourly_peak    = greatest(d.hourly_peak, d.hourly_tokens[hour + 1] + NEW.total_tokens),
        peak_hour      = CASE
            WHEN d.peak_hour IS NULL
              OR d.hourly_tokens[hour + 1] + NEW.total_tokens > d.hourly_peak
              OR (d.hourly_tokens[hour + 1] + NEW.total_tokens = d.hourly_peak
                  AND hour < d.peak_hour)
            THEN hour ELSE d.peak_hour END,
        last_updated   = now();
    RETURN NULL;
END $$;

------------------------------------------------------------------------------------------------
-- audit_log: who acted
------------------------------------------------------------------------------------------------

-- An operator's command (retry, cancel, enqueue) is not a product user, so user_id stays NULL
-- and the actor is named here: `--actor`, else the operator's OS user. NULL for the system.
ALTER TABLE audit_log ADD COLUMN actor text CHECK (length(btrim(actor)) > 0);

------------------------------------------------------------------------------------------------
-- cost_limit_trips: notifications are at least once
------------------------------------------------------------------------------------------------

-- notified_at stays NULL until every configured notifier succeeded. The budget loop re-sends a
-- trip whose next_notify_at has passed; sending pushes next_notify_at forward first (a lease,
-- so two workers do not send at once), and a failure records the error and backs off.
ALTER TABLE cost_limit_trips
    ADD COLUMN notify_attempts integer NOT NULL DEFAULT 0 CHECK (notify_attempts >= 0),
    ADD COLUMN next_notify_at timestamptz,
    ADD COLUMN last_notify_error text;
CREATE INDEX cost_limit_trips_unnotified ON cost_limit_trips (next_notify_at)
    WHERE notified_at IS NULL;

-- The addresses the `email` notifier writes to: the users of the organisation the caller acts
-- for (app.current_org_id), and of no other. SECURITY DEFINER so that a worker role without
-- SELECT on users.email can still mail the organisation it is acting for; EXECUTE is revoked
-- from PUBLIC: grant it to the worker role (docs/database-roles.sql).
CREATE FUNCTION public.mf_organization_emails(org text) RETURNS SETOF text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT u.email FROM public.users u
    WHERE u.organization_id = org AND org = public.mf_current_org_id()
    ORDER BY u.created_at, u.id
$$;
REVOKE EXECUTE ON FUNCTION public.mf_organization_emails(text) FROM PUBLIC;

------------------------------------------------------------------------------------------------
-- agent_memory: where a migrated memory came from
------------------------------------------------------------------------------------------------

-- `mf-worker memories migrate` copies projects.memories entries into agent_memory; `source`
-- ('projects.memories[<index>]') is unique per project, so running it twice, or resuming an
-- interrupted run, inserts nothing twice. NULL for memories the worker writes itself.
ALTER TABLE agent_memory ADD COLUMN source text CHECK (length(source) > 0);
CREATE UNIQUE INDEX agent_memory_project_source ON agent_memory (project_id, source)
    WHERE source IS NOT NULL;

-- One row per project the command has run for: how far it got. `status` reads it across
-- organisations (agent_memory itself stays tenant content the cross-organisation role cannot
-- read) to say which projects still need migrating; completed_at is NULL while a run was
-- interrupted (or sliced with --max-batches), and `entries` is how many the JSON held then.
CREATE TABLE memory_migrations (
    project_id      text PRIMARY KEY,
    organization_id text NOT NULL,
    entries         integer NOT NULL CHECK (entries >= 0),
    copied          integer NOT NULL CHECK (copied >= 0),
    skipped         integer NOT NULL CHECK (skipped >= 0),
    completed_at    timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (project_id, organization_id)
        REFERENCES public.projects (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX memory_migrations_organization_id_idx ON memory_migrations (organization_id);
ALTER TABLE memory_migrations ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON memory_migrations FOR ALL
    USING (organization_id = (SELECT public.mf_current_org_id()))
    WITH CHECK (organization_id = (SELECT public.mf_current_org_id()));
CREATE POLICY cross_org_read ON memory_migrations FOR SELECT
    USING ((SELECT public.mf_has_cross_org_access()));
