-- What each deployments row did: 'deploy' (a component uploaded), 'rollback' (an earlier
-- digest made active again) or 'undeploy' (the service stopped; its digest is the version
-- that was stopped). A service whose latest row is an undeploy runs nowhere.
ALTER TABLE deployments ADD COLUMN action TEXT NOT NULL DEFAULT 'deploy';
