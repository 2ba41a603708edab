-- What `mf-worker generate` reads (mf_worker.generation.preview). Read-only: the preview runs in
-- a READ ONLY transaction acting for the project's organisation.

-- name: find_project
-- The project's organisation (the worker role may read projects across organisations).
SELECT id, organization_id FROM projects WHERE id = %(project_id)s;

-- name: open_item
-- The project's open queue item, if any: the preview uses its due time, attempt and (after an
-- earlier attempt) its episode's number, so the request is the one the next attempt would get.
SELECT q.id, q.scheduled_for, q.attempt_count, q.status, e.sequence_number
FROM episode_schedule_queue q
LEFT JOIN episodes e ON e.id = q.episode_id
WHERE q.project_id = %(project_id)s AND q.status IN ('pending', 'processing', 'blocked')
ORDER BY q.scheduled_for
LIMIT 1;
