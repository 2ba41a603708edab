-- What `mf-worker generate` reads (mf_worker.generation.preview). Read-only: the preview runs in
-- a READ ONLY transaction acting for the project's organisation.

-- name: find_project
-- The project's organisation (the worker role may read projects across organisations).
SELECT id, organization_id FROM projects WHERE id = %(project_id)s;

-- name: load_preview_context
-- A read-only mirror of the engine's load_generation_context (engine/episodes.sql): the same
-- columns, limits and order, so the preview's request is the one the worker would build. Keep
-- the two in step; tests/test_openai_generator.py compares their requests.
SELECT p.id, p.user_id, p.title, p.description, p.cadence_config, p.delivery_time, p.status,
       p.memories, u.timezone,
       (SELECT coalesce(max(e.sequence_number), 0) FROM episodes e
         WHERE e.project_id = p.id) AS last_sequence_number,
       (SELECT coalesce(jsonb_agg(jsonb_build_object('id', n.id, 'note', n.note)
                                  ORDER BY n.created_at, n.id), '[]')
          FROM (SELECT id, note, created_at FROM planning_notes
                 WHERE project_id = p.id AND status = 'pending'
                 ORDER BY created_at, id LIMIT %(max_notes)s) n) AS notes,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'content', m.content, 'memory_type', m.memory_type,
                   'importance', m.importance) ORDER BY m.importance DESC, m.created_at), '[]')
          FROM (SELECT content, memory_type, importance, created_at FROM agent_memory
                 WHERE project_id = p.id AND (expires_at IS NULL OR expires_at > now())
                 ORDER BY importance DESC, created_at LIMIT %(max_memories)s) m) AS agent_memories,
       (SELECT coalesce(jsonb_agg(jsonb_build_object(
                   'sequence_number', e.sequence_number, 'title', e.title,
                   'summary', coalesce(left(b.content, 280), ''))
                   ORDER BY e.sequence_number DESC), '[]')
          FROM (SELECT id, sequence_number, title FROM episodes
                 WHERE project_id = p.id AND status = 'ready'
                 ORDER BY sequence_number DESC LIMIT %(max_previous)s) e
          LEFT JOIN LATERAL (SELECT content FROM blocks WHERE episode_id = e.id
                              ORDER BY position LIMIT 1) b ON true) AS previous_episodes
FROM projects p
JOIN users u ON u.id = p.user_id AND u.organization_id = p.organization_id
WHERE p.id = %(project_id)s;

-- name: open_item
-- The project's open queue item, if any: the preview uses its due time, attempt and (after an
-- earlier attempt) its episode's number, so the request is the one the next attempt would get.
SELECT q.id, q.scheduled_for, q.attempt_count, q.status, e.sequence_number
FROM episode_schedule_queue q
LEFT JOIN episodes e ON e.id = q.episode_id
WHERE q.project_id = %(project_id)s AND q.status IN ('pending', 'processing', 'blocked')
ORDER BY q.scheduled_for
LIMIT 1;
