-- What a generation reads (mf_worker.engine.context), shared by the worker's prepare and the
-- preview. Runs inside a transaction acting for the project's organisation (as_org or
-- act_for), so row-level security rejects any row of another organisation.

-- name: load_generation_context
-- One round trip: the project, its owner's zone, pending notes, memories, recent episodes.
SELECT p.id, p.user_id, p.title, p.description, p.cadence_config, p.delivery_time, p.status,
       p.memories, u.timezone,
       -- The episode an earlier attempt of this item created, if any: as the queue row says
       -- now (a prepare retried after its commit was lost finds its own), else as given.
       (SELECT jsonb_build_object('id', e.id, 'sequence_number', e.sequence_number)
          FROM episodes e
         WHERE e.id = coalesce((SELECT q.episode_id FROM episode_schedule_queue q
                                 WHERE q.id = %(queue_id)s), %(episode_id)s))
       AS existing_episode,
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
