-- Seed data for `mf-worker demo` (mf_worker.demo).

-- name: insert_org
INSERT INTO organizations (id, name) VALUES (%(id)s, %(name)s);

-- name: insert_user
INSERT INTO users (id, organization_id, email, timezone)
VALUES (%(id)s, %(organization_id)s, %(email)s, %(timezone)s);

-- name: insert_project
INSERT INTO projects (id, organization_id, user_id, title, description, cadence_config,
                      delivery_time, memories)
VALUES (%(id)s, %(organization_id)s, %(user_id)s, %(title)s, %(description)s,
        %(cadence_config)s, %(delivery_time)s, %(memories)s);

-- name: insert_note
INSERT INTO planning_notes (id, project_id, organization_id, user_id, note)
VALUES (%(id)s, %(project_id)s, %(organization_id)s, %(user_id)s, %(note)s);

-- name: make_org_items_due
-- The demo does not wait for 09:00 in four time zones: the first items become claimable now,
-- as if their lead window had opened. Their episodes then wait ('scheduled') for 09:00.
UPDATE episode_schedule_queue SET run_after = now()
WHERE organization_id = %(organization_id)s AND status = 'pending';

-- name: summarise_episodes
SELECT p.title AS project, u.timezone, e.sequence_number, e.title, e.status,
       (SELECT count(*) FROM blocks b WHERE b.episode_id = e.id) AS blocks,
       (SELECT coalesce(sum(t.total_tokens), 0) FROM token_usage t
         WHERE t.episode_id = e.id) AS tokens,
       (SELECT count(*) FROM planning_notes n WHERE n.episode_id = e.id) AS notes_used,
       (SELECT q.scheduled_for FROM episode_schedule_queue q
         WHERE q.episode_id = e.id AND q.delivery = 'scheduled') AS publishes_at
FROM episodes e
JOIN projects p ON p.id = e.project_id
JOIN users u ON u.id = p.user_id
WHERE e.organization_id = %(organization_id)s
ORDER BY u.timezone, e.sequence_number;

-- name: summarise_queue
SELECT p.title AS project, u.timezone, q.status, q.scheduled_for, q.metadata ->> 'user_local_time' AS local_time
FROM episode_schedule_queue q
JOIN projects p ON p.id = q.project_id
JOIN users u ON u.id = p.user_id
WHERE q.organization_id = %(organization_id)s
ORDER BY u.timezone, q.created_at;

-- name: summarise_usage
SELECT date, total_tokens, total_cost_gbp, episode_count
FROM token_usage_daily WHERE organization_id = %(organization_id)s;

-- name: count_foreign_pending_items
-- The demo drains the whole queue with the template generator, so it refuses a database where
-- other organisations have work waiting.
SELECT count(*) AS items FROM episode_schedule_queue
WHERE status IN ('pending', 'processing', 'blocked');
