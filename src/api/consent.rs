//! `kluis.v1.ConsentService`: a subject's objection against an opt-out purpose, by its route.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, call::Calls, convert, pb};
use crate::domain::{DomainError, Vault, vault::ObjectionRoute};

pub struct ConsentApi {
    vault: Arc<Vault>,
    calls: Calls,
}

impl ConsentApi {
    pub fn new(vault: Arc<Vault>, calls: Calls) -> Self {
        Self { vault, calls }
    }
}

fn route(value: i32) -> Result<ObjectionRoute, DomainError> {
    match pb::ObjectionRoute::try_from(value) {
        Ok(pb::ObjectionRoute::UnsubscribeLink) => Ok(ObjectionRoute::UnsubscribeLink),
        Ok(pb::ObjectionRoute::Account) => Ok(ObjectionRoute::Account),
        Ok(pb::ObjectionRoute::Portal) => Ok(ObjectionRoute::Portal),
        Ok(pb::ObjectionRoute::Operator) => Ok(ObjectionRoute::Operator),
        Ok(pb::ObjectionRoute::Unspecified) | Err(_) => Err(DomainError::invalid(
            "route",
            "name the route: UNSUBSCRIBE_LINK, ACCOUNT, PORTAL or OPERATOR",
        )),
    }
}

fn purpose_field(purpose: &str) -> Result<&str, DomainError> {
    if purpose.trim().is_empty() {
        Err(DomainError::invalid(
            "purpose",
            "name the purpose objected to",
        ))
    } else {
        Ok(purpose.trim())
    }
}

/// The subject, purpose and route both consent calls name, parsed at the edge.
fn objection<'a>(
    subject_id: &str,
    purpose: &'a str,
    route_value: i32,
) -> Result<(uuid::Uuid, &'a str, ObjectionRoute), DomainError> {
    let id = convert::subject_id("subject_id", subject_id)
        .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
    Ok((id, purpose_field(purpose)?, route(route_value)?))
}

#[tonic::async_trait]
impl pb::consent_service_server::ConsentService for ConsentApi {
    async fn object_to_purpose(
        &self,
        request: Request<pb::ObjectToPurposeRequest>,
    ) -> Result<Response<pb::ObjectToPurposeResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let (id, purpose, route) = objection(&req.subject_id, &req.purpose, req.route)?;
            self.vault
                .object(&access, id, purpose, route, &mut draft)
                .await
        }
        .await;
        let (new, at) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::ObjectToPurposeResponse {
            already_objected: !new,
            object_time: Some(convert::to_timestamp(at)),
        }))
    }

    async fn withdraw_objection(
        &self,
        request: Request<pb::WithdrawObjectionRequest>,
    ) -> Result<Response<pb::WithdrawObjectionResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let (id, purpose, route) = objection(&req.subject_id, &req.purpose, req.route)?;
            self.vault
                .withdraw_objection(&access, id, purpose, route, &mut draft)
                .await
        }
        .await;
        let withdrawn = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::WithdrawObjectionResponse { withdrawn }))
    }
}
