//! `kluis.v1.AdminService`: callers and their tokens, key rotation and key status. Operators only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    auth::context,
    call::Calls,
    convert::{timestamp, to_timestamp},
    pb,
};
use crate::domain::{
    CallerInfo, Callers, DomainError, Role,
    keys::{KeyVersionInfo, Keys, RootVersionInfo},
};

pub struct AdminApi {
    callers: Arc<Callers>,
    keys: Arc<Keys>,
    calls: Calls,
}

impl AdminApi {
    pub fn new(callers: Arc<Callers>, keys: Arc<Keys>, calls: Calls) -> Self {
        Self {
            callers,
            keys,
            calls,
        }
    }
}

fn key_message(k: &KeyVersionInfo) -> pb::KeyVersion {
    pb::KeyVersion {
        kind: k.kind.clone(),
        version: k.version,
        state: k.state.clone(),
        root_version: k.root_version,
        create_time: Some(to_timestamp(k.created_at_us)),
        retire_time: k.retired_at_us.map(to_timestamp),
        data_keys: k.data_keys,
        indexed_subjects: k.indexed_subjects,
    }
}

fn root_message(r: &RootVersionInfo) -> pb::RootKeyVersion {
    pb::RootKeyVersion {
        version: r.version,
        create_time: Some(to_timestamp(r.created_at_us)),
        retire_time: r.retired_at_us.map(to_timestamp),
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

    async fn rotate_kek(
        &self,
        request: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotateKekResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let result = async {
            ctx.caller.require_operator("RotateKek")?;
            self.keys.rotate_kek(&mut draft).await
        }
        .await;
        let version = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RotateKekResponse { version }))
    }

    async fn retire_kek(
        &self,
        request: Request<pb::RetireKekRequest>,
    ) -> Result<Response<pb::RetireKekResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let version = request.get_ref().version;
        let result = async {
            ctx.caller.require_operator("RetireKek")?;
            if version == 0 {
                return Err(DomainError::invalid("version", "KEK versions start at 1"));
            }
            self.keys.retire_kek(version, &mut draft).await
        }
        .await;
        let retired_now = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RetireKekResponse { retired_now }))
    }

    async fn rotate_index_key(
        &self,
        request: Request<pb::RotateIndexKeyRequest>,
    ) -> Result<Response<pb::RotateIndexKeyResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let result = async {
            ctx.caller.require_operator("RotateIndexKey")?;
            self.keys.rotate_index_key(&mut draft).await
        }
        .await;
        let version = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RotateIndexKeyResponse { version }))
    }

    async fn retire_index_key(
        &self,
        request: Request<pb::RetireIndexKeyRequest>,
    ) -> Result<Response<pb::RetireIndexKeyResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let version = request.get_ref().version;
        let result = async {
            ctx.caller.require_operator("RetireIndexKey")?;
            if version == 0 {
                return Err(DomainError::invalid(
                    "version",
                    "index key versions start at 1",
                ));
            }
            self.keys.retire_index_key(version, &mut draft).await
        }
        .await;
        let retired_now = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RetireIndexKeyResponse { retired_now }))
    }

    async fn key_status(
        &self,
        request: Request<pb::KeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatusResponse>, Status> {
        let ctx = context(&request)?;
        let draft = self.calls.open(&ctx);
        let result = async {
            ctx.caller.require_operator("KeyStatus")?;
            let at = timestamp(request.get_ref().backup_time.as_ref())
                .map_err(|e| DomainError::invalid("backup_time", e))?;
            self.keys.status(at).await
        }
        .await;
        let status = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::KeyStatusResponse {
            root_versions: status.roots.iter().map(root_message).collect(),
            keys: status.keys.iter().map(key_message).collect(),
            active_kek_version: status.active_kek,
            rewrap_pending: status.rewrap_pending,
            active_index_key_version: status.active_index,
            reindex_pending: status.reindex_pending,
            backup: status.backup.map(|b| pb::BackupDependencies {
                backup_time: Some(to_timestamp(b.at_us)),
                root_versions: b.roots.iter().map(root_message).collect(),
                keys: b.keys.iter().map(key_message).collect(),
                unrecoverable: b.unrecoverable,
            }),
        }))
    }
}
