-- What `mf-worker status`, `retry` and `cancel` read and change. Cross-organisation.

-- name: list_late_items
SELECT id, project_id, organization_id, status, scheduled_for, attempt_count, last_error,
       extract(epoch FROM now() - scheduled_for)::float8 AS late_seconds
FROM episode_schedule_queue
WHERE (status IN ('pending', 'processing', 'blocked') AND scheduled_for < now())
   OR (delivery = 'scheduled' AND scheduled_for < now() - interval '1 second')
ORDER BY scheduled_for
LIMIT %(limit)s;

-- name: list_expired_leases
SELECT id, project_id, organization_id, locked_by, attempt_count, lease_expires_at
FROM episode_schedule_queue
WHERE status = 'processing' AND lease_expires_at < now()
ORDER BY lease_expires_at
LIMIT %(limit)s;

-- name: list_items_in_status
SELECT id, project_id, organization_id, attempt_count, last_error, updated_at
FROM episode_schedule_queue
WHERE status = %(status)s
ORDER BY updated_at DESC
LIMIT %(limit)s;

-- name: count_active_projects_without_item
SELECT count(*) AS projects
FROM projects p
WHERE p.status = 'active'
  AND NOT EXISTS (SELECT 1 FROM episode_schedule_queue q
                  WHERE q.project_id = p.id AND q.status IN ('pending', 'processing', 'blocked'));

-- name: retry_item_now
-- `mf-worker retry`: a failed, cancelled or blocked item (or a pending one that is backing off)
-- becomes pending and due now, with a fresh start: its attempts (MF_MAX_ATTEMPTS), its retry
-- deadline (MF_RETRY_DEADLINE runs from the next pick-up: picked_up_at), its backoff (the
-- exponent, retry_count), its deferrals and its lost-worker count (lost_count). `old_status`
-- is for the audit row.
WITH old AS (
    SELECT id, status FROM episode_schedule_queue
    WHERE id = %(id)s AND status IN ('failed', 'cancelled', 'blocked', 'pending')
    FOR UPDATE
)
UPDATE episode_schedule_queue q
SET status = 'pending', run_after = now(), attempt_count = 0, last_error = NULL,
    completed_at = NULL, picked_up_at = NULL, retry_count = 0, deferred_count = 0,
    deferred_reason = NULL, lost_count = 0, blocked_on = NULL,
    metadata = q.metadata - 'skipped'
FROM old
WHERE q.id = old.id
RETURNING q.id, q.status, q.organization_id, q.episode_id, old.status AS old_status;

-- name: reopen_retried_episode
-- The retried item's episode (failed with it) is generating again, so the attempts to come
-- add to its history. Runs acting for the item's organisation.
UPDATE episodes SET status = 'generating'
WHERE id = %(episode_id)s AND status = 'failed';

-- name: list_spend_today
-- Today's biggest spenders (UTC day): measured spend (real usage), the part of it that is
-- estimated (reserved worst cases booked for calls whose usage is unknown), reservations in
-- flight, and the limit. Reads the daily aggregate only.
SELECT d.organization_id, d.total_cost_gbp - d.estimated_cost_gbp AS measured_gbp,
       d.estimated_cost_gbp AS estimated_gbp, d.reserved_gbp,
       coalesce(o.daily_cost_limit_gbp, %(default_limit)s) AS limit_gbp
FROM token_usage_daily d
JOIN organizations o ON o.id = d.organization_id
WHERE d.date = %(date)s AND (d.total_cost_gbp > 0 OR d.reserved_gbp > 0)
ORDER BY d.total_cost_gbp + d.reserved_gbp DESC, d.organization_id
LIMIT %(limit)s;

-- name: count_deferred_items
-- Pending items waiting because of the provider (a rate limit, an exhausted quota) or a
-- transient failure's backoff, by why, with when the first of them runs again.
SELECT deferred_reason, count(*) AS items, min(run_after) AS next_run_after
FROM episode_schedule_queue
WHERE status = 'pending' AND deferred_reason IS NOT NULL AND run_after > now()
GROUP BY deferred_reason
ORDER BY deferred_reason;

-- name: count_fallback_episodes
-- Episodes the fallback generator (MF_FALLBACK_GENERATOR) wrote in the last hour, by
-- generator and model: items the primary could not serve in time. Reads the last hour's
-- completed items (episode_schedule_queue_finished) and their episodes by key.
SELECT e.generator, e.model, count(*) AS episodes, max(q.completed_at) AS last_at
FROM episode_schedule_queue AS q
JOIN episodes AS e ON e.id = q.episode_id
WHERE q.status = 'completed' AND q.completed_at > now() - interval '1 hour'
  AND e.generator LIKE 'fallback:%%'
GROUP BY e.generator, e.model
ORDER BY e.generator, e.model;
