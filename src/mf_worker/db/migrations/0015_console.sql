-- The operator console (#27): fleet-wide audit rows, and the indexes its pages read.

-- Fleet-wide operator actions are audited too. Resetting a provider limit key (from the
-- operator console) changes what every organisation's calls may do and belongs to none of
-- them, so its audit row has no organisation: organization_id may now be NULL, and such rows
-- are visible and writable only to members of mf_cross_org (the worker's and the console's
-- roles), never to a transaction acting for one organisation.
ALTER TABLE audit_log ALTER COLUMN organization_id DROP NOT NULL;

CREATE POLICY fleet_actions ON audit_log
    USING (organization_id IS NULL AND (SELECT mf_has_cross_org_access()))
    WITH CHECK (organization_id IS NULL AND (SELECT mf_has_cross_org_access()));

-- The operator console's pages stay fast on a queue of ten million rows (bench/bench_console.py).
-- The items list pages newest first by (scheduled_for, id), the keyset it resumes from: over
-- every item, and over the finished ones of one status (without the second index, a filter on
-- `failed` would first walk past every project's open item, all due in the future). The
-- overview counts the last hour's failures (completed and cancelled ones already have
-- episode_schedule_queue_finished). None of these columns changes on a heartbeat, so those
-- updates stay HOT; an item adds one entry when it is created and one when it finishes. On a
-- large queue the indexes take a while to build (tens of seconds per 10 million rows on 2
-- cores), during which writes to the queue wait: migrate in a quiet hour.
CREATE INDEX episode_schedule_queue_by_due ON episode_schedule_queue (scheduled_for, id);
CREATE INDEX episode_schedule_queue_finished_by_due
    ON episode_schedule_queue (status, scheduled_for, id)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX episode_schedule_queue_failed ON episode_schedule_queue (finished_at)
    WHERE status = 'failed';
-- The console's providers page (and `mf-worker status`) count the items waiting on a provider
-- or a backoff; they are few, and without this the count read every waiting item.
CREATE INDEX episode_schedule_queue_deferred ON episode_schedule_queue (run_after)
    WHERE status = 'pending' AND deferred_reason IS NOT NULL;
