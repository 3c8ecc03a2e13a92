//! Integration tests: the real kluis server on 127.0.0.1:0, a real tonic client, a database of its
//! own per test. KLUIS_TEST_BACKEND=postgres runs the same suite against PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod cli;
mod client;
mod consent;
mod credentials;
mod helpers;
mod keys;
mod limits;
mod metrics;
mod operations;
mod policy;
mod retention;
mod rights;
mod scale;
mod security;
mod subjects;
mod tls;
mod validation;
