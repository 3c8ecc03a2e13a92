//! kluis's rules: subjects and their fields, callers and roles, keys at start-up. No gRPC, no SQL.

pub mod access;
pub mod call;
pub mod callers;
pub mod consent;
pub mod credentials;
pub mod disclosure;
mod error;
pub mod keys;
pub use crate::policy::paths;
pub mod receipt;
pub mod record;
pub mod retention;
pub mod rights;
pub mod statement;
pub mod values;
pub mod vault;

pub use callers::{Caller, CallerInfo, Callers, Role};
pub use error::{DomainError, Violation};
pub use paths::FieldPath;
pub use record::{ActivityRecord, FieldChanges, FieldValue, IpRecord, StoredField};
pub use retention::{Retention, RetentionSettings};
pub use vault::{LookupKey, SubjectView, Vault};

pub use crate::clock::now_us;
