-- The reservation-release trigger fires only for a row that holds a reservation.
--
-- Every update of a queue row (claim, heartbeat, completion, retry, release, reap) used to call
-- mf_queue_release_reservation(), a SECURITY DEFINER function with its own search_path, only
-- for it to find nothing reserved: claims and heartbeats never hold one at that point, and free
-- generations (worst case £0) never reserve. A WHEN condition is checked without calling the
-- function at all. The function itself is unchanged.

DROP TRIGGER episode_schedule_queue_release_reservation ON episode_schedule_queue;
CREATE TRIGGER episode_schedule_queue_release_reservation
    BEFORE UPDATE OR DELETE ON episode_schedule_queue
    FOR EACH ROW
    WHEN (OLD.reserved_cost_gbp IS NOT NULL)
    EXECUTE FUNCTION mf_queue_release_reservation();
