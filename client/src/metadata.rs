//! The interceptor that puts kluis's call metadata on every request: `authorization: Bearer
//! <token>`, `x-kluis-purpose`, `x-kluis-reason` (when given) and the gRPC deadline
//! (`grpc-timeout`), so no call leaves without a token or runs without a deadline.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tonic::{Request, Status, metadata::AsciiMetadataValue, service::Interceptor};

use crate::Error;

/// The metadata one [`Client`](crate::Client) sends; cheap to clone (the values are shared
/// bytes). A header the request already carries (set on a request for a raw stub) wins over the
/// client's default, except `authorization`, which is always the client's token.
#[derive(Clone)]
pub struct CallMetadata {
    /// `None` when the client certificate identifies the caller.
    authorization: Option<AsciiMetadataValue>,
    purpose: Option<AsciiMetadataValue>,
    reason: Option<AsciiMetadataValue>,
    timeout: Duration,
}

impl CallMetadata {
    pub(crate) fn new(
        token: Option<&SecretString>,
        purpose: Option<&str>,
        reason: Option<&str>,
        timeout: Duration,
    ) -> Result<CallMetadata, Error> {
        let authorization = token
            .map(|token| {
                let mut value =
                    AsciiMetadataValue::try_from(format!("Bearer {}", token.expose_secret()))
                        .map_err(|_| Error::config("the token is not a valid header value"))?;
                // Kept out of HPACK's dynamic table and printed as "Sensitive".
                value.set_sensitive(true);
                Ok::<_, Error>(value)
            })
            .transpose()?;
        Ok(CallMetadata {
            authorization,
            purpose: purpose.map(|p| header("purpose", p)).transpose()?,
            reason: reason.map(|r| header("reason", r)).transpose()?,
            timeout,
        })
    }

    /// The declared purpose, if any.
    pub fn purpose(&self) -> Option<&str> {
        self.purpose.as_ref().and_then(|p| p.to_str().ok())
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<&str> {
        self.reason.as_ref().and_then(|r| r.to_str().ok())
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn with_purpose(&self, purpose: Option<&str>) -> Result<CallMetadata, Error> {
        Ok(CallMetadata {
            purpose: purpose.map(|p| header("purpose", p)).transpose()?,
            ..self.clone()
        })
    }

    pub(crate) fn with_reason(&self, reason: Option<&str>) -> Result<CallMetadata, Error> {
        Ok(CallMetadata {
            reason: reason.map(|r| header("reason", r)).transpose()?,
            ..self.clone()
        })
    }

    pub(crate) fn with_timeout(&self, timeout: Duration) -> CallMetadata {
        CallMetadata {
            timeout,
            ..self.clone()
        }
    }
}

/// A purpose or reason as a header value: printable ASCII, not empty.
fn header(what: &str, value: &str) -> Result<AsciiMetadataValue, Error> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::config(format!(
            "the {what} must be printable ASCII without spaces"
        )));
    }
    AsciiMetadataValue::try_from(value)
        .map_err(|_| Error::config(format!("the {what} is not a valid header value")))
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let has_timeout = request.metadata().contains_key("grpc-timeout");
        let metadata = request.metadata_mut();
        // The client's identity only: its token, or none (its certificate) — never a header
        // set on the request by hand.
        match &self.authorization {
            Some(token) => metadata.insert("authorization", token.clone()),
            None => metadata.remove("authorization"),
        };
        if let Some(purpose) = &self.purpose
            && !metadata.contains_key("x-kluis-purpose")
        {
            metadata.insert("x-kluis-purpose", purpose.clone());
        }
        if let Some(reason) = &self.reason
            && !metadata.contains_key("x-kluis-reason")
        {
            metadata.insert("x-kluis-reason", reason.clone());
        }
        if !has_timeout {
            request.set_timeout(self.timeout);
        }
        Ok(request)
    }
}

impl std::fmt::Debug for CallMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMetadata")
            .field(
                "authorization",
                &self
                    .authorization
                    .as_ref()
                    .map_or("none (client certificate)", |_| "Bearer ***"),
            )
            .field("purpose", &self.purpose())
            .field("reason", &self.reason())
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn metadata() -> CallMetadata {
        CallMetadata::new(
            Some(&SecretString::from("kluis_abc_s3cret")),
            Some("order"),
            None,
            Duration::from_secs(3),
        )
        .unwrap()
    }

    #[test]
    fn every_request_gets_token_purpose_and_deadline() {
        let request = metadata().call(Request::new(())).unwrap();
        let m = request.metadata();
        assert_eq!(
            m.get("authorization").unwrap().to_str().unwrap(),
            "Bearer kluis_abc_s3cret"
        );
        assert!(m.get("authorization").unwrap().is_sensitive());
        assert_eq!(m.get("x-kluis-purpose").unwrap(), "order");
        assert!(m.get("x-kluis-reason").is_none());
        assert_eq!(m.get("grpc-timeout").unwrap(), "3000000u");
    }

    #[test]
    fn a_header_set_on_the_request_wins_over_the_default() {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("x-kluis-purpose", "account".parse().unwrap());
        request.set_timeout(Duration::from_millis(250));
        let request = metadata()
            .with_reason(Some("TICKET-7"))
            .unwrap()
            .call(request)
            .unwrap();
        let m = request.metadata();
        assert_eq!(m.get("x-kluis-purpose").unwrap(), "account");
        assert_eq!(m.get("x-kluis-reason").unwrap(), "TICKET-7");
        assert_eq!(m.get("grpc-timeout").unwrap(), "250000u");
    }

    #[test]
    fn debug_never_shows_the_token_and_bad_values_are_refused() {
        let shown = format!("{:?}", metadata());
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("order"), "{shown}");
        assert!(metadata().with_purpose(Some("with space")).is_err());
        assert!(metadata().with_purpose(Some("")).is_err());
        assert!(metadata().with_reason(Some("ticket\n1")).is_err());
        assert!(
            CallMetadata::new(
                Some(&SecretString::from("bad\ntoken")),
                None,
                None,
                Duration::from_secs(1)
            )
            .is_err()
        );
    }
}
