-- The queue's own state machine (mf_worker.queue.store): the one owner of every statement that
-- moves an item out of 'processing'. Each is fenced on the claim token: every claim draws a new
-- value from a sequence (migration 0004), so a worker that lost its claim (crashed, frozen,
-- partitioned, cancelled by an operator, reaped and re-claimed — even by itself) matches
-- nothing. The fence is `id = … AND claim_token = … AND status = 'processing'`. A generation's
-- completion is fenced the same way inside its final write (complete_episode in
-- engine/write.sql), and its budget reservation inside reserve_budget (cost/budget.sql), so
-- that each stays one statement.
--
--   pending ──claim──▶ processing ──complete──▶ completed
--      ▲                 │  │ └──fail────────▶ failed
--      └──retry/release──┘  └──reap (lease expired)──▶ pending | failed
--
-- `now` is a parameter (NULL = the database clock) so tests control time; leases always use
-- the database's clock by default, so hosts with skewed clocks still agree.

-- name: list_due_organizations
-- The organisations of the earliest `scan` due items, and whether those were all the due items
-- (then the list is every organisation with one): the claim's first look, a range of the due
-- index that stops early, so an idle or lightly loaded fleet finds its few due organisations
-- at once however many there are in all.
WITH prefix AS (
    SELECT organization_id FROM public.episode_schedule_queue
    WHERE status = 'pending' AND run_after <= coalesce(%(now)s, now())
    ORDER BY run_after, id
    LIMIT %(scan)s + 1
)
SELECT (SELECT count(*) FROM prefix) <= %(scan)s AS complete,
       ARRAY(SELECT DISTINCT organization_id FROM prefix) AS organizations;

-- name: walk_due_organizations
-- A backlog (more due items than the first look reads): walk the organisations that have
-- pending items in id order after `after`, wrapping round to the first, one index descent each
-- (an organisation's first entry in the pending index is its earliest run_after, so due or not
-- is read there), until `want` with a due item were found, `steps` were looked at, or the walk
-- is back where it began (then it has seen every organisation with pending items). The last
-- row is where the walk stopped: the next claim of this process goes on from there.
WITH RECURSIVE walk (organization_id, due, found, step, first) AS (
    -- Step 0 stands where the previous claim stopped; each step is the next organisation.
    SELECT %(after)s::text, false, 0, 0, NULL::text
    UNION ALL
    SELECT n.organization_id, n.due, walk.found + n.due::int, walk.step + 1,
           coalesce(walk.first, n.organization_id)
    FROM walk
    CROSS JOIN LATERAL (
        (SELECT organization_id, run_after <= coalesce(%(now)s, now()) AS due
         FROM public.episode_schedule_queue
         WHERE status = 'pending' AND organization_id > walk.organization_id
         ORDER BY organization_id, run_after
         LIMIT 1)
        UNION ALL
        (SELECT organization_id, run_after <= coalesce(%(now)s, now())
         FROM public.episode_schedule_queue
         WHERE status = 'pending'
         ORDER BY organization_id, run_after
         LIMIT 1)
        LIMIT 1) AS n
    WHERE walk.found < %(want)s AND walk.step < %(steps)s
      AND n.organization_id IS DISTINCT FROM walk.first
)
SELECT organization_id, due, found < %(want)s AND step < %(steps)s AS round
FROM walk WHERE step > 0 ORDER BY step;

-- name: claim_due_items
-- Batched: one short transaction claims up to `limit` due items, skipping rows other workers
-- have locked. The order is for on-time delivery first, then fairness:
--   1. late first: items whose delivery instant (scheduled_for) has come, before items that are
--      only in their lead window (claimable early, MF_LEAD_SECONDS). The earliest `limit` late
--      items of the whole queue are found here (the deadline index; whichever organisations
--      the caller chose), so a late item never waits behind another organisation's early one;
--   2. then the fair turn: an organisation's due items take turns after the items it already
--      has processing or completed in the last ten minutes (its first due item's turn is that
--      count + 1), so every organisation's earliest item comes before any organisation's
--      second, and one organisation's backlog cannot starve the rest however many claims it
--      takes (among late items too);
--   3. then the earliest delivery instant (scheduled_for), an item that was already started
--      (put back by a rate limit) before one that was not, and the id.
-- (1 and 2 are one sort key, `turn`: the array {0 if late else 1, the fair turn}.)
-- The fair candidates come from the given organisations (store.claim_due_items chooses at
-- most 4 × limit of those with a due item, taking turns among all of them from one claim to
-- the next) plus those of the late items. With k organisations, each offers its first
-- ceil(4 × limit / k) due items by run_after (its share; an index range scan that stops
-- early), and its recent completions are counted up to that share too: one served its share
-- or more in the last ten minutes goes behind every one served less, and the work per claim
-- stays about 5 × limit index entries however large the fleet is. At most
-- `org_max_in_flight` minus what an organisation has processing (NULL: no cap; concurrent
-- claims may overshoot the cap by what they take at the same instant). Each claim draws a
-- new claim token. attempt_count counts generator calls (a release gives the attempt back).
WITH late AS MATERIALIZED (
    -- The earliest-deadline due items whose instant has come, across every organisation,
    -- ranked within each organisation.
    SELECT e.id, e.organization_id, e.scheduled_for, e.started,
           row_number() OVER (PARTITION BY e.organization_id
                              ORDER BY e.scheduled_for, e.run_after, e.id) AS rank
    FROM (
        SELECT l.id, l.organization_id, l.scheduled_for, l.run_after,
               l.picked_up_at IS NOT NULL AS started
        FROM public.episode_schedule_queue AS l
        WHERE l.status = 'pending'
          AND l.scheduled_for <= coalesce(%(now)s, now())
          AND l.run_after <= coalesce(%(now)s, now())
        ORDER BY l.scheduled_for, l.run_after, l.id
        LIMIT %(limit)s
    ) AS e
), due_orgs AS MATERIALIZED (
    SELECT o.id FROM unnest(%(organizations)s::text[]) AS o(id)
    UNION
    SELECT organization_id FROM late
), spread AS (
    -- Each organisation's share: four times the claim split among them, so that claims racing
    -- for the same items find others to take when SKIP LOCKED passes over one.
    SELECT ceil(4 * %(limit)s::numeric / greatest(count(*), 1))::int AS share FROM due_orgs
), counted AS (
    SELECT o.id, b.busy, r.served
    FROM spread, due_orgs AS o
    CROSS JOIN LATERAL (
        SELECT count(*) AS busy FROM public.episode_schedule_queue AS p
        WHERE p.organization_id = o.id AND p.status = 'processing'
    ) AS b
    CROSS JOIN LATERAL (
        -- Served recently: items completed in the last ten minutes, counted up to the share.
        SELECT count(*) AS served FROM (
            SELECT 1 FROM public.episode_schedule_queue AS d
            WHERE d.organization_id = o.id AND d.status = 'completed'
              AND d.completed_at > coalesce(%(now)s, now()) - interval '10 minutes'
            LIMIT spread.share
        ) AS recent
    ) AS r
), room AS (
    -- How many more of its items an organisation may have processing.
    SELECT n.id, n.busy + n.served AS before,
           CASE WHEN %(org_max_in_flight)s::int IS NULL THEN NULL
                ELSE greatest(%(org_max_in_flight)s::int - n.busy, 0) END AS cap
    FROM counted AS n
), candidates AS (
    -- turn: {0 if the item is late else 1, its fair turn}, compared in that order.
    SELECT c.id, ARRAY[(c.scheduled_for > coalesce(%(now)s, now()))::int,
                       m.before + c.rank] AS turn,
           c.scheduled_for, c.started
    FROM spread, room AS m
    CROSS JOIN LATERAL (
        SELECT q.id, q.scheduled_for, q.picked_up_at IS NOT NULL AS started,
               row_number() OVER (ORDER BY q.run_after, q.id) AS rank
        FROM public.episode_schedule_queue AS q
        WHERE q.organization_id = m.id
          AND q.status = 'pending'
          AND q.run_after <= coalesce(%(now)s, now())
        ORDER BY q.run_after, q.id
        LIMIT least(spread.share, coalesce(m.cap, spread.share))
    ) AS c
    UNION ALL
    SELECT l.id, ARRAY[0, m.before + l.rank], l.scheduled_for, l.started
    FROM late AS l
    JOIN room AS m ON m.id = l.organization_id
    WHERE m.cap IS NULL OR l.rank <= m.cap
), first AS (
    -- The best few candidates, chosen in memory before any row is locked (a few more than
    -- asked, so rows that concurrent claims hold can be skipped). An item offered twice (late,
    -- and among its organisation's share) keeps its better turn.
    SELECT id, min(turn) AS turn, min(scheduled_for) AS scheduled_for,
           bool_or(started) AS started
    FROM candidates
    GROUP BY id
    ORDER BY turn, scheduled_for, started DESC, id
    LIMIT 4 * %(limit)s
), due AS (
    SELECT q.id
    FROM first AS c
    JOIN public.episode_schedule_queue AS q ON q.id = c.id
    WHERE q.status = 'pending'
      AND q.run_after <= coalesce(%(now)s, now())
    ORDER BY c.turn, c.scheduled_for, c.started DESC, c.id
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
          q.attempt_count, q.episode_id, q.metadata, q.lease_expires_at, q.deferred_reason;

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
          q.attempt_count, q.episode_id, q.metadata, q.lease_expires_at, q.deferred_reason;

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
-- item inside its final write: complete_episode in engine/write.sql). Settles any
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
-- attempt stays used and the reservation is booked as an estimate (migration 0008), unless the
-- caller booked what the attempt's calls owe in this transaction (`settled`).
UPDATE episode_schedule_queue
SET status           = %(status)s,
    attempt_count    = CASE WHEN %(called)s THEN attempt_count
                            ELSE greatest(attempt_count - 1, 0) END,
    reserved_cost_gbp = CASE WHEN %(called)s AND NOT %(settled)s THEN reserved_cost_gbp END,
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
-- metadata.skipped: an operator skipped this delivery, so its slot has ended and the scheduler
-- plans the following occurrence (scheduling/queries.sql). `old_status` is for the operator's
-- audit row.
WITH old AS (
    SELECT id, status FROM episode_schedule_queue
    WHERE id = %(id)s AND status IN ('pending', 'blocked', 'processing')
    FOR UPDATE
)
UPDATE episode_schedule_queue q
SET status = 'cancelled', last_error = %(reason)s, locked_by = NULL, lease_expires_at = NULL,
    metadata = q.metadata || '{"skipped": true}'::jsonb
FROM old
WHERE q.id = old.id
RETURNING q.id, q.status, q.organization_id, q.episode_id, old.status AS old_status;

-- name: reap_expired_leases
-- Items whose worker stopped heartbeating: back to pending, or failed when workers were lost
-- on it MF_MAX_ATTEMPTS times (lost_count: counted apart from attempt_count, which transient
-- failures also grow, so a provider incident followed by one crash does not fail the item,
-- while an item that keeps crashing its workers is still stopped). Safe to run from every
-- daemon at once (SKIP LOCKED; each row reaped once).
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
SET status           = CASE WHEN q.lost_count + 1 >= %(max_attempts)s THEN 'failed'
                            ELSE 'pending' END,
    lost_count       = q.lost_count + 1,
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
-- batches so the pruner never holds many locks or bloats one transaction. Episodes and usage
-- rows are not touched. Kept whatever their age: an item whose episode still waits for its
-- instant (delivery 'scheduled': the publisher finds it through its item), and one whose slot
-- (scheduled_for) has not come yet, because it is what tells the scheduler that this slot
-- already ended (a slot is generated once).
DELETE FROM episode_schedule_queue
WHERE id IN (
    SELECT id FROM episode_schedule_queue
    WHERE status IN ('completed', 'cancelled')
      AND finished_at < coalesce(%(now)s, now()) - make_interval(days => %(retention_days)s)
      AND delivery IS DISTINCT FROM 'scheduled'
      AND scheduled_for < coalesce(%(now)s, now())
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: read_due_state
-- What an idle worker reads after a claim that came back short: in how many seconds the
-- earliest pending item becomes due (on the database's clock, the one claims use; negative when
-- it is due already; NULL when nothing is pending), so it sleeps exactly until then; and whether
-- any due item is one a claim may take now, i.e. its organisation has fewer than
-- `org_max_in_flight` items processing (NULL: no cap). Due items that no claim may take (every
-- one of their organisations at its cap) are no reason to claim again before a slot frees, a
-- notification arrives or the poll interval ends, and no sign of a worker that cannot claim.
WITH p AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now, %(org_max_in_flight)s::int AS cap
), capped AS (
    -- Organisations at their cap: the fleet's processing items (a small set, by its index).
    SELECT q.organization_id
    FROM public.episode_schedule_queue AS q, p
    WHERE q.status = 'processing' AND p.cap IS NOT NULL
    GROUP BY q.organization_id, p.cap
    HAVING count(*) >= p.cap
)
SELECT extract(epoch FROM (
           (SELECT min(q.run_after) FROM public.episode_schedule_queue AS q
            WHERE q.status = 'pending') - p.now))::float8 AS due_in_seconds,
       EXISTS (
           SELECT 1 FROM public.episode_schedule_queue AS q
           WHERE q.status = 'pending' AND q.run_after <= p.now
             AND NOT EXISTS (SELECT 1 FROM capped AS c
                             WHERE c.organization_id = q.organization_id)
       ) AS claimable
FROM p;

-- name: defer_item
-- A call that must not fail the item: a rate limit or an exhausted quota (the provider's
-- wait; the attempt is given back and the reservation released unbooked, since the provider
-- refused the call and billed nothing), or a transient failure (timeout, 5xx, dropped
-- connection; the backoff; the attempt stays counted and the reservation is booked as an
-- estimate by the queue's trigger, as the call may have run; MF_MAX_ATTEMPTS does not bound
-- these: time does). Back to pending
-- after the delay, counted by kind (retry_count for transient failures, deferred_count for
-- the rest). The backoff of a transient failure is
-- 1 s · 2^retry_count capped at `cap_seconds`, times the caller's `jitter`, capped again (the
-- jitter spreads retries below the cap, never above it), or the provider's `retry_after` if
-- longer: `ITEM_RETRY.delay` in mf_worker/backoff.py, which holds the rule and draws the
-- jitter (tests/test_net.py compares the two); its retry
-- must come before the deadline (picked_up_at + deadline_seconds) and before the project's
-- next occurrence (`not_after`), else the item fails with its error. Returns the status it
-- ended in and the delay. Fenced like every transition out of 'processing'.
WITH p AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS now, %(reason)s::text AS reason
), d AS (
    SELECT q.id,
           CASE WHEN p.reason = 'transient'
                THEN greatest(least(least(%(base_seconds)s::float8
                                          * power(2::float8, least(q.retry_count, 30)),
                                          %(cap_seconds)s::float8) * %(jitter)s::float8,
                                    %(cap_seconds)s::float8),
                              coalesce(%(retry_after)s::float8, 0))
                ELSE coalesce(%(retry_after)s::float8, 0) END AS delay_seconds,
           q.picked_up_at
    FROM public.episode_schedule_queue AS q, p
    WHERE q.id = %(id)s
), v AS (
    SELECT d.id, d.delay_seconds,
           p.reason = 'transient'
           AND p.now + make_interval(secs => d.delay_seconds) > least(
               coalesce(d.picked_up_at, p.now) + make_interval(secs => %(deadline_seconds)s),
               coalesce(%(not_after)s::timestamptz, 'infinity'::timestamptz)) AS give_up
    FROM d, p
)
UPDATE public.episode_schedule_queue AS q
SET status           = CASE WHEN v.give_up THEN 'failed' ELSE 'pending' END,
    attempt_count    = CASE WHEN v.give_up OR p.reason = 'transient' THEN q.attempt_count
                            ELSE greatest(q.attempt_count - 1, 0) END,
    reserved_cost_gbp = CASE WHEN p.reason = 'transient' AND NOT %(settled)s
                             THEN q.reserved_cost_gbp END,
    run_after        = CASE WHEN v.give_up THEN q.run_after
                            ELSE p.now + make_interval(secs => v.delay_seconds) END,
    retry_count      = q.retry_count + (p.reason = 'transient')::int,
    deferred_count   = q.deferred_count + (p.reason <> 'transient')::int,
    deferred_reason  = CASE WHEN v.give_up THEN NULL ELSE p.reason END,
    last_error       = CASE WHEN v.give_up
                            THEN left(format('gave up after %%s transient failures '
                                             '(MF_RETRY_DEADLINE or the project''s next '
                                             'episode reached): %%s',
                                             q.retry_count + 1, %(error)s::text), 2000)
                            ELSE %(error)s END,
    locked_by        = NULL,
    lease_expires_at = NULL
FROM v, p
WHERE q.id = v.id
  AND q.claim_token = %(token)s
  AND q.status = 'processing'
RETURNING q.status, v.delay_seconds, q.retry_count, q.last_error;

-- name: get_item
-- One item's row, whatever its status (`run-once <id>` explains why it cannot claim it).
SELECT * FROM episode_schedule_queue WHERE id = %(id)s;
