-- The scheduler's queries (mf_worker.scheduling.scheduler): keep exactly one correct open
-- queue item for every active project. The unique index on open items per project is the
-- guard against concurrent schedulers; a conflict is simply "someone else did it".

-- name: list_projects_without_open_item
-- Keyset-paginated by project id so 100,000 projects never load at once. `ended_slots`: the
-- instants after `now` that already ended for this project, so that no slot is generated
-- twice: the plan is the next occurrence that is not one of them. A slot ends when its item
-- completes (its episode may still wait for the instant) or fails, or when an operator
-- cancels it (`mf-worker cancel` marks it metadata.skipped: that delivery is skipped). An item
-- cancelled by the system (its project paused or deleted, `enqueue --replace`) ends nothing: a
-- project resumed before the slot gets it. Only an operator opens an ended slot again
-- (`retry`, `enqueue`).
SELECT p.id, p.organization_id, p.cadence_config, p.delivery_time, u.timezone,
       ARRAY(SELECT e.scheduled_for FROM episode_schedule_queue e
             WHERE e.project_id = p.id AND e.scheduled_for > %(now)s
               AND (e.status IN ('completed', 'failed')
                    OR (e.status = 'cancelled' AND e.metadata ? 'skipped'))) AS ended_slots
FROM projects p
JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
WHERE p.status = 'active'
  AND p.id > %(after_id)s
  AND NOT EXISTS (
      SELECT 1 FROM episode_schedule_queue q
      WHERE q.project_id = p.id AND q.status IN ('pending', 'processing', 'blocked'))
ORDER BY p.id
LIMIT %(limit)s;

-- name: insert_planned_items
-- Claimable a lead window before the delivery instant (MF_LEAD_SECONDS).
INSERT INTO episode_schedule_queue
    (id, project_id, organization_id, scheduled_for, run_after, metadata)
SELECT n.id, n.project_id, n.organization_id, n.scheduled_for,
       n.scheduled_for - make_interval(secs => %(lead_seconds)s), n.metadata
FROM unnest(%(ids)s::text[], %(project_ids)s::text[], %(organization_ids)s::text[],
            %(scheduled_for)s::timestamptz[], %(metadata)s::jsonb[])
     AS n(id, project_id, organization_id, scheduled_for, metadata)
ON CONFLICT (project_id) WHERE status IN ('pending', 'processing', 'blocked') DO NOTHING
RETURNING project_id, scheduled_for;

-- name: cache_next_scheduled_at
-- projects.next_scheduled_at is a cache of the queue for the web app. Rows are locked in id
-- order so two schedulers updating overlapping batches cannot deadlock.
WITH locked AS (
    SELECT p.id FROM projects p
    WHERE p.id = ANY(%(project_ids)s::text[])
    ORDER BY p.id
    FOR NO KEY UPDATE
)
UPDATE projects p
SET next_scheduled_at = n.scheduled_for
FROM unnest(%(project_ids)s::text[], %(scheduled_for)s::timestamptz[]) AS n(id, scheduled_for),
     locked
WHERE p.id = n.id AND locked.id = n.id
  AND p.next_scheduled_at IS DISTINCT FROM n.scheduled_for;

-- name: list_stale_pending_items
-- Pending, never-attempted items planned by the scheduler whose project has since changed its
-- cadence, delivery time or owner's zone. Items enqueued by hand (metadata.manual) or by other
-- software (no metadata.cadence) are left alone. metadata.delivery_time is Python's isoformat
-- (HH:MM:SS, or HH:MM:SS.ffffff with microseconds), which time::text does not reproduce for
-- fractional seconds ('09:00:00.5'), so both spellings are compared (no cast that could fail).
SELECT q.id, q.project_id, q.organization_id, p.cadence_config, p.delivery_time, u.timezone,
       ARRAY(SELECT e.scheduled_for FROM episode_schedule_queue e
             WHERE e.project_id = q.project_id AND e.scheduled_for > %(now)s
               AND (e.status IN ('completed', 'failed')
                    OR (e.status = 'cancelled' AND e.metadata ? 'skipped'))) AS ended_slots
FROM episode_schedule_queue q
JOIN projects p ON p.id = q.project_id
JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
WHERE q.status = 'pending'
  AND q.attempt_count = 0
  AND q.id > %(after_id)s
  AND p.status = 'active'
  AND q.metadata ? 'cadence'
  AND (q.metadata ->> 'manual') IS DISTINCT FROM 'true'
  AND (q.metadata -> 'cadence' IS DISTINCT FROM p.cadence_config
       OR q.metadata ->> 'user_timezone' IS DISTINCT FROM u.timezone
       OR NOT coalesce(q.metadata ->> 'delivery_time'
                       IN (p.delivery_time::text, to_char(p.delivery_time, 'HH24:MI:SS.US')),
                       false))
ORDER BY q.id
LIMIT %(limit)s;

-- name: reschedule_items
UPDATE episode_schedule_queue q
SET scheduled_for = n.scheduled_for,
    run_after     = n.scheduled_for - make_interval(secs => %(lead_seconds)s),
    metadata      = n.metadata
FROM unnest(%(ids)s::text[], %(scheduled_for)s::timestamptz[], %(metadata)s::jsonb[])
     AS n(id, scheduled_for, metadata)
WHERE q.id = n.id AND q.status = 'pending' AND q.attempt_count = 0
RETURNING q.project_id, q.scheduled_for;

-- name: cancel_items_of_inactive_projects
-- A paused or archived project gets nothing: its waiting item is cancelled with the reason.
-- (An item already processing finishes; the worker then plans no next item.)
-- Runs without parameters, so psycopg sends it verbatim: no %-escapes in here.
UPDATE episode_schedule_queue q
SET status = 'cancelled',
    last_error = 'project ' || p.status
FROM projects p
WHERE q.project_id = p.id
  AND p.status <> 'active'
  AND q.status IN ('pending', 'blocked')
RETURNING q.id, q.project_id;

-- name: cancel_items_of_deleted_projects
UPDATE episode_schedule_queue
SET status = 'cancelled', last_error = 'project deleted'
WHERE project_id IS NULL AND status IN ('pending', 'blocked')
RETURNING id;

-- name: clear_next_scheduled_at_of_inactive_projects
UPDATE projects
SET next_scheduled_at = NULL
WHERE status <> 'active' AND next_scheduled_at IS NOT NULL;

-- name: get_project_for_enqueue
SELECT p.id, p.organization_id, p.status, p.cadence_config, p.delivery_time, u.timezone,
       q.id AS open_item_id, q.status AS open_item_status, q.scheduled_for AS open_item_due
FROM projects p
JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
LEFT JOIN episode_schedule_queue q
       ON q.project_id = p.id AND q.status IN ('pending', 'processing', 'blocked')
WHERE p.id = %(project_id)s
FOR UPDATE OF p;

-- name: cancel_open_pending_item
-- `enqueue --replace`; `old_status` is for the audit row. metadata.replaced_by names the item
-- that takes its place (a moved delivery: its slot does not end, unlike an operator's cancel).
WITH old AS (
    SELECT id, status FROM episode_schedule_queue
    WHERE id = %(id)s AND status IN ('pending', 'blocked')
    FOR UPDATE
)
UPDATE episode_schedule_queue q
SET status = 'cancelled', last_error = %(reason)s,
    metadata = q.metadata || jsonb_build_object('replaced_by', %(replaced_by)s::text)
FROM old
WHERE q.id = old.id
RETURNING q.id, q.organization_id, old.status AS old_status;

-- name: insert_enqueued_item
-- One item for one project (`enqueue`), claimable a lead window before it is due, and the
-- cache, in one statement. Returns nothing when the project already has an open item.
WITH inserted AS (
    INSERT INTO episode_schedule_queue
        (id, project_id, organization_id, scheduled_for, run_after, metadata)
    VALUES (%(id)s, %(project_id)s, %(organization_id)s, %(scheduled_for)s,
            %(scheduled_for)s::timestamptz - make_interval(secs => %(lead_seconds)s),
            %(metadata)s)
    ON CONFLICT (project_id) WHERE status IN ('pending', 'processing', 'blocked') DO NOTHING
    RETURNING id, project_id, scheduled_for
), cached AS (
    UPDATE projects p SET next_scheduled_at = inserted.scheduled_for
    FROM inserted
    WHERE p.id = inserted.project_id
      AND p.next_scheduled_at IS DISTINCT FROM inserted.scheduled_for
)
SELECT id, scheduled_for FROM inserted;

-- ---------------------------------------------------------------------------------------------
-- One pass per fleet, and passes that touch only what changed (#16, migration 0009)
-- ---------------------------------------------------------------------------------------------

-- name: hold_fleet_lock_open
-- The fleet's lock is a transaction-scoped advisory lock, taken in a transaction that a
-- connection of its own keeps open for the whole pass (the pass runs on another connection).
-- So it works through a transaction-mode pooler (the open transaction pins one server
-- connection; a session lock would stay behind on whichever server connection took it), and it
-- goes when the transaction ends: at the end of the pass, or when the process dies. The idle
-- time of this one transaction may be long (a sweep at a million projects) but not endless (a
-- frozen process must not stop the fleet's scheduling): MF_DB_STATEMENT_TIMEOUT's idle limit is
-- lifted to 15 minutes for it, and lock_timeout for the wait of `mf-worker schedule`.
SELECT set_config('idle_in_transaction_session_timeout', '900s', true),
       set_config('lock_timeout', '0', true), set_config('statement_timeout', '0', true);

-- name: try_fleet_lock
-- Whoever gets it plans, the rest skip.
SELECT pg_try_advisory_xact_lock(%(key)s) AS locked;

-- name: wait_for_fleet_lock
-- `mf-worker schedule` by hand: wait for a running pass to end, then sweep.
SELECT pg_advisory_xact_lock(%(key)s), true AS locked;

-- name: claim_paced_pass
-- The loop's pass runs only if no replica ran one within `min_gap_seconds` (the database's
-- clock, shared by the fleet); claiming the slot and checking it are one statement.
UPDATE scheduler_state
SET last_pass_at = now()
WHERE last_pass_at IS NULL
   OR last_pass_at <= now() - make_interval(secs => %(min_gap_seconds)s)
   OR last_pass_at > now()
RETURNING last_pass_at;

-- name: get_last_sweep
SELECT last_sweep_at FROM scheduler_state;

-- name: stamp_sweep
UPDATE scheduler_state SET last_sweep_at = %(now)s;

-- name: clear_project_changes
-- At the start of a sweep, in a transaction of its own that commits before the sweep reads
-- anything: every committed change is seen by the sweep's reads, so the log of it can go (rows
-- committed later stay for the next pass). If the sweep fails, it is not stamped and the next
-- pass sweeps again.
DELETE FROM scheduler_project_changes;

-- name: take_project_changes
-- A batch of logged projects, deleted in the transaction that handles them (a project logged
-- again meanwhile waits for this transaction, then is logged anew).
DELETE FROM scheduler_project_changes c
WHERE c.project_id IN (SELECT project_id FROM scheduler_project_changes
                       ORDER BY project_id
                       LIMIT %(limit)s
                       FOR UPDATE SKIP LOCKED)
RETURNING c.project_id;

-- name: cancel_items_of_inactive_projects_in
-- cancel_items_of_inactive_projects for the given projects only: each project by its key, its
-- item through the open-item index on project_id = p.id. (Naming the ids on both sides let the
-- planner scan both lists and join them with a filter, ids × ids probes per batch.)
UPDATE episode_schedule_queue q
SET status = 'cancelled',
    last_error = 'project ' || p.status
FROM projects p
WHERE p.id = ANY(%(ids)s::text[])
  AND p.status <> 'active'
  AND q.project_id = p.id
  AND q.status IN ('pending', 'blocked')
RETURNING q.id, q.project_id;

-- name: clear_next_scheduled_at_of_inactive_projects_in
UPDATE projects
SET next_scheduled_at = NULL
WHERE id = ANY(%(ids)s::text[]) AND status <> 'active' AND next_scheduled_at IS NOT NULL;

-- name: list_stale_pending_items_in
-- list_stale_pending_items for the given projects only (keep the two in step).
SELECT q.id, q.project_id, q.organization_id, p.cadence_config, p.delivery_time, u.timezone,
       ARRAY(SELECT e.scheduled_for FROM episode_schedule_queue e
             WHERE e.project_id = q.project_id AND e.scheduled_for > %(now)s
               AND (e.status IN ('completed', 'failed')
                    OR (e.status = 'cancelled' AND e.metadata ? 'skipped'))) AS ended_slots
FROM episode_schedule_queue q
JOIN projects p ON p.id = q.project_id
JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
WHERE q.project_id = ANY(%(ids)s::text[])
  AND q.status = 'pending'
  AND q.attempt_count = 0
  AND p.status = 'active'
  AND q.metadata ? 'cadence'
  AND (q.metadata ->> 'manual') IS DISTINCT FROM 'true'
  AND (q.metadata -> 'cadence' IS DISTINCT FROM p.cadence_config
       OR q.metadata ->> 'user_timezone' IS DISTINCT FROM u.timezone
       OR NOT coalesce(q.metadata ->> 'delivery_time'
                       IN (p.delivery_time::text, to_char(p.delivery_time, 'HH24:MI:SS.US')),
                       false))
ORDER BY q.id;

-- name: list_projects_without_open_item_in
-- list_projects_without_open_item for the given projects only (keep the two in step).
SELECT p.id, p.organization_id, p.cadence_config, p.delivery_time, u.timezone,
       ARRAY(SELECT e.scheduled_for FROM episode_schedule_queue e
             WHERE e.project_id = p.id AND e.scheduled_for > %(now)s
               AND (e.status IN ('completed', 'failed')
                    OR (e.status = 'cancelled' AND e.metadata ? 'skipped'))) AS ended_slots
FROM projects p
JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
WHERE p.id = ANY(%(ids)s::text[])
  AND p.status = 'active'
  AND NOT EXISTS (
      SELECT 1 FROM episode_schedule_queue q
      WHERE q.project_id = p.id AND q.status IN ('pending', 'processing', 'blocked'))
ORDER BY p.id;
