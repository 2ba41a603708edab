-- The memory migration (mf_worker.memories): projects.memories (JSON) into agent_memory.

-- name: get_project
SELECT id, organization_id FROM projects WHERE id = %(project_id)s;

-- name: list_projects_with_memories
-- Cross-organisation read (projects' cross_org_read policy); the writes act for each org.
SELECT id, organization_id, jsonb_array_length(memories) AS entries
FROM projects
WHERE (%(project_id)s::text IS NULL OR id = %(project_id)s)
  AND jsonb_array_length(memories) >= %(min_count)s
ORDER BY organization_id, id;

-- name: get_project_memories
SELECT memories FROM projects WHERE id = %(project_id)s;

-- name: list_migrated_sources
SELECT source FROM agent_memory WHERE project_id = %(project_id)s AND source IS NOT NULL;

-- name: insert_migrated_memories
-- One batch, acting for the project's organisation. The unique (project_id, source) index makes
-- a repeated or resumed run insert nothing twice; RETURNING counts what this batch added.
INSERT INTO agent_memory (project_id, organization_id, content, memory_type, importance,
                          expires_at, source)
SELECT %(project_id)s, %(organization_id)s, m.content, m.memory_type, m.importance,
       m.expires_at, m.source
FROM jsonb_to_recordset(%(memories)s) AS m(content text, memory_type text,
                                           importance double precision,
                                           expires_at timestamptz, source text)
ON CONFLICT (project_id, source) WHERE source IS NOT NULL DO NOTHING
RETURNING 1;

-- name: record_memory_migration
-- Acting for the project's organisation, after each project: how far the command got.
INSERT INTO memory_migrations AS r
    (project_id, organization_id, entries, copied, skipped, completed_at)
VALUES (%(project_id)s, %(organization_id)s, %(entries)s, %(copied)s, %(skipped)s,
        CASE WHEN %(complete)s THEN now() END)
ON CONFLICT (project_id) DO UPDATE SET
    entries = EXCLUDED.entries, copied = r.copied + EXCLUDED.copied,
    skipped = EXCLUDED.skipped, completed_at = EXCLUDED.completed_at, updated_at = now();

-- name: list_memory_migration_candidates
-- `mf-worker status`: projects at the seed's trigger (this many entries in projects.memories)
-- that no run has completed, or whose JSON has grown since (an app still writing it).
-- Cross-organisation reads only: projects and memory_migrations, never agent_memory.
SELECT p.id AS project_id, p.organization_id, jsonb_array_length(p.memories) AS memories
FROM projects p
LEFT JOIN memory_migrations r ON r.project_id = p.id
WHERE jsonb_array_length(p.memories) >= %(min_count)s
  AND (r.completed_at IS NULL OR jsonb_array_length(p.memories) > r.entries)
ORDER BY memories DESC, p.id
LIMIT %(limit)s;

-- name: get_launch
-- The seed's other trigger, three months after launch: the first organisation's creation, and
-- how many projects hold JSON memories no completed run has covered.
SELECT (min(o.created_at) AT TIME ZONE 'UTC')::date AS launched_on,
       coalesce(min(o.created_at) + interval '3 months' <= %(now)s, false) AS three_months,
       (SELECT count(*) FROM projects p
        LEFT JOIN memory_migrations r ON r.project_id = p.id
        WHERE jsonb_array_length(p.memories) > 0
          AND (r.completed_at IS NULL OR jsonb_array_length(p.memories) > r.entries))
           AS unmigrated_projects
FROM organizations o;
