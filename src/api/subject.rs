//! `kluis.v1.SubjectService`: decode and validate, call the vault, encode. No rules live here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, convert, pb, status::to_status};
use crate::domain::{DomainError, FieldPath, Vault, vault::MAX_BATCH_GET};

pub struct SubjectApi {
    vault: Arc<Vault>,
}

impl SubjectApi {
    pub fn new(vault: Arc<Vault>) -> Self {
        Self { vault }
    }
}

fn all_or(paths: Vec<FieldPath>) -> Vec<FieldPath> {
    if paths.is_empty() {
        FieldPath::ALL.to_vec()
    } else {
        paths
    }
}

#[tonic::async_trait]
impl pb::subject_service_server::SubjectService for SubjectApi {
    async fn create_subject(
        &self,
        request: Request<pb::CreateSubjectRequest>,
    ) -> Result<Response<pb::CreateSubjectResponse>, Status> {
        let ctx = context(&request)?;
        let req = request.into_inner();
        let result = async {
            let subject = req.subject.unwrap_or_default();
            let fields = convert::subject_fields(&subject)?;
            let source = convert::source(&req.source)?;
            self.vault.create(&ctx.caller, fields, source).await
        }
        .await;
        let view = result.map_err(|e| to_status(e, &ctx.request_id))?;
        tracing::info!(subject = %view.id, paths = view.fields.len(), "subject created");
        Ok(Response::new(pb::CreateSubjectResponse {
            subject: Some(convert::subject_message(&view, true)),
        }))
    }

    async fn get_subject(
        &self,
        request: Request<pb::GetSubjectRequest>,
    ) -> Result<Response<pb::GetSubjectResponse>, Status> {
        let ctx = context(&request)?;
        let req = request.into_inner();
        let result = async {
            let id = convert::subject_id("id", &req.id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            let paths = all_or(convert::mask_paths(req.read_mask.as_ref(), "read_mask")?);
            let full = convert::full_view(req.view)?;
            Ok((self.vault.get(id, &paths).await?, full))
        }
        .await;
        let (view, full) = result.map_err(|e| to_status(e, &ctx.request_id))?;
        Ok(Response::new(pb::GetSubjectResponse {
            subject: Some(convert::subject_message(&view, full)),
        }))
    }

    async fn update_subject(
        &self,
        request: Request<pb::UpdateSubjectRequest>,
    ) -> Result<Response<pb::UpdateSubjectResponse>, Status> {
        let ctx = context(&request)?;
        let req = request.into_inner();
        let result = async {
            let subject = req.subject.unwrap_or_default();
            let id = convert::subject_id("subject.id", &subject.id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            let paths = convert::mask_paths(req.update_mask.as_ref(), "update_mask")?;
            if paths.is_empty() {
                return Err(DomainError::invalid(
                    "update_mask",
                    "name at least one field path to set",
                ));
            }
            let changes = convert::subject_changes(&subject, &paths)?;
            let source = convert::source(&req.source)?;
            self.vault
                .update(&ctx.caller, id, changes, req.expected_version, source)
                .await
        }
        .await;
        let view = result.map_err(|e| to_status(e, &ctx.request_id))?;
        tracing::info!(subject = %view.id, version = view.version, "subject updated");
        Ok(Response::new(pb::UpdateSubjectResponse {
            subject: Some(convert::subject_message(&view, true)),
        }))
    }

    async fn find_subjects(
        &self,
        request: Request<pb::FindSubjectsRequest>,
    ) -> Result<Response<pb::FindSubjectsResponse>, Status> {
        let ctx = context(&request)?;
        let result = async {
            let key = convert::lookup_key(request.get_ref())?;
            self.vault.find(&key).await
        }
        .await;
        let ids = result.map_err(|e| to_status(e, &ctx.request_id))?;
        Ok(Response::new(pb::FindSubjectsResponse {
            subject_ids: ids.iter().map(|id| id.to_string()).collect(),
        }))
    }

    async fn batch_get_subjects(
        &self,
        request: Request<pb::BatchGetSubjectsRequest>,
    ) -> Result<Response<pb::BatchGetSubjectsResponse>, Status> {
        let ctx = context(&request)?;
        let req = request.into_inner();
        let result = async {
            if req.ids.is_empty() || req.ids.len() > MAX_BATCH_GET {
                return Err(DomainError::invalid(
                    "ids",
                    format!("1 to {MAX_BATCH_GET} ids"),
                ));
            }
            let mut ids = Vec::with_capacity(req.ids.len());
            let mut violations = Vec::new();
            for (i, text) in req.ids.iter().enumerate() {
                match convert::subject_id(&format!("ids[{i}]"), text) {
                    Ok(id) => ids.push(id),
                    Err(v) => violations.push(v),
                }
            }
            if !violations.is_empty() {
                return Err(DomainError::InvalidArgument(violations));
            }
            let paths = all_or(convert::mask_paths(req.read_mask.as_ref(), "read_mask")?);
            let full = convert::full_view(req.view)?;
            Ok((self.vault.batch_get(&ids, &paths).await?, full))
        }
        .await;
        let (items, full) = result.map_err(|e| to_status(e, &ctx.request_id))?;
        let results = items
            .into_iter()
            .map(|(id, item)| {
                use pb::batch_get_subjects_result::Result as Item;
                let result = match item {
                    Ok(view) => Item::Subject(convert::subject_message(&view, full)),
                    Err(e) => {
                        let status = to_status(e, &ctx.request_id);
                        Item::Error(pb::ItemError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        })
                    }
                };
                pb::BatchGetSubjectsResult {
                    id: id.to_string(),
                    result: Some(result),
                }
            })
            .collect();
        Ok(Response::new(pb::BatchGetSubjectsResponse { results }))
    }

    async fn erase_subject(
        &self,
        request: Request<pb::EraseSubjectRequest>,
    ) -> Result<Response<pb::EraseSubjectResponse>, Status> {
        let ctx = context(&request)?;
        let result = async {
            ctx.caller.require_operator("EraseSubject")?;
            let id = convert::subject_id("id", &request.get_ref().id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            self.vault.erase(id).await
        }
        .await;
        let at = result.map_err(|e| to_status(e, &ctx.request_id))?;
        Ok(Response::new(pb::EraseSubjectResponse {
            erase_time: Some(convert::to_timestamp(at)),
        }))
    }
}
