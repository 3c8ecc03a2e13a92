//! The disclosure register (the statement's "Verstrekking"): data goes only to a recipient the
//! policy names for the purpose, or to an authority under `legal-demand` with the legal basis its
//! demand states. Each entry names field paths, never values.

use std::sync::Arc;

use uuid::Uuid;

use super::{
    DomainError, FieldPath, Vault, Violation,
    access::{Access, parse_reference},
    call::Draft,
};
use crate::{
    policy::Role,
    store::{DisclosureRow, StoreError, WriteOp},
};

/// The purpose under which an authority's demand is answered.
pub const LEGAL_DEMAND: &str = "legal-demand";
/// How far in the future `disclosed_at` may lie (clock skew between systems).
const FUTURE_TOLERANCE_US: i64 = 300 * 1_000_000;
/// Longest recipient name or legal basis text.
const MAX_TEXT: usize = 120;

/// A disclosure as a caller reports it, parsed at the edge except against the policy.
pub struct NewDisclosure {
    pub subject: Uuid,
    pub recipient: String,
    pub paths: Vec<String>,
    pub reference: String,
    pub disclosed_at: Option<i64>,
    pub legal_basis: String,
}

pub struct Disclosures {
    vault: Arc<Vault>,
}

impl Disclosures {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }

    /// Records a disclosure under the caller's purpose. `InvalidArgument` for a recipient the
    /// purpose does not name (listing those it does), a path the purpose does not grant, a
    /// missing legal basis under `legal-demand`, or a time in the future; `NotFound` for an
    /// unknown subject.
    pub async fn record(
        &self,
        access: &Access,
        new: NewDisclosure,
        draft: &mut Draft,
    ) -> Result<DisclosureRow, DomainError> {
        draft.subject(new.subject);
        let policy = &self.vault.policy;
        let purpose = policy
            .purpose(&access.purpose)
            .ok_or_else(|| DomainError::Internal("declared purpose vanished".into()))?;
        let mut violations = Vec::new();
        let (recipient, legal_basis) = if purpose.name == LEGAL_DEMAND {
            let recipient = plain_text(&new.recipient, "recipient", &mut violations);
            let basis = plain_text(&new.legal_basis, "legal_basis", &mut violations);
            (recipient, basis)
        } else {
            if !new.legal_basis.trim().is_empty() {
                violations.push(Violation::new(
                    "legal_basis",
                    format!(
                        "is given only under {LEGAL_DEMAND}; under {} the purpose's own basis applies",
                        purpose.name
                    ),
                ));
            }
            if !purpose.recipients.iter().any(|r| r == new.recipient.trim()) {
                violations.push(Violation::new(
                    "recipient",
                    if purpose.recipients.is_empty() {
                        format!(
                            "purpose {} names no recipients: nothing may be disclosed under it",
                            purpose.name
                        )
                    } else {
                        format!(
                            "not a recipient the policy names for purpose {}; it names: {}",
                            purpose.name,
                            purpose.recipients.join(", ")
                        )
                    },
                ));
            }
            (
                new.recipient.trim().to_owned(),
                purpose.legal_basis.as_str().to_owned(),
            )
        };
        let mut paths = Vec::new();
        if new.paths.is_empty() {
            violations.push(Violation::new("paths", "name the field paths disclosed"));
        }
        for (i, text) in new.paths.iter().enumerate() {
            match FieldPath::from_leaf(text.trim()) {
                Some(p) if purpose.paths.contains(p) => paths.push(p.as_str().to_owned()),
                Some(p) => violations.push(Violation::new(
                    format!("paths[{i}]"),
                    format!("purpose {} does not grant {}", purpose.name, p.as_str()),
                )),
                None => {
                    violations.push(Violation::new(format!("paths[{i}]"), "unknown field path"))
                }
            }
        }
        paths.sort();
        paths.dedup();
        let reference = match parse_reference(&new.reference) {
            Ok(r) => r,
            Err(_) => {
                violations.push(Violation::new(
                    "reference",
                    "give the disclosure's reference (an order or case number: letters, digits, -_.:/)",
                ));
                String::new()
            }
        };
        let now = self.vault.clock.now_us();
        let disclosed_at = new.disclosed_at.unwrap_or(now);
        if disclosed_at > now + FUTURE_TOLERANCE_US {
            violations.push(Violation::new("disclosed_time", "lies in the future"));
        }
        if !violations.is_empty() {
            return Err(DomainError::InvalidArgument(violations));
        }
        let row = DisclosureRow {
            id: Uuid::new_v4().to_string(),
            subject: new.subject,
            recipient,
            purpose: purpose.name.clone(),
            legal_basis,
            paths,
            reference,
            disclosed_at,
            recorded_at: now,
            recorded_by: access.caller.id.clone(),
        };
        draft.event.detail = format!("disclosure={} paths={}", row.id, row.paths.join(","));
        self.vault
            .store
            .write_audited(
                WriteOp::RecordDisclosure(row.clone()),
                draft.committed_record(),
            )
            .await
            .map_err(|e| match e {
                StoreError::NotFound => DomainError::NotFound,
                other => other.into(),
            })?;
        draft.committed = true;
        Ok(row)
    }

    /// A subject's disclosures. Operators only.
    pub async fn list(
        &self,
        access: &Access,
        id: Uuid,
        draft: &mut Draft,
    ) -> Result<Vec<DisclosureRow>, DomainError> {
        draft.subject(id);
        if access.caller.role != Role::Operator {
            return Err(DomainError::PermissionDenied(format!(
                "the disclosure register is read by operators; caller has role {}",
                access.caller.role
            )));
        }
        if self.vault.store.subject(id).await?.is_none() {
            return Err(DomainError::NotFound);
        }
        Ok(self.vault.store.disclosures(id).await?)
    }
}

/// A recipient name or legal basis under `legal-demand`: one line of printable text.
fn plain_text(text: &str, field: &str, violations: &mut Vec<Violation>) -> String {
    let t = text.trim();
    if t.is_empty() {
        violations.push(Violation::new(field, "required under legal-demand"));
    } else if t.chars().count() > MAX_TEXT || t.chars().any(char::is_control) {
        violations.push(Violation::new(
            field,
            format!("one line of at most {MAX_TEXT} characters"),
        ));
    }
    t.to_owned()
}
