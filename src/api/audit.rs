//! `kluis.v1.AuditService`: querying and verifying the audit trail. Operators only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, call::Calls, convert, pb};
use crate::{
    audit::{AuditError, AuditEvent, AuditTrail},
    domain::DomainError,
    store::AuditFilter,
};

/// Largest page of QueryAuditLog, and the page when none is asked.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;

pub struct AuditApi {
    trail: Arc<AuditTrail>,
    calls: Calls,
}

impl AuditApi {
    pub fn new(trail: Arc<AuditTrail>, calls: Calls) -> Self {
        Self { trail, calls }
    }
}

fn event_message(seq: i64, e: AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        seq,
        time: Some(convert::to_timestamp(e.at_us)),
        method: e.method,
        caller: e.caller,
        role: e.role,
        purpose: e.purpose,
        policy_version: e.policy_version,
        subject_ids: e.subjects,
        read_paths: e.read,
        written_paths: e.written,
        withheld_paths: e.withheld,
        masked_paths: e.masked,
        outcome: e.outcome,
        request_id: e.request_id,
        peer: e.peer,
        reason: e.reason,
        count: e.count,
        detail: e.detail,
    }
}

/// The database not answering is worth a retry; audit data that does not decode is not.
fn audit_error(e: AuditError) -> DomainError {
    match e {
        AuditError::Store(m) => DomainError::Unavailable(m),
        other => DomainError::Internal(other.to_string()),
    }
}

fn text(value: &str) -> Option<String> {
    (!value.trim().is_empty()).then(|| value.trim().to_owned())
}

/// `PERMISSION_DENIED`, `permission_denied` or grpcurl's `PermissionDenied` as the status name the
/// trail records; anything else is refused.
fn outcome_name(text: &str) -> Result<String, DomainError> {
    let mut name = String::new();
    for (i, c) in text.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 && text.chars().any(|c| c.is_ascii_lowercase()) {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    let name = name.replace("__", "_");
    (0..=16)
        .map(|n| super::status::code_name(tonic::Code::from(n)))
        .find(|known| *known == name)
        .map(str::to_owned)
        .ok_or_else(|| {
            DomainError::invalid(
                "outcome",
                "a gRPC status name, e.g. OK, PERMISSION_DENIED, UNAUTHENTICATED",
            )
        })
}

fn filter(
    req: &pb::QueryAuditLogRequest,
    policy: &crate::policy::Policy,
) -> Result<(AuditFilter, i64, u32), DomainError> {
    if let Some(purpose) = text(&req.purpose)
        && policy.purpose(&purpose).is_none()
    {
        let known: Vec<&str> = policy.purposes().map(|p| p.name.as_str()).collect();
        return Err(DomainError::invalid(
            "purpose",
            format!("unknown purpose; the policy defines {}", known.join(", ")),
        ));
    }
    if let Some(caller) = text(&req.caller)
        && !crate::domain::Caller::is_valid_id(&caller)
    {
        return Err(DomainError::invalid(
            "caller",
            "a caller id (16 hex digits, as ListCallers shows, or tls:<certificate DNS name>), \
             not a name",
        ));
    }
    let subject = match text(&req.subject_id) {
        Some(t) => Some(
            convert::subject_id("subject_id", &t)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?,
        ),
        None => None,
    };
    let after =
        match text(&req.page_token) {
            Some(t) => t.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                DomainError::invalid("page_token", "not a token this service gave")
            })?,
            None => 0,
        };
    let page = match req.page_size {
        0 => DEFAULT_PAGE,
        n if n < 0 => return Err(DomainError::invalid("page_size", "must not be negative")),
        n => u32::try_from(n).unwrap_or(MAX_PAGE).min(MAX_PAGE),
    };
    let time = |field: &str, t: &Option<prost_types::Timestamp>| match t {
        None => Ok(None),
        Some(t) if (0..1_000_000_000).contains(&t.nanos) => Ok(Some(
            t.seconds
                .saturating_mul(1_000_000)
                .saturating_add(i64::from(t.nanos / 1000)),
        )),
        Some(_) => Err(DomainError::invalid(
            field,
            "nanos must be 0 to 999,999,999",
        )),
    };
    Ok((
        AuditFilter {
            subject,
            caller: text(&req.caller),
            purpose: text(&req.purpose),
            method: text(&req.method),
            outcome: text(&req.outcome).map(|o| outcome_name(&o)).transpose()?,
            from_us: time("start_time", &req.start_time)?,
            to_us: time("end_time", &req.end_time)?,
        },
        after,
        page,
    ))
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AuditApi {
    async fn query_audit_log(
        &self,
        request: Request<pb::QueryAuditLogRequest>,
    ) -> Result<Response<pb::QueryAuditLogResponse>, Status> {
        let ctx = context(&request)?;
        let draft = self.calls.open(&ctx);
        let result = async {
            ctx.caller.require_operator("QueryAuditLog")?;
            let (filter, after, page) = filter(request.get_ref(), &self.calls.policy)?;
            if let (Some(from), Some(to)) = (filter.from_us, filter.to_us)
                && from >= to
            {
                return Err(DomainError::invalid("end_time", "must be after start_time"));
            }
            let events = self
                .trail
                .query(&filter, after, page)
                .await
                .map_err(audit_error)?;
            Ok((events, page))
        }
        .await;
        let (events, page) = self.calls.finish(&ctx, draft, result).await?;
        let next_page_token = match events.last() {
            Some((seq, _)) if events.len() == page as usize => seq.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::QueryAuditLogResponse {
            events: events
                .into_iter()
                .map(|(seq, e)| event_message(seq, e))
                .collect(),
            next_page_token,
        }))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<pb::VerifyAuditChainRequest>,
    ) -> Result<Response<pb::VerifyAuditChainResponse>, Status> {
        let ctx = context(&request)?;
        let draft = self.calls.open(&ctx);
        let result = async {
            ctx.caller.require_operator("VerifyAuditChain")?;
            self.trail.verify(&[]).await.map_err(audit_error)
        }
        .await;
        let outcome = self.calls.finish(&ctx, draft, result).await?;
        let response = match outcome {
            Ok(report) => pb::VerifyAuditChainResponse {
                intact: true,
                events_checked: report.events,
                checkpoints_checked: report.checkpoints_checked,
                first_seq: report.first_seq.unwrap_or(0),
                last_seq: report.last_seq.unwrap_or(0),
                last_checkpoint_seq: report.last_checkpoint_seq.unwrap_or(0),
                problem: String::new(),
                broken_at_seq: 0,
            },
            Err(broken) => {
                tracing::error!(seq = broken.seq(), problem = %broken, "audit chain verification failed");
                pb::VerifyAuditChainResponse {
                    intact: false,
                    problem: broken.to_string(),
                    broken_at_seq: broken.seq(),
                    ..Default::default()
                }
            }
        };
        Ok(Response::new(response))
    }
}
