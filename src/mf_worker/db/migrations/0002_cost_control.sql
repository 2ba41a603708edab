-- Cost control: budget reservations against the daily aggregate, the cost breaker's record.
--
-- Before a generation the worker reserves its worst-case cost on the organisation's row of
-- token_usage_daily (reserved_gbp), in the same UPDATE that checks
-- total_cost_gbp + reserved_gbp + amount <= limit; the row lock makes that check atomic, so
-- concurrent workers cannot together start more than the remaining budget allows. The final
-- write settles the reservation (the real cost arrives through the usage trigger); a failed or
-- reaped attempt releases it. The queue item remembers what it reserved and for which day.

ALTER TABLE token_usage_daily
    ADD COLUMN reserved_gbp numeric(16, 6) NOT NULL DEFAULT 0 CHECK (reserved_gbp >= 0);

ALTER TABLE episode_schedule_queue
    ADD COLUMN reserved_cost_gbp numeric(14, 6) CHECK (reserved_cost_gbp >= 0),
    ADD COLUMN reserved_on date,
    -- The UTC day an item was blocked by the cost breaker (NULL when not cost-blocked).
    ADD COLUMN blocked_on date,
    ADD CONSTRAINT episode_schedule_queue_reservation_dated
        CHECK ((reserved_cost_gbp IS NULL) = (reserved_on IS NULL));

-- One row per organisation and UTC day on which the breaker tripped: inserting it is how the
-- many workers agree that the user event, the audit row and the operator notification are
-- written exactly once per organisation per day.
CREATE TABLE cost_limit_trips (
    organization_id text NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    date            date NOT NULL,
    spent_gbp       numeric(16, 6) NOT NULL,
    limit_gbp       numeric(12, 4) NOT NULL,
    tripped_at      timestamptz NOT NULL DEFAULT now(),
    notified_at     timestamptz,
    PRIMARY KEY (organization_id, date)
);
ALTER TABLE cost_limit_trips ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON cost_limit_trips FOR ALL
    USING (organization_id = (SELECT mf_current_org_id()))
    WITH CHECK (organization_id = (SELECT mf_current_org_id()));
CREATE POLICY cross_org_read ON cost_limit_trips FOR SELECT
    USING ((SELECT mf_has_cross_org_access()));

CREATE INDEX episode_schedule_queue_cost_blocked
    ON episode_schedule_queue (organization_id, blocked_on) WHERE status = 'blocked';

-- A reservation lives exactly as long as its item is processing: whatever moves the item out
-- of 'processing' (completion, retry, failure, release, the reaper, an operator's cancel, a
-- delete) gives the reserved amount back to the day it was taken from. Doing it here, not in
-- each code path, means no path can forget it. The completed generation's real cost reaches
-- the aggregate separately, through the token_usage trigger.
CREATE FUNCTION mf_queue_release_reservation() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF OLD.reserved_cost_gbp IS NOT NULL
       AND (TG_OP = 'DELETE' OR NEW.status <> 'processing') THEN
        UPDATE token_usage_daily
        SET reserved_gbp = greatest(reserved_gbp - OLD.reserved_cost_gbp, 0),
            last_updated = now()
        WHERE organization_id = OLD.organization_id AND date = OLD.reserved_on;
        IF TG_OP = 'UPDATE' THEN
            NEW.reserved_cost_gbp := NULL;
            NEW.reserved_on := NULL;
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER episode_schedule_queue_release_reservation
    BEFORE UPDATE OR DELETE ON episode_schedule_queue
    FOR EACH ROW EXECUTE FUNCTION mf_queue_release_reservation();
