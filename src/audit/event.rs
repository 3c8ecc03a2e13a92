//! The audit event: who did what to which subjects' fields, and its exact stored bytes.

use serde::{Deserialize, Serialize};

use super::{AuditError, describe_json_error};

/// The event format version written by this code.
pub const FORMAT_VERSION: u32 = 1;

/// One audit event. Never holds a personal value: ids, field paths, codes only.
///
/// `Default` gives `v = 1` (the current format) and `count = 1` (one occurrence), so
/// `AuditEvent { method, .., ..Default::default() }` builds a valid event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Format version, [`FORMAT_VERSION`].
    pub v: u32,
    /// Microseconds since the Unix epoch.
    pub at_us: i64,
    /// The gRPC method (`kluis.v1.SubjectService/GetSubject`) or an event name (`auth.failed`).
    pub method: String,
    /// Caller id, empty when unauthenticated.
    pub caller: String,
    pub role: String,
    /// Empty when no purpose was declared or the declared one was not valid.
    pub purpose: String,
    pub policy_version: String,
    /// Subject ids (UUID text).
    pub subjects: Vec<String>,
    /// Field paths returned.
    pub read: Vec<String>,
    /// Field paths written.
    pub written: Vec<String>,
    /// Field paths withheld by policy.
    pub withheld: Vec<String>,
    /// Field paths returned masked.
    pub masked: Vec<String>,
    /// gRPC code name: `OK`, `PERMISSION_DENIED`, ...
    pub outcome: String,
    pub request_id: String,
    pub peer: String,
    pub reason: String,
    /// Greater than 1 for aggregated events (failed authentications per peer and minute).
    pub count: u32,
    /// Short machine text, e.g. `route=unsubscribe-link`; never a value.
    pub detail: String,
}

impl Default for AuditEvent {
    fn default() -> Self {
        Self {
            v: FORMAT_VERSION,
            at_us: 0,
            method: String::new(),
            caller: String::new(),
            role: String::new(),
            purpose: String::new(),
            policy_version: String::new(),
            subjects: Vec::new(),
            read: Vec::new(),
            written: Vec::new(),
            withheld: Vec::new(),
            masked: Vec::new(),
            outcome: String::new(),
            request_id: String::new(),
            peer: String::new(),
            reason: String::new(),
            count: 1,
            detail: String::new(),
        }
    }
}

impl AuditEvent {
    /// The exact stored bytes: compact JSON with the fields in declaration order. The chain MAC is
    /// computed over these bytes, so they are stored as they are and never re-encoded.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of strings and integers cannot fail; the empty fallback (which
        // would then fail to decode and show up in verification) only keeps the no-panic rule.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes stored bytes. Every field must be present; unknown fields are ignored.
    pub fn from_bytes(b: &[u8]) -> Result<Self, AuditError> {
        serde_json::from_slice(b).map_err(|e| AuditError::Decode(describe_json_error(&e)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> AuditEvent {
        AuditEvent {
            at_us: 1_767_225_600_123_456,
            method: "kluis.v1.SubjectService/GetSubject".into(),
            caller: "crm".into(),
            role: "service".into(),
            purpose: "customer-support".into(),
            policy_version: "2026-01".into(),
            subjects: vec!["0198c0de-0000-7000-8000-000000000001".into()],
            read: vec!["contact.email".into(), "name.given".into()],
            withheld: vec!["identity.bsn".into()],
            masked: vec!["payment.iban".into()],
            outcome: "OK".into(),
            request_id: "req-1".into(),
            peer: "127.0.0.1".into(),
            detail: "route=ü\"quoted\"".into(),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn default_event_has_current_version_and_count_one() {
        let event = AuditEvent::default();
        assert_eq!(event.v, FORMAT_VERSION);
        assert_eq!(event.count, 1);
    }

    #[test]
    fn to_bytes_round_trips_and_re_encodes_to_identical_bytes() {
        let event = sample();
        let bytes = event.to_bytes();
        let decoded = AuditEvent::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, event);
        assert_eq!(decoded.to_bytes(), bytes);
        // Twice from the same value gives the same bytes too.
        assert_eq!(event.to_bytes(), bytes);
    }

    #[test]
    fn to_bytes_is_compact_json_in_declaration_order() {
        let text = String::from_utf8(AuditEvent::default().to_bytes()).unwrap();
        assert!(text.starts_with(r#"{"v":1,"at_us":0,"method":"","caller":"""#));
        assert!(text.ends_with(r#""count":1,"detail":""}"#));
        assert!(!text.contains(' '));
    }

    #[test]
    fn from_bytes_rejects_garbage_without_echoing_it() {
        let err = AuditEvent::from_bytes(b"{\"v\":1,\"secret-looking\"").unwrap_err();
        assert!(matches!(err, AuditError::Decode(_)));
        assert!(!err.to_string().contains("secret-looking"));
        assert!(AuditEvent::from_bytes(b"{\"v\":1}").is_err());
    }
}
