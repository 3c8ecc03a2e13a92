//! `kluis.v1.RightsService`: data-subject requests handled by operators — explanation, export,
//! rectification, erasure with a signed receipt, restriction — and the receipt key.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{auth::context, call::Calls, convert, pb};
use crate::{
    domain::{
        DomainError,
        receipt::{self, Receipt, RetainedReason},
        rights::{Rights, Verification, VerificationMethod},
        statement,
    },
    policy::Lang,
};

/// Bytes per chunk of a streamed export.
const EXPORT_CHUNK: usize = 64 * 1024;

pub struct RightsApi {
    rights: Arc<Rights>,
    calls: Calls,
}

impl RightsApi {
    pub fn new(rights: Arc<Rights>, calls: Calls) -> Self {
        Self { rights, calls }
    }
}

fn verification(v: Option<&pb::IdentityVerification>) -> Result<Verification, DomainError> {
    let Some(v) = v else {
        return Err(DomainError::invalid(
            "verification",
            "name who verified the subject's identity and how (verified_by, method)",
        ));
    };
    let method = match pb::VerificationMethod::try_from(v.method) {
        Ok(pb::VerificationMethod::PortalSession) => Some(VerificationMethod::PortalSession),
        Ok(pb::VerificationMethod::AccountSession) => Some(VerificationMethod::AccountSession),
        Ok(pb::VerificationMethod::IdDocument) => Some(VerificationMethod::IdDocument),
        Ok(pb::VerificationMethod::EmailOnFile) => Some(VerificationMethod::EmailOnFile),
        Ok(pb::VerificationMethod::Unspecified) | Err(_) => None,
    };
    Verification::parse(&v.verified_by, method)
}

fn method_to_pb(text: &str) -> pb::VerificationMethod {
    match VerificationMethod::parse(text) {
        Some(VerificationMethod::PortalSession) => pb::VerificationMethod::PortalSession,
        Some(VerificationMethod::AccountSession) => pb::VerificationMethod::AccountSession,
        Some(VerificationMethod::IdDocument) => pb::VerificationMethod::IdDocument,
        Some(VerificationMethod::EmailOnFile) => pb::VerificationMethod::EmailOnFile,
        None => pb::VerificationMethod::Unspecified,
    }
}

fn lang(value: i32) -> Lang {
    match pb::Language::try_from(value) {
        Ok(pb::Language::En) => Lang::En,
        _ => Lang::Nl,
    }
}

fn id(text: &str) -> Result<Uuid, DomainError> {
    convert::subject_id("subject_id", text).map_err(|v| DomainError::InvalidArgument(vec![v]))
}

fn receipt_to_pb(r: &Receipt) -> pb::ErasureReceipt {
    pb::ErasureReceipt {
        receipt_id: r.receipt_id.clone(),
        subject_id: r.subject_id.clone(),
        issued_time: Some(convert::to_timestamp(r.issued_at_us)),
        operator: r.operator.clone(),
        verified_by: r.verified_by.clone(),
        verification_method: method_to_pb(&r.verification_method) as i32,
        policy_version: r.policy_version.clone(),
        contracts_ended: r.contracts_ended.clone(),
        erased_paths: r.erased.clone(),
        retained: r
            .retained
            .iter()
            .map(|k| pb::RetainedPath {
                path: k.path.clone(),
                reason: match k.reason {
                    RetainedReason::ContractInForce => pb::RetainedReason::ContractInForce,
                    RetainedReason::LegalObligation => pb::RetainedReason::LegalObligation,
                    RetainedReason::LegalRetention => pb::RetainedReason::LegalRetention,
                    RetainedReason::LegalHold => pb::RetainedReason::LegalHold,
                } as i32,
                purposes: k.purposes.clone(),
                due_time: k.due_at_us.map(convert::to_timestamp),
            })
            .collect(),
        shredded: r.shredded,
    }
}

type ExportStream =
    Pin<Box<dyn Stream<Item = Result<pb::ExportSubjectDataResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::rights_service_server::RightsService for RightsApi {
    async fn explain_processing(
        &self,
        request: Request<pb::ExplainProcessingRequest>,
    ) -> Result<Response<pb::ExplainProcessingResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let language = lang(req.language);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let v = verification(req.verification.as_ref())?;
            let id = id(&req.subject_id)?;
            let dossier = self
                .rights
                .dossier(&access, &v, id, "explain", &mut draft)
                .await?;
            Ok((
                statement::explain(self.rights.policy(), &dossier, language),
                dossier.policy_version,
            ))
        }
        .await;
        let (text, policy_version) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::ExplainProcessingResponse {
            text,
            policy_version,
            language: match language {
                Lang::Nl => pb::Language::Nl,
                Lang::En => pb::Language::En,
            } as i32,
        }))
    }

    type ExportSubjectDataStream = ExportStream;

    async fn export_subject_data(
        &self,
        request: Request<pb::ExportSubjectDataRequest>,
    ) -> Result<Response<Self::ExportSubjectDataStream>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let text = req.format == pb::ExportFormat::Text as i32;
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let v = verification(req.verification.as_ref())?;
            let id = id(&req.subject_id)?;
            let dossier = self
                .rights
                .dossier(&access, &v, id, "export", &mut draft)
                .await?;
            let policy = self.rights.policy();
            if text {
                Ok(statement::export_text(policy, &dossier, lang(req.language)).into_bytes())
            } else {
                serde_json::to_vec_pretty(&statement::export_json(policy, &dossier))
                    .map_err(|e| DomainError::Internal(format!("export: {e}")))
            }
        }
        .await;
        let document = self.calls.finish(&ctx, draft, result).await?;
        let content_type = if text {
            "text/plain; charset=utf-8"
        } else {
            "application/json"
        };
        let chunks: Vec<Result<pb::ExportSubjectDataResponse, Status>> = document
            .chunks(EXPORT_CHUNK)
            .enumerate()
            .map(|(i, chunk)| {
                Ok(pb::ExportSubjectDataResponse {
                    chunk: chunk.to_vec(),
                    content_type: if i == 0 {
                        content_type.to_owned()
                    } else {
                        String::new()
                    },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }

    async fn rectify_subject(
        &self,
        request: Request<pb::RectifySubjectRequest>,
    ) -> Result<Response<pb::RectifySubjectResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        if let Some(subject) = &req.subject {
            draft.subject_text(&subject.id);
        }
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let v = verification(req.verification.as_ref())?;
            let subject = req.subject.unwrap_or_default();
            let (id, changes) =
                convert::subject_update(&access, &subject, req.update_mask.as_ref(), &mut draft)?;
            let rectified =
                convert::path_names(crate::policy::PathSet::from_paths(changes.keys().copied()));
            let shown = self
                .rights
                .rectify(&access, &v, id, changes, req.expected_version, &mut draft)
                .await?;
            Ok((shown, rectified))
        }
        .await;
        let (shown, rectified_paths) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RectifySubjectResponse {
            subject: Some(convert::subject_message(&shown.view, true)),
            rectified_paths,
        }))
    }

    async fn request_erasure(
        &self,
        request: Request<pb::RequestErasureRequest>,
    ) -> Result<Response<pb::RequestErasureResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let v = verification(req.verification.as_ref())?;
            let id = id(&req.subject_id)?;
            self.rights
                .erase(&access, &v, id, req.end_contracts, &mut draft)
                .await
        }
        .await;
        let erasure = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RequestErasureResponse {
            receipt: Some(receipt_to_pb(&erasure.receipt)),
            receipt_json: erasure.json,
            signature: erasure.signature.to_vec(),
        }))
    }

    async fn restrict_processing(
        &self,
        request: Request<pb::RestrictProcessingRequest>,
    ) -> Result<Response<pb::RestrictProcessingResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let v = verification(req.verification.as_ref())?;
            let id = id(&req.subject_id)?;
            self.rights
                .restrict(&access, &v, id, &req.reason, &mut draft)
                .await
        }
        .await;
        let (restriction_id, new, since) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RestrictProcessingResponse {
            restriction_id,
            restricted_time: Some(convert::to_timestamp(since)),
            already_restricted: !new,
        }))
    }

    async fn lift_restriction(
        &self,
        request: Request<pb::LiftRestrictionRequest>,
    ) -> Result<Response<pb::LiftRestrictionResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let v = verification(req.verification.as_ref())?;
            let id = id(&req.subject_id)?;
            self.rights.lift(&access, &v, id, &mut draft).await
        }
        .await;
        let lifted = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::LiftRestrictionResponse { lifted }))
    }

    async fn get_receipt_public_key(
        &self,
        request: Request<pb::GetReceiptPublicKeyRequest>,
    ) -> Result<Response<pb::GetReceiptPublicKeyResponse>, Status> {
        let ctx = context(&request)?;
        let draft = self.calls.open(&ctx);
        let key = self.rights.receipt_public_key();
        self.calls.finish(&ctx, draft, Ok(())).await?;
        Ok(Response::new(pb::GetReceiptPublicKeyResponse {
            public_key: key.as_bytes().to_vec(),
            public_key_pem: receipt::public_key_pem(&key),
            key_id: receipt::key_id(&key),
        }))
    }

    async fn verify_erasure_receipt(
        &self,
        request: Request<pb::VerifyErasureReceiptRequest>,
    ) -> Result<Response<pb::VerifyErasureReceiptResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let answer = match self
            .rights
            .verify_receipt(&req.receipt_json, &req.signature)
        {
            Ok(r) => {
                draft.subject_text(&r.subject_id);
                draft.event.detail = format!("receipt={} valid", r.receipt_id);
                pb::VerifyErasureReceiptResponse {
                    valid: true,
                    problem: String::new(),
                    receipt: Some(receipt_to_pb(&r)),
                }
            }
            Err(problem) => {
                draft.event.detail = "receipt invalid".into();
                pb::VerifyErasureReceiptResponse {
                    valid: false,
                    problem,
                    receipt: None,
                }
            }
        };
        self.calls.finish(&ctx, draft, Ok(())).await?;
        Ok(Response::new(answer))
    }
}
