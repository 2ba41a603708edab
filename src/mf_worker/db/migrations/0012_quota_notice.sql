-- An exhausted quota is notified once per exhaustion (#23): provider_limits.quota_noticed_at is
-- when a worker told the operator that the key's quota is used up; the first call under the
-- key that the provider answers afterwards clears it, so the next exhaustion is notified again.
-- Before, every 10-minute pause of one exhaustion notified anew (up to 144 a day per key).

ALTER TABLE provider_limits ADD COLUMN quota_noticed_at timestamptz;
