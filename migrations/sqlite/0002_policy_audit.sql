-- Purpose-bound access and the audit trail (SQLite). Never edit once landed.
-- Times are integer microseconds since the Unix epoch; subject ids are 16-byte UUIDs.

-- A subject's objection against an opt-out purpose (the rights issue adds history and consent).
CREATE TABLE objections (
    subject_id BLOB    NOT NULL,
    purpose    TEXT    NOT NULL,
    route      TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (subject_id, purpose)
) WITHOUT ROWID;
CREATE INDEX objections_by_purpose ON objections (purpose, subject_id);

-- The audit trail: one row per event, appended in `seq` order. `body` holds the exact bytes the
-- keyed chain covers (`mac` = HMAC over the previous mac, seq and body); the other columns copy
-- fields of the body for queries and are checked against it on verification.
CREATE TABLE audit_events (
    seq     INTEGER PRIMARY KEY,
    at_us   INTEGER NOT NULL,
    caller  TEXT    NOT NULL,
    purpose TEXT    NOT NULL,
    method  TEXT    NOT NULL,
    outcome TEXT    NOT NULL,
    -- The subject ids the event names, comma-separated (indexed into audit_subjects later).
    subjects TEXT   NOT NULL,
    body    BLOB    NOT NULL,
    mac     BLOB    NOT NULL
);
CREATE INDEX audit_events_at ON audit_events (at_us);

-- Which events name a subject (an event may name several: batch reads, finds). Derived from
-- audit_events.subjects by a background indexer in batches, not in the appending transaction: one
-- row per event at a random place in this index would cost every read a B-tree page write. Events
-- after `audit_index_state.indexed_seq` are found by scanning their `subjects` column instead.
CREATE TABLE audit_subjects (
    subject_id BLOB    NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (subject_id, seq)
) WITHOUT ROWID;

-- How far audit_subjects is complete.
CREATE TABLE audit_index_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    indexed_seq INTEGER NOT NULL
);
INSERT INTO audit_index_state (id, indexed_seq) VALUES (1, 0);

-- The single ordering point of the chain: every batch of events reads and advances this row in
-- the transaction that appends them, so instances sharing a database keep one linear chain.
CREATE TABLE audit_head (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    mac BLOB    NOT NULL
);
INSERT INTO audit_head (id, seq, mac) VALUES (1, 0, zeroblob(32));

-- Signed checkpoints of the chain head (also appended to a file outside the database).
CREATE TABLE audit_checkpoints (
    seq        INTEGER PRIMARY KEY,
    checkpoint TEXT    NOT NULL
);
