-- Customers' portal passwords (PostgreSQL). Never edit once landed.
-- Only an Argon2id hash (a PHC string naming its own parameters) per subject; erased with it.
CREATE TABLE credentials (
    subject_id BYTEA   PRIMARY KEY,
    hash       TEXT    NOT NULL,
    updated_at BIGINT  NOT NULL
);
