-- The Many Futures schema as mf-worker needs it: tenants, projects, episodes, the queue,
-- token accounting, planning notes, memory, events, audit, and the chat/highlight structure.
--
-- Conventions
--   * Ids are text. mf-worker generates readable prefixed ids (org_…, queue_…); the defaults
--     below do the same for other software that omits the id, and any other text id works.
--   * Every tenant row carries organization_id, and a child row's organization_id is tied to
--     its parent's by a composite foreign key, so a cross-organisation link cannot exist.
--   * Timestamps are timestamptz (stored as UTC); dates that mean "a UTC day" are plain dates.
--   * Status columns are text with CHECK constraints (easier to extend than enum types).
-- Requires PostgreSQL 15+ (ON DELETE SET NULL with a column list).

CREATE FUNCTION mf_new_id(prefix text) RETURNS text
    LANGUAGE sql VOLATILE
    RETURN prefix || '_' || replace(gen_random_uuid()::text, '-', '');

-- updated_at follows every UPDATE, whoever makes it.
CREATE FUNCTION mf_touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

------------------------------------------------------------------------------------------------
-- Tenants and people
------------------------------------------------------------------------------------------------

CREATE TABLE organizations (
    id                    text PRIMARY KEY DEFAULT mf_new_id('org'),
    name                  text NOT NULL CHECK (length(btrim(name)) > 0),
    enabled_features      text[] NOT NULL DEFAULT '{}',
    experimental_features text[] NOT NULL DEFAULT '{}',
    -- NULL means "use the worker's MF_DAILY_COST_LIMIT_GBP".
    daily_cost_limit_gbp  numeric(12, 4) DEFAULT 50 CHECK (daily_cost_limit_gbp >= 0),
    created_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id              text PRIMARY KEY DEFAULT mf_new_id('usr'),
    organization_id text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    email           text NOT NULL CHECK (position('@' IN email) > 1),
    -- An IANA zone name. It is validated where it is used (the scheduler reports a bad one on
    -- the project it affects) because the zone database belongs to the application, not here.
    timezone        text NOT NULL DEFAULT 'UTC' CHECK (length(timezone) > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (id, organization_id)
);
CREATE INDEX users_organization_id_idx ON users (organization_id);

CREATE TABLE projects (
    id                text PRIMARY KEY DEFAULT mf_new_id('prj'),
    organization_id   text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id           text NOT NULL,
    title             text NOT NULL CHECK (length(btrim(title)) > 0),
    description       text NOT NULL DEFAULT '',
    -- {"mode": "daily"|"weekdays"|"weekly"|"custom", "days": [0..6]}, 0 = Sunday.
    cadence_config    jsonb NOT NULL DEFAULT '{"mode": "weekly", "days": [1]}'
                      CHECK (jsonb_typeof(cadence_config) = 'object'),
    delivery_time     time NOT NULL DEFAULT '09:00',
    memories          jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(memories) = 'array'),
    -- A cache of the project's open queue item, for the web app; the queue is the truth.
    next_scheduled_at timestamptz,
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'paused', 'archived')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (id, organization_id),
    FOREIGN KEY (user_id, organization_id) REFERENCES users (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX projects_organization_id_idx ON projects (organization_id);
CREATE INDEX projects_user_id_idx ON projects (user_id);
CREATE TRIGGER projects_touch_updated_at BEFORE UPDATE ON projects
    FOR EACH ROW EXECUTE FUNCTION mf_touch_updated_at();

------------------------------------------------------------------------------------------------
-- Episodes and their blocks
------------------------------------------------------------------------------------------------

CREATE TABLE episodes (
    id                  text PRIMARY KEY DEFAULT mf_new_id('ep'),
    project_id          text NOT NULL,
    organization_id     text NOT NULL,
    sequence_number     integer NOT NULL CHECK (sequence_number > 0),
    -- NULL while the episode is still being generated.
    title               text,
    status              text NOT NULL DEFAULT 'generating'
                        CHECK (status IN ('generating', 'ready', 'failed')),
    generation_attempts integer NOT NULL DEFAULT 0 CHECK (generation_attempts >= 0),
    generation_errors   text[] NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'ready' OR title IS NOT NULL),
    UNIQUE (project_id, sequence_number),
    UNIQUE (id, organization_id),
    FOREIGN KEY (project_id, organization_id)
        REFERENCES projects (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX episodes_organization_id_idx ON episodes (organization_id);
CREATE TRIGGER episodes_touch_updated_at BEFORE UPDATE ON episodes
    FOR EACH ROW EXECUTE FUNCTION mf_touch_updated_at();

CREATE TABLE blocks (
    id              text PRIMARY KEY DEFAULT mf_new_id('blk'),
    episode_id      text NOT NULL,
    organization_id text NOT NULL,
    type            text NOT NULL DEFAULT 'MARKDOWN' CHECK (type IN ('MARKDOWN')),
    content         text NOT NULL,
    position        integer NOT NULL CHECK (position >= 0),
    reasoning       text,
    -- NaN compares greater than every number in PostgreSQL, so this also rejects NaN.
    confidence      double precision CHECK (confidence >= 0 AND confidence <= 1),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (episode_id, position),
    UNIQUE (id, organization_id),
    FOREIGN KEY (episode_id, organization_id)
        REFERENCES episodes (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX blocks_organization_id_idx ON blocks (organization_id);
CREATE TRIGGER blocks_touch_updated_at BEFORE UPDATE ON blocks
    FOR EACH ROW EXECUTE FUNCTION mf_touch_updated_at();

------------------------------------------------------------------------------------------------
-- The queue: the source of truth for when each project's next episode runs
------------------------------------------------------------------------------------------------

CREATE TABLE episode_schedule_queue (
    id               text PRIMARY KEY DEFAULT mf_new_id('queue'),
    -- Set to NULL when the project is deleted: the worker then cancels the item with a reason
    -- instead of the row (and its history) silently vanishing under a running generation.
    project_id       text,
    organization_id  text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    -- When the episode is due (the user's local delivery time, in UTC).
    scheduled_for    timestamptz NOT NULL,
    -- When it may next be claimed: scheduled_for at first, pushed back by retry backoff.
    run_after        timestamptz NOT NULL,
    picked_up_at     timestamptz,
    completed_at     timestamptz,
    attempt_count    integer NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    last_error       text,
    last_attempt_at  timestamptz,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'completed', 'failed',
                                       'cancelled', 'blocked')),
    episode_id       text,
    -- user_timezone, user_local_time, cadence and anything else useful when debugging.
    metadata         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    -- The claim: which worker holds the item and until when (extended by its heartbeat).
    locked_by        text,
    lease_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (status <> 'processing' OR (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CHECK (status <> 'completed' OR completed_at IS NOT NULL),
    FOREIGN KEY (project_id, organization_id)
        REFERENCES projects (id, organization_id) ON DELETE SET NULL (project_id),
    FOREIGN KEY (episode_id, organization_id)
        REFERENCES episodes (id, organization_id) ON DELETE SET NULL (episode_id)
);
-- At most one open item per project: the guard that makes concurrent schedulers race-free.
CREATE UNIQUE INDEX episode_schedule_queue_one_open_per_project
    ON episode_schedule_queue (project_id)
    WHERE status IN ('pending', 'processing', 'blocked');
-- Serves the claim: due pending items in order.
CREATE INDEX episode_schedule_queue_due_pending
    ON episode_schedule_queue (run_after, id) WHERE status = 'pending';
-- Serves the reaper: processing items by lease expiry.
CREATE INDEX episode_schedule_queue_processing_lease
    ON episode_schedule_queue (lease_expires_at) WHERE status = 'processing';
-- Serves the cost breaker and per-org views.
CREATE INDEX episode_schedule_queue_org_status
    ON episode_schedule_queue (organization_id, status);
-- Serves the retention pruner.
CREATE INDEX episode_schedule_queue_finished
    ON episode_schedule_queue (updated_at) WHERE status IN ('completed', 'cancelled');
CREATE INDEX episode_schedule_queue_episode_id_idx ON episode_schedule_queue (episode_id);

-- The queue is small, hot and update-heavy: vacuum and analyse it far more eagerly than the
-- defaults (20% dead rows) would, and leave room on each page for HOT updates.
ALTER TABLE episode_schedule_queue SET (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 200,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 1
);

CREATE FUNCTION mf_queue_default_run_after() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    NEW.run_after := coalesce(NEW.run_after, NEW.scheduled_for);
    RETURN NEW;
END $$;
CREATE TRIGGER episode_schedule_queue_default_run_after
    BEFORE INSERT ON episode_schedule_queue
    FOR EACH ROW EXECUTE FUNCTION mf_queue_default_run_after();
CREATE TRIGGER episode_schedule_queue_touch_updated_at BEFORE UPDATE ON episode_schedule_queue
    FOR EACH ROW EXECUTE FUNCTION mf_touch_updated_at();

-- Wake idle workers: one NOTIFY per statement that makes an item pending (sent at commit;
-- identical notifications within a transaction are folded into one by PostgreSQL).
CREATE FUNCTION mf_queue_notify_pending() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM new_rows WHERE status = 'pending') THEN
        PERFORM pg_notify('mf_worker_queue', '');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER episode_schedule_queue_notify_insert
    AFTER INSERT ON episode_schedule_queue
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mf_queue_notify_pending();
CREATE TRIGGER episode_schedule_queue_notify_update
    AFTER UPDATE ON episode_schedule_queue
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mf_queue_notify_pending();

------------------------------------------------------------------------------------------------
-- Token accounting
------------------------------------------------------------------------------------------------

CREATE TABLE token_usage (
    id                text PRIMARY KEY DEFAULT mf_new_id('tok'),
    organization_id   text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    -- Usage outlives the project and episode it was spent on: the bill is the bill.
    project_id        text,
    episode_id        text,
    operation         text NOT NULL
                      CHECK (operation IN ('episode_generation', 'project_onboarding', 'chat')),
    model             text NOT NULL CHECK (length(model) > 0),
    prompt_tokens     bigint NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens bigint NOT NULL CHECK (completion_tokens >= 0),
    total_tokens      bigint GENERATED ALWAYS AS (prompt_tokens + completion_tokens) STORED,
    cost_gbp          numeric(14, 6) NOT NULL CHECK (cost_gbp >= 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (project_id, organization_id)
        REFERENCES projects (id, organization_id) ON DELETE SET NULL (project_id),
    FOREIGN KEY (episode_id, organization_id)
        REFERENCES episodes (id, organization_id) ON DELETE SET NULL (episode_id)
);
CREATE INDEX token_usage_org_created_idx ON token_usage (organization_id, created_at);
CREATE INDEX token_usage_episode_id_idx ON token_usage (episode_id);
CREATE INDEX token_usage_project_id_idx ON token_usage (project_id);

-- One row per organisation and UTC day; the cost limit reads this, never the raw rows.
CREATE TABLE token_usage_daily (
    organization_id     text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    date                date NOT NULL,
    total_tokens        bigint NOT NULL DEFAULT 0 CHECK (total_tokens >= 0),
    total_cost_gbp      numeric(16, 6) NOT NULL DEFAULT 0 CHECK (total_cost_gbp >= 0),
    episode_count       integer NOT NULL DEFAULT 0 CHECK (episode_count >= 0),
    -- {"episode_generation": {"tokens": n, "cost": x}, "project_onboarding": …, "chat": …}
    operation_breakdown jsonb,
    last_updated        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, date)
);

-- Keeps token_usage_daily equal to the raw rows. INSERT … ON CONFLICT DO UPDATE takes the row
-- lock of the day's aggregate, so concurrent inserts serialise on it and no increment is lost;
-- the breakdown is recomputed from the locked row inside the same UPDATE.
-- SECURITY DEFINER: whoever may insert usage may move the aggregate, whatever their grants on
-- it; the row written is always the inserted row's own organisation.
CREATE FUNCTION mf_token_usage_daily_add() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    day   date := (NEW.created_at AT TIME ZONE 'UTC')::date;
    entry jsonb := jsonb_build_object(NEW.operation,
                       jsonb_build_object('tokens', NEW.total_tokens, 'cost', NEW.cost_gbp));
BEGIN
    INSERT INTO token_usage_daily AS d
        (organization_id, date, total_tokens, total_cost_gbp, episode_count,
         operation_breakdown, last_updated)
    VALUES (NEW.organization_id, day, NEW.total_tokens, NEW.cost_gbp,
            CASE WHEN NEW.operation = 'episode_generation' THEN 1 ELSE 0 END,
            entry, now())
    ON CONFLICT (organization_id, date) DO UPDATE SET
        total_tokens   = d.total_tokens + EXCLUDED.total_tokens,
        total_cost_gbp = d.total_cost_gbp + EXCLUDED.total_cost_gbp,
        episode_count  = d.episode_count + EXCLUDED.episode_count,
        operation_breakdown = coalesce(d.operation_breakdown, '{}'::jsonb) || jsonb_build_object(
            NEW.operation, jsonb_build_object(
                'tokens', coalesce((d.operation_breakdown -> NEW.operation ->> 'tokens')::bigint, 0)
                          + NEW.total_tokens,
                'cost',   coalesce((d.operation_breakdown -> NEW.operation ->> 'cost')::numeric, 0)
                          + NEW.cost_gbp)),
        last_updated   = now();
    RETURN NULL;
END $$;
CREATE TRIGGER token_usage_maintain_daily
    AFTER INSERT ON token_usage
    FOR EACH ROW EXECUTE FUNCTION mf_token_usage_daily_add();

------------------------------------------------------------------------------------------------
-- The feedback loop: planning notes and agent memory
------------------------------------------------------------------------------------------------

CREATE TABLE planning_notes (
    id              text PRIMARY KEY DEFAULT mf_new_id('note'),
    project_id      text NOT NULL,
    organization_id text NOT NULL,
    user_id         text NOT NULL,
    note            text NOT NULL CHECK (length(btrim(note)) > 0),
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'incorporated', 'archived')),
    -- The episode that incorporated the note.
    episode_id      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    processed_at    timestamptz,
    CHECK (status <> 'incorporated' OR processed_at IS NOT NULL),
    FOREIGN KEY (project_id, organization_id)
        REFERENCES projects (id, organization_id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, organization_id)
        REFERENCES users (id, organization_id) ON DELETE CASCADE,
    FOREIGN KEY (episode_id, organization_id)
        REFERENCES episodes (id, organization_id) ON DELETE SET NULL (episode_id)
);
CREATE INDEX planning_notes_pending_idx ON planning_notes (project_id, created_at)
    WHERE status = 'pending';
CREATE INDEX planning_notes_organization_id_idx ON planning_notes (organization_id);
CREATE INDEX planning_notes_episode_id_idx ON planning_notes (episode_id);

CREATE TABLE agent_memory (
    id              text PRIMARY KEY DEFAULT mf_new_id('mem'),
    project_id      text NOT NULL,
    organization_id text NOT NULL,
    content         text NOT NULL CHECK (length(btrim(content)) > 0),
    memory_type     text NOT NULL DEFAULT 'preference' CHECK (length(memory_type) > 0),
    importance      double precision NOT NULL DEFAULT 0.5
                    CHECK (importance >= 0 AND importance <= 1),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz,
    FOREIGN KEY (project_id, organization_id)
        REFERENCES projects (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX agent_memory_project_idx ON agent_memory (project_id, importance DESC);
CREATE INDEX agent_memory_organization_id_idx ON agent_memory (organization_id);

------------------------------------------------------------------------------------------------
-- Events and audit
------------------------------------------------------------------------------------------------

CREATE TABLE user_events (
    id              text PRIMARY KEY DEFAULT mf_new_id('evt'),
    -- NULL for organisation-level events (e.g. cost_limit_reached).
    user_id         text,
    organization_id text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    event_type      text NOT NULL CHECK (length(event_type) > 0),
    event_data      jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (user_id, organization_id)
        REFERENCES users (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX user_events_org_created_idx ON user_events (organization_id, created_at);
CREATE INDEX user_events_user_id_idx ON user_events (user_id);

CREATE TABLE audit_log (
    id              text PRIMARY KEY DEFAULT mf_new_id('aud'),
    -- NULL when the actor is the system (mf-worker) rather than a user.
    user_id         text,
    organization_id text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    action          text NOT NULL CHECK (length(action) > 0),
    resource_id     text,
    old_value       text,
    new_value       text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- Audit rows outlive the user who acted: keep the row, forget the link.
    FOREIGN KEY (user_id, organization_id)
        REFERENCES users (id, organization_id) ON DELETE SET NULL (user_id)
);
CREATE INDEX audit_log_org_created_idx ON audit_log (organization_id, created_at);
CREATE INDEX audit_log_user_id_idx ON audit_log (user_id);

------------------------------------------------------------------------------------------------
-- Structure only, for later phases: chat and highlights
------------------------------------------------------------------------------------------------

CREATE TABLE chat_sessions (
    id              text PRIMARY KEY DEFAULT mf_new_id('chat'),
    project_id      text NOT NULL,
    organization_id text NOT NULL,
    user_id         text NOT NULL,
    title           text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (id, organization_id),
    FOREIGN KEY (project_id, organization_id)
        REFERENCES projects (id, organization_id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, organization_id)
        REFERENCES users (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX chat_sessions_project_id_idx ON chat_sessions (project_id);
CREATE INDEX chat_sessions_organization_id_idx ON chat_sessions (organization_id);
CREATE INDEX chat_sessions_user_id_idx ON chat_sessions (user_id);
CREATE TRIGGER chat_sessions_touch_updated_at BEFORE UPDATE ON chat_sessions
    FOR EACH ROW EXECUTE FUNCTION mf_touch_updated_at();

CREATE TABLE chat_messages (
    id              text PRIMARY KEY DEFAULT mf_new_id('msg'),
    session_id      text NOT NULL,
    organization_id text NOT NULL,
    role            text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content         text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (session_id, organization_id)
        REFERENCES chat_sessions (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX chat_messages_session_idx ON chat_messages (session_id, created_at);
CREATE INDEX chat_messages_organization_id_idx ON chat_messages (organization_id);

CREATE TABLE highlights (
    id              text PRIMARY KEY DEFAULT mf_new_id('hl'),
    block_id        text NOT NULL,
    organization_id text NOT NULL,
    user_id         text NOT NULL,
    start_offset    integer NOT NULL CHECK (start_offset >= 0),
    end_offset      integer NOT NULL,
    quote           text NOT NULL,
    note            text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (end_offset > start_offset),
    FOREIGN KEY (block_id, organization_id)
        REFERENCES blocks (id, organization_id) ON DELETE CASCADE,
    FOREIGN KEY (user_id, organization_id)
        REFERENCES users (id, organization_id) ON DELETE CASCADE
);
CREATE INDEX highlights_block_id_idx ON highlights (block_id);
CREATE INDEX highlights_organization_id_idx ON highlights (organization_id);
CREATE INDEX highlights_user_id_idx ON highlights (user_id);

------------------------------------------------------------------------------------------------
-- Row-level security
--
-- Every tenant table admits a row only when its organisation is the one the transaction says
-- it acts for: set_config('app.current_org_id', org, true), i.e. SET LOCAL, by mf-worker's
-- as_org() or by a trusted server-side caller (never from a client-supplied header). Without the
-- setting, a non-owner role sees nothing. Table owners and superusers bypass RLS as usual.
--
-- Cross-organisation work (claiming, reaping, scheduling scans, status) is granted by
-- membership of the role mf_cross_org, which an operator creates (roles are cluster-wide; see
-- docs/database-roles.sql). The check tolerates the role not existing: then nobody has it.
------------------------------------------------------------------------------------------------

CREATE FUNCTION mf_current_org_id() RETURNS text
    LANGUAGE sql STABLE
    RETURN nullif(current_setting('app.current_org_id', true), '');

CREATE FUNCTION mf_has_cross_org_access() RETURNS boolean
    LANGUAGE sql STABLE
    RETURN EXISTS (
        SELECT 1 FROM pg_catalog.pg_roles r
        WHERE r.rolname = 'mf_cross_org' AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')
    );

DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['users', 'projects', 'episodes', 'blocks', 'episode_schedule_queue',
                             'token_usage', 'token_usage_daily', 'planning_notes',
                             'agent_memory', 'user_events', 'audit_log', 'chat_sessions',
                             'chat_messages', 'highlights']
    LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format(
            'CREATE POLICY org_isolation ON %I FOR ALL '
            'USING (organization_id = (SELECT mf_current_org_id())) '
            'WITH CHECK (organization_id = (SELECT mf_current_org_id()))', t);
    END LOOP;
END $$;

ALTER TABLE organizations ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON organizations FOR ALL
    USING (id = (SELECT mf_current_org_id()))
    WITH CHECK (id = (SELECT mf_current_org_id()));

-- What the worker must see and do across organisations, and nothing more. Writes through these
-- policies cannot mislabel a row: the composite foreign keys tie it to its project's org.
CREATE POLICY cross_org_worker ON episode_schedule_queue FOR ALL
    USING ((SELECT mf_has_cross_org_access())) WITH CHECK ((SELECT mf_has_cross_org_access()));
CREATE POLICY cross_org_read ON projects FOR SELECT USING ((SELECT mf_has_cross_org_access()));
CREATE POLICY cross_org_cache ON projects FOR UPDATE
    USING ((SELECT mf_has_cross_org_access())) WITH CHECK ((SELECT mf_has_cross_org_access()));
CREATE POLICY cross_org_read ON users FOR SELECT USING ((SELECT mf_has_cross_org_access()));
CREATE POLICY cross_org_read ON organizations FOR SELECT USING ((SELECT mf_has_cross_org_access()));
CREATE POLICY cross_org_read ON token_usage_daily FOR SELECT
    USING ((SELECT mf_has_cross_org_access()));
