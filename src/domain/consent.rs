//! A subject's say over opt-out and consent-based purposes: objections and consent with their
//! full history, the marketing audience with fresh unsubscribe handles, and redeeming a handle
//! from a mail's link (the statement's "Reclame": objection at any time, by three routes).

use std::{sync::Arc, time::Duration};

use uuid::Uuid;

use super::{DomainError, FieldPath, Vault, access::Access, call::Draft};
use crate::{
    crypto::{SecretKey, new_unsubscribe_handle, unsubscribe_handle_hash},
    policy::{Objection, PathSet, Role},
    store::{ConsentChange, ConsentEventRow, StoreError, WriteOp, WriteOutcome},
};

/// Subjects per page of the marketing audience (one commit of their handles and the page's audit
/// event).
pub const AUDIENCE_PAGE: u32 = 100;

/// How a subject objected or consented (DESIGN.md §2: unsubscribe link, account, portal;
/// operators record too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentRoute {
    UnsubscribeLink,
    Account,
    Portal,
    Operator,
}

impl ConsentRoute {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentRoute::UnsubscribeLink => "unsubscribe-link",
            ConsentRoute::Account => "account",
            ConsentRoute::Portal => "portal",
            ConsentRoute::Operator => "operator",
        }
    }
}

/// What a subject decided about purposes, now and over time.
#[derive(Debug, Clone, Default)]
pub struct ConsentHistory {
    pub objected: Vec<String>,
    pub consented: Vec<String>,
    pub events: Vec<ConsentEventRow>,
}

/// One subject the mailer may mail: its id, e-mail address and a fresh unsubscribe handle.
pub struct Recipient {
    pub id: Uuid,
    pub email: String,
    pub handle: String,
}

/// A page of the audience and where the next one starts (None: this was the last).
pub struct AudiencePage {
    pub recipients: Vec<Recipient>,
    pub next: Option<Uuid>,
}

pub struct Consent {
    vault: Arc<Vault>,
    token_key: SecretKey,
    /// How long an unsubscribe token stays redeemable.
    token_validity: Duration,
}

impl Consent {
    pub fn new(vault: Arc<Vault>, token_key: SecretKey, token_validity: Duration) -> Self {
        Self {
            vault,
            token_key,
            token_validity,
        }
    }

    fn validity_us(&self) -> i64 {
        i64::try_from(self.token_validity.as_micros()).unwrap_or(i64::MAX)
    }

    /// Deletes the unsubscribe tokens older than their validity; how many.
    pub async fn prune_tokens(&self) -> Result<u64, DomainError> {
        let cutoff = self.vault.clock.now_us().saturating_sub(self.validity_us());
        Ok(self.vault.store.prune_unsubscribe_tokens(cutoff).await?)
    }

    /// Prunes expired unsubscribe tokens once a day, in the background.
    pub fn spawn_token_pruning(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let consent = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(24 * 3600));
            loop {
                tick.tick().await;
                match consent.prune_tokens().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tokens = n, "expired unsubscribe tokens pruned"),
                    Err(e) => tracing::warn!(error = %e, "pruning unsubscribe tokens failed"),
                }
            }
        })
    }

    /// Records the subject's objection against `purpose`. Refused (`FailedPrecondition`, naming
    /// the legal basis) for a purpose based on a legal obligation or a contract; the operator
    /// route only for operators. Returns whether it is new and since when it stands.
    pub async fn object(
        &self,
        access: &Access,
        id: Uuid,
        purpose: &str,
        route: ConsentRoute,
        draft: &mut Draft,
    ) -> Result<(bool, i64), DomainError> {
        draft.subject(id);
        let target =
            self.purpose_of_kind(purpose, &[Objection::OptOut, Objection::ConsentBased])?;
        check_route(access, route)?;
        draft.event.detail = format!("objection={target} route={}", route.as_str());
        match self
            .write(
                WriteOp::Object(self.change(access, id, target, route)),
                draft,
            )
            .await?
        {
            WriteOutcome::Objected { new, since } => Ok((new, since)),
            other => Err(unexpected("objection", &other)),
        }
    }

    /// Withdraws the subject's objection against `purpose`; returns whether there was one. A role
    /// that itself uses the purpose (the mailer, for `marketing`) may record an objection (the
    /// unsubscribe link) but never withdraw one: only the subject, through the account, the portal
    /// or an operator, can.
    pub async fn withdraw_objection(
        &self,
        access: &Access,
        id: Uuid,
        purpose: &str,
        route: ConsentRoute,
        draft: &mut Draft,
    ) -> Result<bool, DomainError> {
        draft.subject(id);
        let target =
            self.purpose_of_kind(purpose, &[Objection::OptOut, Objection::ConsentBased])?;
        check_route(access, route)?;
        self.not_a_user_of(access, &target, "withdraw objections against")?;
        draft.event.detail = format!("withdraw-objection={target} route={}", route.as_str());
        match self
            .write(
                WriteOp::WithdrawObjection(self.change(access, id, target, route)),
                draft,
            )
            .await?
        {
            WriteOutcome::Withdrawn { existed } => Ok(existed),
            other => Err(unexpected("withdrawal", &other)),
        }
    }

    /// Records consent for a consent-based purpose; returns whether it is new and since when it
    /// stands. Only the subject's own routes (account, portal) or an operator can grant it, never
    /// a role that uses the purpose.
    pub async fn grant(
        &self,
        access: &Access,
        id: Uuid,
        purpose: &str,
        route: ConsentRoute,
        draft: &mut Draft,
    ) -> Result<(bool, i64), DomainError> {
        draft.subject(id);
        let target = self.purpose_of_kind(purpose, &[Objection::ConsentBased])?;
        check_route(access, route)?;
        if route == ConsentRoute::UnsubscribeLink {
            return Err(DomainError::invalid(
                "route",
                "consent is given through the account, the portal or an operator, not an unsubscribe link",
            ));
        }
        self.not_a_user_of(access, &target, "grant consent for")?;
        draft.event.detail = format!("grant-consent={target} route={}", route.as_str());
        match self
            .write(
                WriteOp::GrantConsent(self.change(access, id, target, route)),
                draft,
            )
            .await?
        {
            WriteOutcome::ConsentGranted { new, since } => Ok((new, since)),
            other => Err(unexpected("consent", &other)),
        }
    }

    /// Withdraws consent for a consent-based purpose; returns whether consent was in force.
    /// Reads under the purpose stop at once.
    pub async fn withdraw_consent(
        &self,
        access: &Access,
        id: Uuid,
        purpose: &str,
        route: ConsentRoute,
        draft: &mut Draft,
    ) -> Result<bool, DomainError> {
        draft.subject(id);
        let target = self.purpose_of_kind(purpose, &[Objection::ConsentBased])?;
        check_route(access, route)?;
        draft.event.detail = format!("withdraw-consent={target} route={}", route.as_str());
        match self
            .write(
                WriteOp::WithdrawConsent(self.change(access, id, target, route)),
                draft,
            )
            .await?
        {
            WriteOutcome::ConsentWithdrawn { existed } => Ok(existed),
            other => Err(unexpected("consent withdrawal", &other)),
        }
    }

    /// The subject's objections and consents in force and their history. Operators, or a role
    /// acting for the subject under `account` or `portal`.
    pub async fn history(
        &self,
        access: &Access,
        id: Uuid,
        draft: &mut Draft,
    ) -> Result<ConsentHistory, DomainError> {
        draft.subject(id);
        if access.caller.role != Role::Operator
            && !matches!(access.purpose.as_str(), "account" | "portal")
        {
            return Err(DomainError::PermissionDenied(format!(
                "a subject's consent history is shown under account, portal or (operators) \
                 subject-request, not under purpose {}",
                access.purpose
            )));
        }
        self.history_of(id).await
    }

    /// The history without a caller check (explanations and exports include it).
    pub(crate) async fn history_of(&self, id: Uuid) -> Result<ConsentHistory, DomainError> {
        let store = &self.vault.store;
        if store.subject(id).await?.is_none() {
            return Err(DomainError::NotFound);
        }
        let (objected, consented) = store.consent_state(id).await?;
        Ok(ConsentHistory {
            objected,
            consented,
            events: store.consent_events(id).await?,
        })
    }

    /// One page of the subjects that may be mailed under the caller's purpose, after `after`:
    /// those with an e-mail address the caller may read, not objected (or, consent-based, with
    /// consent), not restricted, and not kept only for a legal retention. Each gets a fresh
    /// handle; the handles' hashes commit with the page's audit event before the page is
    /// answered.
    pub async fn audience(
        &self,
        access: &Access,
        after: Option<Uuid>,
        draft: &mut Draft,
    ) -> Result<AudiencePage, DomainError> {
        let email = FieldPath::ContactEmail;
        let consent_based = match access.objection {
            Objection::OptOut => false,
            Objection::ConsentBased => true,
            Objection::NotObjectable => {
                return Err(DomainError::FailedPrecondition(format!(
                    "purpose {} is neither opt-out nor consent-based: it has no mailing audience",
                    access.purpose
                )));
            }
        };
        if !access.grant.read.contains(email) {
            return Err(DomainError::PermissionDenied(format!(
                "purpose {} does not let role {} read contact.email",
                access.purpose, access.caller.role
            )));
        }
        let vault = &self.vault;
        let rows = vault
            .store
            .audience_page(&access.purpose, consent_based, after, AUDIENCE_PAGE)
            .await?;
        let next = (rows.len() == AUDIENCE_PAGE as usize)
            .then(|| rows.last().map(|r| r.id))
            .flatten();
        let mut recipients = Vec::with_capacity(rows.len());
        let mut tokens = Vec::with_capacity(rows.len());
        vault.ensure_keks(&rows).await;
        for row in &rows {
            if vault
                .hidden(access, row.retention.as_deref())?
                .contains(email)
            {
                continue;
            }
            let (view, _) = vault.open_row(row, PathSet::from_paths([email]))?;
            let Some(address) = view
                .fields
                .get(&email)
                .and_then(|f| f.value.as_text())
                .map(str::to_owned)
            else {
                continue;
            };
            let (handle, hash) = new_unsubscribe_handle(&self.token_key)?;
            tokens.push((hash.to_vec(), row.id));
            draft.subject(row.id);
            recipients.push(Recipient {
                id: row.id,
                email: address,
                handle,
            });
        }
        draft.read(PathSet::from_paths([email]));
        draft.event.detail = format!("audience={} page={}", access.purpose, recipients.len());
        if !tokens.is_empty() {
            let op = WriteOp::IssueTokens {
                tokens,
                purpose: access.purpose.clone(),
                at: vault.clock.now_us(),
            };
            self.write(op, draft).await?;
        }
        Ok(AudiencePage { recipients, next })
    }

    /// Redeems an unsubscribe handle: the objection against the purpose it was issued for, by
    /// the unsubscribe link. Returns the purpose and whether the handle had been redeemed before
    /// (then nothing changes). A text that is no issued handle, or one older than the tokens'
    /// validity, is `NotFound`.
    pub async fn redeem(
        &self,
        access: &Access,
        handle: &str,
        draft: &mut Draft,
    ) -> Result<(String, bool), DomainError> {
        let hash = unsubscribe_handle_hash(&self.token_key, handle.trim()).ok_or(
            DomainError::NotFoundNamed {
                what: "unsubscribe token",
            },
        )?;
        draft.event.detail = "unsubscribe".into();
        let now = self.vault.clock.now_us();
        let issued_after = now.saturating_sub(self.validity_us());
        // The audit event names the subject (the caller is never told it).
        let subject = self
            .vault
            .store
            .unsubscribe_token_subject(&hash, issued_after)
            .await?
            .ok_or(DomainError::NotFoundNamed {
                what: "unsubscribe token",
            })?;
        draft.subject(subject);
        let op = WriteOp::RedeemToken {
            hash: hash.to_vec(),
            at: now,
            caller: access.caller.id.clone(),
            issued_after,
        };
        match self.write(op, draft).await {
            Ok(WriteOutcome::TokenRedeemed { already, purpose }) => Ok((purpose, already)),
            Ok(other) => Err(unexpected("unsubscribe", &other)),
            Err(DomainError::NotFound) => Err(DomainError::NotFoundNamed {
                what: "unsubscribe token",
            }),
            Err(e) => Err(e),
        }
    }

    fn change(
        &self,
        access: &Access,
        id: Uuid,
        purpose: String,
        route: ConsentRoute,
    ) -> ConsentChange {
        ConsentChange {
            id,
            purpose,
            route: route.as_str().to_owned(),
            at: self.vault.clock.now_us(),
            caller: access.caller.id.clone(),
        }
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

    /// The purpose named, if the policy gives it one of `kinds`; else the refusal naming its
    /// legal basis (DESIGN.md §2: objection only against legitimate interest and consent).
    fn purpose_of_kind(&self, purpose: &str, kinds: &[Objection]) -> Result<String, DomainError> {
        let def = self
            .vault
            .policy
            .purpose(purpose.trim())
            .ok_or_else(|| DomainError::invalid("purpose", "unknown purpose"))?;
        if kinds.contains(&def.objection) {
            return Ok(def.name.clone());
        }
        Err(DomainError::FailedPrecondition(match def.objection {
            Objection::NotObjectable => format!(
                "purpose {} rests on {}: no objection is possible against it",
                def.name,
                def.legal_basis.as_str(),
            ),
            _ => format!(
                "purpose {} is not consent-based (it rests on {}); object to it instead",
                def.name,
                def.legal_basis.as_str(),
            ),
        }))
    }

    /// Refuses a role that itself acts under `purpose` (operators excepted).
    fn not_a_user_of(&self, access: &Access, purpose: &str, what: &str) -> Result<(), DomainError> {
        let role = access.caller.role;
        if role != Role::Operator && self.vault.policy.grant(role, purpose).is_some() {
            return Err(DomainError::PermissionDenied(format!(
                "role {role} acts under purpose {purpose} and may not {what} it"
            )));
        }
        Ok(())
    }
}

/// The operator route is for operators only.
fn check_route(access: &Access, route: ConsentRoute) -> Result<(), DomainError> {
    if route == ConsentRoute::Operator && access.caller.role != Role::Operator {
        return Err(DomainError::PermissionDenied(format!(
            "route OPERATOR is for operators, not role {}",
            access.caller.role
        )));
    }
    Ok(())
}

fn unexpected(what: &str, outcome: &WriteOutcome) -> DomainError {
    DomainError::Internal(format!("{what} answered {outcome:?}"))
}
