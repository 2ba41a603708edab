-- The queue's depth as the metrics (and `mf-worker status`) read it. Cross-organisation,
-- read-only.

-- name: count_items_by_status
-- Exact, and a scan of the whole queue: for small queues and `mf-worker status`.
SELECT status, count(*) AS items FROM episode_schedule_queue GROUP BY status;

-- name: count_in_flight_items
-- The statuses a large queue holds few of (the fleet's in-flight items, an organisation's
-- blocked ones), each through its partial index. Pending grows with the projects (every active
-- project has one waiting item), so a large queue estimates it like the finished statuses.
SELECT (SELECT count(*) FROM episode_schedule_queue WHERE status = 'processing') AS processing,
       (SELECT count(*) FROM episode_schedule_queue WHERE status = 'blocked') AS blocked;

-- name: estimate_items_by_status
-- The planner's own estimate: rows per page at the last VACUUM/ANALYZE times the pages now,
-- split by the status column's most common values (ANALYZE samples them; autovacuum
-- re-analyses the queue after 2 % of it changed, migration 0001). rows < 0: never analysed.
SELECT CASE WHEN c.reltuples < 0 OR c.relpages = 0 THEN c.reltuples
            ELSE c.reltuples / c.relpages
                 * (pg_relation_size(c.oid) / current_setting('block_size')::int) END AS rows,
       s.most_common_vals::text::text[] AS vals, s.most_common_freqs AS freqs
FROM pg_class c
LEFT JOIN pg_stats s
       ON s.schemaname = 'public' AND s.tablename = c.relname AND s.attname = 'status'
WHERE c.oid = 'public.episode_schedule_queue'::regclass;

-- name: oldest_due_pending
-- Lag: how long the oldest due pending item has been waiting. `now` is a parameter, not now():
-- the planner then estimates the due range from the column's histogram (a few rows among a
-- million pending, one index range) instead of guessing a third of the table, which at a
-- million projects chose a parallel scan whose start-up alone took 10 ms per scrape.
SELECT min(run_after) AS oldest_due,
       count(*) AS due_items
FROM episode_schedule_queue
WHERE status = 'pending' AND run_after <= %(now)s;

-- name: count_late_items
-- Late: the delivery instant has passed and the episode is not visible yet. Open items (not
-- generated yet: waiting, running, or blocked by the cost limit until the next UTC day) and
-- episodes finished early that the publisher has not published within a second of the instant.
-- Read at every scrape: one branch per status, so each uses its partial index (0.3 ms for
-- 100,000 open items, where one OR over the table was a 40-70 ms sequential scan); `now` a
-- parameter, as above.
SELECT coalesce(sum(n), 0)::bigint AS late_items, min(oldest) AS oldest_late
FROM (SELECT count(*) AS n, min(scheduled_for) AS oldest FROM episode_schedule_queue
       WHERE status = 'pending' AND scheduled_for < %(now)s
      UNION ALL
      SELECT count(*), min(scheduled_for) FROM episode_schedule_queue
       WHERE status = 'processing' AND scheduled_for < %(now)s
      UNION ALL
      SELECT count(*), min(scheduled_for) FROM episode_schedule_queue
       WHERE status = 'blocked' AND scheduled_for < %(now)s
      UNION ALL
      SELECT count(*), min(scheduled_for) FROM episode_schedule_queue
       WHERE delivery = 'scheduled' AND scheduled_for < %(now)s::timestamptz - interval '1 second') late;
