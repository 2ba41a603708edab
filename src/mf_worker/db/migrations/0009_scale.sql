-- Costs that do not grow with the history or the fleet (#16).
--
-- * The scheduler's change log: projects whose schedule may need work (a new project; a change
--   of status, cadence, delivery time or owner; the owner's zone; an open item that ended
--   without a next one). Triggers keep it, so a steady pass reads what changed instead of
--   joining every project with the queue. scheduler_state paces the passes of the whole fleet
--   (one per MF_SCHEDULER_INTERVAL) and remembers the last full sweep.
-- * HOT queue updates: no indexed column changes on a heartbeat. The pruner reads finished_at
--   (set once, when an item reaches a final status) instead of updated_at (which still follows
--   every update, but is no longer indexed), and the reaper's index no longer holds the lease
--   time.
-- * NOTIFY only for items due now, from row triggers whose WHEN clause is checked without a
--   function call (no transition tables built for every claim and heartbeat).
-- * Indexes behind the cascades from projects.

------------------------------------------------------------------------------------------------
-- The scheduler's change log and pacing
------------------------------------------------------------------------------------------------

-- One row per project with something to look at; the scheduler deletes the rows it handles in
-- the transaction that handles them. A trigger that logs a project the scheduler is handling
-- right now waits for that transaction (ON CONFLICT on a row being deleted) and then logs it
-- again, so no change made after the scheduler's read is lost. No foreign key: a deleted
-- project's row is simply found to have nothing to plan.
CREATE TABLE scheduler_project_changes (
    project_id text PRIMARY KEY,
    changed_at timestamptz NOT NULL DEFAULT now()
);

-- The fleet's scheduler state, one row: when the last paced pass and the last full sweep ran.
CREATE TABLE scheduler_state (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_pass_at  timestamptz,
    last_sweep_at timestamptz
);
INSERT INTO scheduler_state DEFAULT VALUES;

-- SECURITY DEFINER: whoever may change a project or a user (the web app's role) logs the change,
-- without being granted anything on the log.
CREATE FUNCTION public.mf_log_project_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'public.projects'::regclass THEN
        RAISE EXCEPTION 'mf_log_project_change() maintains public.projects only';
    END IF;
    INSERT INTO public.scheduler_project_changes (project_id) VALUES (NEW.id)
    ON CONFLICT (project_id) DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER projects_log_new_for_scheduler
    AFTER INSERT ON projects
    FOR EACH ROW WHEN (NEW.status = 'active')
    EXECUTE FUNCTION mf_log_project_change();
-- The column list keeps the worker's own cache update (next_scheduled_at) from firing it.
CREATE TRIGGER projects_log_change_for_scheduler
    AFTER UPDATE OF status, cadence_config, delivery_time, user_id ON projects
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          OR OLD.cadence_config IS DISTINCT FROM NEW.cadence_config
          OR OLD.delivery_time IS DISTINCT FROM NEW.delivery_time
          OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION mf_log_project_change();

CREATE FUNCTION public.mf_log_user_zone_change() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'public.users'::regclass THEN
        RAISE EXCEPTION 'mf_log_user_zone_change() maintains public.users only';
    END IF;
    INSERT INTO public.scheduler_project_changes (project_id)
    SELECT p.id FROM public.projects p WHERE p.user_id = NEW.id
    ON CONFLICT (project_id) DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER users_log_zone_change_for_scheduler
    AFTER UPDATE OF timezone ON users
    FOR EACH ROW WHEN (OLD.timezone IS DISTINCT FROM NEW.timezone)
    EXECUTE FUNCTION mf_log_user_zone_change();

-- An open item that ends (or is deleted) leaves its project without one unless the same
-- transaction plans the next (the final write does). Checked at commit, so only a project that
-- really has no open item then, and is active, is logged: a completion that plans its next item
-- costs one index probe and logs nothing. A concurrent insert can at worst cause a spare entry,
-- which the scheduler finds nothing to do for.
CREATE FUNCTION public.mf_log_item_ended() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID <> 'public.episode_schedule_queue'::regclass THEN
        RAISE EXCEPTION 'mf_log_item_ended() maintains public.episode_schedule_queue only';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM public.episode_schedule_queue q
                   WHERE q.project_id = OLD.project_id
                     AND q.status IN ('pending', 'processing', 'blocked'))
       AND EXISTS (SELECT 1 FROM public.projects p
                   WHERE p.id = OLD.project_id AND p.status = 'active') THEN
        INSERT INTO public.scheduler_project_changes (project_id) VALUES (OLD.project_id)
        ON CONFLICT (project_id) DO NOTHING;
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER episode_schedule_queue_log_item_ended
    AFTER UPDATE OF status ON episode_schedule_queue
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.status IN ('pending', 'processing', 'blocked')
          AND NEW.status NOT IN ('pending', 'processing', 'blocked')
          AND OLD.project_id IS NOT NULL)
    EXECUTE FUNCTION mf_log_item_ended();
CREATE CONSTRAINT TRIGGER episode_schedule_queue_log_item_deleted
    AFTER DELETE ON episode_schedule_queue
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (OLD.status IN ('pending', 'processing', 'blocked') AND OLD.project_id IS NOT NULL)
    EXECUTE FUNCTION mf_log_item_ended();

REVOKE EXECUTE ON FUNCTION mf_log_project_change() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION mf_log_user_zone_change() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION mf_log_item_ended() FROM PUBLIC;

-- Whoever runs the scheduler across organisations reads and drains the log and paces the fleet
-- (granted here as in 0004, so a running fleet keeps scheduling before the roles file is rerun).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'mf_cross_org') THEN
        GRANT SELECT, UPDATE, DELETE ON scheduler_project_changes TO mf_cross_org;
        GRANT SELECT, UPDATE ON scheduler_state TO mf_cross_org;
    END IF;
END $$;

------------------------------------------------------------------------------------------------
-- HOT queue updates
------------------------------------------------------------------------------------------------

ALTER TABLE episode_schedule_queue ADD COLUMN finished_at timestamptz;

CREATE FUNCTION mf_queue_stamp_finished_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.finished_at := now();
    RETURN NEW;
END $$;
-- Fires only when an item reaches a final status (the WHEN clause costs no function call on
-- claims and heartbeats); an item reopened by `mf-worker retry` is stamped again when it ends.
CREATE TRIGGER episode_schedule_queue_stamp_finished_at
    BEFORE UPDATE OF status ON episode_schedule_queue
    FOR EACH ROW
    WHEN (NEW.status IN ('completed', 'failed', 'cancelled')
          AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION mf_queue_stamp_finished_at();
CREATE TRIGGER episode_schedule_queue_stamp_finished_at_insert
    BEFORE INSERT ON episode_schedule_queue
    FOR EACH ROW
    WHEN (NEW.status IN ('completed', 'failed', 'cancelled') AND NEW.finished_at IS NULL)
    EXECUTE FUNCTION mf_queue_stamp_finished_at();

-- Finished items keep the time they last changed as the time they finished (their updated_at
-- is left as it was).
ALTER TABLE episode_schedule_queue DISABLE TRIGGER episode_schedule_queue_touch_updated_at;
UPDATE episode_schedule_queue SET finished_at = updated_at
WHERE status IN ('completed', 'failed', 'cancelled');
ALTER TABLE episode_schedule_queue ENABLE TRIGGER episode_schedule_queue_touch_updated_at;

-- The pruner's index, on a column that never changes after the item finished.
DROP INDEX episode_schedule_queue_finished;
CREATE INDEX episode_schedule_queue_finished
    ON episode_schedule_queue (finished_at) WHERE status IN ('completed', 'cancelled');

-- The reaper's index without the lease time: processing items are few (the fleet's in-flight
-- work), so the reaper filters them by lease; a heartbeat changes no indexed column.
DROP INDEX episode_schedule_queue_processing_lease;
CREATE INDEX episode_schedule_queue_processing
    ON episode_schedule_queue (id) WHERE status = 'processing';

-- fillfactor 80 (from 0001) leaves a fifth of each page for the new versions of heartbeats
-- and other HOT updates; the eager autovacuum settings of 0001 stay.

------------------------------------------------------------------------------------------------
-- NOTIFY only for items due now
------------------------------------------------------------------------------------------------

DROP TRIGGER episode_schedule_queue_notify_insert ON episode_schedule_queue;
DROP TRIGGER episode_schedule_queue_notify_update ON episode_schedule_queue;
DROP FUNCTION mf_queue_notify_pending();

-- One NOTIFY per row that becomes claimable now (identical notifications of one transaction are
-- folded into one by PostgreSQL, so a batch still sends one). Items due later are found by the
-- idle workers' sleep until the earliest run_after (next_due_at) and by polling.
CREATE FUNCTION mf_queue_notify_due() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mf_worker_queue', '');
    RETURN NULL;
END $$;
CREATE TRIGGER episode_schedule_queue_notify_due_insert
    AFTER INSERT ON episode_schedule_queue
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND NEW.run_after <= now())
    EXECUTE FUNCTION mf_queue_notify_due();
CREATE TRIGGER episode_schedule_queue_notify_due_update
    AFTER UPDATE ON episode_schedule_queue
    FOR EACH ROW
    WHEN (NEW.status = 'pending' AND NEW.run_after <= now()
          AND (OLD.status <> 'pending' OR OLD.run_after > now()))
    EXECUTE FUNCTION mf_queue_notify_due();

------------------------------------------------------------------------------------------------
-- Indexes behind the cascades from projects and users (a deleted one finds its rows by index;
-- episodes already have one: UNIQUE (project_id, sequence_number))
------------------------------------------------------------------------------------------------

CREATE INDEX episode_schedule_queue_project_id_idx ON episode_schedule_queue (project_id);
CREATE INDEX planning_notes_project_id_idx ON planning_notes (project_id);
CREATE INDEX planning_notes_user_id_idx ON planning_notes (user_id);
