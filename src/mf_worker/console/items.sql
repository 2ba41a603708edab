-- The console's items list and the item and project pages (mf_worker.console.items).
-- Cross-organisation reads of the queue; the episode, its usage and audit rows are read acting
-- for the item's organisation (row-level security).

-- name: list_items_page
-- One page of items, newest delivery first, filtered; keyset pagination on
-- (scheduled_for, id): the page after the cursor, never an OFFSET.
SELECT q.id, q.project_id, q.organization_id, q.status, q.scheduled_for, q.run_after,
       q.attempt_count, q.last_error, q.deferred_reason, q.delivery, q.updated_at,
       p.title AS project_title
FROM episode_schedule_queue q
LEFT JOIN projects p ON p.id = q.project_id
WHERE (%(status)s::text IS NULL OR q.status = %(status)s)
  AND (%(organization_id)s::text IS NULL OR q.organization_id = %(organization_id)s)
  AND (%(project_id)s::text IS NULL OR q.project_id = %(project_id)s)
  AND (%(error)s::text IS NULL OR q.last_error ILIKE '%%' || %(error)s || '%%')
  AND (%(since)s::timestamptz IS NULL OR q.scheduled_for >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR q.scheduled_for < %(until)s)
  AND (%(after_at)s::timestamptz IS NULL
       OR (q.scheduled_for, q.id) < (%(after_at)s::timestamptz, %(after_id)s::text))
ORDER BY q.scheduled_for DESC, q.id DESC
LIMIT %(limit)s;

-- name: get_item_detail
SELECT q.*, p.title AS project_title, p.status AS project_status,
       o.name AS organization_name
FROM episode_schedule_queue q
LEFT JOIN projects p ON p.id = q.project_id
JOIN organizations o ON o.id = q.organization_id
WHERE q.id = %(id)s;

-- name: get_episode
-- Acting for the item's organisation.
SELECT id, title, status, sequence_number, generation_attempts, generation_errors,
       created_at, updated_at, published_at, withdrawn_reason
FROM episodes
WHERE id = %(episode_id)s;

-- name: list_episode_blocks
-- Acting for the item's organisation.
SELECT position, type, content, confidence
FROM blocks
WHERE episode_id = %(episode_id)s
ORDER BY position;

-- name: list_episode_usage
-- The usage booked for the episode (acting for its organisation): real or estimated.
SELECT created_at, model, prompt_tokens, completion_tokens, cost_gbp, estimated, billing_date
FROM token_usage
WHERE episode_id = %(episode_id)s
ORDER BY created_at;

-- name: list_item_audit
-- Audit rows about the item (acting for its organisation), within its lifetime.
SELECT created_at, action, actor, old_value, new_value
FROM audit_log
WHERE organization_id = %(organization_id)s AND resource_id = %(id)s
  AND created_at >= %(created_at)s::timestamptz - interval '1 minute'
ORDER BY created_at;

-- name: get_project_detail
SELECT p.id, p.organization_id, p.title, p.status, p.cadence_config, p.delivery_time,
       p.next_scheduled_at, p.created_at, o.name AS organization_name, u.timezone
FROM projects p
JOIN organizations o ON o.id = p.organization_id
LEFT JOIN users u ON u.id = p.user_id
WHERE p.id = %(id)s;

-- name: list_project_items
SELECT id, status, scheduled_for, attempt_count, last_error, delivery, episode_id,
       finished_at
FROM episode_schedule_queue
WHERE project_id = %(id)s
ORDER BY scheduled_for DESC, id DESC
LIMIT %(limit)s;
