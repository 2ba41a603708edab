-- The final write of a successful generation (mf_worker.engine.write). Runs inside a
-- transaction acting for the item's organisation (act_for), so row-level security rejects any
-- row of another organisation.

-- name: lock_project_for_write
-- The project as it is at commit: its row locked (FOR NO KEY UPDATE, the lock the final write's
-- cache update takes anyway, taken first) until the write commits, so a pause, a new delivery
-- time or a deletion by the web app either committed before this read or waits for the write.
-- No row: the project was deleted. `ended_slots`: its instants after `after` that already
-- ended (a slot is generated once; the same rule as scheduling/queries.sql).
SELECT p.status, p.cadence_config, p.delivery_time, u.timezone,
       ARRAY(SELECT e.scheduled_for FROM episode_schedule_queue e
             WHERE e.project_id = p.id AND e.scheduled_for > %(after)s
               AND (e.status IN ('completed', 'failed')
                    OR (e.status = 'cancelled' AND e.metadata ? 'skipped'))) AS ended_slots
FROM projects p
JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
WHERE p.id = %(project_id)s
FOR NO KEY UPDATE OF p;

-- name: complete_episode
-- The final write of one item, in one statement so that a batch of items pipelines in one
-- transaction (lists arrive as JSON: one parameter each, cheap to send and to unpack): the
-- completion first, fenced on the claim token (it takes the item's row lock, and settles the
-- reservation: the real usage is booked below, so the trigger books no estimate), then — only if the fence held, because every other part reads
-- from `fence` — the episode ready, its blocks, the token usage (the daily aggregate follows by
-- trigger), the incorporated planning notes (only those still pending for this project), new
-- memories, the audit row, the user events, and the project's next item with its cache. The
-- episode is visible ('ready', published_at, the `episode_ready` event) only if its delivery
-- instant has come; finished before it, it is 'scheduled' and the publisher (engine/
-- publisher.sql) makes it ready at the instant. A project that is no longer active at commit
-- (`withdrawn_reason`: 'project paused', 'project archived') gets its episode 'withdrawn' at
-- once instead (never visible; its usage booked; the notes it used stay pending, for the next
-- episode; no user events; an `episode.withdraw` audit row), no next item, and no
-- next_scheduled_at. The
-- next item selects FROM fence, so the completed row has left the open-item index before the
-- insert checks it. `held` 0 means the claim is no longer ours and nothing was written.
WITH fence AS (
    UPDATE episode_schedule_queue
    SET status           = 'completed',
        completed_at     = now(),
        episode_id       = %(episode_id)s,
        reserved_cost_gbp = NULL,
        locked_by        = NULL,
        lease_expires_at = NULL,
        last_error       = 'episode withdrawn: ' || %(withdrawn_reason)s::text,
        delivery         = CASE WHEN scheduled_for > now()
                                     AND %(withdrawn_reason)s::text IS NULL THEN 'scheduled'
                                WHEN %(withdrawn_reason)s::text IS NULL THEN 'published'
                                ELSE 'withdrawn' END,
        published_at     = CASE WHEN %(withdrawn_reason)s::text IS NOT NULL
                                  OR scheduled_for > now() THEN NULL
                                ELSE now() END
    WHERE id = %(id)s
      AND claim_token = %(token)s
      AND status = 'processing'
    RETURNING id, scheduled_for, delivery, published_at
), episode AS (
    UPDATE episodes
    SET status = CASE fence.delivery WHEN 'scheduled' THEN 'scheduled'
                                     WHEN 'withdrawn' THEN 'withdrawn' ELSE 'ready' END,
        withdrawn_reason = %(withdrawn_reason)s,
        published_at = fence.published_at,
        title = %(title)s, generation_attempts = generation_attempts + 1,
        generator = %(generator)s, model = %(model)s
    FROM fence
    WHERE episodes.id = %(episode_id)s
), new_blocks AS (
    INSERT INTO blocks (id, episode_id, organization_id, content, position, reasoning,
                        confidence)
    SELECT b.id, %(episode_id)s, %(organization_id)s, b.content, b.position, b.reasoning,
           b.confidence
    FROM fence,
         jsonb_to_recordset(%(blocks)s::jsonb)
         AS b(id text, content text, position int, reasoning text, confidence float8)
), usage AS (
    INSERT INTO token_usage (id, organization_id, project_id, episode_id, operation, model,
                             prompt_tokens, completion_tokens, cost_gbp, billing_date, estimated)
    SELECT u.id, %(organization_id)s, %(project_id)s, %(episode_id)s, 'episode_generation',
           u.model, u.prompt_tokens, u.completion_tokens, u.cost_gbp, %(billing_date)s,
           coalesce(u.estimated, false)
    FROM fence,
         jsonb_to_recordset(%(usages)s::jsonb)
         AS u(id text, model text, prompt_tokens bigint, completion_tokens bigint,
              cost_gbp numeric, estimated boolean)
), notes AS (
    UPDATE planning_notes
    SET status = 'incorporated', processed_at = now(), episode_id = %(episode_id)s
    FROM fence
    WHERE fence.delivery <> 'withdrawn'
      AND planning_notes.project_id = %(project_id)s AND planning_notes.status = 'pending'
      AND planning_notes.id IN (SELECT jsonb_array_elements_text(%(note_ids)s::jsonb))
), memories AS (
    INSERT INTO agent_memory (id, project_id, organization_id, content, memory_type,
                              importance)
    SELECT m.id, %(project_id)s, %(organization_id)s, m.content, m.memory_type, m.importance
    FROM fence,
         jsonb_to_recordset(%(memories)s::jsonb)
         AS m(id text, content text, memory_type text, importance float8)
), audit AS (
    INSERT INTO audit_log (id, user_id, organization_id, action, resource_id, new_value)
    SELECT %(audit_id)s, NULL, %(organization_id)s, 'episode.generate', %(episode_id)s,
           %(summary)s
    FROM fence
), withdraw_audit AS (
    INSERT INTO audit_log (id, user_id, organization_id, action, resource_id, new_value)
    SELECT %(withdraw_audit_id)s, NULL, %(organization_id)s, 'episode.withdraw',
           %(episode_id)s, %(withdrawn_reason)s
    FROM fence
    WHERE fence.delivery = 'withdrawn'
), event AS (
    INSERT INTO user_events (id, user_id, organization_id, event_type, event_data)
    SELECT %(event_id)s, %(user_id)s, %(organization_id)s, 'episode_generated', %(event_data)s
    FROM fence
    WHERE fence.delivery <> 'withdrawn'
), ready_event AS (
    INSERT INTO user_events (id, user_id, organization_id, event_type, event_data)
    SELECT %(ready_event_id)s, %(user_id)s, %(organization_id)s, 'episode_ready', %(event_data)s
    FROM fence
    WHERE fence.delivery = 'published'
), next_item AS (
    -- NULL when the project's cadence or zone is now invalid (the scheduler reports that).
    INSERT INTO episode_schedule_queue
        (id, project_id, organization_id, scheduled_for, run_after, metadata)
    SELECT %(next_id)s, %(project_id)s, %(organization_id)s, %(next_scheduled_for)s,
           %(next_scheduled_for)s::timestamptz - make_interval(secs => %(lead_seconds)s),
           %(next_metadata)s
    FROM fence
    WHERE %(next_scheduled_for)s::timestamptz IS NOT NULL
    ON CONFLICT (project_id) WHERE status IN ('pending', 'processing', 'blocked') DO NOTHING
    RETURNING project_id, scheduled_for
), cached AS (
    UPDATE projects p SET next_scheduled_at = next_item.scheduled_for
    FROM next_item
    WHERE p.id = next_item.project_id
      AND p.next_scheduled_at IS DISTINCT FROM next_item.scheduled_for
), uncached AS (
    -- An inactive project has no next item, so no next delivery.
    UPDATE projects p SET next_scheduled_at = NULL
    FROM fence
    WHERE fence.delivery = 'withdrawn' AND p.id = %(project_id)s
      AND p.next_scheduled_at IS NOT NULL
)
SELECT count(*) AS held, max(scheduled_for) AS scheduled_for, max(published_at) AS published_at,
       %(withdrawn_reason)s::text AS withdrawn_reason
FROM fence;
