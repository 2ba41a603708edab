-- Users' addresses reach only the `email` notifier, and only for an organisation whose daily
-- cost limit tripped today and has not been told yet (#25).
--
-- mf_organization_emails(org) (migration 0006) answered whenever org = app.current_org_id, a
-- setting any session sets for itself: the worker's role, which belongs to mf_cross_org and so
-- lists every organisation, read every organisation's addresses through it. Its successor
-- answers only while the organisation has an undelivered trip row of today (which only the
-- worker writes, when the limit really trips), and the roles file grants it to a separate mail
-- role, never to the worker role, and to no one at all when MF_MAIL_TO is used.
--
-- SECURITY DEFINER with search_path = pg_catalog, pg_temp and every object of ours named as
-- public.…, like every definer function here (migration 0004): no object a caller creates can
-- stand in for ours.
CREATE FUNCTION public.mf_trip_recipients(org text) RETURNS SETOF text
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT u.email FROM public.users u
    WHERE u.organization_id = org AND org = public.mf_current_org_id()
      AND EXISTS (SELECT 1 FROM public.cost_limit_trips t
                  WHERE t.organization_id = org AND t.notified_at IS NULL
                    AND t.date = (pg_catalog.now() AT TIME ZONE 'UTC')::date)
    ORDER BY u.created_at, u.id
$$;
REVOKE EXECUTE ON FUNCTION public.mf_trip_recipients(text) FROM PUBLIC;

-- The old lookup stays (migrations never drop what a released version calls), but nobody but
-- its owner may call it any more: an older worker's `email` notifier, during the roll, fails
-- with "permission denied" and the budget loop sends the mail again once a new worker runs.
DO $$
DECLARE
    grantee_name text;
BEGIN
    FOR grantee_name IN
        SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(r.rolname) END
        FROM pg_catalog.pg_proc p
        CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) a
        LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
        WHERE p.oid = 'public.mf_organization_emails(text)'::pg_catalog.regprocedure
          AND a.grantee <> p.proowner
    LOOP
        EXECUTE 'REVOKE EXECUTE ON FUNCTION public.mf_organization_emails(text) FROM '
                || grantee_name;
    END LOOP;
END $$;
