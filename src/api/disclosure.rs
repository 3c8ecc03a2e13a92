//! `kluis.v1.DisclosureService`: the disclosure register.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{auth::context, call::Calls, convert, pb};
use crate::{
    domain::{
        DomainError,
        disclosure::{Disclosures, NewDisclosure},
    },
    store::DisclosureRow,
};

pub struct DisclosureApi {
    disclosures: Arc<Disclosures>,
    calls: Calls,
}

impl DisclosureApi {
    pub fn new(disclosures: Arc<Disclosures>, calls: Calls) -> Self {
        Self { disclosures, calls }
    }
}

fn to_pb(d: DisclosureRow) -> pb::Disclosure {
    pb::Disclosure {
        disclosure_id: d.id,
        subject_id: d.subject.to_string(),
        recipient: d.recipient,
        purpose: d.purpose,
        legal_basis: d.legal_basis,
        paths: d.paths,
        reference: d.reference,
        disclosed_time: Some(convert::to_timestamp(d.disclosed_at)),
        recorded_time: Some(convert::to_timestamp(d.recorded_at)),
        recorded_by: d.recorded_by,
    }
}

#[tonic::async_trait]
impl pb::disclosure_service_server::DisclosureService for DisclosureApi {
    async fn record_disclosure(
        &self,
        request: Request<pb::RecordDisclosureRequest>,
    ) -> Result<Response<pb::RecordDisclosureResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let subject = convert::subject_id("subject_id", &req.subject_id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            let disclosed_at = convert::timestamp(req.disclosed_time.as_ref())
                .map_err(|e| DomainError::invalid("disclosed_time", e))?;
            let new = NewDisclosure {
                subject,
                recipient: req.recipient,
                paths: req.paths,
                reference: req.reference,
                disclosed_at,
                legal_basis: req.legal_basis,
            };
            self.disclosures.record(&access, new, &mut draft).await
        }
        .await;
        let row = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RecordDisclosureResponse {
            disclosure: Some(to_pb(row)),
        }))
    }

    async fn list_disclosures(
        &self,
        request: Request<pb::ListDisclosuresRequest>,
    ) -> Result<Response<pb::ListDisclosuresResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = convert::subject_id("subject_id", &req.subject_id)
                .map_err(|v| DomainError::InvalidArgument(vec![v]))?;
            self.disclosures.list(&access, id, &mut draft).await
        }
        .await;
        let rows = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::ListDisclosuresResponse {
            disclosures: rows.into_iter().map(to_pb).collect(),
        }))
    }
}
