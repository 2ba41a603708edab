-- The daily cost limit (mf_worker.cost.budget). Reads the aggregate, never raw usage rows.

-- name: reserve_budget
-- The cost check, atomic, as the start of an attempt. In order: the item's row lock, if the
-- claim is still ours (`held`); then one upsert on the organisation's row of the aggregate for
-- the day, whose row lock serialises concurrent reservations and whose condition is re-checked
-- against the latest row after any wait, so racing workers can never reserve more than the
-- limit together; then, only if granted, the amount noted on the item (the trigger that gives
-- it back reads it there) and, at the first attempt, the episode row (status generating) whose
-- generation_attempts and generation_errors keep the history across retries. A refusal writes
-- nothing. `reserved` is 1 when granted; the spend and limit (as they were before this
-- statement) explain a refusal. Item lock before aggregate lock: the final write's order.
-- Idempotent per claim: a retried prepare finds its own reservation and reserves nothing more.
-- A free attempt (amount 0: a local model, the template) reserves and notes no amount, so
-- neither it nor its release writes the organisation's hot aggregate row: it cannot push the
-- day over the limit, so it only needs the day not to be over already, which a read decides.
WITH today AS (
    -- The billing day: the database's UTC day unless the caller names one (tests), so every
    -- worker, whatever its clock, files the reservation and its usage under the same day.
    SELECT coalesce(%(date)s::date, (now() AT TIME ZONE 'UTC')::date) AS day
), held AS (
    -- `already`: this claim reserved before (the reservation lives exactly as long as the
    -- claim, see migration 0002), so this is a prepare retried after its commit was lost.
    SELECT id, episode_id, reserved_cost_gbp IS NOT NULL AS already FROM episode_schedule_queue
    WHERE id = %(id)s AND claim_token = %(token)s AND status = 'processing'
    FOR UPDATE
), reserved AS (
    INSERT INTO token_usage_daily AS d (organization_id, date, reserved_gbp)
    SELECT o.id, today.day, %(amount)s
    FROM organizations o, held, today
    WHERE o.id = %(organization_id)s AND %(amount)s > 0 AND NOT held.already
      AND %(amount)s <= coalesce(o.daily_cost_limit_gbp, %(default_limit)s)
    ON CONFLICT (organization_id, date) DO UPDATE
    SET reserved_gbp = d.reserved_gbp + EXCLUDED.reserved_gbp
    WHERE d.total_cost_gbp + d.reserved_gbp + EXCLUDED.reserved_gbp
          <= (SELECT coalesce(o.daily_cost_limit_gbp, %(default_limit)s)
              FROM organizations o WHERE o.id = %(organization_id)s)
    RETURNING 1
), free AS (
    SELECT 1
    FROM organizations o
    CROSS JOIN held
    LEFT JOIN token_usage_daily d
           ON d.organization_id = o.id AND d.date = (SELECT day FROM today)
    WHERE o.id = %(organization_id)s AND %(amount)s = 0 AND NOT held.already
      AND coalesce(d.total_cost_gbp + d.reserved_gbp, 0)
          <= coalesce(o.daily_cost_limit_gbp, %(default_limit)s)
), granted AS (
    SELECT 1 FROM reserved UNION ALL SELECT 1 FROM free
    UNION ALL SELECT 1 FROM held WHERE already
), noted AS (
    UPDATE episode_schedule_queue
    SET episode_id        = coalesce(%(new_episode_id)s, episode_id),
        reserved_cost_gbp = nullif(%(amount)s, 0),
        reserved_on       = CASE WHEN %(amount)s > 0 THEN (SELECT day FROM today) END
    FROM granted
    WHERE episode_schedule_queue.id = %(id)s
      AND NOT EXISTS (SELECT 1 FROM held WHERE already)
      AND (%(amount)s > 0 OR %(new_episode_id)s::text IS NOT NULL)
), created AS (
    INSERT INTO episodes (id, project_id, organization_id, sequence_number, status)
    SELECT %(new_episode_id)s, %(project_id)s, %(organization_id)s, %(sequence_number)s,
           'generating'
    FROM granted
    WHERE %(new_episode_id)s::text IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM held WHERE already)
)
-- `episode_id`: the episode this claim's earlier run created (a retry whose context was read
-- before that run's commit became visible would otherwise name a new one).
SELECT (SELECT count(*) FROM held) AS held, (SELECT count(*) FROM granted) AS reserved,
       (SELECT episode_id FROM held WHERE already) AS episode_id,
       today.day,
       coalesce(d.total_cost_gbp, 0) AS spent_gbp, coalesce(d.reserved_gbp, 0) AS reserved_gbp,
       coalesce(o.daily_cost_limit_gbp, %(default_limit)s) AS limit_gbp
FROM organizations o
CROSS JOIN today
LEFT JOIN token_usage_daily d ON d.organization_id = o.id AND d.date = today.day
WHERE o.id = %(organization_id)s;

-- name: book_attempt_usage
-- What an attempt that did not succeed owes (cost.settle): the usage of the calls the provider
-- answered, and the worst case of each call whose fate is unknown (`estimated`), on the day its
-- reservation was taken; the caller's fenced queue transition in the same transaction clears
-- the reservation without booking it as a whole.
INSERT INTO token_usage (id, organization_id, project_id, episode_id, operation, model,
                         prompt_tokens, completion_tokens, cost_gbp, billing_date, estimated)
SELECT u.id, %(organization_id)s, %(project_id)s, %(episode_id)s, 'episode_generation',
       u.model, u.prompt_tokens, u.completion_tokens, u.cost_gbp, %(billing_date)s,
       coalesce(u.estimated, false)
FROM jsonb_to_recordset(%(usages)s::jsonb)
     AS u(id text, model text, prompt_tokens bigint, completion_tokens bigint, cost_gbp numeric,
          estimated boolean);

-- name: block_org_pending_items
UPDATE episode_schedule_queue
SET status = 'blocked', blocked_on = %(date)s, last_error = %(reason)s
WHERE organization_id = %(organization_id)s AND status = 'pending'
RETURNING id;

-- name: record_trip
-- Whoever inserts the day's row writes the event, the audit row and notifies: once per day.
-- next_notify_at is that worker's lease on the sending: the budget loop retries the trip only
-- if it is still un-notified when the lease has run out (a crash, a hung notifier).
INSERT INTO cost_limit_trips (organization_id, date, spent_gbp, limit_gbp, needed_gbp,
                              next_notify_at)
VALUES (%(organization_id)s, %(date)s, %(spent_gbp)s, %(limit_gbp)s, %(needed_gbp)s,
        now() + make_interval(secs => %(lease_seconds)s))
ON CONFLICT (organization_id, date) DO NOTHING
RETURNING organization_id;

-- name: mark_trip_notified
UPDATE cost_limit_trips
SET notified_at = now(), notify_attempts = notify_attempts + 1, last_notify_error = NULL,
    next_notify_at = NULL
WHERE organization_id = %(organization_id)s AND date = %(date)s;

-- name: record_trip_notify_failure
-- Try again after 2, 4, 8 … minutes, at most an hour apart.
UPDATE cost_limit_trips
SET notify_attempts = notify_attempts + 1, last_notify_error = %(error)s,
    next_notify_at = now() + least(interval '1 minute' * power(2, least(notify_attempts + 1, 6)),
                                   interval '1 hour')
WHERE organization_id = %(organization_id)s AND date = %(date)s AND notified_at IS NULL;

-- name: list_trips_to_notify
-- The day's trips whose notification has not succeeded and whose next attempt is due (across
-- organisations: cost_limit_trips' cross_org_read policy). An older day's trip is left alone:
-- its items have resumed, and a "limit reached" mail would only confuse.
SELECT t.organization_id, t.date, t.spent_gbp, t.limit_gbp,
       (SELECT count(*) FROM episode_schedule_queue q
        WHERE q.organization_id = t.organization_id AND q.status = 'blocked'
          AND q.blocked_on = t.date) AS blocked_items
FROM cost_limit_trips t
WHERE t.notified_at IS NULL AND t.date = %(date)s AND t.next_notify_at <= %(now)s
ORDER BY t.next_notify_at;

-- name: claim_trip_notification
-- Acting for the organisation: take the lease on sending it again (no other process sends it
-- until the lease runs out). Returns nothing when someone else did first.
UPDATE cost_limit_trips
SET next_notify_at = %(now)s::timestamptz + make_interval(secs => %(lease_seconds)s)
WHERE organization_id = %(organization_id)s AND date = %(date)s AND notified_at IS NULL
  AND next_notify_at <= %(now)s
RETURNING organization_id;

-- name: insert_trip_event
INSERT INTO user_events (id, user_id, organization_id, event_type, event_data)
VALUES (%(id)s, NULL, %(organization_id)s, 'cost_limit_reached', %(data)s);

-- name: insert_trip_audit
INSERT INTO audit_log (id, user_id, organization_id, action, resource_id, new_value)
VALUES (%(id)s, NULL, %(organization_id)s, 'cost_limit.block', %(organization_id)s,
        %(detail)s);

-- name: list_cost_blocked_orgs
-- Organisations with items the breaker blocked, with today's spend (and how much of it is
-- estimated), reservations, their limit, and the worst case today's trip refused (what must fit
-- before they resume; NULL when unknown).
SELECT q.organization_id, min(q.blocked_on) AS blocked_on, count(*) AS items,
       coalesce(d.total_cost_gbp, 0) AS spent_gbp,
       coalesce(d.estimated_cost_gbp, 0) AS estimated_gbp,
       coalesce(d.reserved_gbp, 0) AS reserved_gbp,
       coalesce(o.daily_cost_limit_gbp, %(default_limit)s) AS limit_gbp,
       t.needed_gbp
FROM episode_schedule_queue q
JOIN organizations o ON o.id = q.organization_id
LEFT JOIN token_usage_daily d ON d.organization_id = q.organization_id AND d.date = %(date)s
LEFT JOIN cost_limit_trips t ON t.organization_id = q.organization_id AND t.date = %(date)s
WHERE q.status = 'blocked' AND q.blocked_on IS NOT NULL
GROUP BY q.organization_id, d.total_cost_gbp, d.estimated_cost_gbp, d.reserved_gbp,
         o.daily_cost_limit_gbp, t.needed_gbp
ORDER BY q.organization_id;

-- name: resume_blocked_items
-- Back to pending: items already due run as soon as possible, later ones at their own time
-- (run_after, which blocking leaves alone: a lead window before the delivery instant).
UPDATE episode_schedule_queue
SET status = 'pending', run_after = greatest(run_after, now()), blocked_on = NULL,
    last_error = NULL
WHERE organization_id = %(organization_id)s AND status = 'blocked' AND blocked_on IS NOT NULL
RETURNING id;

-- name: skip_blocked_items
-- Policy `skip`: the blocked occurrences that fell due are cancelled (the scheduler then plans
-- each project's next regular occurrence); blocked items not yet due are resumed instead.
UPDATE episode_schedule_queue
SET status = 'cancelled', blocked_on = NULL,
    last_error = 'skipped: daily cost limit reached on ' || blocked_on::text
WHERE organization_id = %(organization_id)s AND status = 'blocked'
  AND blocked_on IS NOT NULL AND blocked_on < %(date)s AND scheduled_for <= %(now)s
RETURNING id;

-- name: read_daily_budget
-- What the limit check reads (inside reserve_budget, whose final SELECT explains a refusal the
-- same way): the organisation's row of the daily aggregate and its limit, never the raw usage
-- rows. Named on its own for the benchmarks (bench_cost.py, bench_scale.py).
SELECT coalesce(d.total_cost_gbp + d.reserved_gbp, 0) AS spent_gbp,
       coalesce(o.daily_cost_limit_gbp, %(default_limit)s) AS limit_gbp
FROM organizations o
LEFT JOIN token_usage_daily d ON d.organization_id = o.id AND d.date = %(date)s
WHERE o.id = %(organization_id)s;
