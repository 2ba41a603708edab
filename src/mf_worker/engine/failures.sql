-- The history of attempts that did not succeed (mf_worker.engine.failures). Runs inside a
-- transaction acting for the item's organisation (as_org or act_for), so row-level security
-- rejects any row of another organisation.

-- name: record_episode_error
-- A failed generator call: count it and keep its error. When the item gave up, the queue's
-- trigger (migration 0004) has already failed the episode in this transaction.
UPDATE episodes
SET generation_attempts = generation_attempts + 1,
    generation_errors   = generation_errors || %(error)s::text
WHERE id = %(episode_id)s AND status IN ('generating', 'failed');
