-- The email notifier's look-ups (mf_worker.cost.mail). Both run acting for the organisation.

-- name: get_organization_name
SELECT name FROM organizations WHERE id = %(organization_id)s;

-- name: list_organization_emails
-- Through the SECURITY DEFINER function (migration 0006): the worker's role needs no SELECT on
-- users.email, and the function answers only for the organisation the transaction acts for.
SELECT email FROM public.mf_organization_emails(%(organization_id)s) AS email;
