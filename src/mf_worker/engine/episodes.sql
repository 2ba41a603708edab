-- What the engine reads and writes around one generation (mf_worker.engine.episodes). Every
-- statement here runs inside a transaction acting for the item's organisation (as_org), so
-- row-level security rejects any row of another organisation.

-- name: load_generation_context
-- One round trip: the project, its owner's zone, pending notes, memories, recent episodes.
SELECT p.id, p.user_id, p.title, p.description, p.cadence_config, p.delivery_time, p.status,
       p.memories, u.timezone,
       -- The episode an earlier attempt of this item created, if any.
       (SELECT jsonb_build_object('id', e.id, 'sequence_number', e.sequence_number)
          FROM episodes e WHERE e.id = %(episode_id)s) AS existing_episode,
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

-- name: start_attempt
-- Fenced: note the cost reserved for this attempt on the item (its row lock comes before the
-- aggregate's, as in the final write) and, at the first attempt, create the episode (status
-- generating) so its generation_attempts and generation_errors keep the history across
-- retries. No row back: the item is no longer ours.
WITH created AS (
    INSERT INTO episodes (id, project_id, organization_id, sequence_number, status)
    SELECT %(new_episode_id)s, %(project_id)s, %(organization_id)s, %(sequence_number)s,
           'generating'
    WHERE %(new_episode_id)s::text IS NOT NULL
)
UPDATE episode_schedule_queue
SET episode_id        = coalesce(%(new_episode_id)s, episode_id),
    reserved_cost_gbp = %(amount)s,
    reserved_on       = %(date)s
WHERE id = %(id)s AND attempt_count = %(attempt)s AND status = 'processing'
  AND locked_by = %(worker)s
RETURNING id;

-- name: record_episode_error
-- A failed generator call: count it and keep its error; 'failed' when the item gives up.
UPDATE episodes
SET generation_attempts = generation_attempts + 1,
    generation_errors   = generation_errors || %(error)s::text,
    status              = CASE WHEN %(final)s THEN 'failed' ELSE status END
WHERE id = %(episode_id)s AND status = 'generating';

-- name: write_episode
-- Everything the generation produced, in one statement (data-modifying CTEs all run, whether
-- referenced or not): the episode ready, its blocks, the token usage (the daily aggregate
-- follows by trigger), the incorporated planning notes (only those still pending for this
-- project), new memories, the audit row and the user event. The caller has already sent the
-- fenced completion in the same transaction and rolls everything back if it did not match.
WITH episode AS (
    UPDATE episodes
    SET status = 'ready', title = %(title)s, generation_attempts = generation_attempts + 1
    WHERE id = %(episode_id)s
    RETURNING id
), new_blocks AS (
    INSERT INTO blocks (id, episode_id, organization_id, content, position, reasoning,
                        confidence)
    SELECT b.id, %(episode_id)s, %(organization_id)s, b.content, b.position, b.reasoning,
           b.confidence
    FROM unnest(%(block_ids)s::text[], %(contents)s::text[], %(positions)s::int[],
                %(reasonings)s::text[], %(confidences)s::float8[])
         AS b(id, content, position, reasoning, confidence)
), usage AS (
    INSERT INTO token_usage (id, organization_id, project_id, episode_id, operation, model,
                             prompt_tokens, completion_tokens, cost_gbp)
    SELECT u.id, %(organization_id)s, %(project_id)s, %(episode_id)s, 'episode_generation',
           u.model, u.prompt_tokens, u.completion_tokens, u.cost_gbp
    FROM unnest(%(usage_ids)s::text[], %(models)s::text[], %(prompt_tokens)s::bigint[],
                %(completion_tokens)s::bigint[], %(costs)s::numeric[])
         AS u(id, model, prompt_tokens, completion_tokens, cost_gbp)
), notes AS (
    UPDATE planning_notes
    SET status = 'incorporated', processed_at = now(), episode_id = %(episode_id)s
    WHERE project_id = %(project_id)s AND status = 'pending'
      AND id = ANY(%(note_ids)s::text[])
), memories AS (
    INSERT INTO agent_memory (id, project_id, organization_id, content, memory_type,
                              importance)
    SELECT m.id, %(project_id)s, %(organization_id)s, m.content, m.memory_type, m.importance
    FROM unnest(%(memory_ids)s::text[], %(memory_contents)s::text[],
                %(memory_types)s::text[], %(importances)s::float8[])
         AS m(id, content, memory_type, importance)
), audit AS (
    INSERT INTO audit_log (id, user_id, organization_id, action, resource_id, new_value)
    VALUES (%(audit_id)s, NULL, %(organization_id)s, 'episode.generate', %(episode_id)s,
            %(summary)s)
), event AS (
    INSERT INTO user_events (id, user_id, organization_id, event_type, event_data)
    VALUES (%(event_id)s, %(user_id)s, %(organization_id)s, 'episode_generated', %(event_data)s)
)
SELECT count(*) AS episodes FROM episode;

