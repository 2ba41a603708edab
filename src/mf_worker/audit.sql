-- The audit trail of operators' commands (mf_worker.audit).

-- name: insert_operator_action
-- Runs acting for the item's organisation (audit_log has row-level security). user_id is NULL:
-- an operator is not a product user; `actor` names them.
INSERT INTO audit_log (id, user_id, organization_id, action, resource_id, old_value, new_value,
                       actor)
VALUES (%(id)s, NULL, %(organization_id)s, %(action)s, %(resource_id)s, %(old_value)s,
        %(new_value)s, %(actor)s);


-- name: insert_fleet_action
-- A fleet-wide action (the console's provider key reset): no organisation, so the row is
-- admitted by the fleet_actions policy (members of mf_cross_org), not by acting for one.
INSERT INTO audit_log (id, user_id, organization_id, action, resource_id, old_value, new_value,
                       actor)
VALUES (%(id)s, NULL, NULL, %(action)s, %(resource_id)s, %(old_value)s, %(new_value)s,
        %(actor)s);
