//! `kluis.v1.CredentialService`: customers' portal passwords — set, verify, change.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, call::Calls, convert, pb};
use crate::domain::{
    DomainError,
    credentials::{Credentials, Password},
};

pub struct CredentialApi {
    credentials: Arc<Credentials>,
    calls: Calls,
}

impl CredentialApi {
    pub fn new(credentials: Arc<Credentials>, calls: Calls) -> Self {
        Self { credentials, calls }
    }
}

fn subject(text: &str) -> Result<uuid::Uuid, DomainError> {
    convert::subject_id("subject_id", text).map_err(|v| DomainError::InvalidArgument(vec![v]))
}

/// The customer's address the portal passed on, if any.
fn client_ip(text: &str) -> Result<Option<std::net::IpAddr>, DomainError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| DomainError::invalid("client_ip", "an IPv4 or IPv6 address"))
}

#[tonic::async_trait]
impl pb::credential_service_server::CredentialService for CredentialApi {
    async fn set_password(
        &self,
        request: Request<pb::SetPasswordRequest>,
    ) -> Result<Response<pb::SetPasswordResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = subject(&req.subject_id)?;
            let password = Password::parse(req.password, "password")?;
            self.credentials
                .set(&access, id, password, &mut draft)
                .await
        }
        .await;
        self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::SetPasswordResponse {}))
    }

    async fn verify_password(
        &self,
        request: Request<pb::VerifyPasswordRequest>,
    ) -> Result<Response<pb::VerifyPasswordResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            if req.username.trim().is_empty() {
                return Err(DomainError::invalid("username", "give the username"));
            }
            let password = Password::given(req.password, "password")?;
            self.credentials
                .verify(
                    &access,
                    req.username.trim(),
                    password,
                    client_ip(&req.client_ip)?,
                    &mut draft,
                )
                .await
        }
        .await;
        let found = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::VerifyPasswordResponse {
            valid: found.is_some(),
            subject_id: found.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = subject(&req.subject_id)?;
            let current = Password::given(req.current_password, "current_password")?;
            let new = Password::parse(req.new_password, "new_password")?;
            self.credentials
                .change(
                    &access,
                    id,
                    current,
                    new,
                    client_ip(&req.client_ip)?,
                    &mut draft,
                )
                .await
        }
        .await;
        let changed = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::ChangePasswordResponse { changed }))
    }
}
