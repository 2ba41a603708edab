-- The fleet-wide provider limiter (mf_worker.flow.limiter): one token bucket per limit key for
-- requests and one for tokens, in public.provider_limits, shared by every worker on every host.
-- Each statement locks the key's one row, so takes from many processes serialise on it and
-- none is lost. `now` is a parameter (NULL = the database clock, which every host shares).
-- A NULL level is a full bucket; a rate of NULL means no limit known on that dimension.
-- Rates come from two places, kept apart: the configured ones (`rps`, `tps`: the calling
-- replica's MF_LLM_*_PER_MINUTE, paced), stored with the time a replica last sent them and
-- lapsing `ttl` seconds later; and the learned ones, which each 429 stating a limit replaces.
-- The key's rate is the smaller of the two where both are known.

-- name: ensure_limit
INSERT INTO public.provider_limits (limit_key, refilled_at)
VALUES (%(key)s, coalesce(%(now)s::timestamptz, clock_timestamp()))
ON CONFLICT (limit_key) DO NOTHING;

-- name: acquire
-- Refill the buckets up to now (never above their capacity, `burst` seconds of the rate), then
-- take `requests` and `tokens` if the key is not cooling down and both buckets hold what is
-- asked (an amount above a bucket's capacity needs a full bucket and leaves it in debt, which
-- the refill pays off, so the average rate holds even for calls bigger than the burst).
-- The configured rate is this replica's (`rps`, `tps`, already paced) if it has one, which is
-- stored as the key's configured rate with the time; else the stored one while it is fresh
-- (another replica sent it within `ttl` seconds). The rate is the smaller of that and the one
-- the provider stated in its last 429 (stored by cool_down); none means no bucket on that
-- dimension. Returns whether it was granted and, if not, how long until it would be.
WITH p AS (
    SELECT coalesce(%(now)s::timestamptz, clock_timestamp()) AS now,
           %(rps)s::float8 AS rps, %(tps)s::float8 AS tps, %(burst)s::float8 AS burst,
           %(requests)s::float8 AS want_r, %(tokens)s::float8 AS want_t,
           %(rps)s::float8 IS NOT NULL OR %(tps)s::float8 IS NOT NULL AS sends,
           %(ttl)s::float8 AS ttl
), cfg AS (
    SELECT l.limit_key,
           CASE WHEN p.sends THEN p.rps
                WHEN l.configured_at > p.now - make_interval(secs => p.ttl)
                THEN l.configured_requests_per_second END AS rps,
           CASE WHEN p.sends THEN p.tps
                WHEN l.configured_at > p.now - make_interval(secs => p.ttl)
                THEN l.configured_tokens_per_second END AS tps
    FROM public.provider_limits AS l, p
    WHERE l.limit_key = %(key)s
), cur AS (
    SELECT l.limit_key, l.request_level, l.token_level, l.refilled_at, l.cooldown_until,
           l.cooldown_reason,
           least(cfg.rps, l.learned_requests_per_second) AS rps,
           least(cfg.tps, l.learned_tokens_per_second) AS tps,
           greatest(extract(epoch FROM (p.now - l.refilled_at))::float8, 0) AS elapsed
    FROM public.provider_limits AS l
    JOIN cfg ON cfg.limit_key = l.limit_key, p
    WHERE l.limit_key = %(key)s
    FOR UPDATE OF l
), cap AS (
    SELECT cur.*, greatest(cur.rps * p.burst, 1) AS rcap, greatest(cur.tps * p.burst, 1) AS tcap
    FROM cur, p
), level AS (
    SELECT cap.*,
           least(cap.rcap, coalesce(cap.request_level + cap.rps * cap.elapsed, cap.rcap))
               AS requests,
           least(cap.tcap, coalesce(cap.token_level + cap.tps * cap.elapsed, cap.tcap))
               AS tokens,
           greatest(extract(epoch FROM (cap.cooldown_until - p.now))::float8, 0) AS cooling
    FROM cap, p
), d AS (
    SELECT level.*,
           coalesce(level.cooling, 0) = 0
           AND (level.requests IS NULL OR level.requests >= least(p.want_r, level.rcap))
           AND (level.tokens IS NULL OR level.tokens >= least(p.want_t, level.tcap)) AS granted
    FROM level, p
)
UPDATE public.provider_limits AS l
SET request_level       = CASE WHEN d.granted THEN d.requests - p.want_r ELSE d.requests END,
    token_level         = CASE WHEN d.granted THEN d.tokens - p.want_t ELSE d.tokens END,
    refilled_at         = greatest(l.refilled_at, p.now),
    requests_per_second = d.rps,
    tokens_per_second   = d.tps,
    configured_requests_per_second = CASE WHEN p.sends THEN p.rps
                                          ELSE l.configured_requests_per_second END,
    configured_tokens_per_second   = CASE WHEN p.sends THEN p.tps
                                          ELSE l.configured_tokens_per_second END,
    configured_at       = CASE WHEN p.sends THEN p.now ELSE l.configured_at END,
    cooldown_until      = CASE WHEN coalesce(d.cooling, 0) = 0 THEN NULL
                               ELSE l.cooldown_until END,
    cooldown_reason     = CASE WHEN coalesce(d.cooling, 0) = 0 THEN NULL
                               ELSE l.cooldown_reason END,
    updated_at          = p.now
FROM d, p
WHERE l.limit_key = d.limit_key
RETURNING d.granted,
          CASE WHEN d.granted THEN 0::float8
               ELSE greatest(d.cooling,
                             (least(p.want_r, d.rcap) - d.requests) / d.rps,
                             (least(p.want_t, d.tcap) - d.tokens) / d.tps, 0.001)
          END AS wait_seconds,
          CASE WHEN d.cooling > 0 THEN d.cooldown_reason END AS cooling_for,
          l.request_level, l.token_level;

-- name: correct
-- After a call: give back what was charged but not used (or take what was used beyond it),
-- never filling a bucket above its capacity. `requests` and `tokens` are the differences,
-- charged minus used (positive gives back).
UPDATE public.provider_limits AS l
SET request_level = CASE WHEN l.request_level IS NULL THEN NULL
                         ELSE least(l.request_level + %(requests)s::float8,
                                    greatest(l.requests_per_second * %(burst)s::float8, 1))
                    END,
    token_level   = CASE WHEN l.token_level IS NULL THEN NULL
                         ELSE least(l.token_level + %(tokens)s::float8,
                                    greatest(l.tokens_per_second * %(burst)s::float8, 1))
                    END,
    updated_at    = coalesce(%(now)s::timestamptz, clock_timestamp())
WHERE l.limit_key = %(key)s
RETURNING l.request_level, l.token_level;

-- name: cool_down
-- The provider refused a call (429) or the quota is exhausted: hold every worker's new calls
-- under the key until `seconds` from now (a later hold already set wins), and empty both
-- buckets from then on, since the provider's own window is full. A rate the provider stated
-- (x-ratelimit-limit-*, paced) replaces the key's learned rate of that dimension (a dimension
-- it does not state keeps what was learned), so a fleet without configured limits paces itself
-- after the first 429, and a limit the provider lowered or raised is followed; the key's rate
-- becomes the smaller of it and a configured rate still fresh (`ttl`). An exhausted quota
-- outranks a rate limit while it lasts. `started` says whether this statement began the hold of this
-- reason (so the first worker to see an exhausted quota notifies, not all of them).
WITH p AS (
    SELECT coalesce(%(now)s::timestamptz, clock_timestamp()) AS now,
           %(seconds)s::float8 AS seconds, %(reason)s::text AS reason,
           %(learned_rps)s::float8 AS learned_rps, %(learned_tps)s::float8 AS learned_tps,
           %(ttl)s::float8 AS ttl
), cur AS (
    SELECT l.limit_key, l.cooldown_until, l.cooldown_reason,
           coalesce(p.learned_rps, l.learned_requests_per_second) AS learned_rps,
           coalesce(p.learned_tps, l.learned_tokens_per_second) AS learned_tps,
           l.configured_at > p.now - make_interval(secs => p.ttl) AS configured_fresh
    FROM public.provider_limits AS l, p
    WHERE l.limit_key = %(key)s
    FOR UPDATE OF l
), d AS (
    SELECT cur.*,
           p.now + make_interval(secs => p.seconds) AS until,
           cur.cooldown_until IS NULL OR cur.cooldown_until <= p.now
               OR cur.cooldown_reason IS DISTINCT FROM p.reason AS started,
           CASE WHEN cur.cooldown_until > p.now AND cur.cooldown_reason = 'quota_exhausted'
                THEN 'quota_exhausted' ELSE p.reason END AS reason
    FROM cur, p
)
UPDATE public.provider_limits AS l
SET cooldown_until     = greatest(CASE WHEN l.cooldown_until > p.now THEN l.cooldown_until END,
                                  d.until),
    cooldown_reason    = d.reason,
    learned_requests_per_second = d.learned_rps,
    learned_tokens_per_second   = d.learned_tps,
    learned_at         = CASE WHEN p.learned_rps IS NOT NULL OR p.learned_tps IS NOT NULL
                              THEN p.now ELSE l.learned_at END,
    requests_per_second = least(CASE WHEN d.configured_fresh
                                     THEN l.configured_requests_per_second END, d.learned_rps),
    tokens_per_second  = least(CASE WHEN d.configured_fresh
                                    THEN l.configured_tokens_per_second END, d.learned_tps),
    request_level      = least(coalesce(l.request_level, 0), 0),
    token_level        = least(coalesce(l.token_level, 0), 0),
    refilled_at        = greatest(l.refilled_at, d.until),
    rate_limited_count = l.rate_limited_count + (p.reason = 'rate_limited')::int,
    quota_pauses       = l.quota_pauses
                         + (p.reason = 'quota_exhausted' AND d.started)::int,
    updated_at         = p.now
FROM d, p
WHERE l.limit_key = d.limit_key
RETURNING d.started AND d.reason = p.reason AS started, l.cooldown_until, l.cooldown_reason;

-- name: read_limits
-- Every key with its state as of now (for `mf-worker status` and the metrics): the rates in
-- force at the last take, and where they come from (a configured rate no replica sent within
-- `ttl` seconds reads as none).
SELECT l.limit_key, l.requests_per_second, l.tokens_per_second, l.request_level,
       l.token_level, l.refilled_at,
       CASE WHEN l.configured_at > coalesce(%(now)s::timestamptz, clock_timestamp())
                                   - make_interval(secs => %(ttl)s::float8)
            THEN l.configured_requests_per_second END AS configured_requests_per_second,
       CASE WHEN l.configured_at > coalesce(%(now)s::timestamptz, clock_timestamp())
                                   - make_interval(secs => %(ttl)s::float8)
            THEN l.configured_tokens_per_second END AS configured_tokens_per_second,
       l.configured_at, l.learned_requests_per_second, l.learned_tokens_per_second,
       l.learned_at,
       CASE WHEN l.cooldown_until > coalesce(%(now)s::timestamptz, clock_timestamp())
            THEN l.cooldown_until END AS cooldown_until,
       CASE WHEN l.cooldown_until > coalesce(%(now)s::timestamptz, clock_timestamp())
            THEN l.cooldown_reason END AS cooldown_reason,
       l.rate_limited_count, l.quota_pauses, l.updated_at
FROM public.provider_limits AS l
ORDER BY l.limit_key;

-- name: reset_limit
-- An operator's reset of a key (the console): end its cooldown, refill both buckets and forget
-- the rates learnt from the provider's headers (configured rates are sent by every replica that
-- has one, so they still apply) and the quota notice (the next exhaustion is notified anew).
-- For after a quota top-up, or a learnt rate that was wrong. Returns the state before, for the
-- audit row; no row when the key does not exist.
WITH old AS (
    SELECT limit_key, cooldown_reason, cooldown_until
    FROM public.provider_limits
    WHERE limit_key = %(key)s
    FOR UPDATE
)
UPDATE public.provider_limits AS l
SET cooldown_until = NULL, cooldown_reason = NULL, request_level = NULL, token_level = NULL,
    requests_per_second = NULL, tokens_per_second = NULL,
    learned_requests_per_second = NULL, learned_tokens_per_second = NULL, learned_at = NULL,
    quota_noticed_at = NULL,
    refilled_at = coalesce(%(now)s::timestamptz, clock_timestamp()),
    updated_at = coalesce(%(now)s::timestamptz, clock_timestamp())
FROM old
WHERE l.limit_key = old.limit_key
RETURNING old.cooldown_reason AS old_cooldown_reason, old.cooldown_until AS old_cooldown_until;
