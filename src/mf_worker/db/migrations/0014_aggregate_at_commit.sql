-- No hot organisation row (#28): the daily aggregate is written at commit, not mid-transaction.
--
-- Every episode's final write books its usage, and the trigger on token_usage used to update
-- the organisation's row of token_usage_daily at once: the row lock was then held for the rest
-- of the transaction (a batch of final writes, the other organisations' rows, the commit's WAL
-- flush), and every other transaction of the same organisation queued on it
-- (Lock:transactionid). One organisation's episodes ran one transaction at a time whatever the
-- number of processes, and a batch holding many organisations' rows made the others wait too.
--
-- * The usage trigger is now a constraint trigger deferred to commit: the row is locked and
--   updated only while the transaction commits, in the order its usage rows were written (the
--   final write goes in organisation order, prepare.org_order, so every batch of every worker
--   takes the rows in the same order). Another transaction of the same organisation waits at
--   most for that commit, not for the whole transaction.
-- * The reservation's release (reserved_gbp less the item's amount when the item leaves
--   'processing' or is deleted) moves from the BEFORE trigger to deferred constraint triggers
--   too, for the same reason: the final write settles the reservation in its fence. The BEFORE
--   trigger still books the estimate (an insert into token_usage, itself aggregated at commit)
--   and clears the item's reservation columns.
--
-- Why the limit stays exact: reserve_budget still locks the row and re-checks
-- total + reserved + amount against the limit (immediately, in the prepare's transaction). A
-- committing transaction moves a settled amount from reserved_gbp to total_cost_gbp in one
-- commit under the row lock: nobody sees one without the other, and until the commit the
-- reservation still counts, so a concurrent check is on the safe side. What a reader of the
-- aggregate sees is what was committed, as before; the row is the one the app and
-- `mf-worker status` read.
--
-- Inside the writing transaction the aggregate is not updated yet (a statement reading it after
-- booking usage in the same transaction sees the day without that usage): no query of
-- mf-worker does so.
--
-- episode_count: a deferred trigger sees every row its transaction wrote, later statements'
-- rows included, so "first" among one transaction's rows is now by command (cmin), then id.

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
    -- it. Rows of other transactions visible here committed first; among this transaction's
    -- rows (same xmin; all visible at commit, later statements' too) the earlier command
    -- (cmin, which has no ordering operator: compared as a number) is first, and within one
    -- statement the smallest id. Rows of no episode (an attempt whose project, and episode
    -- with it, was deleted while it generated) count one episode per statement: the attempt's
    -- calls are booked together (cost.settle), one row per call.
    IF NEW.operation = 'episode_generation' AND NEW.episode_id IS NULL THEN
        new_episode := CASE WHEN EXISTS (
            SELECT 1
            FROM public.token_usage t, public.token_usage me
            WHERE me.id = NEW.id
              AND t.organization_id = NEW.organization_id AND t.created_at = NEW.created_at
              AND t.episode_id IS NULL AND t.operation = 'episode_generation'
              AND t.id < NEW.id AND t.xmin = me.xmin AND t.cmin = me.cmin)
        THEN 0 ELSE 1 END;
    ELSIF NEW.operation = 'episode_generation' THEN
        new_episode := CASE WHEN NOT EXISTS (
            SELECT 1
            FROM public.token_usage t, public.token_usage me
            WHERE me.id = NEW.id
              AND t.episode_id = NEW.episode_id AND t.operation = 'episode_generation'
              AND t.id <> NEW.id
              AND coalesce(t.billing_date, (t.created_at AT TIME ZONE 'UTC')::date) = day
              AND NOT (t.xmin = me.xmin
                       AND (t.cmin::text::int8 > me.cmin::text::int8
                            OR (t.cmin = me.cmin AND t.id > NEW.id))))
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

DROP TRIGGER token_usage_maintain_daily ON token_usage;
CREATE CONSTRAINT TRIGGER token_usage_maintain_daily
    AFTER INSERT ON token_usage
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION mf_token_usage_daily_add();

-- The BEFORE trigger: books the estimate when the statement did not settle the reservation
-- itself, and clears the item's reservation columns. The aggregate's reserved_gbp is given back
-- at commit (below).
CREATE OR REPLACE FUNCTION public.mf_queue_release_reservation() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'public.episode_schedule_queue'::regclass THEN
        RAISE EXCEPTION 'mf_queue_release_reservation() maintains public.episode_schedule_queue only';
    END IF;
    IF OLD.reserved_cost_gbp IS NOT NULL
       AND (TG_OP = 'DELETE' OR NEW.status <> 'processing') THEN
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

-- The release itself, at commit: OLD is the row as it was before the statement, whose
-- reservation the BEFORE trigger above cleared (so a second update in the same transaction
-- finds nothing to give back).
CREATE FUNCTION public.mf_queue_give_back_reservation() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'public.episode_schedule_queue'::regclass THEN
        RAISE EXCEPTION 'mf_queue_give_back_reservation() maintains public.episode_schedule_queue only';
    END IF;
    UPDATE public.token_usage_daily
    SET reserved_gbp = greatest(reserved_gbp - OLD.reserved_cost_gbp, 0),
        last_updated = now()
    WHERE organization_id = OLD.organization_id AND date = OLD.reserved_on;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER episode_schedule_queue_give_back_reservation
    AFTER UPDATE ON episode_schedule_queue
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.reserved_cost_gbp IS NOT NULL AND NEW.status <> 'processing')
    EXECUTE FUNCTION mf_queue_give_back_reservation();
CREATE CONSTRAINT TRIGGER episode_schedule_queue_give_back_reservation_deleted
    AFTER DELETE ON episode_schedule_queue
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.reserved_cost_gbp IS NOT NULL)
    EXECUTE FUNCTION mf_queue_give_back_reservation();

REVOKE EXECUTE ON FUNCTION mf_queue_give_back_reservation() FROM PUBLIC;
