-- Customers' portal passwords (SQLite). Never edit once landed.
-- Only an Argon2id hash (a PHC string naming its own parameters) per subject; erased with it.
CREATE TABLE credentials (
    subject_id BLOB    PRIMARY KEY,
    hash       TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
