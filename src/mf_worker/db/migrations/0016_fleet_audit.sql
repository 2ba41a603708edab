-- Fleet-wide operator actions are audited too. Resetting a provider limit key (from the
-- operator console) changes what every organisation's calls may do and belongs to none of
-- them, so its audit row has no organisation: organization_id may now be NULL, and such rows
-- are visible and writable only to members of mf_cross_org (the worker's and the console's
-- roles), never to a transaction acting for one organisation.
ALTER TABLE audit_log ALTER COLUMN organization_id DROP NOT NULL;

CREATE POLICY fleet_actions ON audit_log
    USING (organization_id IS NULL AND (SELECT mf_has_cross_org_access()))
    WITH CHECK (organization_id IS NULL AND (SELECT mf_has_cross_org_access()));
