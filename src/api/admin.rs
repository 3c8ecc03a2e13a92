//! `kluis.v1.AdminService`: callers and their tokens. Operators only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, call::Calls, convert::to_timestamp, pb};
use crate::domain::{CallerInfo, Callers, Role};

pub struct AdminApi {
    callers: Arc<Callers>,
    calls: Calls,
}

impl AdminApi {
    pub fn new(callers: Arc<Callers>, calls: Calls) -> Self {
        Self { callers, calls }
    }
}

fn caller_message(info: &CallerInfo) -> pb::Caller {
    pb::Caller {
        id: info.id.clone(),
        name: info.name.clone(),
        role: info.role.clone(),
        create_time: Some(to_timestamp(info.created_at_us)),
        revoke_time: info.revoked_at_us.map(to_timestamp),
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn create_caller_token(
        &self,
        request: Request<pb::CreateCallerTokenRequest>,
    ) -> Result<Response<pb::CreateCallerTokenResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            ctx.caller.require_operator("CreateCallerToken")?;
            let role: Role = req.role.parse()?;
            self.callers
                .create_audited(&req.name, role, &mut draft)
                .await
        }
        .await;
        let (info, token) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::CreateCallerTokenResponse {
            caller: Some(caller_message(&info)),
            token: token.to_string(),
        }))
    }

    async fn revoke_caller_token(
        &self,
        request: Request<pb::RevokeCallerTokenRequest>,
    ) -> Result<Response<pb::RevokeCallerTokenResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let result = async {
            ctx.caller.require_operator("RevokeCallerToken")?;
            self.callers
                .revoke_audited(&request.get_ref().id, &mut draft)
                .await
        }
        .await;
        let info = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RevokeCallerTokenResponse {
            caller: Some(caller_message(&info)),
        }))
    }

    async fn list_callers(
        &self,
        request: Request<pb::ListCallersRequest>,
    ) -> Result<Response<pb::ListCallersResponse>, Status> {
        let ctx = context(&request)?;
        let draft = self.calls.open(&ctx);
        let result = async {
            ctx.caller.require_operator("ListCallers")?;
            self.callers.list().await
        }
        .await;
        let callers = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::ListCallersResponse {
            callers: callers.iter().map(caller_message).collect(),
        }))
    }
}
