-- The per-subject index of the audit trail moves to a database of its own beside this one
-- (`<file>.audit-index`, src/store/audit_index.rs), so that building it never takes this file's
-- write lock, which every read's audit event needs. It is derived from audit_events, so it is not
-- copied: the new file starts empty and the indexer builds it again from the first event left.
DROP TABLE audit_subjects;
DROP TABLE audit_index_state;
