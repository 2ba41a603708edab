-- Provider rates by origin (#24): a rate an operator configured and a rate a provider stated in
-- a 429 are kept apart, so neither outlives its source.
--
-- * Configured (MF_LLM_REQUESTS_PER_MINUTE / MF_LLM_TOKENS_PER_MINUTE, paced): every take of a
--   replica that has one writes it here with the time (`configured_at`); it applies to the
--   replicas that have none while some replica keeps sending it, and lapses a few minutes after
--   the last one did (flow/limiter.py: CONFIGURED_TTL_SECONDS). Removed from the settings, it
--   no longer paces the fleet.
-- * Learned (x-ratelimit-limit-* of a 429, paced): each 429 that states a limit replaces the
--   learned one of that dimension, so a lowered limit is learned and a raised one used.
--
-- The key's rate is the smaller of the two where both are known. `requests_per_second` and
-- `tokens_per_second` keep the rate in force at the last take (what `correct` caps a bucket at,
-- and what `mf-worker status` shows).
ALTER TABLE provider_limits
    ADD COLUMN configured_requests_per_second double precision
        CHECK (configured_requests_per_second > 0),
    ADD COLUMN configured_tokens_per_second double precision
        CHECK (configured_tokens_per_second > 0),
    ADD COLUMN configured_at timestamptz,
    ADD COLUMN learned_requests_per_second double precision
        CHECK (learned_requests_per_second > 0),
    ADD COLUMN learned_tokens_per_second double precision CHECK (learned_tokens_per_second > 0),
    ADD COLUMN learned_at timestamptz;

-- The rates stored so far have no known origin: they become configured ones, seen when the row
-- was last used, so they lapse unless a replica still sends them.
UPDATE provider_limits
SET configured_requests_per_second = requests_per_second,
    configured_tokens_per_second   = tokens_per_second,
    configured_at                  = updated_at
WHERE requests_per_second IS NOT NULL OR tokens_per_second IS NOT NULL;
