-- The console's overview (mf_worker.console.overview). Cross-organisation reads.

-- name: count_finished_by_slot
-- Items that finished in each five-minute slot of the hour before %(now)s (slot 0 is the
-- latest), completed and failed apart: the throughput chart. One branch per status, so each
-- reads its partial index on finished_at.
SELECT floor(extract(epoch FROM %(now)s::timestamptz - finished_at) / 300)::int AS slot,
       'completed' AS status, count(*) AS items
FROM episode_schedule_queue
WHERE status = 'completed'
  AND finished_at > %(now)s::timestamptz - interval '1 hour'
  AND finished_at <= %(now)s::timestamptz
GROUP BY 1
UNION ALL
SELECT floor(extract(epoch FROM %(now)s::timestamptz - finished_at) / 300)::int,
       'failed', count(*)
FROM episode_schedule_queue
WHERE status = 'failed'
  AND finished_at > %(now)s::timestamptz - interval '1 hour'
  AND finished_at <= %(now)s::timestamptz
GROUP BY 1;

-- name: count_deliveries_by_hour
-- Open items due in each of the next 24 hours (hour 0 starts at %(now)s): the zones' morning
-- waves. One branch per open status, each through its own partial index.
SELECT hour, sum(items)::bigint AS items
FROM (
    SELECT floor(extract(epoch FROM scheduled_for - %(now)s::timestamptz) / 3600)::int AS hour,
           count(*) AS items
    FROM episode_schedule_queue
    WHERE status = 'pending'
      AND scheduled_for >= %(now)s::timestamptz
      AND scheduled_for < %(now)s::timestamptz + interval '24 hours'
    GROUP BY 1
    UNION ALL
    SELECT floor(extract(epoch FROM scheduled_for - %(now)s::timestamptz) / 3600)::int,
           count(*)
    FROM episode_schedule_queue
    WHERE status = 'processing'
      AND scheduled_for >= %(now)s::timestamptz
      AND scheduled_for < %(now)s::timestamptz + interval '24 hours'
    GROUP BY 1
    UNION ALL
    SELECT floor(extract(epoch FROM scheduled_for - %(now)s::timestamptz) / 3600)::int,
           count(*)
    FROM episode_schedule_queue
    WHERE status = 'blocked'
      AND scheduled_for >= %(now)s::timestamptz
      AND scheduled_for < %(now)s::timestamptz + interval '24 hours'
    GROUP BY 1
) AS waves
GROUP BY hour;

-- name: list_organizations_near_limit
-- Organisations whose spend today (measured, estimated and reserved) has reached 80 % of their
-- limit, fullest first. Reads the daily aggregate only.
SELECT d.organization_id, o.name,
       d.total_cost_gbp + d.reserved_gbp AS committed_gbp,
       coalesce(o.daily_cost_limit_gbp, %(default_limit)s) AS limit_gbp
FROM token_usage_daily d
JOIN organizations o ON o.id = d.organization_id
WHERE d.date = %(date)s
  AND d.total_cost_gbp + d.reserved_gbp >= 0.8 * coalesce(o.daily_cost_limit_gbp, %(default_limit)s)
ORDER BY (d.total_cost_gbp + d.reserved_gbp)
         / nullif(coalesce(o.daily_cost_limit_gbp, %(default_limit)s), 0) DESC NULLS FIRST,
         d.organization_id
LIMIT %(limit)s;
