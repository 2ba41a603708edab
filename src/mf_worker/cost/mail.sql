-- The email notifier's look-ups (mf_worker.cost.mail). Both run acting for the organisation.

-- name: get_organization_name
SELECT name FROM organizations WHERE id = %(organization_id)s;

-- name: list_trip_recipients
-- Through the SECURITY DEFINER function of migration 0011, as the mail role
-- (MF_MAIL_DATABASE_URL): it answers only for the organisation the transaction acts for, and
-- only while that organisation has a trip of today not yet notified. The worker's role may not
-- call it, and reads no address anywhere (tests/test_tenancy.py).
SELECT email FROM public.mf_trip_recipients(%(organization_id)s) AS email;
