//! `kluis.v1.SubjectService`: decode and validate, call the vault, encode. No rules live here.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, call::Calls, convert, pb, status::to_status};
use crate::domain::{DomainError, Vault, vault::MAX_BATCH_GET};

pub struct SubjectApi {
    vault: Arc<Vault>,
    calls: Calls,
}

impl SubjectApi {
    pub fn new(vault: Arc<Vault>, calls: Calls) -> Self {
        Self { vault, calls }
    }
}

#[tonic::async_trait]
impl pb::subject_service_server::SubjectService for SubjectApi {
    async fn create_subject(
        &self,
        request: Request<pb::CreateSubjectRequest>,
    ) -> Result<Response<pb::CreateSubjectResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let subject = req.subject.unwrap_or_default();
            let fields = convert::subject_fields(&subject)?;
            let source = convert::source(&req.source)?;
            self.vault.create(&access, fields, source, &mut draft).await
        }
        .await;
        let shown = self.calls.finish(&ctx, draft, result).await?;
        tracing::info!(subject = %shown.view.id, "subject created");
        Ok(Response::new(pb::CreateSubjectResponse {
            subject: Some(convert::subject_message(&shown.view, true)),
            masked_values: convert::masked_values(&shown),
            withheld_paths: convert::path_names(shown.withheld),
        }))
    }

    async fn get_subject(
        &self,
        request: Request<pb::GetSubjectRequest>,
    ) -> Result<Response<pb::GetSubjectResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = convert::subject_id("id", &req.id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            let asked = convert::mask_paths(req.read_mask.as_ref(), "read_mask")?;
            let full = convert::full_view(req.view)?;
            Ok((self.vault.get(&access, id, &asked, &mut draft).await?, full))
        }
        .await;
        let (shown, full) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::GetSubjectResponse {
            subject: Some(convert::subject_message(&shown.view, full)),
            masked_values: convert::masked_values(&shown),
            withheld_paths: convert::path_names(shown.withheld),
        }))
    }

    async fn update_subject(
        &self,
        request: Request<pb::UpdateSubjectRequest>,
    ) -> Result<Response<pb::UpdateSubjectResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        if let Some(subject) = &req.subject {
            draft.subject_text(&subject.id);
        }
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let subject = req.subject.unwrap_or_default();
            let (id, changes) =
                convert::subject_update(&access, &subject, req.update_mask.as_ref(), &mut draft)?;
            let source = convert::source(&req.source)?;
            self.vault
                .update(
                    &access,
                    id,
                    changes,
                    req.expected_version,
                    source,
                    &mut draft,
                )
                .await
        }
        .await;
        let shown = self.calls.finish(&ctx, draft, result).await?;
        tracing::info!(subject = %shown.view.id, version = shown.view.version, "subject updated");
        Ok(Response::new(pb::UpdateSubjectResponse {
            subject: Some(convert::subject_message(&shown.view, true)),
            masked_values: convert::masked_values(&shown),
            withheld_paths: convert::path_names(shown.withheld),
        }))
    }

    async fn find_subjects(
        &self,
        request: Request<pb::FindSubjectsRequest>,
    ) -> Result<Response<pb::FindSubjectsResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let key = convert::lookup_key(request.get_ref())?;
            self.vault.find(&access, &key, &mut draft).await
        }
        .await;
        let ids = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::FindSubjectsResponse {
            subject_ids: ids.iter().map(|id| id.to_string()).collect(),
        }))
    }

    async fn batch_get_subjects(
        &self,
        request: Request<pb::BatchGetSubjectsRequest>,
    ) -> Result<Response<pb::BatchGetSubjectsResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        for id in req.ids.iter().take(MAX_BATCH_GET) {
            draft.subject_text(id);
        }
        let result = async {
            let access = self.calls.authorize(&ctx)?;
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
            let asked = convert::mask_paths(req.read_mask.as_ref(), "read_mask")?;
            let full = convert::full_view(req.view)?;
            Ok((
                self.vault
                    .batch_get(&access, &ids, &asked, &mut draft)
                    .await?,
                full,
            ))
        }
        .await;
        let (items, full) = self.calls.finish(&ctx, draft, result).await?;
        let results = items
            .into_iter()
            .map(|(id, item)| {
                use pb::batch_get_subjects_result::Result as Item;
                let (result, masked_values, withheld_paths) = match item {
                    Ok(shown) => (
                        Item::Subject(convert::subject_message(&shown.view, full)),
                        convert::masked_values(&shown),
                        convert::path_names(shown.withheld),
                    ),
                    Err(e) => {
                        let status = to_status(e, &ctx.request_id);
                        let error = pb::ItemError {
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        };
                        (Item::Error(error), Vec::new(), Vec::new())
                    }
                };
                pb::BatchGetSubjectsResult {
                    id: id.to_string(),
                    result: Some(result),
                    masked_values,
                    withheld_paths,
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
        let mut draft = self.calls.open(&ctx);
        draft.subject_text(&request.get_ref().id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = convert::subject_id("id", &request.get_ref().id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            self.vault.erase(&access, id, &mut draft).await
        }
        .await;
        let at = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::EraseSubjectResponse {
            erase_time: Some(convert::to_timestamp(at)),
        }))
    }

    async fn record_activity(
        &self,
        request: Request<pb::RecordActivityRequest>,
    ) -> Result<Response<pb::RecordActivityResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = convert::subject_id("subject_id", &req.subject_id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            let entry = convert::activity_entry(req.entry.as_ref())?;
            self.vault
                .record_activity(&access, id, entry, &mut draft)
                .await
        }
        .await;
        let (version, entries) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RecordActivityResponse {
            version,
            entries: u32::try_from(entries).unwrap_or(u32::MAX),
        }))
    }
}
