//! The audit trail: the event format, the keyed hash chain and its verifier, signed checkpoints
//! (in the database and in an append-only file outside it), and the run-time trail over the store.
//!
//! `event`, `chain` and `checkpoint` are pure (no database, no async runtime); `trail` drives them
//! against the store.

mod chain;
mod checkpoint;
mod event;
mod trail;

pub use chain::{Break, CheckpointSource, GENESIS, StoredEvent, Verifier, VerifyReport, link};
pub use checkpoint::{Checkpoint, append_to_file, read_file, signing_key_from_seed};
pub use event::{AuditEvent, FORMAT_VERSION};
pub use trail::{AuditTrail, CheckpointSettings, verify_chain};

use std::path::PathBuf;

/// What can go wrong reading, writing or decoding audit data. No variant carries key material
/// or a personal value.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file operation on the checkpoint file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The database could not be read or written (the store's error, ids only).
    #[error("store: {0}")]
    Store(String),
    /// Stored audit bytes are not a well-formed event or checkpoint.
    #[error("cannot decode audit data: {0}")]
    Decode(String),
    /// A line of the checkpoint file other than the last one is not a checkpoint.
    #[error("{}: line {line} is not a checkpoint: {reason}", path.display())]
    CorruptCheckpointFile {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Describes a JSON error by kind and position only, never by the text it choked on.
pub(crate) fn describe_json_error(error: &serde_json::Error) -> String {
    let kind = match error.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "unexpected field or type",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{kind} at line {} column {}", error.line(), error.column())
}
