-- Key rotation (PostgreSQL). Never edit once landed.
-- When a key version was retired (its wrapped bytes destroyed) and when a root-key version was
-- retired; KeyStatus tells from these which versions a backup taken at a given time depends on.
ALTER TABLE keys ADD COLUMN retired_at BIGINT;
ALTER TABLE root_key_checks ADD COLUMN retired_at BIGINT;

-- Subjects' wrapped data keys move to a narrow table of their own: re-wrapping them under a new
-- KEK then rewrites rows of about 100 bytes instead of each subject's row with its sealed record
-- (kilobytes). Erasure deletes a subject's row here with everything else it owns.
CREATE TABLE data_keys (
    subject_id  BYTEA    PRIMARY KEY,
    dek_id      BYTEA    NOT NULL,
    kek_version BIGINT NOT NULL,
    wrapped_dek BYTEA    NOT NULL
);
INSERT INTO data_keys (subject_id, dek_id, kek_version, wrapped_dek)
    SELECT id, dek_id, kek_version, wrapped_dek FROM subjects;
-- The re-wrap job finds the data keys still under an older KEK, and KeyStatus counts them per
-- version, without reading every row.
CREATE INDEX data_keys_kek_version ON data_keys (kek_version);
ALTER TABLE subjects DROP COLUMN dek_id;
ALTER TABLE subjects DROP COLUMN kek_version;
ALTER TABLE subjects DROP COLUMN wrapped_dek;

-- The oldest blind-index key version among a subject's index entries (NULL: none); the re-index
-- job after a blind-index key rotation moves the subjects below the active version. Every entry
-- so far is under version 1.
ALTER TABLE subjects ADD COLUMN index_version BIGINT;
UPDATE subjects SET index_version = 1 WHERE length(index_keys) > 0;
CREATE INDEX subjects_index_version ON subjects (index_version) WHERE index_version IS NOT NULL;
