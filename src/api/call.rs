//! Every kluis call's audit event, opened from the request context before the handler runs and
//! recorded with the call's outcome after it: refused calls included, durable before the answer
//! leaves, and a call whose event cannot be recorded fails (`UNAVAILABLE`) without its data.

use std::sync::Arc;

use tonic::{Code, Status};

use super::{
    auth::RequestContext,
    status::{code_name, to_status},
};
use crate::{
    audit::{AuditEvent, AuditTrail, FORMAT_VERSION},
    clock::Clock,
    domain::{
        DomainError,
        access::{self, Access},
        call::Draft,
    },
    policy::Policy,
};

/// What every service needs to authorise and audit its calls.
#[derive(Clone)]
pub struct Calls {
    pub policy: Arc<Policy>,
    pub trail: Arc<AuditTrail>,
    /// Event times come from the instance's clock (tests move it forward).
    pub clock: Clock,
}

impl Calls {
    /// The call's event with everything the request says (never a value).
    pub fn open(&self, ctx: &RequestContext) -> Draft {
        Draft::new(AuditEvent {
            v: FORMAT_VERSION,
            at_us: self.clock.now_us(),
            method: ctx.method.clone(),
            caller: ctx.caller.id.clone(),
            role: ctx.caller.role.as_str().to_owned(),
            purpose: access::recordable_purpose(&self.policy, &ctx.declared),
            policy_version: self.trail.policy_version().to_owned(),
            request_id: ctx.request_id.clone(),
            peer: ctx.peer.clone(),
            reason: access::recordable_reason(&ctx.declared),
            ..AuditEvent::default()
        })
    }

    /// The caller's access under the purpose it declared.
    pub fn authorize(&self, ctx: &RequestContext) -> Result<Access, DomainError> {
        access::authorize(&self.policy, &ctx.caller, &ctx.declared)
    }

    /// Maps the result to the answer, recording the event unless a write already committed it.
    /// If the event cannot be recorded, the answer is `UNAVAILABLE` and carries no data.
    pub async fn finish<T>(
        &self,
        ctx: &RequestContext,
        mut draft: Draft,
        result: Result<T, DomainError>,
    ) -> Result<T, Status> {
        ctx.audited.store(true, std::sync::atomic::Ordering::SeqCst);
        let answer = result.map_err(|e| to_status(e, &ctx.request_id));
        // A write that committed its event is recorded, whatever happened after.
        if draft.committed {
            return answer;
        }
        let code = answer.as_ref().err().map_or(Code::Ok, Status::code);
        draft.event.outcome = code_name(code).to_owned();
        match self.trail.record(&draft.event).await {
            Ok(()) => answer,
            Err(e) => {
                tracing::error!(request_id = %ctx.request_id, error = %e, "audit event not recorded; call refused");
                Err(Status::unavailable(format!(
                    "the audit trail cannot record this call; nothing was returned (request id {})",
                    ctx.request_id
                )))
            }
        }
    }

    /// Records a call that was answered before its handler ran (undecodable request, unknown
    /// method). The answer is already decided; a failure to record is logged.
    pub async fn record_refusal(&self, ctx: &RequestContext, code: Code) {
        let mut draft = self.open(ctx);
        draft.event.outcome = code_name(code).to_owned();
        if let Err(e) = self.trail.record(&draft.event).await {
            tracing::error!(request_id = %ctx.request_id, error = %e, "audit event of a refused call not recorded");
        }
    }
}
