-- Guarantees that hold under races: a claim token that never repeats, definer functions that
-- cannot be hijacked, and no episode left 'generating' when its item ends.

------------------------------------------------------------------------------------------------
-- The claim token
--
-- Every claim draws a new value from this sequence and stores it on the item; every statement
-- that moves a claimed item (heartbeat, reservation, final write, retry, failure, release)
-- matches it. (id, attempt_count, locked_by) could repeat: `mf-worker retry` resets the attempt
-- count, a release gives an attempt back, and the same worker claims the same item again, so a
-- cancelled or reaped generation's write could pass the old fence. A sequence value cannot come
-- back. The column keeps the latest claim's token after the item leaves 'processing' (useful
-- when reading the history); the fences also require status = 'processing'.
------------------------------------------------------------------------------------------------

CREATE SEQUENCE episode_schedule_queue_claim_token_seq AS bigint;
ALTER TABLE episode_schedule_queue ADD COLUMN claim_token bigint;
-- Items held by an older mf-worker during the upgrade keep working under their old fence;
-- they only need a token so that the constraint below holds.
UPDATE episode_schedule_queue
SET claim_token = nextval('episode_schedule_queue_claim_token_seq')
WHERE status = 'processing';
ALTER TABLE episode_schedule_queue
    ADD CONSTRAINT episode_schedule_queue_claimed_with_token
        CHECK (status <> 'processing' OR claim_token IS NOT NULL);
-- Whoever may claim across organisations may draw tokens: granted here, not only in
-- docs/database-roles.sql, so that workers keep claiming between this migration and the next
-- run of the roles file (the role is operator-made and may not exist; then the file grants it).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'mf_cross_org') THEN
        GRANT USAGE ON SEQUENCE episode_schedule_queue_claim_token_seq TO mf_cross_org;
    END IF;
END $$;

-- A claim that does not draw a token itself (an older mf-worker during a rolling upgrade) gets
-- one here, so that no claim can ever carry a token an earlier claim had. mf-worker's own
-- claims set it in the claim statement, so for them the WHEN clause is false and no function
-- is called.
CREATE FUNCTION mf_queue_draw_claim_token() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.claim_token := nextval('public.episode_schedule_queue_claim_token_seq');
    RETURN NEW;
END $$;
CREATE TRIGGER episode_schedule_queue_draw_claim_token
    BEFORE UPDATE ON episode_schedule_queue
    FOR EACH ROW
    WHEN (NEW.status = 'processing' AND OLD.status <> 'processing'
          AND NEW.claim_token IS NOT DISTINCT FROM OLD.claim_token)
    EXECUTE FUNCTION mf_queue_draw_claim_token();

------------------------------------------------------------------------------------------------
-- SECURITY DEFINER functions that cannot be hijacked
--
-- `SET search_path FROM CURRENT` stored "$user", public, and PostgreSQL searches the session's
-- temporary schema first unless the path names it: a temporary table called token_usage_daily
-- (with a trigger of its own) received the aggregate's upsert and ran with the owner's rights.
-- Each definer function now searches pg_catalog, then pg_temp (last, so nothing temporary can
-- stand in for anything), and names every table and function of ours with its schema. PUBLIC
-- may not execute them: they are trigger functions, and EXECUTE is what CREATE TRIGGER checks,
-- so nobody can attach them to a table of their own; the triggers below fire regardless.
-- Each also refuses to run for any table but the one it was written for.
------------------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION mf_token_usage_daily_add() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    day   date := (NEW.created_at AT TIME ZONE 'UTC')::date;
    entry jsonb := jsonb_build_object(NEW.operation,
                       jsonb_build_object('tokens', NEW.total_tokens, 'cost', NEW.cost_gbp));
BEGIN
    IF TG_RELID <> 'public.token_usage'::regclass THEN
        RAISE EXCEPTION 'mf_token_usage_daily_add() maintains public.token_usage only';
    END IF;
    INSERT INTO public.token_usage_daily AS d
        (organization_id, date, total_tokens, total_cost_gbp, episode_count,
         operation_breakdown, last_updated)
    VALUES (NEW.organization_id, day, NEW.total_tokens, NEW.cost_gbp,
            CASE WHEN NEW.operation = 'episode_generation' THEN 1 ELSE 0 END,
            entry, now())
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
        last_updated   = now();
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION mf_queue_release_reservation() RETURNS trigger
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

------------------------------------------------------------------------------------------------
-- An item that ends ends its episode
--
-- An attempt creates the item's episode ('generating') and retries reuse it. Whatever ends the
-- item without success — a failure, the reaper giving up, or a cancellation by anyone (an
-- operator, the scheduler for a paused project, the worker for an unavailable one, the cost
-- policy `skip`, `enqueue --replace`) — fails that episode in the same transaction (at commit),
-- so none stays 'generating' for ever. A cancellation's reason is added to the episode's
-- history here; a failure's error was recorded by the attempt that failed. SECURITY DEFINER:
-- cross-organisation callers (the scheduler) cannot see episodes; the composite foreign key
-- ties the episode to the item's own organisation.
------------------------------------------------------------------------------------------------

CREATE FUNCTION mf_queue_fail_open_episode() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'public.episode_schedule_queue'::regclass THEN
        RAISE EXCEPTION 'mf_queue_fail_open_episode() maintains public.episode_schedule_queue only';
    END IF;
    UPDATE public.episodes
    SET status = 'failed',
        generation_errors = CASE
            WHEN NEW.status = 'cancelled'
            THEN generation_errors || ('cancelled: ' || coalesce(NEW.last_error, 'no reason given'))
            ELSE generation_errors END
    WHERE id = NEW.episode_id AND organization_id = NEW.organization_id
      AND status = 'generating';
    RETURN NULL;
END $$;
-- Deferred to commit: the statement that ended the item may go on to record the attempt's error
-- on the episode in the same transaction (an older mf-worker does so only while the episode is
-- still 'generating'), and the history must keep it.
CREATE CONSTRAINT TRIGGER episode_schedule_queue_fail_open_episode
    AFTER UPDATE OF status ON episode_schedule_queue
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.status IN ('failed', 'cancelled') AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.episode_id IS NOT NULL)
    EXECUTE FUNCTION mf_queue_fail_open_episode();

REVOKE EXECUTE ON FUNCTION mf_token_usage_daily_add() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION mf_queue_release_reservation() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION mf_queue_fail_open_episode() FROM PUBLIC;
