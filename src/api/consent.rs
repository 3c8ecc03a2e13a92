//! `kluis.v1.ConsentService`: objections and consent by route with their history, the marketing
//! audience with unsubscribe tokens, and redeeming a token from a mail's link.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{
    auth::{RequestContext, context},
    call::Calls,
    convert, pb,
};
use crate::domain::{
    DomainError,
    consent::{Consent, ConsentHistory, ConsentRoute},
};

pub struct ConsentApi {
    consent: Arc<Consent>,
    calls: Calls,
}

impl ConsentApi {
    pub fn new(consent: Arc<Consent>, calls: Calls) -> Self {
        Self { consent, calls }
    }
}

fn route(value: i32) -> Result<ConsentRoute, DomainError> {
    match pb::ObjectionRoute::try_from(value) {
        Ok(pb::ObjectionRoute::UnsubscribeLink) => Ok(ConsentRoute::UnsubscribeLink),
        Ok(pb::ObjectionRoute::Account) => Ok(ConsentRoute::Account),
        Ok(pb::ObjectionRoute::Portal) => Ok(ConsentRoute::Portal),
        Ok(pb::ObjectionRoute::Operator) => Ok(ConsentRoute::Operator),
        Ok(pb::ObjectionRoute::Unspecified) | Err(_) => Err(DomainError::invalid(
            "route",
            "name the route: UNSUBSCRIBE_LINK, ACCOUNT, PORTAL or OPERATOR",
        )),
    }
}

fn route_to_pb(route: &str) -> pb::ObjectionRoute {
    match route {
        "unsubscribe-link" => pb::ObjectionRoute::UnsubscribeLink,
        "account" => pb::ObjectionRoute::Account,
        "portal" => pb::ObjectionRoute::Portal,
        "operator" => pb::ObjectionRoute::Operator,
        _ => pb::ObjectionRoute::Unspecified,
    }
}

fn action_to_pb(action: &str) -> pb::ConsentAction {
    match action {
        "object" => pb::ConsentAction::Object,
        "withdraw-objection" => pb::ConsentAction::WithdrawObjection,
        "grant" => pb::ConsentAction::Grant,
        "withdraw-consent" => pb::ConsentAction::WithdrawConsent,
        _ => pb::ConsentAction::Unspecified,
    }
}

/// The subject, purpose and route every change names, parsed at the edge.
fn parse(
    subject_id: &str,
    purpose: &str,
    route_value: i32,
) -> Result<(Uuid, String, ConsentRoute), DomainError> {
    let id = convert::subject_id("subject_id", subject_id)
        .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
    if purpose.trim().is_empty() {
        return Err(DomainError::invalid("purpose", "name the purpose"));
    }
    Ok((id, purpose.trim().to_owned(), route(route_value)?))
}

pub fn history_to_pb(history: ConsentHistory) -> pb::GetConsentHistoryResponse {
    pb::GetConsentHistoryResponse {
        objected_purposes: history.objected,
        consented_purposes: history.consented,
        events: history
            .events
            .into_iter()
            .map(|e| pb::ConsentEvent {
                purpose: e.purpose,
                action: action_to_pb(&e.action) as i32,
                route: route_to_pb(&e.route) as i32,
                time: Some(convert::to_timestamp(e.at)),
                caller: e.caller,
            })
            .collect(),
    }
}

type AudienceStream =
    Pin<Box<dyn Stream<Item = Result<pb::ListMarketingAudienceResponse, Status>> + Send>>;

/// Where the audience stream stands: the next page starts after `after`; `done` once the last
/// page (or an error) went out.
struct Cursor {
    consent: Arc<Consent>,
    calls: Calls,
    ctx: RequestContext,
    after: Option<Uuid>,
    done: bool,
}

impl Cursor {
    /// The next page, with its own audit event (the subjects it lists and the path read),
    /// durable, together with its handles, before the page goes out.
    async fn next_page(&mut self) -> Result<pb::ListMarketingAudienceResponse, Status> {
        let mut draft = self.calls.open(&self.ctx);
        let result = async {
            let access = self.calls.authorize(&self.ctx)?;
            self.consent.audience(&access, self.after, &mut draft).await
        }
        .await;
        let page = self.calls.finish(&self.ctx, draft, result).await?;
        self.after = page.next;
        self.done = page.next.is_none();
        Ok(pb::ListMarketingAudienceResponse {
            recipients: page
                .recipients
                .into_iter()
                .map(|r| pb::MarketingRecipient {
                    subject_id: r.id.to_string(),
                    email: r.email,
                    unsubscribe_token: r.handle,
                })
                .collect(),
        })
    }
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
            let (id, purpose, route) = parse(&req.subject_id, &req.purpose, req.route)?;
            self.consent
                .object(&access, id, &purpose, route, &mut draft)
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
            let (id, purpose, route) = parse(&req.subject_id, &req.purpose, req.route)?;
            self.consent
                .withdraw_objection(&access, id, &purpose, route, &mut draft)
                .await
        }
        .await;
        let withdrawn = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::WithdrawObjectionResponse { withdrawn }))
    }

    async fn grant_consent(
        &self,
        request: Request<pb::GrantConsentRequest>,
    ) -> Result<Response<pb::GrantConsentResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let (id, purpose, route) = parse(&req.subject_id, &req.purpose, req.route)?;
            self.consent
                .grant(&access, id, &purpose, route, &mut draft)
                .await
        }
        .await;
        let (new, at) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::GrantConsentResponse {
            already_granted: !new,
            grant_time: Some(convert::to_timestamp(at)),
        }))
    }

    async fn withdraw_consent(
        &self,
        request: Request<pb::WithdrawConsentRequest>,
    ) -> Result<Response<pb::WithdrawConsentResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let (id, purpose, route) = parse(&req.subject_id, &req.purpose, req.route)?;
            self.consent
                .withdraw_consent(&access, id, &purpose, route, &mut draft)
                .await
        }
        .await;
        let withdrawn = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::WithdrawConsentResponse { withdrawn }))
    }

    async fn get_consent_history(
        &self,
        request: Request<pb::GetConsentHistoryRequest>,
    ) -> Result<Response<pb::GetConsentHistoryResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = convert::subject_id("subject_id", &req.subject_id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            self.consent.history(&access, id, &mut draft).await
        }
        .await;
        let history = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(history_to_pb(history)))
    }

    type ListMarketingAudienceStream = AudienceStream;

    async fn list_marketing_audience(
        &self,
        request: Request<pb::ListMarketingAudienceRequest>,
    ) -> Result<Response<Self::ListMarketingAudienceStream>, Status> {
        let ctx = context(&request)?;
        let mut cursor = Cursor {
            consent: self.consent.clone(),
            calls: self.calls.clone(),
            ctx,
            after: None,
            done: false,
        };
        // The first page is answered as the call's status: a refused call fails at once.
        let first = cursor.next_page().await?;
        let rest = futures_util::stream::unfold(cursor, |mut cursor| async move {
            if cursor.done {
                return None;
            }
            let page = cursor.next_page().await;
            if page.is_err() {
                cursor.done = true;
            }
            Some((page, cursor))
        });
        let stream = futures_util::StreamExt::chain(futures_util::stream::iter([Ok(first)]), rest);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn redeem_unsubscribe_token(
        &self,
        request: Request<pb::RedeemUnsubscribeTokenRequest>,
    ) -> Result<Response<pb::RedeemUnsubscribeTokenResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            self.consent.redeem(&access, &req.token, &mut draft).await
        }
        .await;
        let (purpose, already) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RedeemUnsubscribeTokenResponse {
            already_redeemed: already,
            purpose,
        }))
    }
}
