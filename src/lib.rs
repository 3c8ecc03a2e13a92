//! kluis — the personal-data vault: field-encrypted subjects behind authenticated gRPC.
//!
//! Layers depend downwards only: `api` (tonic) → `domain` (rules) → `crypto`, `store`.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod audit;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod keysource;
pub mod policy;
pub mod store;
pub mod telemetry;

pub use app::{Application, StartupError};
pub use config::ServeArgs;
