//! The `kluis.v1` messages (shared with the Rust client: `kluis_client::pb`, whose `Debug` is
//! redacted for every message that can carry personal data or a token) and the generated services.

#![allow(clippy::all, missing_docs)]

pub use kluis_client::pb::*;

tonic::include_proto!("kluis.v1");

/// The encoded descriptor set of `kluis.v1` (and its imports), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("kluis_descriptor");
