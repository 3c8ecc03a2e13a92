//! The one error type of the client: every gRPC status kluis can answer, mapped from
//! `tonic::Code` without a catch-all arm (a new code cannot slip through), plus the failures
//! that happen before kluis answers (no connection, an expired deadline, a bad configuration).
//!
//! Messages are kluis's own (they name fields, purposes and paths, never values) or the
//! transport's; the client never puts a request's payload into an error.

use std::error::Error as _;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// One bad field of a refused request, as kluis names it in its `google.rpc.BadRequest` details:
/// a field path (`contact.email`, `ip_addresses[2].address`, `read_mask.paths[1]`) or a header
/// (`x-kluis-purpose`, `x-kluis-reason`), and why. Never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field path or header name.
    pub field: String,
    /// Why it was refused (e.g. `not a valid e-mail address`).
    pub description: String,
}

/// What went wrong with a call. Match on it; every variant is a distinct situation of the kluis
/// API (README "The API in short", the status table), so the enum is deliberately exhaustive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `UNAUTHENTICATED`: no, malformed, unknown or revoked token.
    #[error("unauthenticated: {message}")]
    Unauthenticated {
        /// kluis's reason.
        message: String,
    },
    /// `PERMISSION_DENIED`: the purpose is not allowed for the caller's role, a path outside the
    /// grant was asked for or written, or an operators-only call. The message names the purpose
    /// or paths.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// kluis's reason, naming purpose or paths.
        message: String,
    },
    /// `INVALID_ARGUMENT`: a bad field, field mask or id; a missing or unknown `x-kluis-purpose`;
    /// an operator's read without `x-kluis-reason`. Every bad field is listed at once; nothing was
    /// written.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// kluis's summary (`invalid contact.email, payment.iban`).
        message: String,
        /// The fields from the `google.rpc.BadRequest` details, in kluis's order.
        field_violations: Vec<FieldViolation>,
    },
    /// `NOT_FOUND`: unknown or erased subject, a subject whose remaining paths retention hides
    /// from the caller, an unknown processing record or hold, an unknown unsubscribe token.
    #[error("not found: {message}")]
    NotFound {
        /// kluis's message (ids only).
        message: String,
    },
    /// `ALREADY_EXISTS`: the username is taken, or the processing record `(purpose, reference)`
    /// belongs to another subject.
    #[error("already exists: {message}")]
    AlreadyExists {
        /// kluis's message.
        message: String,
    },
    /// `ABORTED`: an update's `expected_version` is stale — someone changed the subject since it
    /// was read. Read it again, reapply the change, write with the new version.
    #[error("conflict (stale version): {message}")]
    Conflict {
        /// kluis's message.
        message: String,
    },
    /// `FAILED_PRECONDITION`: the subject objected to the purpose or is under a restriction of
    /// processing (GDPR art. 18), a path is kept only for another purpose's legal retention, a
    /// closed record cannot reopen, an erasure a legal obligation forbids. The message says why.
    #[error("failed precondition: {message}")]
    FailedPrecondition {
        /// kluis's reason.
        message: String,
    },
    /// `RESOURCE_EXHAUSTED`: throttled (too many failed password attempts), or a message over
    /// the size limit. The message says how long to wait where that applies.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        /// kluis's or the transport's message.
        message: String,
    },
    /// `OUT_OF_RANGE`: a request message over kluis's 4 MiB limit (tonic's answer).
    #[error("out of range: {message}")]
    OutOfRange {
        /// The transport's message.
        message: String,
    },
    /// The call's deadline passed before an answer came: `DEADLINE_EXCEEDED` from the server, or
    /// the client's own per-call deadline (retries included) ran out.
    #[error("deadline exceeded: {message}")]
    DeadlineExceeded {
        /// What ran out.
        message: String,
    },
    /// `CANCELLED`: the call was cancelled before it completed (not by the deadline).
    #[error("cancelled: {message}")]
    Cancelled {
        /// The transport's message.
        message: String,
    },
    /// `UNAVAILABLE` from kluis: its database is unreachable or the call's audit event could not
    /// be written (kluis fails closed; no data was returned). Transient: idempotent calls are
    /// retried by the client before this reaches the caller.
    #[error("kluis unavailable: {message}")]
    Unavailable {
        /// kluis's message.
        message: String,
        /// The `x-request-id` of the call, to quote when asking the operators.
        request_id: Option<String>,
    },
    /// No answer from kluis at all: the connection could not be made (refused, DNS, TLS
    /// handshake, connect timeout) or broke during the call. Idempotent calls are retried.
    #[error("transport: {message}")]
    Transport {
        /// The transport's error chain (no request data).
        message: String,
    },
    /// `DATA_LOSS`: a stored ciphertext failed authentication. kluis logged it at error level and
    /// recorded an audit event; tell the operators, quoting the request id.
    #[error("data loss: {message}")]
    DataLoss {
        /// kluis's message (ids and path only).
        message: String,
        /// The `x-request-id` of the call.
        request_id: Option<String>,
    },
    /// `INTERNAL`: kluis failed for a reason it keeps in its log; quote the request id.
    #[error("internal error in kluis: {message}")]
    Internal {
        /// kluis's generic message.
        message: String,
        /// The `x-request-id` of the call, the key to the cause in kluis's log.
        request_id: Option<String>,
    },
    /// `UNIMPLEMENTED`: the server does not know the method (an older kluis).
    #[error("unimplemented: {message}")]
    Unimplemented {
        /// The transport's message.
        message: String,
    },
    /// `UNKNOWN` from the server, or a status `OK` without a response.
    #[error("unknown error: {message}")]
    Unknown {
        /// The message as received.
        message: String,
    },
    /// The client was configured wrongly (bad URL, TLS settings on an `http://` endpoint, a
    /// purpose that is not a valid header value, an unreadable certificate). No call was made.
    #[error("invalid client configuration: {message}")]
    InvalidConfig {
        /// What is wrong.
        message: String,
    },
}

impl Error {
    /// Whether retrying the same idempotent call may succeed: kluis was unavailable or could
    /// not be reached. Never true for answers that say something about the request.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Transport { .. })
    }

    /// The `x-request-id` kluis gave the call, where the error carries one (server failures,
    /// which kluis's log explains under that id).
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Error::Unavailable { request_id, .. }
            | Error::DataLoss { request_id, .. }
            | Error::Internal { request_id, .. } => request_id.as_deref(),
            Error::Unauthenticated { .. }
            | Error::PermissionDenied { .. }
            | Error::InvalidArgument { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists { .. }
            | Error::Conflict { .. }
            | Error::FailedPrecondition { .. }
            | Error::ResourceExhausted { .. }
            | Error::OutOfRange { .. }
            | Error::DeadlineExceeded { .. }
            | Error::Cancelled { .. }
            | Error::Transport { .. }
            | Error::Unimplemented { .. }
            | Error::Unknown { .. }
            | Error::InvalidConfig { .. } => None,
        }
    }

    /// The gRPC code this error stands for (for logs and metrics); `Unavailable` for transport
    /// failures and `InvalidArgument` for a bad client configuration.
    pub fn code(&self) -> Code {
        match self {
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::InvalidArgument { .. } | Error::InvalidConfig { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::Conflict { .. } => Code::Aborted,
            Error::FailedPrecondition { .. } => Code::FailedPrecondition,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::OutOfRange { .. } => Code::OutOfRange,
            Error::DeadlineExceeded { .. } => Code::DeadlineExceeded,
            Error::Cancelled { .. } => Code::Cancelled,
            Error::Unavailable { .. } | Error::Transport { .. } => Code::Unavailable,
            Error::DataLoss { .. } => Code::DataLoss,
            Error::Internal { .. } => Code::Internal,
            Error::Unimplemented { .. } => Code::Unimplemented,
            Error::Unknown { .. } => Code::Unknown,
        }
    }

    /// The field violations of an `InvalidArgument` (empty for every other error).
    pub fn field_violations(&self) -> &[FieldViolation] {
        if let Error::InvalidArgument {
            field_violations, ..
        } = self
        {
            field_violations
        } else {
            &[]
        }
    }

    /// The error for one failed item of a batch (`ItemError`: a `google.rpc.Code` and message).
    pub(crate) fn from_item(code: i32, message: String) -> Error {
        Error::from(Status::new(Code::from(code), message))
    }

    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::InvalidConfig {
            message: message.into(),
        }
    }
}

impl From<Status> for Error {
    /// Maps a status from kluis (or from the transport, before kluis answered) to the variant a
    /// caller matches on. Callers of the raw generated stubs use it as `.map_err(Error::from)`.
    fn from(status: Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::Ok => Error::Unknown {
                message: format!("status OK without a response: {message}"),
            },
            Code::Cancelled => {
                // The client's own timer (the error is the source), or a tonic server's timer on
                // the `grpc-timeout` the client sent (tonic answers CANCELLED "Timeout expired").
                if caused_by::<tonic::TimeoutExpired>(&status)
                    || message == tonic::TimeoutExpired(()).to_string()
                {
                    Error::DeadlineExceeded {
                        message: "the call's deadline passed before kluis answered".into(),
                    }
                } else if caused_by::<tonic::transport::Error>(&status) {
                    // The connection closed under the call (hyper's "operation was canceled"),
                    // e.g. a TLS handshake kluis refused: the transport failed, nobody cancelled.
                    Error::Transport {
                        message: error_chain(&status),
                    }
                } else {
                    Error::Cancelled { message }
                }
            }
            Code::Unknown => {
                // A status made from a local error carries it as its source; one kluis sent
                // has none.
                if status.source().is_some() {
                    Error::Transport {
                        message: error_chain(&status),
                    }
                } else {
                    Error::Unknown { message }
                }
            }
            Code::InvalidArgument => {
                let field_violations = status
                    .get_details_bad_request()
                    .map(|b| {
                        b.field_violations
                            .into_iter()
                            .map(|v| FieldViolation {
                                field: v.field,
                                description: v.description,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Error::InvalidArgument {
                    message,
                    field_violations,
                }
            }
            Code::DeadlineExceeded => Error::DeadlineExceeded { message },
            Code::NotFound => Error::NotFound { message },
            Code::AlreadyExists => Error::AlreadyExists { message },
            Code::PermissionDenied => Error::PermissionDenied { message },
            Code::ResourceExhausted => Error::ResourceExhausted { message },
            Code::FailedPrecondition => Error::FailedPrecondition { message },
            Code::Aborted => Error::Conflict { message },
            Code::OutOfRange => Error::OutOfRange { message },
            Code::Unimplemented => Error::Unimplemented { message },
            Code::Internal => Error::Internal {
                request_id: request_id(&status),
                message,
            },
            Code::Unavailable => {
                if caused_by::<tonic::ConnectError>(&status) {
                    Error::Transport {
                        message: error_chain(&status),
                    }
                } else {
                    Error::Unavailable {
                        request_id: request_id(&status),
                        message,
                    }
                }
            }
            Code::DataLoss => Error::DataLoss {
                request_id: request_id(&status),
                message,
            },
            Code::Unauthenticated => Error::Unauthenticated { message },
        }
    }
}

impl From<tonic::transport::Error> for Error {
    /// A channel that could not be set up or connected.
    fn from(e: tonic::transport::Error) -> Self {
        Error::Transport {
            message: error_chain(&e),
        }
    }
}

/// Whether an error of type `E` is somewhere in the status's source chain.
fn caused_by<E: std::error::Error + 'static>(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<E>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// `error: cause: cause…`, each distinct message once.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// kluis's `x-request-id` response header, or the id its message quotes
/// (`… (request id <id>)`).
fn request_id(status: &Status) -> Option<String> {
    if let Some(id) = status
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    {
        return Some(id.to_owned());
    }
    let message = status.message();
    let start = message.find("(request id ")? + "(request id ".len();
    let len = message[start..].find(')')?;
    Some(message[start..start + len].to_owned()).filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    #[test]
    fn every_code_maps_to_its_variant() {
        let cases = [
            (Code::Ok, Code::Unknown),
            (Code::Cancelled, Code::Cancelled),
            (Code::Unknown, Code::Unknown),
            (Code::InvalidArgument, Code::InvalidArgument),
            (Code::DeadlineExceeded, Code::DeadlineExceeded),
            (Code::NotFound, Code::NotFound),
            (Code::AlreadyExists, Code::AlreadyExists),
            (Code::PermissionDenied, Code::PermissionDenied),
            (Code::ResourceExhausted, Code::ResourceExhausted),
            (Code::FailedPrecondition, Code::FailedPrecondition),
            (Code::Aborted, Code::Aborted),
            (Code::OutOfRange, Code::OutOfRange),
            (Code::Unimplemented, Code::Unimplemented),
            (Code::Internal, Code::Internal),
            (Code::Unavailable, Code::Unavailable),
            (Code::DataLoss, Code::DataLoss),
            (Code::Unauthenticated, Code::Unauthenticated),
        ];
        for (code, expected) in cases {
            let e = Error::from(Status::new(code, "m"));
            assert_eq!(e.code(), expected, "{code:?} -> {e:?}");
        }
        assert!(matches!(
            Error::from(Status::aborted("stale")),
            Error::Conflict { .. }
        ));
    }

    #[test]
    fn bad_request_details_become_field_violations() {
        let status = Status::with_error_details(
            Code::InvalidArgument,
            "invalid contact.email, payment.iban",
            ErrorDetails::with_bad_request(vec![
                tonic_types::FieldViolation::new("contact.email", "not a valid e-mail address"),
                tonic_types::FieldViolation::new("payment.iban", "checksum fails"),
            ]),
        );
        let e = Error::from(status);
        let Error::InvalidArgument {
            message,
            field_violations,
        } = &e
        else {
            panic!("{e:?}");
        };
        assert_eq!(message, "invalid contact.email, payment.iban");
        assert_eq!(
            field_violations,
            &[
                FieldViolation {
                    field: "contact.email".into(),
                    description: "not a valid e-mail address".into()
                },
                FieldViolation {
                    field: "payment.iban".into(),
                    description: "checksum fails".into()
                },
            ]
        );
        assert_eq!(e.field_violations().len(), 2);
    }

    #[test]
    fn the_request_id_comes_from_the_header_or_else_the_message() {
        let quoted = Status::internal("internal error (request id abc-123)");
        assert_eq!(Error::from(quoted).request_id(), Some("abc-123"));
        let mut status = Status::internal("internal error (request id abc-123)");
        status
            .metadata_mut()
            .insert("x-request-id", "from-header".parse().unwrap());
        let e = Error::from(status);
        assert!(matches!(&e, Error::Internal { request_id: Some(id), .. } if id == "from-header"));
        assert_eq!(
            Error::from(Status::unavailable("retry (request id r-9)")).request_id(),
            Some("r-9")
        );
        assert_eq!(Error::from(Status::data_loss("x")).request_id(), None);
    }

    #[test]
    fn local_failures_are_transport_or_deadline_not_server_answers() {
        let refused = Status::from_error(Box::new(tonic::ConnectError(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        )));
        let e = Error::from(refused);
        assert!(matches!(e, Error::Transport { .. }), "{e:?}");
        assert!(e.is_retryable());

        let timed_out = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        let e = Error::from(timed_out);
        assert!(matches!(e, Error::DeadlineExceeded { .. }), "{e:?}");
        assert!(!e.is_retryable());
        // The server's timer on the sent grpc-timeout: tonic answers CANCELLED.
        let e = Error::from(Status::cancelled("Timeout expired"));
        assert!(matches!(e, Error::DeadlineExceeded { .. }), "{e:?}");

        let e = Error::from(Status::unavailable("kluis cannot serve this now"));
        assert!(matches!(e, Error::Unavailable { .. }), "{e:?}");
        assert!(e.is_retryable());
        assert!(!Error::from(Status::not_found("x")).is_retryable());
        assert!(!Error::from(Status::cancelled("x")).is_retryable());
    }

    #[test]
    fn a_batch_item_error_maps_like_a_status() {
        assert!(matches!(
            Error::from_item(5, "subject not found".into()),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            Error::from_item(99, "?".into()),
            Error::Unknown { .. }
        ));
    }
}
