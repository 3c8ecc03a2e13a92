//! Purpose-bound access: what a caller may do under the purpose it declared, decided once per call
//! from the policy file (DESIGN.md §2), and the split of a subject's stored paths into what the
//! caller reads, sees masked, or does not see.

use super::{Caller, DomainError, FieldPath, call::Draft};
use crate::policy::{Grant, Objection, PathSet, Policy};

/// Longest `x-kluis-reason` accepted: a ticket reference, never a note (it is kept in the audit
/// trail for years, beyond any erasure, so it must not be able to hold personal data).
pub const MAX_REASON_CHARS: usize = 64;

/// The metadata a call declared: `x-kluis-purpose` and `x-kluis-reason`, as received.
#[derive(Debug, Clone, Default)]
pub struct Declared {
    pub purpose: Option<String>,
    pub reason: Option<String>,
}

/// A caller authorised to act under one purpose: its grant, and whether it must give a reason.
#[derive(Debug, Clone)]
pub struct Access {
    pub caller: Caller,
    pub purpose: String,
    pub objection: Objection,
    pub grant: Grant,
    /// Every path the purpose itself grants (to any role).
    purpose_paths: PathSet,
    require_reason: bool,
    pub reason: Option<String>,
}

/// The purpose as it may be recorded: a purpose the policy defines, else nothing (a caller's
/// unknown purpose text is not copied into the audit trail).
pub fn recordable_purpose(policy: &Policy, declared: &Declared) -> String {
    declared
        .purpose
        .as_deref()
        .map(str::trim)
        .filter(|p| policy.purpose(p).is_some())
        .unwrap_or_default()
        .to_owned()
}

/// The reason as it may be recorded: only a valid one.
pub fn recordable_reason(declared: &Declared) -> String {
    declared
        .reason
        .as_deref()
        .and_then(|r| parse_reason(r).ok())
        .unwrap_or_default()
}

/// A reason is a reference (`TICKET-1234`, `jira:PRIV-7`, `#4411`): a letter or digit, then up to
/// 63 of letters, digits and `. _ : # / -`. No spaces, so no names or sentences.
pub(crate) fn parse_reason(reason: &str) -> Result<String, DomainError> {
    let reason = reason.trim();
    if !is_reference(reason, MAX_REASON_CHARS) {
        return Err(DomainError::invalid(
            "x-kluis-reason",
            format!(
                "a ticket reference: a letter or digit, then letters, digits and . _ : # / - \
                 ({MAX_REASON_CHARS} at most, no spaces)"
            ),
        ));
    }
    Ok(reason.to_owned())
}

/// Whether `text` is an identifier of another system: a letter or digit, then letters, digits and
/// `. _ : # / -`, at most `max` bytes — never room for a name, a sentence or an e-mail address.
fn is_reference(text: &str, max: usize) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '#' | '/' | '-'))
        && text.len() <= max
}

/// Longest processing-record reference (an invoice number, a contract, account or service id).
pub const MAX_REFERENCE_CHARS: usize = 128;

/// A processing record's reference: an identifier of the caller's system (`INV-2026-0042`,
/// `contract:881`), a letter or digit then letters, digits and `. _ : # / -`. No spaces or `@`, so
/// no names or e-mail addresses (references appear in the audit trail).
pub fn parse_reference(reference: &str) -> Result<String, DomainError> {
    let reference = reference.trim();
    if !is_reference(reference, MAX_REFERENCE_CHARS) {
        return Err(DomainError::invalid(
            "reference",
            format!(
                "an identifier: a letter or digit, then letters, digits and . _ : # / - \
                 ({MAX_REFERENCE_CHARS} at most, no spaces)"
            ),
        ));
    }
    Ok(reference.to_owned())
}

/// Decides whether `caller` may act under the declared purpose.
///
/// Errors: no or an unknown purpose, or an invalid reason → `InvalidArgument`; a purpose the
/// caller's role may not use → `PermissionDenied` naming role and purpose.
pub fn authorize(
    policy: &Policy,
    caller: &Caller,
    declared: &Declared,
) -> Result<Access, DomainError> {
    let name = declared
        .purpose
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            DomainError::invalid(
                "x-kluis-purpose",
                "declare the purpose of the call in the x-kluis-purpose header",
            )
        })?;
    let purpose = policy.purpose(name).ok_or_else(|| {
        let known: Vec<&str> = policy.purposes().map(|p| p.name.as_str()).collect();
        DomainError::invalid(
            "x-kluis-purpose",
            format!("unknown purpose; the policy defines {}", known.join(", ")),
        )
    })?;
    let grant = policy.grant(caller.role, name).ok_or_else(|| {
        DomainError::PermissionDenied(format!(
            "role {} may not act under purpose {name}",
            caller.role
        ))
    })?;
    let reason = match declared.reason.as_deref() {
        Some(r) if !r.trim().is_empty() => Some(parse_reason(r)?),
        _ => None,
    };
    Ok(Access {
        caller: caller.clone(),
        purpose: purpose.name.clone(),
        objection: purpose.objection,
        grant: grant.clone(),
        purpose_paths: purpose.paths,
        require_reason: policy.role(caller.role).require_reason,
        reason,
    })
}

/// How a subject's stored paths divide for one caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Visibility {
    pub read: PathSet,
    pub masked: PathSet,
    pub withheld: PathSet,
}

impl Access {
    /// Roles that must state why they read personal values (operators) have done so.
    pub fn require_reason_for_values(&self) -> Result<(), DomainError> {
        if self.require_reason && self.reason.is_none() {
            return Err(DomainError::invalid(
                "x-kluis-reason",
                format!(
                    "role {} states a reason (e.g. a ticket number) in x-kluis-reason to read personal values",
                    self.caller.role
                ),
            ));
        }
        Ok(())
    }

    /// The paths a read may return: those asked for explicitly (each must be readable or masked
    /// for this caller, else `PermissionDenied` naming them), or everything the grant shows.
    /// A refusal names the paths in the call's audit event too (`denied=…`).
    pub fn readable(&self, asked: &[FieldPath], draft: &mut Draft) -> Result<PathSet, DomainError> {
        let visible = self.grant.read.union(self.grant.masked);
        if asked.is_empty() {
            return Ok(visible);
        }
        let asked = PathSet::from_paths(asked.iter().copied());
        let refused = asked.difference(visible);
        if !refused.is_empty() {
            draft.event.detail = format!("denied={}", path_list(refused).join(","));
            return Err(DomainError::PermissionDenied(format!(
                "purpose {} does not grant role {} the paths {}",
                self.purpose,
                self.caller.role,
                names(refused)
            )));
        }
        Ok(asked)
    }

    /// Refuses a write naming any path outside the write grant (the whole write is refused).
    pub fn check_write(
        &self,
        paths: impl IntoIterator<Item = FieldPath>,
        draft: &mut Draft,
    ) -> Result<(), DomainError> {
        let refused = PathSet::from_paths(paths).difference(self.grant.write);
        if refused.is_empty() {
            Ok(())
        } else {
            draft.event.detail = format!("denied={}", path_list(refused).join(","));
            Err(DomainError::PermissionDenied(format!(
                "purpose {} does not let role {} write {}",
                self.purpose,
                self.caller.role,
                names(refused)
            )))
        }
    }

    /// Splits `stored` (the paths a subject holds) for a read limited to `wanted`.
    pub fn visibility(&self, stored: PathSet, wanted: PathSet) -> Visibility {
        let read = stored.intersection(wanted).intersection(self.grant.read);
        let masked = stored
            .intersection(wanted)
            .intersection(self.grant.masked)
            .difference(read);
        let withheld = self.withheld(stored);
        Visibility {
            read,
            masked,
            withheld,
        }
    }

    /// The stored paths this caller does not get, limited to the paths its purpose concerns: a
    /// caller is told what its purpose would cover but its role may not see, not which other data
    /// the subject has (the mailer learns nothing about a customer's payment or gender paths).
    pub fn withheld(&self, stored: PathSet) -> PathSet {
        stored
            .intersection(self.purpose_paths)
            .difference(self.grant.read)
            .difference(self.grant.masked)
    }
}

/// Paths joined for messages and audit: `a, b, c`.
pub fn names(paths: PathSet) -> String {
    paths
        .iter()
        .map(FieldPath::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Paths as the audit trail lists them.
pub fn path_list(paths: PathSet) -> Vec<String> {
    paths.iter().map(|p| p.as_str().to_owned()).collect()
}
