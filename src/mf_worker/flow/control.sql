-- One process's flow control (mf_worker.flow.control): the once-per-exhaustion notice of a
-- limit key's exhausted quota, on the key's row of public.provider_limits.

-- name: claim_quota_notice
-- The first worker to ask since calls under the key last succeeded tells the operator; every
-- later pause of the same exhaustion finds the notice taken (no row returned).
UPDATE public.provider_limits
SET quota_noticed_at = clock_timestamp()
WHERE limit_key = %(key)s AND quota_noticed_at IS NULL
RETURNING limit_key;

-- name: clear_quota_notice
-- A call under the key was answered: the quota works again, so the next exhaustion is new.
-- Writes nothing when there is no notice to clear.
UPDATE public.provider_limits
SET quota_noticed_at = NULL
WHERE limit_key = %(key)s AND quota_noticed_at IS NOT NULL;

-- name: read_key_hold
-- Whether the key is held now (a cooldown after a 429, a quota pause), why, and for how many
-- more seconds: the fallback decision of an item due soon reads it instead of calling.
SELECT cooldown_reason AS reason,
       extract(epoch FROM (cooldown_until - clock_timestamp()))::float8 AS seconds
FROM public.provider_limits
WHERE limit_key = %(key)s AND cooldown_until > clock_timestamp();
