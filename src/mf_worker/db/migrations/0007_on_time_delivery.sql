-- On-time delivery (issue #15): work on an episode starts within a lead window before its
-- delivery instant (the scheduler sets run_after = scheduled_for - MF_LEAD_SECONDS), and the
-- episode becomes visible at the instant, not before.
--
-- The web app shows episodes whose status is 'ready'; that stays the contract. An episode
-- finished before its instant is 'scheduled' until the publisher makes it 'ready' at the
-- instant; one finished after it is 'ready' at once. A project paused, archived or
-- rescheduled in between withdraws it ('withdrawn', with the reason; its usage stays booked).

------------------------------------------------------------------------------------------------
-- episodes: scheduled, withdrawn, published_at
------------------------------------------------------------------------------------------------

ALTER TABLE episodes DROP CONSTRAINT episodes_status_check;
ALTER TABLE episodes ADD CONSTRAINT episodes_status_check
    CHECK (status IN ('generating', 'scheduled', 'ready', 'failed', 'withdrawn'));
-- When the episode became visible ('ready'). Episodes that were ready before this migration
-- get their last change, the closest record there is.
ALTER TABLE episodes
    ADD COLUMN published_at timestamptz,
    ADD COLUMN withdrawn_reason text,
    ADD CONSTRAINT episodes_withdrawn_with_reason
        CHECK (status <> 'withdrawn' OR withdrawn_reason IS NOT NULL);
UPDATE episodes SET published_at = updated_at WHERE status = 'ready';

------------------------------------------------------------------------------------------------
-- episode_schedule_queue: what became of the item's episode
------------------------------------------------------------------------------------------------

-- The publisher works across organisations, and the cross-organisation role cannot read
-- episodes (row-level security): the queue item, which it can read, says which episodes wait
-- for their instant. `delivery`: 'scheduled' (finished before its instant, not yet visible),
-- 'published' (visible since published_at), 'withdrawn' (the project changed before the
-- instant; the reason is in last_error). NULL until the item completes, and for items completed
-- before this migration. On time means finished before the instant: completed_at < scheduled_for.
ALTER TABLE episode_schedule_queue
    ADD COLUMN delivery text
        CONSTRAINT episode_schedule_queue_delivery_check
        CHECK (delivery IN ('scheduled', 'published', 'withdrawn')),
    ADD COLUMN published_at timestamptz,
    ADD CONSTRAINT episode_schedule_queue_delivered_when_completed
        CHECK (delivery IS NULL OR status = 'completed');

-- The publisher's timer: the next instant something is waiting for.
CREATE INDEX episode_schedule_queue_to_publish
    ON episode_schedule_queue (scheduled_for) WHERE delivery = 'scheduled';
-- The scheduler's check that a project's next slot is not one already generated.
CREATE INDEX episode_schedule_queue_to_publish_by_project
    ON episode_schedule_queue (project_id) WHERE delivery = 'scheduled';
-- Earliest deadline first: the claim orders due items by scheduled_for.
CREATE INDEX episode_schedule_queue_due_by_deadline
    ON episode_schedule_queue (scheduled_for, run_after, id) WHERE status = 'pending';
