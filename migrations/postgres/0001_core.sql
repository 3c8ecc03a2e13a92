-- kluis core schema (PostgreSQL). Never edit once landed; add a new migration instead.
-- Times are integer microseconds since the Unix epoch; ids are 16-byte UUIDs.

-- One row per root-key version: an HMAC over a fixed label, so a wrong root key stops start-up.
CREATE TABLE root_key_checks (
    version     BIGINT  PRIMARY KEY,
    check_value BYTEA   NOT NULL,
    created_at  BIGINT  NOT NULL
);

-- Key-encryption keys and service keys, wrapped under the root key.
CREATE TABLE keys (
    kind         TEXT    NOT NULL,
    version      BIGINT  NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('active', 'decrypt-only', 'retired')),
    root_version BIGINT  NOT NULL,
    wrapped      BYTEA   NOT NULL,
    created_at   BIGINT  NOT NULL,
    PRIMARY KEY (kind, version)
);

-- One row per subject: its data key wrapped under a KEK, and every field leaf sealed under that
-- data key in one record (few rows per create; see DESIGN.md §5).
CREATE TABLE subjects (
    id          BYTEA   PRIMARY KEY,
    dek_id      BYTEA   NOT NULL,
    kek_version BIGINT  NOT NULL,
    wrapped_dek BYTEA   NOT NULL,
    record      BYTEA   NOT NULL,
    -- The subject's blind-index entries (path, key version, digest), so erasure and updates find
    -- them by primary key without a second index on blind_index.
    index_keys  BYTEA   NOT NULL,
    version     BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);

-- HMAC-SHA256 blind indexes for equality lookup; the path is part of the HMAC input too. Every
-- entry is also listed in its subject's index_keys and removed with it (no foreign key: a
-- cascade would need a second index here, and every create writes four entries at random places).
CREATE TABLE blind_index (
    path        TEXT    NOT NULL,
    digest      BYTEA   NOT NULL,
    subject_id  BYTEA   NOT NULL,
    key_version BIGINT  NOT NULL,
    PRIMARY KEY (path, digest, subject_id)
);
CREATE UNIQUE INDEX blind_index_unique_username ON blind_index (path, digest)
    WHERE path = 'account.username';

-- Erased subjects keep only their pseudonymous id and the time of erasure.
CREATE TABLE erased_subjects (
    id        BYTEA   PRIMARY KEY,
    erased_at BIGINT  NOT NULL
);

-- Callers and the SHA-256 of their token secrets.
CREATE TABLE callers (
    id          TEXT    PRIMARY KEY,
    name        TEXT    NOT NULL,
    role        TEXT    NOT NULL,
    secret_hash BYTEA   NOT NULL,
    created_at  BIGINT  NOT NULL,
    revoked_at  BIGINT 
);
