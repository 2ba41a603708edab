-- The publisher's statements (mf_worker.maintenance.publisher): episodes finished before their
-- delivery instant wait as 'scheduled' and become 'ready' at it, or are withdrawn when their
-- project changed meanwhile. The queue item says which are waiting (delivery = 'scheduled'),
-- because the publisher finds them across organisations and the cross-organisation role cannot
-- read episodes; each episode is then changed acting for its own organisation.
--
-- `now` is a parameter (NULL = the database clock) so tests control the instant. With the
-- database clock, the selection and the change share the transaction's now(), so
-- published_at >= scheduled_for always, and nothing commits before the instant: no episode is
-- ever visible early.

-- name: list_due_publications
-- Items whose episode waits for an instant that has come, with what decides between publishing
-- and withdrawing it. Locked (SKIP LOCKED), so concurrent publishers split the work and never
-- act on one item twice.
SELECT q.id, q.organization_id, q.project_id, q.episode_id, q.scheduled_for, q.metadata,
       p.user_id, p.status AS project_status, p.cadence_config, p.delivery_time, u.timezone
FROM episode_schedule_queue q
LEFT JOIN projects p ON p.id = q.project_id
LEFT JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
WHERE q.delivery = 'scheduled'
  AND q.scheduled_for <= coalesce(%(now)s, now())
ORDER BY q.scheduled_for, q.id
LIMIT %(limit)s
FOR UPDATE OF q SKIP LOCKED;

-- name: publish_episode
-- Acting for the item's organisation (whose row list_due_publications locked in this
-- transaction): the episode becomes visible now, with the user event. An episode that is no
-- longer 'scheduled' (changed by hand) is left alone and its item marked withdrawn, so the
-- item never waits again and nothing is counted as published that was not.
WITH episode AS (
    UPDATE episodes
    SET status = 'ready', published_at = coalesce(%(now)s, now())
    WHERE id = %(episode_id)s AND status = 'scheduled'
    RETURNING id, project_id, sequence_number, published_at
), item AS (
    UPDATE episode_schedule_queue
    SET delivery     = CASE WHEN EXISTS (SELECT 1 FROM episode) THEN 'published'
                            ELSE 'withdrawn' END,
        published_at = (SELECT published_at FROM episode),
        last_error   = CASE WHEN EXISTS (SELECT 1 FROM episode) THEN last_error
                            ELSE 'episode withdrawn: it was no longer scheduled' END
    WHERE id = %(id)s AND delivery = 'scheduled'
    RETURNING published_at
), event AS (
    -- The same event data as the final write's, for an episode ready at once.
    INSERT INTO user_events (id, user_id, organization_id, event_type, event_data)
    SELECT %(event_id)s, %(user_id)s, %(organization_id)s, 'episode_ready',
           jsonb_build_object('episode_id', episode.id, 'project_id', episode.project_id,
                              'sequence_number', episode.sequence_number)
    FROM episode
)
SELECT (SELECT published_at FROM item) AS published_at;

-- name: withdraw_episode
-- Acting for the item's organisation: the project was paused, archived, deleted or rescheduled
-- before the instant. The episode is kept, 'withdrawn' with the reason (its usage stays
-- booked: token_usage is not touched); the planning notes it used go back to pending, for the
-- next episode; an audit row says why. A deleted project's episode went with it (the cascade),
-- so only the queue item and the audit row record the withdrawal.
WITH item AS (
    UPDATE episode_schedule_queue
    SET delivery = 'withdrawn', last_error = 'episode withdrawn: ' || %(reason)s
    WHERE id = %(id)s AND delivery = 'scheduled'
    RETURNING id
), episode AS (
    UPDATE episodes
    SET status = 'withdrawn', withdrawn_reason = %(reason)s
    FROM item
    WHERE episodes.id = %(episode_id)s AND episodes.status = 'scheduled'
    RETURNING episodes.id
), notes AS (
    UPDATE planning_notes
    SET status = 'pending', processed_at = NULL, episode_id = NULL
    FROM episode
    WHERE planning_notes.episode_id = episode.id AND planning_notes.status = 'incorporated'
), audit AS (
    INSERT INTO audit_log (id, user_id, organization_id, action, resource_id, new_value)
    SELECT %(audit_id)s, NULL, %(organization_id)s, 'episode.withdraw',
           coalesce(%(episode_id)s, %(id)s), %(reason)s
    FROM item
)
SELECT count(*) AS withdrawn FROM item;

-- name: next_publication_at
-- The publisher's timer: the next instant an episode waits for.
SELECT min(scheduled_for) AS due_at FROM episode_schedule_queue WHERE delivery = 'scheduled';
