//! kluis's rules: subjects and their fields, callers and roles, keys at start-up. No gRPC, no SQL.

pub mod access;
pub mod call;
pub mod callers;
mod error;
pub mod keys;
pub use crate::policy::paths;
pub mod record;
pub mod values;
pub mod vault;

pub use callers::{Caller, CallerInfo, Callers, Role};
pub use error::{DomainError, Violation};
pub use paths::FieldPath;
pub use record::{ActivityRecord, FieldChanges, FieldValue, IpRecord, StoredField};
pub use vault::{LookupKey, SubjectView, Vault};

/// Microseconds since the Unix epoch: the one time unit of rows, records and events.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
