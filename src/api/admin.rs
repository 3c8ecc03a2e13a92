//! `kluis.v1.AdminService`: callers and their tokens. Operators only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, convert::to_timestamp, pb, status::to_status};
use crate::domain::{CallerInfo, Callers, Role};

pub struct AdminApi {
    callers: Arc<Callers>,
}

impl AdminApi {
    pub fn new(callers: Arc<Callers>) -> Self {
        Self { callers }
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
        let req = request.into_inner();
        let result = async {
            ctx.caller.require_operator("CreateCallerToken")?;
            let role: Role = req.role.parse()?;
            self.callers.create(&req.name, role).await
        }
        .await;
        let (info, token) = result.map_err(|e| to_status(e, &ctx.request_id))?;
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
        let result = async {
            ctx.caller.require_operator("RevokeCallerToken")?;
            self.callers.revoke(&request.get_ref().id).await
        }
        .await;
        let info = result.map_err(|e| to_status(e, &ctx.request_id))?;
        Ok(Response::new(pb::RevokeCallerTokenResponse {
            caller: Some(caller_message(&info)),
        }))
    }

    async fn list_callers(
        &self,
        request: Request<pb::ListCallersRequest>,
    ) -> Result<Response<pb::ListCallersResponse>, Status> {
        let ctx = context(&request)?;
        let result = async {
            ctx.caller.require_operator("ListCallers")?;
            self.callers.list().await
        }
        .await;
        let callers = result.map_err(|e| to_status(e, &ctx.request_id))?;
        Ok(Response::new(pb::ListCallersResponse {
            callers: callers.iter().map(caller_message).collect(),
        }))
    }
}
