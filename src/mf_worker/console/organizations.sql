-- The console's organisations page (mf_worker.console.organizations). Cross-organisation reads
-- of the daily aggregate, the cost-limit trips and the blocked items.

-- name: list_organizations_today
-- Organisations with spend, reservations, a trip or blocked items today, largest first:
-- measured, estimated and reserved against the limit.
WITH active AS (
    SELECT organization_id FROM token_usage_daily
    WHERE date = %(date)s AND (total_cost_gbp > 0 OR reserved_gbp > 0)
    UNION
    SELECT organization_id FROM cost_limit_trips WHERE date = %(date)s
    UNION
    SELECT DISTINCT organization_id FROM episode_schedule_queue WHERE status = 'blocked'
)
SELECT o.id AS organization_id, o.name,
       coalesce(d.total_cost_gbp - d.estimated_cost_gbp, 0) AS measured_gbp,
       coalesce(d.estimated_cost_gbp, 0) AS estimated_gbp,
       coalesce(d.reserved_gbp, 0) AS reserved_gbp,
       coalesce(o.daily_cost_limit_gbp, %(default_limit)s) AS limit_gbp,
       t.tripped_at, t.notified_at, t.notify_attempts, t.last_notify_error,
       (SELECT count(*) FROM episode_schedule_queue b
        WHERE b.organization_id = o.id AND b.status = 'blocked') AS blocked_items
FROM active a
JOIN organizations o ON o.id = a.organization_id
LEFT JOIN token_usage_daily d ON d.organization_id = o.id AND d.date = %(date)s
LEFT JOIN cost_limit_trips t ON t.organization_id = o.id AND t.date = %(date)s
WHERE %(organization_id)s::text IS NULL OR o.id = %(organization_id)s
ORDER BY coalesce(d.total_cost_gbp + d.reserved_gbp, 0) DESC, o.id
LIMIT %(limit)s;
