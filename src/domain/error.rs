//! The domain's error: what went wrong, in terms a caller can act on; mapped once to a gRPC status.

use uuid::Uuid;

use crate::{crypto::CryptoError, store::StoreError};

/// One invalid input, named by its field path (or request field); never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl ToString) -> Self {
        Self {
            field: field.into(),
            description: description.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Descriptions say what is wrong, never the value, so they may be shown.
    #[error("invalid argument: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    InvalidArgument(Vec<Violation>),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    /// The call is valid but the subject's state forbids it (an objection, a legal basis that
    /// allows no objection); the text names the reason.
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("subject not found")]
    NotFound,
    #[error("{what} not found")]
    NotFoundNamed { what: &'static str },
    #[error("{path} is already taken by another subject")]
    AlreadyExists { path: String },
    #[error("stale version: expected {expected}, stored {actual}")]
    Aborted { expected: u64, actual: u64 },
    /// Stored data failed authentication. Logged at error with the ids; no plaintext anywhere.
    #[error("stored data of subject {subject} failed authentication")]
    DataLoss { subject: Uuid, path: Option<String> },
    /// Too many attempts (failed password checks); the text says what to wait for.
    #[error("{0}")]
    Throttled(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal: {0}")]
    Internal(String),
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, description: impl ToString) -> Self {
        DomainError::InvalidArgument(vec![Violation::new(field, description)])
    }
}

impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => DomainError::NotFound,
            StoreError::Duplicate { path } => DomainError::AlreadyExists { path },
            StoreError::VersionMismatch { actual } => DomainError::Aborted {
                expected: 0,
                actual,
            },
            StoreError::Unavailable(m) => DomainError::Unavailable(m),
            StoreError::Corrupt(m) => DomainError::Internal(format!("corrupt row: {m}")),
            StoreError::Refused(m) => DomainError::FailedPrecondition(m),
            StoreError::StaleKeyring(m) => DomainError::Unavailable(m),
            StoreError::Database(m) | StoreError::Url(m) | StoreError::Migrate(m) => {
                DomainError::Internal(m)
            }
        }
    }
}

impl From<CryptoError> for DomainError {
    fn from(e: CryptoError) -> Self {
        DomainError::Internal(e.to_string())
    }
}
