-- kluis core schema (SQLite). Never edit once landed; add a new migration instead.
-- Times are integer microseconds since the Unix epoch; ids are 16-byte UUIDs.

-- One row per root-key version: an HMAC over a fixed label, so a wrong root key stops start-up.
CREATE TABLE root_key_checks (
    version     INTEGER PRIMARY KEY,
    check_value BLOB    NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Key-encryption keys and service keys, wrapped under the root key.
CREATE TABLE keys (
    kind         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('active', 'decrypt-only', 'retired')),
    root_version INTEGER NOT NULL,
    wrapped      BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (kind, version)
);

-- One row per subject: its data key wrapped under a KEK, and every field leaf sealed under that
-- data key in one record (few rows per create; see DESIGN.md §5). A rowid table on purpose: rows
-- are kilobytes, and appending them by rowid (with a small unique index on the random id) avoids
-- the page splits a WITHOUT ROWID table keyed by a random UUID would make.
CREATE TABLE subjects (
    id          BLOB    NOT NULL UNIQUE,
    dek_id      BLOB    NOT NULL,
    kek_version INTEGER NOT NULL,
    wrapped_dek BLOB    NOT NULL,
    record      BLOB    NOT NULL,
    -- The subject's blind-index entries (path, key version, digest), so erasure and updates find
    -- them by primary key without a second index on blind_index.
    index_keys  BLOB    NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- HMAC-SHA256 blind indexes for equality lookup; the path is part of the HMAC input too. Every
-- entry is also listed in its subject's index_keys and removed with it (no foreign key: a
-- cascade would need a second index here, and every create writes four entries at random places).
CREATE TABLE blind_index (
    path        TEXT    NOT NULL,
    digest      BLOB    NOT NULL,
    subject_id  BLOB    NOT NULL,
    key_version INTEGER NOT NULL,
    PRIMARY KEY (path, digest, subject_id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX blind_index_unique_username ON blind_index (path, digest)
    WHERE path = 'account.username';

-- Erased subjects keep only their pseudonymous id and the time of erasure.
CREATE TABLE erased_subjects (
    id        BLOB    PRIMARY KEY,
    erased_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Callers and the SHA-256 of their token secrets.
CREATE TABLE callers (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    secret_hash BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
