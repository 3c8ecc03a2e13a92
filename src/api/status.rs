//! The one mapping from domain errors to gRPC statuses (DESIGN.md §6), with no catch-all arm.
//!
//! Client errors are logged at info, server errors at warn or error with the request id; internal
//! causes reach the log only, the caller gets the request id to quote.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::domain::DomainError;

pub fn to_status(e: DomainError, request_id: &str) -> Status {
    match e {
        DomainError::InvalidArgument(violations) => {
            let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
            let message = format!("invalid {}", fields.join(", "));
            tracing::info!(request_id, fields = %fields.join(","), "invalid argument");
            let details = ErrorDetails::with_bad_request(
                violations
                    .into_iter()
                    .map(|v| FieldViolation::new(v.field, v.description))
                    .collect::<Vec<_>>(),
            );
            Status::with_error_details(Code::InvalidArgument, message, details)
        }
        DomainError::Unauthenticated(m) => {
            tracing::info!(request_id, reason = m, "unauthenticated");
            Status::unauthenticated(m)
        }
        DomainError::PermissionDenied(m) => {
            tracing::info!(request_id, reason = %m, "permission denied");
            Status::permission_denied(m)
        }
        DomainError::FailedPrecondition(m) => {
            tracing::info!(request_id, reason = %m, "failed precondition");
            Status::failed_precondition(m)
        }
        e @ (DomainError::NotFound | DomainError::NotFoundNamed { .. }) => {
            Status::not_found(e.to_string())
        }
        e @ DomainError::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        e @ DomainError::Aborted { .. } => Status::aborted(e.to_string()),
        DomainError::DataLoss { subject, path } => {
            // Already logged at error where it was detected, with subject and path.
            Status::data_loss(format!(
                "stored data of subject {subject}{} failed authentication (request id {request_id})",
                path.map(|p| format!(" at {p}")).unwrap_or_default()
            ))
        }
        DomainError::Throttled(m) => Status::resource_exhausted(m),
        DomainError::Unavailable(cause) => {
            tracing::warn!(request_id, cause = %cause, "unavailable");
            Status::unavailable(format!(
                "kluis cannot serve this now; retry (request id {request_id})"
            ))
        }
        DomainError::Internal(cause) => {
            tracing::error!(request_id, cause = %cause, "internal error");
            Status::internal(format!("internal error (request id {request_id})"))
        }
    }
}

/// The status an answer carries in its headers (a trailers-only answer: refusals and errors
/// before any message); `None` when it will come in the trailers.
pub fn header_code(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from)
}

/// The canonical name of a status code, as the audit trail records outcomes.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
