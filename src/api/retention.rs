//! `kluis.v1.RetentionService`: processing records, legal holds, the retention report and sweeps.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{auth::context, call::Calls, convert, pb};
use crate::{
    domain::{
        DomainError, Retention,
        retention::{HoldTarget, RecordView, SweepOptions},
    },
    policy::lifecycle::PathState,
    store::HoldRow,
};

/// Largest horizon of a report section, in days.
const MAX_REPORT_DAYS: u32 = 3650;
const DEFAULT_REPORT_DAYS: u32 = 30;

pub struct RetentionApi {
    retention: Arc<Retention>,
    calls: Calls,
}

impl RetentionApi {
    pub fn new(retention: Arc<Retention>, calls: Calls) -> Self {
        Self { retention, calls }
    }
}

fn subject(field: &str, text: &str) -> Result<Uuid, DomainError> {
    convert::subject_id(field, text).map_err(|v| DomainError::InvalidArgument(vec![v]))
}

fn days(field: &str, value: u32) -> Result<u32, DomainError> {
    match value {
        0 => Ok(DEFAULT_REPORT_DAYS),
        v if v <= MAX_REPORT_DAYS => Ok(v),
        _ => Err(DomainError::invalid(
            field,
            format!("at most {MAX_REPORT_DAYS} days"),
        )),
    }
}

fn ts(us: Option<i64>) -> Option<prost_types::Timestamp> {
    us.map(convert::to_timestamp)
}

fn record(view: &RecordView) -> pb::ProcessingRecord {
    let r = &view.row;
    pb::ProcessingRecord {
        subject_id: r.subject.to_string(),
        purpose: r.purpose.clone(),
        reference: r.reference.clone(),
        open_time: Some(convert::to_timestamp(r.opened_at)),
        close_time: ts(r.closed_at),
        close_event: r.close_event.clone().unwrap_or_default(),
        retain_until: ts(view.until_us),
        held: view.held,
    }
}

fn hold(h: &HoldRow) -> pb::Hold {
    pb::Hold {
        hold_id: h.id.clone(),
        subject_id: h.subject.to_string(),
        purpose: h.purpose.clone().unwrap_or_default(),
        reference: h.reference.clone().unwrap_or_default(),
        reason: h.reason.clone(),
        place_time: Some(convert::to_timestamp(h.placed_at)),
        placed_by: h.placed_by.clone(),
        release_time: ts(h.released_at),
        released_by: h.released_by.clone().unwrap_or_default(),
        release_reason: h.release_reason.clone().unwrap_or_default(),
    }
}

fn path_counts(map: &std::collections::BTreeMap<String, u64>) -> Vec<pb::PathCount> {
    map.iter()
        .map(|(path, n)| pb::PathCount {
            path: path.clone(),
            subjects: *n,
        })
        .collect()
}

#[tonic::async_trait]
impl pb::retention_service_server::RetentionService for RetentionApi {
    async fn open_processing(
        &self,
        request: Request<pb::OpenProcessingRequest>,
    ) -> Result<Response<pb::OpenProcessingResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = subject("subject_id", &req.subject_id)?;
            self.retention
                .open(&access, id, &req.purpose, &req.reference, &mut draft)
                .await
        }
        .await;
        let (row, created) = self.calls.finish(&ctx, draft, result).await?;
        let view = RecordView {
            row,
            until_us: None,
            held: false,
        };
        Ok(Response::new(pb::OpenProcessingResponse {
            record: Some(record(&view)),
            created,
        }))
    }

    async fn close_processing(
        &self,
        request: Request<pb::CloseProcessingRequest>,
    ) -> Result<Response<pb::CloseProcessingResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let at =
                convert::timestamp(req.at.as_ref()).map_err(|e| DomainError::invalid("at", e))?;
            self.retention
                .close(
                    &access,
                    &req.purpose,
                    &req.reference,
                    &req.event,
                    at,
                    &mut draft,
                )
                .await
        }
        .await;
        let (view, closed) = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::CloseProcessingResponse {
            record: Some(record(&view)),
            closed,
        }))
    }

    async fn get_retention(
        &self,
        request: Request<pb::GetRetentionRequest>,
    ) -> Result<Response<pb::GetRetentionResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        draft.subject_text(&req.subject_id);
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let id = subject("subject_id", &req.subject_id)?;
            self.retention.status(&access, id, &mut draft).await
        }
        .await;
        let status = self.calls.finish(&ctx, draft, result).await?;
        let paths = status
            .paths
            .iter()
            .map(|p| {
                let (state, until, held) = match p.state {
                    PathState::Kept => (pb::PathRetentionState::Kept, None, false),
                    PathState::Restricted { until_us, held } => (
                        pb::PathRetentionState::RetentionRestricted,
                        Some(until_us),
                        held,
                    ),
                    PathState::Due { since_us, held } => {
                        (pb::PathRetentionState::Due, Some(since_us), held)
                    }
                    PathState::NoBasis => (pb::PathRetentionState::NoBasisRecorded, None, false),
                };
                pb::PathRetention {
                    path: p.path.as_str().to_owned(),
                    state: state as i32,
                    until: ts(until.filter(|u| *u != i64::MAX)),
                    held,
                    kept_by: p
                        .kept_by
                        .iter()
                        .map(|(purpose, reference)| format!("{purpose}/{reference}"))
                        .collect(),
                    retained_for: p.retained_for.clone(),
                }
            })
            .collect();
        Ok(Response::new(pb::GetRetentionResponse {
            subject_id: status.subject.to_string(),
            paths,
            records: status.records.iter().map(record).collect(),
            holds: status.holds.iter().map(hold).collect(),
            next_due: ts(status.next_due_us),
        }))
    }

    async fn place_hold(
        &self,
        request: Request<pb::PlaceHoldRequest>,
    ) -> Result<Response<pb::PlaceHoldResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        if let Some(pb::place_hold_request::Target::SubjectId(id)) = &req.target {
            draft.subject_text(id);
        }
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let target = match req.target {
                Some(pb::place_hold_request::Target::SubjectId(id)) => {
                    HoldTarget::Subject(subject("subject_id", &id)?)
                }
                Some(pb::place_hold_request::Target::Record(r)) => HoldTarget::Record {
                    purpose: r.purpose.trim().to_owned(),
                    reference: r.reference,
                },
                None => {
                    return Err(DomainError::invalid(
                        "target",
                        "name a subject_id or a record",
                    ));
                }
            };
            self.retention
                .place_hold(&access, target, &req.reason, &mut draft)
                .await
        }
        .await;
        let placed = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::PlaceHoldResponse {
            hold: Some(hold(&placed)),
        }))
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::ReleaseHoldResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            if req.hold_id.trim().is_empty() {
                return Err(DomainError::invalid("hold_id", "required"));
            }
            self.retention
                .release_hold(&access, &req.hold_id, &req.reason, &mut draft)
                .await
        }
        .await;
        let released = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::ReleaseHoldResponse {
            hold: Some(hold(&released)),
        }))
    }

    async fn retention_report(
        &self,
        request: Request<pb::RetentionReportRequest>,
    ) -> Result<Response<pb::RetentionReportResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            let due = days("due_within_days", req.due_within_days)?;
            let purged = days("purged_within_days", req.purged_within_days)?;
            self.retention
                .report(&access, due, purged, &mut draft)
                .await
        }
        .await;
        let r = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::RetentionReportResponse {
            report_time: Some(convert::to_timestamp(r.now_us)),
            due_within_days: r.due_within_days,
            due_subjects: r.due_subjects,
            due: r
                .due
                .iter()
                .map(|((purpose, path), n)| pb::PurposePathCount {
                    purpose: purpose.clone(),
                    path: path.clone(),
                    subjects: *n,
                })
                .collect(),
            purged_within_days: r.purged_within_days,
            purged_subjects: r.purged_subjects,
            shredded_subjects: r.shredded_subjects,
            purged_paths: path_counts(&r.purged_paths),
            subjects_without_records: r.subjects_without_records,
            subjects_without_records_sample: r
                .subjects_without_records_sample
                .iter()
                .map(Uuid::to_string)
                .collect(),
            subjects_with_unbased_paths: r.subjects_with_unbased_paths,
            paths_without_basis: path_counts(&r.paths_without_basis),
            subjects_with_unbased_paths_sample: r
                .subjects_with_unbased_paths_sample
                .iter()
                .map(Uuid::to_string)
                .collect(),
            holds: r.holds.iter().map(hold).collect(),
        }))
    }

    async fn sweep(
        &self,
        request: Request<pb::SweepRequest>,
    ) -> Result<Response<pb::SweepResponse>, Status> {
        let ctx = context(&request)?;
        let mut draft = self.calls.open(&ctx);
        let req = request.into_inner();
        let result = async {
            let access = self.calls.authorize(&ctx)?;
            access.caller.require_operator("Sweep")?;
            let settings = self.retention.settings();
            let stats = self
                .retention
                .sweep(SweepOptions {
                    dry_run: req.dry_run,
                    // An operator's sweep runs at full speed unless asked to run as the background
                    // sweeper does (rate-limited, to spare other calls).
                    rate: if req.at_background_rate {
                        settings.sweep_rate
                    } else {
                        0
                    },
                    batch: settings.sweep_batch,
                    limit: req.limit,
                })
                .await?;
            draft.event.detail = format!(
                "dry_run={} visited={} purged={} shredded={}",
                req.dry_run, stats.subjects_visited, stats.subjects_purged, stats.subjects_shredded
            );
            Ok(stats)
        }
        .await;
        let stats = self.calls.finish(&ctx, draft, result).await?;
        Ok(Response::new(pb::SweepResponse {
            subjects_visited: stats.subjects_visited,
            subjects_purged: stats.subjects_purged,
            subjects_shredded: stats.subjects_shredded,
            paths: path_counts(&stats.paths),
            subjects_skipped: stats.skipped,
            subjects_failed: stats.failed,
            dry_run: req.dry_run,
        }))
    }
}
