//! Rust client for kluis, the personal-data vault: for the billing service, the hosting backend
//! and any other Rust caller.
//!
//! - [`ClientConfig`] → [`Client`]: endpoint, caller token, declared purpose (and reason), TLS
//!   with kluis's CA and optionally a client identity (mTLS), a deadline per call, a connect
//!   timeout.
//! - Every call carries `authorization: Bearer <token>`, `x-kluis-purpose`, `x-kluis-reason` when
//!   set, and the deadline as its gRPC timeout ([`CallMetadata`], an interceptor).
//! - Typed calls for what callers do: [`Client::create_subject`], [`Client::get_subject`],
//!   [`Client::find_subjects`], [`Client::update_subject`], [`Client::batch_get_subjects`],
//!   [`Client::open_processing`], [`Client::close_processing`]; the generated stubs
//!   ([`Client::subject_service`], …) for the rest, with the same metadata.
//! - Reads and the idempotent processing-record calls are retried on `UNAVAILABLE` and
//!   connection failures ([`RetryPolicy`]: bounded attempts, exponential backoff with jitter,
//!   within the call's deadline); creates and updates never are.
//! - One [`Error`] enum to match on, mapped from every `tonic::Code`; invalid input comes with
//!   the [`FieldViolation`]s kluis names.
//! - Messages that can carry personal data have a redacted `Debug` ([`pb`]), and so do
//!   [`SubjectData`], [`Lookup`] and the configuration: a log line cannot leak a value or the
//!   token by accident.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kluis_client::Error> {
//! use kluis_client::{ClientConfig, Error, SecretString};
//!
//! let kluis = ClientConfig::new("http://127.0.0.1:50051", SecretString::from("kluis_…"))
//!     .purpose("account")
//!     .connect()
//!     .await?;
//! match kluis.find_by_email("jan.jansen@example.nl").await?.first() {
//!     Some(id) => {
//!         let read = kluis.get_subject(id, &["billing", "payment"]).await?;
//!         println!("{id}: {:?}", read.paths());
//!     }
//!     None => println!("no such customer"),
//! }
//! # Ok(()) }
//! ```

mod client;
mod config;
mod error;
mod metadata;
pub mod paths;
pub mod pb;
mod retry;

pub use client::{BatchItem, Client, KluisChannel, Lookup, SubjectData};
pub use config::{ClientConfig, RetryHook, Retrying};
pub use error::{Error, FieldViolation};
pub use metadata::CallMetadata;
pub use retry::RetryPolicy;
/// The token type [`ClientConfig::new`] takes (re-exported from `secrecy`).
pub use secrecy::SecretString;
