-- A daily limit that is really hard: every call that may have been billed is booked, on the day
-- its reservation was taken.
--
-- * token_usage.billing_date: the UTC day the attempt's reservation was taken (the database's
--   clock at prepare). The aggregate files the row under it, so the limit check and the spend
--   always agree across midnight. NULL for other writers (the web app's chat usage): the row's
--   own UTC day, as before.
-- * token_usage.estimated: the row books a reserved worst case because the real usage is
--   unknown (a timed-out, crashed, cancelled or abandoned call); the aggregate keeps their sum
--   apart (estimated_cost_gbp) so `mf-worker status` can show estimated beside measured spend.
-- * A reservation is settled, not released, when its item leaves 'processing': a statement that
--   knows the real outcome clears reserved_cost_gbp itself (the final write books the real
--   usage; a failure with known usage books it; a hand-back before the call started booked
--   nothing), and whatever leaves the reservation in place — the reaper, an operator's cancel, a
--   failure or hand-back whose usage is unknown, a delete — has it booked as an estimate.
-- * episode_count counts distinct episodes with usage on the day, not usage rows.
-- * organizations.daily_cost_limit_gbp has no default: a new organisation follows
--   MF_DAILY_COST_LIMIT_GBP until it is given a limit of its own. Existing rows keep theirs
--   (docs/operations.md, "Upgrading", says how to move them to the setting).
-- * cost_limit_trips.needed_gbp: the worst case that was refused, so the budget loop resumes an
--   organisation only when that fits, not a flat reserve.

ALTER TABLE token_usage
    ADD COLUMN billing_date date,
    ADD COLUMN estimated boolean NOT NULL DEFAULT false;

ALTER TABLE token_usage_daily
    ADD COLUMN estimated_cost_gbp numeric(16, 6) NOT NULL DEFAULT 0
        CHECK (estimated_cost_gbp >= 0);

ALTER TABLE organizations ALTER COLUMN daily_cost_limit_gbp DROP DEFAULT;

ALTER TABLE cost_limit_trips
    ADD COLUMN needed_gbp numeric(14, 6) CHECK (needed_gbp >= 0);

CREATE OR REPLACE FUNCTION public.mf_token_usage_daily_add() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    day   date := coalesce(NEW.billing_date, (NEW.created_at AT TIME ZONE 'UTC')::date);
    hour  int := extract(hour FROM NEW.created_at AT TIME ZONE 'UTC')::int;
    entry jsonb := jsonb_build_object(NEW.operation,
                       jsonb_build_object('tokens', NEW.total_tokens, 'cost', NEW.cost_gbp));
    first_hours bigint[] := array_fill(0::bigint, ARRAY[24]);
    estimate numeric := CASE WHEN NEW.estimated THEN NEW.cost_gbp ELSE 0 END;
    new_episode int := 0;
BEGIN
    IF TG_RELID <> 'public.token_usage'::regclass THEN
        RAISE EXCEPTION 'mf_token_usage_daily_add() maintains public.token_usage only';
    END IF;
    -- One per episode and day: only the episode's first usage row on this billing day counts
    -- it. Every row visible here that another statement wrote came first; among the rows of
    -- this very statement (all visible to an AFTER trigger, same xmin and cmin) the smallest id
    -- is first.
    IF NEW.operation = 'episode_generation' THEN
        new_episode := CASE WHEN NEW.episode_id IS NULL OR NOT EXISTS (
            SELECT 1
            FROM public.token_usage t, public.token_usage me
            WHERE me.id = NEW.id
              AND t.episode_id = NEW.episode_id AND t.operation = 'episode_generation'
              AND t.id <> NEW.id
              AND coalesce(t.billing_date, (t.created_at AT TIME ZONE 'UTC')::date) = day
              AND NOT (t.xmin = me.xmin AND t.cmin = me.cmin AND t.id > NEW.id))
        THEN 1 ELSE 0 END;
    END IF;
    first_hours[hour + 1] := NEW.total_tokens;
    INSERT INTO public.token_usage_daily AS d
        (organization_id, date, total_tokens, total_cost_gbp, estimated_cost_gbp, episode_count,
         operation_breakdown, hourly_tokens, hourly_peak, peak_hour, last_updated)
    VALUES (NEW.organization_id, day, NEW.total_tokens, NEW.cost_gbp, estimate, new_episode,
            entry, first_hours, NEW.total_tokens, hour, now())
    ON CONFLICT (organization_id, date) DO UPDATE SET
        total_tokens   = d.total_tokens + EXCLUDED.total_tokens,
        total_cost_gbp = d.total_cost_gbp + EXCLUDED.total_cost_gbp,
        estimated_cost_gbp = d.estimated_cost_gbp + EXCLUDED.estimated_cost_gbp,
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

-- The reservation is given back whenever its item leaves 'processing' (as since 0002) and, unless
-- the statement settled it itself (set reserved_cost_gbp to NULL), booked as an estimate: the
-- call may have been billed, and its real usage is unknown.
CREATE OR REPLACE FUNCTION public.mf_queue_release_reservation() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'public.episode_schedule_queue'::regclass THEN
        RAISE EXCEPTION 'mf_queue_release_reservation() maintains public.episode_schedule_queue only';
    END IF;
    IF OLD.reserved_cost_gbp IS NOT NULL
       AND (TG_OP = 'DELETE' OR NEW.status <> 'processing') THEN
        UPDATE public.token_usage_daily
        SET reserved_gbp = greatest(reserved_gbp - OLD.reserved_cost_gbp, 0),
            last_updated = now()
        WHERE organization_id = OLD.organization_id AND date = OLD.reserved_on;
        IF TG_OP = 'DELETE' OR NEW.reserved_cost_gbp IS NOT NULL THEN
            INSERT INTO public.token_usage
                (organization_id, project_id, episode_id, operation, model, prompt_tokens,
                 completion_tokens, cost_gbp, billing_date, estimated)
            VALUES (OLD.organization_id, OLD.project_id, OLD.episode_id, 'episode_generation',
                    'estimate', 0, 0, OLD.reserved_cost_gbp, OLD.reserved_on, true);
        END IF;
        IF TG_OP = 'UPDATE' THEN
            NEW.reserved_cost_gbp := NULL;
            NEW.reserved_on := NULL;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
