-- Key rotation (SQLite). Never edit once landed.
-- When a key version was retired (its wrapped bytes destroyed) and when a root-key version was
-- retired; KeyStatus tells from these which versions a backup taken at a given time depends on.
ALTER TABLE keys ADD COLUMN retired_at INTEGER;
ALTER TABLE root_key_checks ADD COLUMN retired_at INTEGER;
-- The re-wrap job finds the data keys still under an older KEK, and KeyStatus counts them per
-- version, without scanning every subject.
CREATE INDEX subjects_kek_version ON subjects (kek_version);
-- The oldest blind-index key version among a subject's index entries (NULL: none); the re-index
-- job after a blind-index key rotation moves the subjects below the active version. Every entry
-- so far is under version 1.
ALTER TABLE subjects ADD COLUMN index_version INTEGER;
UPDATE subjects SET index_version = 1 WHERE length(index_keys) > 0;
CREATE INDEX subjects_index_version ON subjects (index_version) WHERE index_version IS NOT NULL;
