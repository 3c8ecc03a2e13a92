-- Data-subject rights, consent and disclosures (SQLite). Never edit once landed.
-- Times are integer microseconds since the Unix epoch; subject ids are 16-byte UUIDs. No table here
-- holds a personal value: ids, purposes, routes, recipients, field paths and times only.

-- Every objection, withdrawal of an objection, grant of consent and withdrawal of consent, in the
-- order made, with its route (the statement: unsubscribe link, account, portal; operators too).
CREATE TABLE consent_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_id BLOB    NOT NULL,
    purpose    TEXT    NOT NULL,
    action     TEXT    NOT NULL CHECK (action IN ('object', 'withdraw-objection', 'grant', 'withdraw-consent')),
    route      TEXT    NOT NULL,
    at_us      INTEGER NOT NULL,
    caller     TEXT    NOT NULL
);
CREATE INDEX consent_events_subject ON consent_events (subject_id, id);

-- Consent in force for a purpose the policy marks consent-based (reads need it).
CREATE TABLE consents (
    subject_id BLOB    NOT NULL,
    purpose    TEXT    NOT NULL,
    route      TEXT    NOT NULL,
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (subject_id, purpose)
) WITHOUT ROWID;
CREATE INDEX consents_by_purpose ON consents (purpose, subject_id);

-- Unsubscribe handles: only a keyed hash of each random handle is stored, so nothing about the
-- subject can be derived from a handle and a database copy cannot be turned back into links.
CREATE TABLE unsubscribe_tokens (
    token_hash  BLOB    PRIMARY KEY,
    subject_id  BLOB    NOT NULL,
    purpose     TEXT    NOT NULL,
    issued_at   INTEGER NOT NULL,
    redeemed_at INTEGER
) WITHOUT ROWID;
CREATE INDEX unsubscribe_tokens_subject ON unsubscribe_tokens (subject_id);
-- Tokens older than the configured validity are pruned daily.
CREATE INDEX unsubscribe_tokens_issued ON unsubscribe_tokens (issued_at);

-- Restrictions of processing (GDPR art. 18), with their history. `subjects.restricted_at` is set
-- while one is in force, so a read learns it from the row it reads anyway.
CREATE TABLE restrictions (
    id         TEXT    PRIMARY KEY,
    subject_id BLOB    NOT NULL,
    reason     TEXT    NOT NULL,
    placed_at  INTEGER NOT NULL,
    placed_by  TEXT    NOT NULL,
    lifted_at  INTEGER,
    lifted_by  TEXT
);
CREATE INDEX restrictions_subject ON restrictions (subject_id);
ALTER TABLE subjects ADD COLUMN restricted_at INTEGER;

-- The disclosure register: what was given to whom, when, on which basis (field paths, never values).
CREATE TABLE disclosures (
    id           TEXT    PRIMARY KEY,
    subject_id   BLOB    NOT NULL,
    recipient    TEXT    NOT NULL,
    purpose      TEXT    NOT NULL,
    legal_basis  TEXT    NOT NULL,
    paths        TEXT    NOT NULL,
    reference    TEXT    NOT NULL,
    disclosed_at INTEGER NOT NULL,
    recorded_at  INTEGER NOT NULL,
    recorded_by  TEXT    NOT NULL
);
CREATE INDEX disclosures_subject ON disclosures (subject_id, disclosed_at);

-- Signed erasure receipts as issued (paths, reasons and dates; no values).
CREATE TABLE erasure_receipts (
    id         TEXT    PRIMARY KEY,
    subject_id BLOB    NOT NULL,
    issued_at  INTEGER NOT NULL,
    receipt    TEXT    NOT NULL,
    signature  BLOB    NOT NULL
);
CREATE INDEX erasure_receipts_subject ON erasure_receipts (subject_id);
