-- The queue's own state machine (mf_worker.queue.store): the one owner of every statement that
-- moves an item out of 'processing'. Each is fenced on the claim token: every claim draws a new
-- value from a sequence (migration 0004), so a worker that lost its claim (crashed, frozen,
-- partitioned, cancelled by an operator, reaped and re-claimed — even by itself) matches
-- nothing. The fence is `id = … AND claim_token = … AND status = 'processing'`. A generation's
-- completion is fenced the same way inside its final write (complete_episode in
-- engine/episodes.sql), and its budget reservation inside reserve_budget (cost/budget.sql), so
-- that each stays one statement.
--
--   pending ──claim──▶ processing ──complete──▶ completed
--      ▲                 │  │ └──fail────────▶ failed
--      └──retry/release──┘  └──reap (lease expired)──▶ pending | failed
--
-- `now` is a parameter (NULL = the database clock) so tests control time; leases always use
-- the database's clock by default, so hosts with skewed clocks still agree.

-- name: claim_due_items
-- Batched: one short transaction claims up to `limit` due items, skipping rows other workers
-- have locked. Fair across organisations: each organisation's due items are numbered in
-- run_after order (its "turn"), and items are taken by turn, then run_after, so every
-- organisation's earliest item comes before any organisation's second, and one
-- organisation's backlog cannot starve the rest. Per organisation at most `limit` items are
-- looked at (an index range scan that stops at the first item not yet due), and at most
-- `org_max_in_flight` minus those it already has processing (NULL: no cap; concurrent claims
-- may overshoot the cap by what they take at the same instant). Each claim draws a new claim
-- token. attempt_count counts generator calls (a release gives the attempt back).
WITH candidates AS (
    SELECT c.id, c.turn, c.run_after
    FROM public.organizations AS o
    CROSS JOIN LATERAL (
        SELECT q.id, q.run_after, row_number() OVER (ORDER BY q.run_after, q.id) AS turn
        FROM public.episode_schedule_queue AS q
        WHERE q.organization_id = o.id
          AND q.status = 'pending'
          AND q.run_after <= coalesce(%(now)s, now())
        ORDER BY q.run_after, q.id
        LIMIT CASE WHEN %(org_max_in_flight)s::int IS NULL THEN %(limit)s
                   ELSE greatest(least(%(limit)s, %(org_max_in_flight)s::int - (
                            SELECT count(*) FROM public.episode_schedule_queue AS busy
                            WHERE busy.organization_id = o.id
                              AND busy.status = 'processing')), 0) END
    ) AS c
), due AS (
    SELECT q.id
    FROM candidates AS c
    JOIN public.episode_schedule_queue AS q ON q.id = c.id
    WHERE q.status = 'pending'
      AND q.run_after <= coalesce(%(now)s, now())
    ORDER BY c.turn, c.run_after, c.id
    LIMIT %(limit)s
    FOR UPDATE OF q SKIP LOCKED
)
UPDATE episode_schedule_queue AS q
SET status           = 'processing',
    attempt_count    = q.attempt_count + 1,
    picked_up_at     = coalesce(q.picked_up_at, coalesce(%(now)s, now())),
    last_attempt_at  = coalesce(%(now)s, now()),
    locked_by        = %(worker)s,
    claim_token      = nextval('episode_schedule_queue_claim_token_seq'),
    lease_expires_at = coalesce(%(now)s, now()) + make_interval(secs => %(lease_seconds)s)
FROM due
WHERE q.id = due.id
RETURNING q.id, q.claim_token, q.project_id, q.organization_id, q.scheduled_for, q.run_after,
          q.attempt_count, q.episode_id, q.metadata, q.lease_expires_at;

-- name: claim_item_by_id
-- `run-once --id`: claim one named item even if it is not due yet (pending only).
UPDATE episode_schedule_queue AS q
SET status           = 'processing',
    attempt_count    = q.attempt_count + 1,
    picked_up_at     = coalesce(q.picked_up_at, coalesce(%(now)s, now())),
    last_attempt_at  = coalesce(%(now)s, now()),
    locked_by        = %(worker)s,
    claim_token      = nextval('episode_schedule_queue_claim_token_seq'),
    lease_expires_at = coalesce(%(now)s, now()) + make_interval(secs => %(lease_seconds)s)
WHERE q.id = (SELECT id FROM episode_schedule_queue
              WHERE id = %(id)s AND status = 'pending' FOR UPDATE SKIP LOCKED)
RETURNING q.id, q.claim_token, q.project_id, q.organization_id, q.scheduled_for, q.run_after,
          q.attempt_count, q.episode_id, q.metadata, q.lease_expires_at;

-- name: extend_leases
-- The heartbeat: one statement for all of this worker's in-flight claims. It skips rows that
-- someone else has locked (an operator's open `SELECT … FOR UPDATE`, a cancel in progress)
-- instead of waiting for them, so one locked row cannot stall every other lease; such a claim
-- is still ours (`extended` false) and is renewed on the next beat. Claims missing from the
-- result are lost (reaped, cancelled, taken over). `lease_expires_at` is set first: a test
-- recognises the heartbeat by it.
WITH held AS (
    SELECT q.id, q.claim_token
    FROM episode_schedule_queue AS q
    JOIN unnest(%(ids)s::text[], %(tokens)s::bigint[]) AS mine(id, token)
      ON q.id = mine.id AND q.claim_token = mine.token
    WHERE q.status = 'processing'
), lockable AS (
    SELECT q.id
    FROM episode_schedule_queue AS q
    WHERE q.id IN (SELECT id FROM held)
    FOR UPDATE SKIP LOCKED
), extended AS (
    UPDATE episode_schedule_queue AS q
    SET lease_expires_at = coalesce(%(now)s, now()) + make_interval(secs => %(lease_seconds)s)
    FROM lockable, held
    WHERE q.id = lockable.id AND held.id = q.id
      AND q.claim_token = held.claim_token AND q.status = 'processing'
    RETURNING q.id
)
SELECT held.claim_token, extended.id IS NOT NULL AS extended
FROM held LEFT JOIN extended ON extended.id = held.id;

-- name: complete_items
-- Fenced completion of a batch (the queue machinery alone; the full pipeline completes each
-- item inside its final write: complete_episode in engine/episodes.sql). Settles any
-- reservation without booking it (nothing was generated).
UPDATE episode_schedule_queue AS q
SET status           = 'completed',
    completed_at     = coalesce(%(now)s, now()),
    reserved_cost_gbp = NULL,
    locked_by        = NULL,
    lease_expires_at = NULL,
    last_error       = NULL
FROM unnest(%(ids)s::text[], %(tokens)s::bigint[]) AS done(id, token)
WHERE q.id = done.id
  AND q.claim_token = done.token
  AND q.status = 'processing'
RETURNING q.id;

-- name: retry_item
-- A retryable failure: back to pending, claimable again after the backoff. `settled`: the
-- caller booked the attempt's real usage in this transaction; otherwise the reservation (if
-- any) is booked as an estimate by the queue's trigger (migration 0008).
UPDATE episode_schedule_queue
SET status           = 'pending',
    reserved_cost_gbp = CASE WHEN %(settled)s THEN NULL ELSE reserved_cost_gbp END,
    run_after        = coalesce(%(now)s, now()) + make_interval(secs => %(delay_seconds)s),
    last_error       = %(error)s,
    locked_by        = NULL,
    lease_expires_at = NULL
WHERE id = %(id)s
  AND claim_token = %(token)s
  AND status = 'processing'
RETURNING id;

-- name: finish_item
-- A final outcome other than success: 'failed' (attempts used up, or a permanent error) or
-- 'cancelled' (the project is gone or paused). `settled` as for retry_item.
UPDATE episode_schedule_queue
SET status           = %(status)s,
    reserved_cost_gbp = CASE WHEN %(settled)s THEN NULL ELSE reserved_cost_gbp END,
    last_error       = %(error)s,
    locked_by        = NULL,
    lease_expires_at = NULL
WHERE id = %(id)s
  AND claim_token = %(token)s
  AND status = 'processing'
RETURNING id;

-- name: release_item
-- Hand an item back (shutdown, cost block): pending (after `delay_seconds`) or blocked. Before
-- its generator call started (`called` false) the attempt the claim counted is given back and
-- the reservation released unbooked, since nothing can have been billed; after it started, the
-- attempt stays used and the reservation is booked as an estimate (migration 0008).
UPDATE episode_schedule_queue
SET status           = %(status)s,
    attempt_count    = CASE WHEN %(called)s THEN attempt_count
                            ELSE greatest(attempt_count - 1, 0) END,
    reserved_cost_gbp = CASE WHEN %(called)s THEN reserved_cost_gbp END,
    run_after        = coalesce(%(now)s, now()) + make_interval(secs => %(delay_seconds)s),
    last_error       = coalesce(%(error)s, last_error),
    blocked_on       = %(blocked_on)s,
    locked_by        = NULL,
    lease_expires_at = NULL
WHERE id = %(id)s
  AND claim_token = %(token)s
  AND status = 'processing'
RETURNING id;

-- name: cancel_item_by_operator
-- `mf-worker cancel`: a pending, blocked or processing item is cancelled with the reason. A
-- generation in flight is fenced out by its claim token (its write, heartbeat and failure all
-- match nothing); the trigger of migration 0004 fails the episode an attempt had started.
-- `old_status` is for the operator's audit row.
WITH old AS (
    SELECT id, status FROM episode_schedule_queue
    WHERE id = %(id)s AND status IN ('pending', 'blocked', 'processing')
    FOR UPDATE
)
UPDATE episode_schedule_queue q
SET status = 'cancelled', last_error = %(reason)s, locked_by = NULL, lease_expires_at = NULL
FROM old
WHERE q.id = old.id
RETURNING q.id, q.status, q.organization_id, q.episode_id, old.status AS old_status;

-- name: reap_expired_leases
-- Items whose worker stopped heartbeating: back to pending, or failed when the attempts are
-- used up. Safe to run from every daemon at once (SKIP LOCKED; each row reaped once).
WITH expired AS (
    SELECT id
    FROM episode_schedule_queue
    WHERE status = 'processing'
      AND lease_expires_at < coalesce(%(now)s, now())
    ORDER BY lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE episode_schedule_queue AS q
SET status           = CASE WHEN q.attempt_count >= %(max_attempts)s THEN 'failed'
                            ELSE 'pending' END,
    run_after        = coalesce(%(now)s, now()),
    last_error       = format('worker lost: %%s stopped renewing its lease on attempt %%s '
                              '(expired %%s)', q.locked_by, q.attempt_count,
                              to_char(q.lease_expires_at AT TIME ZONE 'UTC',
                                      'YYYY-MM-DD"T"HH24:MI:SS"Z"')),
    locked_by        = NULL,
    lease_expires_at = NULL
FROM expired
WHERE q.id = expired.id
RETURNING q.id, q.organization_id, q.episode_id, q.status, q.attempt_count, q.last_error;

-- name: prune_finished_items
-- Retention: completed and cancelled items past their time (finished_at: set once when the item
-- reached its final status, so no heartbeat or claim changes an indexed column), in small
-- batches so the pruner never holds many locks or bloats one transaction. Episodes and usage rows are not touched.
DELETE FROM episode_schedule_queue
WHERE id IN (
    SELECT id FROM episode_schedule_queue
    WHERE status IN ('completed', 'cancelled')
      AND finished_at < coalesce(%(now)s, now()) - make_interval(days => %(retention_days)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: next_due_at
-- When the earliest pending item becomes due, so an idle worker can sleep exactly until then.
SELECT min(run_after) AS due_at FROM episode_schedule_queue WHERE status = 'pending';
