-- The console's providers page (mf_worker.console.providers).

-- name: count_deferred_by_reason
-- Pending items waiting on the provider or a backoff (no attempt used), by why.
SELECT deferred_reason, count(*) AS items, min(run_after) AS next_run_after
FROM episode_schedule_queue
WHERE status = 'pending' AND deferred_reason IS NOT NULL AND run_after > %(now)s::timestamptz
GROUP BY deferred_reason
ORDER BY deferred_reason;
