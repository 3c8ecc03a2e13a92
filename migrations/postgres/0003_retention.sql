-- The retention engine (PostgreSQL): processing records, legal holds, and each subject's derived
-- retention state. Never edit once landed; add a new migration instead.
-- Times are integer microseconds since the Unix epoch; subject ids are 16-byte UUIDs.

-- A processing record: (purpose, reference) is unique across kluis (DESIGN.md §2). Open until the
-- close event the purpose defines; closing starts the purpose's retention period.
CREATE TABLE processing_records (
    purpose     TEXT    NOT NULL,
    reference   TEXT    NOT NULL,
    subject_id  BYTEA   NOT NULL,
    opened_at   BIGINT  NOT NULL,
    opened_by   TEXT    NOT NULL,
    closed_at   BIGINT,
    close_event TEXT,
    closed_by   TEXT,
    PRIMARY KEY (purpose, reference)
);
CREATE INDEX processing_records_subject ON processing_records (subject_id);

-- Legal holds suspend purging of a subject (purpose and reference NULL) or of one record.
CREATE TABLE legal_holds (
    id          TEXT    PRIMARY KEY,
    subject_id  BYTEA   NOT NULL,
    purpose     TEXT,
    reference   TEXT,
    reason      TEXT    NOT NULL,
    placed_at   BIGINT  NOT NULL,
    placed_by   TEXT    NOT NULL,
    released_at BIGINT,
    released_by TEXT,
    release_reason TEXT
);
CREATE INDEX legal_holds_subject ON legal_holds (subject_id);

-- The subject's retention state derived from its records and holds (NULL: no record ever), the
-- version every change of it bumps (records and holds are changed compare-and-set on it), and the
-- earliest time a path of it becomes due (NULL: none), which the sweeper visits in order.
ALTER TABLE subjects ADD COLUMN retention BYTEA;
ALTER TABLE subjects ADD COLUMN retention_version BIGINT NOT NULL DEFAULT 0;
ALTER TABLE subjects ADD COLUMN retention_due BIGINT;
CREATE INDEX subjects_retention_due ON subjects (retention_due, id) WHERE retention_due IS NOT NULL;
