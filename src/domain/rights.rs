//! Data-subject requests handled by operators (GDPR art. 12–22; the statement's "Inzage, wijzigen
//! en verwijderen"): restriction, rectification, erasure with its legal carve-outs and a signed
//! receipt, and the gathering of everything kluis knows about a subject for the explanation and
//! the export. Every call names who verified the subject's identity and how.

use std::{collections::BTreeMap, sync::Arc};

use ed25519_dalek::{SigningKey, VerifyingKey};
use uuid::Uuid;

use super::{
    DomainError, FieldChanges, FieldPath, SubjectView, Vault,
    access::{Access, parse_reason, parse_reference},
    call::Draft,
    consent::{Consent, ConsentHistory},
    receipt::{self, RECEIPT_FORMAT, Receipt, RetainedEntry, RetainedReason},
    record::SealedRecord,
    retention::{Retention, SubjectRetention, derive_mark},
    vault::Shown,
};
use crate::{
    audit::{AuditEvent, AuditTrail},
    policy::{LegalBasis, PathSet, Policy, lifecycle::Mark, lifecycle::PathState},
    store::{
        AuditFilter, DisclosureRow, ReceiptRow, RecordChange, RecordRow, RestrictionRow,
        StoreError, WriteOp, WriteOutcome,
    },
};

/// The purpose data-subject requests are handled under.
pub const SUBJECT_REQUEST: &str = "subject-request";
/// Most audit events of a subject an export lists (newest kept).
pub const MAX_ACCESS_HISTORY: usize = 10_000;

/// How the operator verified the subject's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerificationMethod {
    PortalSession,
    AccountSession,
    IdDocument,
    EmailOnFile,
}

impl VerificationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            VerificationMethod::PortalSession => "portal-session",
            VerificationMethod::AccountSession => "account-session",
            VerificationMethod::IdDocument => "id-document",
            VerificationMethod::EmailOnFile => "email-on-file",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            VerificationMethod::PortalSession,
            VerificationMethod::AccountSession,
            VerificationMethod::IdDocument,
            VerificationMethod::EmailOnFile,
        ]
        .into_iter()
        .find(|m| m.as_str() == text)
    }
}

/// Who verified the subject's identity, and how; parsed at the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub verified_by: String,
    pub method: VerificationMethod,
}

impl Verification {
    /// `verified_by` is an identifier (never a customer's name); `method` is required.
    pub fn parse(
        verified_by: &str,
        method: Option<VerificationMethod>,
    ) -> Result<Self, DomainError> {
        let mut violations = Vec::new();
        let by = match parse_reference(verified_by) {
            Ok(by) => Some(by),
            Err(_) => {
                violations.push(super::Violation::new(
                    "verification.verified_by",
                    "name who verified the subject's identity (an identifier: letters, digits, -_.:/)",
                ));
                None
            }
        };
        if method.is_none() {
            violations.push(super::Violation::new(
                "verification.method",
                "name how the identity was verified",
            ));
        }
        match (by, method) {
            (Some(verified_by), Some(method)) => Ok(Self {
                verified_by,
                method,
            }),
            _ => Err(DomainError::InvalidArgument(violations)),
        }
    }

    fn detail(&self) -> String {
        format!(
            "verified-by={} method={}",
            self.verified_by,
            self.method.as_str()
        )
    }
}

/// A stored path an erasure keeps, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub path: FieldPath,
    pub reason: RetainedReason,
    pub purposes: Vec<String>,
    pub due_at_us: Option<i64>,
}

/// An erasure's answer: the receipt and its signed form.
#[derive(Debug, Clone)]
pub struct Erasure {
    pub receipt: Receipt,
    pub json: String,
    pub signature: [u8; 64],
}

/// Everything kluis holds about a subject, for the explanation and the export.
pub struct Dossier {
    pub subject: SubjectView,
    pub retention: SubjectRetention,
    pub consent: ConsentHistory,
    pub disclosures: Vec<DisclosureRow>,
    pub restrictions: Vec<RestrictionRow>,
    /// (seq, event), oldest first.
    pub access_history: Vec<(i64, AuditEvent)>,
    pub now_us: i64,
    pub policy_version: String,
}

pub struct Rights {
    vault: Arc<Vault>,
    retention: Arc<Retention>,
    consent: Arc<Consent>,
    trail: Arc<AuditTrail>,
    receipt_key: SigningKey,
}

impl Rights {
    pub fn new(
        vault: Arc<Vault>,
        retention: Arc<Retention>,
        consent: Arc<Consent>,
        trail: Arc<AuditTrail>,
        receipt_key: SigningKey,
    ) -> Self {
        Self {
            vault,
            retention,
            consent,
            trail,
            receipt_key,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.vault.policy
    }

    /// The key receipts are verified with.
    pub fn receipt_public_key(&self) -> VerifyingKey {
        self.receipt_key.verifying_key()
    }

    /// Checks a receipt's signature against this kluis's receipt key.
    pub fn verify_receipt(&self, json: &str, signature: &[u8]) -> Result<Receipt, String> {
        receipt::verify(json, signature, &self.receipt_public_key()).map_err(|e| e.to_string())
    }

    /// Every request: an operator under `subject-request`, with the verification recorded.
    fn admit(
        &self,
        access: &Access,
        what: &str,
        id: Uuid,
        verification: &Verification,
        draft: &mut Draft,
    ) -> Result<(), DomainError> {
        draft.subject(id);
        access.caller.require_operator(what)?;
        if access.purpose != SUBJECT_REQUEST {
            return Err(DomainError::PermissionDenied(format!(
                "{what} is handled under purpose {SUBJECT_REQUEST}, not {}",
                access.purpose
            )));
        }
        access.require_reason_for_values()?;
        draft.event.detail = verification.detail();
        Ok(())
    }

    /// Restricts processing (GDPR art. 18): reads under every purpose but `subject-request` and
    /// `legal-demand` are refused until lifted. Returns the restriction in force, whether new,
    /// and since when.
    pub async fn restrict(
        &self,
        access: &Access,
        verification: &Verification,
        id: Uuid,
        reason: &str,
        draft: &mut Draft,
    ) -> Result<(String, bool, i64), DomainError> {
        self.admit(access, "RestrictProcessing", id, verification, draft)?;
        let reason = parse_reason(reason).map_err(|_| {
            DomainError::invalid(
                "reason",
                "give the restriction's case reference (letters, digits, -_.:/)",
            )
        })?;
        draft.event.detail = format!("restrict {}", verification.detail());
        let op = WriteOp::Restrict {
            id,
            restriction_id: Uuid::new_v4().to_string(),
            reason,
            at: self.vault.clock.now_us(),
            by: access.caller.id.clone(),
        };
        match self.write(op, draft).await? {
            WriteOutcome::Restricted {
                new,
                restriction_id,
                since,
            } => Ok((restriction_id, new, since)),
            other => Err(DomainError::Internal(format!(
                "restriction answered {other:?}"
            ))),
        }
    }

    /// Lifts the restriction in force; returns whether there was one.
    pub async fn lift(
        &self,
        access: &Access,
        verification: &Verification,
        id: Uuid,
        draft: &mut Draft,
    ) -> Result<bool, DomainError> {
        self.admit(access, "LiftRestriction", id, verification, draft)?;
        draft.event.detail = format!("lift-restriction {}", verification.detail());
        let op = WriteOp::LiftRestriction {
            id,
            at: self.vault.clock.now_us(),
            by: access.caller.id.clone(),
        };
        match self.write(op, draft).await? {
            WriteOutcome::RestrictionLifted { existed } => Ok(existed),
            other => Err(DomainError::Internal(format!("lifting answered {other:?}"))),
        }
    }

    /// Corrects paths of the subject: an update under `subject-request`, validated like any
    /// write, recorded with the verification.
    pub async fn rectify(
        &self,
        access: &Access,
        verification: &Verification,
        id: Uuid,
        changes: FieldChanges,
        expected_version: Option<u64>,
        draft: &mut Draft,
    ) -> Result<Shown, DomainError> {
        self.admit(access, "RectifySubject", id, verification, draft)?;
        draft.event.detail = format!("rectify {}", verification.detail());
        let source = Some(format!("rectification:{}", access.caller.id));
        self.vault
            .update(access, id, changes, expected_version, source, draft)
            .await
    }

    /// Erases every stored path without a legal basis and signs a receipt for what was erased
    /// and what stays, with reasons and due dates. With `end_contracts`, the subject's open
    /// records of contract purposes are closed first (their close events, now), so what only
    /// they kept goes too. When nothing must be kept, the subject is crypto-shredded. Records,
    /// purge and receipt commit together with the call's audit event.
    pub async fn erase(
        &self,
        access: &Access,
        verification: &Verification,
        id: Uuid,
        end_contracts: bool,
        draft: &mut Draft,
    ) -> Result<Erasure, DomainError> {
        self.admit(access, "RequestErasure", id, verification, draft)?;
        let policy = &self.vault.policy;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (row, mut records, holds) = self.retention.subject_state(id).await?;
            let now = self.vault.clock.now_us();
            let mut ops = Vec::new();
            let mut contracts_ended = Vec::new();
            if end_contracts {
                for r in records.iter_mut().filter(|r| r.closed_at.is_none()) {
                    let Some(def) = policy.purpose(&r.purpose) else {
                        continue;
                    };
                    let (LegalBasis::Contract, Some(rule)) = (def.legal_basis, &def.retention)
                    else {
                        continue;
                    };
                    r.closed_at = Some(now);
                    r.close_event = Some(rule.close_event.clone());
                    r.closed_by = Some(access.caller.id.clone());
                    contracts_ended.push(format!("{}/{}", r.purpose, r.reference));
                    ops.push(RecordChange::Close {
                        purpose: r.purpose.clone(),
                        reference: r.reference.clone(),
                        event: rule.close_event.clone(),
                        at: now,
                        by: access.caller.id.clone(),
                    });
                }
            }
            let mark = derive_mark(policy, &records, &holds)?;
            let mut record = SealedRecord::decode_blob(&row.record)
                .map_err(|e| DomainError::Internal(format!("subject {id} record: {e}")))?;
            let stored = record.paths();
            let kept = classify(policy, &mark, &records, stored, now);
            let keep = PathSet::from_paths(kept.iter().map(|k| k.path));
            let erased = stored.difference(keep);
            let shred = mark.shreddable(keep);

            let mut steps: Vec<WriteOp> = Vec::new();
            let base = row.retention_version;
            for (n, change) in ops.into_iter().enumerate() {
                steps.push(WriteOp::RetentionChange {
                    subject: id,
                    expected_version: base + n as i64,
                    mark: mark.encode(),
                    due: mark.first_due_us(),
                    change,
                });
            }
            let retention_version = base + steps.len() as i64;
            if shred {
                steps.push(WriteOp::Shred {
                    id,
                    read_version: row.version,
                    retention_version,
                    at: now,
                });
            } else if erased.is_empty() {
                // Nothing to purge: the receipt still speaks for the state it was planned on.
                steps.push(WriteOp::Expect {
                    id,
                    version: row.version,
                    retention_version,
                });
            } else {
                for path in erased.iter() {
                    record.clear(path);
                }
                steps.push(WriteOp::Purge {
                    id,
                    read_version: row.version,
                    retention_version,
                    record: record.to_blob(),
                    updated_at: now,
                    remove_index_paths: erased
                        .iter()
                        .filter(|p| p.index().is_some())
                        .map(FieldPath::as_str)
                        .collect(),
                    mark: mark.encode(),
                    due: mark.next_due_after(now),
                });
            }
            let public = self.receipt_public_key();
            let receipt = Receipt {
                format: RECEIPT_FORMAT.to_owned(),
                receipt_id: Uuid::new_v4().to_string(),
                subject_id: id.to_string(),
                issued_at_us: now,
                key_id: receipt::key_id(&public),
                operator: access.caller.id.clone(),
                verified_by: verification.verified_by.clone(),
                verification_method: verification.method.as_str().to_owned(),
                policy_version: self.trail.policy_version().to_owned(),
                contracts_ended: contracts_ended.clone(),
                erased: erased.iter().map(|p| p.as_str().to_owned()).collect(),
                retained: kept
                    .iter()
                    .map(|k| RetainedEntry {
                        path: k.path.as_str().to_owned(),
                        reason: k.reason,
                        purposes: k.purposes.clone(),
                        due_at_us: k.due_at_us,
                    })
                    .collect(),
                shredded: shred,
            };
            let (json, signature) = receipt::sign(&receipt, &self.receipt_key)
                .map_err(|e| DomainError::Internal(e.to_string()))?;
            steps.push(WriteOp::InsertReceipt(ReceiptRow {
                id: receipt.receipt_id.clone(),
                subject: id,
                issued_at: now,
                receipt: json.clone(),
                signature: signature.to_vec(),
            }));
            let mut attempt = draft.clone();
            attempt.written(erased);
            attempt.event.detail = format!(
                "erasure receipt={} erased={} retained={}{}{} {}",
                receipt.receipt_id,
                erased.len(),
                kept.len(),
                if shred { " shredded" } else { "" },
                if contracts_ended.is_empty() {
                    String::new()
                } else {
                    format!(" contracts-ended={}", contracts_ended.join(","))
                },
                verification.detail(),
            );
            match self
                .vault
                .store
                .write_audited(WriteOp::Sequence(steps), attempt.committed_record())
                .await
            {
                Ok(_) => {
                    attempt.committed = true;
                    *draft = attempt;
                    if mark.first_due_us().is_some() {
                        self.retention.wake_sweeper();
                    }
                    tracing::info!(subject = %id, erased = erased.len(), retained = kept.len(), shredded = shred, "erasure request carried out");
                    return Ok(Erasure {
                        receipt,
                        json,
                        signature,
                    });
                }
                Err(StoreError::VersionMismatch { .. }) if attempts < 10 => {}
                Err(StoreError::NotFound) => return Err(DomainError::NotFound),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Everything kluis holds about a subject: every value with its retention state, records,
    /// holds, consent and its history, disclosures, restrictions, and who accessed it.
    pub async fn dossier(
        &self,
        access: &Access,
        verification: &Verification,
        id: Uuid,
        what: &str,
        draft: &mut Draft,
    ) -> Result<Dossier, DomainError> {
        self.admit(access, what, id, verification, draft)?;
        draft.event.detail = format!("{} {}", what, verification.detail());
        let row = self
            .vault
            .store
            .subject(id)
            .await?
            .ok_or(DomainError::NotFound)?;
        self.vault.ensure_keks([&row]).await;
        let (subject, stored) = self.vault.open_row(&row, PathSet::all())?;
        draft.read(stored);
        let mut scratch = draft.clone();
        let retention = self.retention.status(access, id, &mut scratch).await?;
        let consent = self.consent.history_of(id).await?;
        let store = &self.vault.store;
        let disclosures = store.disclosures(id).await?;
        let restrictions = store.restrictions(id).await?;
        let filter = AuditFilter {
            subject: Some(id),
            ..AuditFilter::default()
        };
        let mut access_history = Vec::new();
        let mut after = 0;
        loop {
            let page = self
                .trail
                .query(&filter, after, 1000)
                .await
                .map_err(|e| DomainError::Unavailable(format!("audit trail: {e}")))?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            let last_page = page.len() < 1000;
            access_history.extend(page);
            if access_history.len() > MAX_ACCESS_HISTORY {
                access_history.drain(..access_history.len() - MAX_ACCESS_HISTORY);
            }
            if last_page {
                break;
            }
        }
        Ok(Dossier {
            subject,
            retention,
            consent,
            disclosures,
            restrictions,
            access_history,
            now_us: self.vault.clock.now_us(),
            policy_version: self.trail.policy_version().to_owned(),
        })
    }

    async fn write(&self, op: WriteOp, draft: &mut Draft) -> Result<WriteOutcome, DomainError> {
        let outcome = self
            .vault
            .store
            .write_audited(op, draft.committed_record())
            .await
            .map_err(|e| match e {
                StoreError::NotFound => DomainError::NotFound,
                other => other.into(),
            })?;
        draft.committed = true;
        Ok(outcome)
    }
}

/// The stored paths a legal basis keeps at `now`, each with the strongest reason: a hold, an open
/// record of a legal obligation, a legal retention, an open contract. Every other stored path
/// has no basis left and may be erased (DESIGN.md §2).
pub(crate) fn classify(
    policy: &Policy,
    mark: &Mark,
    records: &[RecordRow],
    stored: PathSet,
    now: i64,
) -> Vec<Kept> {
    let basis = |purpose: &str| policy.purpose(purpose).map(|p| p.legal_basis);
    let grants = |purpose: &str, path: FieldPath| {
        policy
            .purpose(purpose)
            .is_some_and(|p| p.paths.contains(path))
    };
    let mut out = Vec::new();
    for path in stored.iter() {
        let open: Vec<&RecordRow> = records
            .iter()
            .filter(|r| r.closed_at.is_none() && grants(&r.purpose, path))
            .collect();
        let purposes_of = |rows: &[&RecordRow]| {
            let mut p: Vec<String> = rows.iter().map(|r| r.purpose.clone()).collect();
            p.sort();
            p.dedup();
            p
        };
        let kept = match mark.state(path, now) {
            PathState::Kept => {
                let legal: Vec<&RecordRow> = open
                    .iter()
                    .copied()
                    .filter(|r| basis(&r.purpose) == Some(LegalBasis::LegalObligation))
                    .collect();
                if mark.held {
                    Some((RetainedReason::LegalHold, purposes_of(&open), None))
                } else if !legal.is_empty() {
                    Some((RetainedReason::LegalObligation, purposes_of(&legal), None))
                } else {
                    Some((RetainedReason::ContractInForce, purposes_of(&open), None))
                }
            }
            PathState::Restricted { until_us, held } => {
                let purposes = mark
                    .groups
                    .iter()
                    .filter(|g| g.paths.contains(path) && (g.until_us > now || g.held))
                    .map(|g| g.purpose.clone())
                    .collect();
                if held {
                    Some((RetainedReason::LegalHold, purposes, None))
                } else {
                    Some((RetainedReason::LegalRetention, purposes, Some(until_us)))
                }
            }
            PathState::Due { held: true, .. } => Some((
                RetainedReason::LegalHold,
                mark.groups
                    .iter()
                    .filter(|g| g.paths.contains(path))
                    .map(|g| g.purpose.clone())
                    .collect(),
                None,
            )),
            PathState::Due { held: false, .. } | PathState::NoBasis if mark.held => {
                Some((RetainedReason::LegalHold, Vec::new(), None))
            }
            PathState::Due { held: false, .. } | PathState::NoBasis => None,
        };
        if let Some((reason, purposes, due_at_us)) = kept {
            out.push(Kept {
                path,
                reason,
                purposes,
                due_at_us,
            });
        }
    }
    out
}

/// The stored paths a legal obligation keeps, whatever else keeps them too: an open record of a
/// legal-obligation purpose, a closed record whose retention still runs, or a hold. What the
/// core's EraseSubject may not erase; empty when the subject may be erased outright.
pub(crate) fn legally_kept(
    policy: &Policy,
    records: &[RecordRow],
    holds: &[crate::store::HoldRow],
    stored: PathSet,
    now: i64,
) -> Result<Vec<FieldPath>, DomainError> {
    let mark = derive_mark(policy, records, holds)?;
    let legal_open = records
        .iter()
        .filter(|r| r.closed_at.is_none())
        .filter_map(|r| policy.purpose(&r.purpose))
        .filter(|p| p.legal_basis == LegalBasis::LegalObligation)
        .fold(PathSet::EMPTY, |acc, p| acc.union(p.paths));
    Ok(stored
        .iter()
        .filter(|path| {
            mark.held
                || legal_open.contains(*path)
                || mark
                    .groups
                    .iter()
                    .any(|g| g.paths.contains(*path) && (g.until_us > now || g.held))
        })
        .collect())
}

/// Field paths grouped by category, in vocabulary order (for explanations).
pub fn by_category(paths: PathSet) -> BTreeMap<&'static str, Vec<&'static str>> {
    let mut out: BTreeMap<&'static str, Vec<&'static str>> = BTreeMap::new();
    for p in paths.iter() {
        out.entry(p.category()).or_default().push(p.as_str());
    }
    out
}
