//! The retention engine: processing records and their lifecycle clocks, legal holds, each subject's
//! retention state derived from them (`policy::lifecycle`, DESIGN.md §2), and the sweep that erases
//! every path that lost its last legal basis — crypto-shredding the subject when nothing remains.
//!
//! Every change of a subject's records or holds is written compare-and-set on the subject's
//! `retention_version` together with the state derived from the result, so concurrent calls and
//! instances never store a state that does not match the records. A purge is checked the same way
//! (and against the subject's version), so two sweepers never both act on one subject and a write
//! that lands between planning and purging is never lost.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use uuid::Uuid;

use super::{
    DomainError, FieldPath,
    access::{Access, parse_reference},
    call::{Draft, OK},
    record::SealedRecord,
};
use crate::{
    audit::{AuditEvent, AuditTrail},
    clock::Clock,
    policy::{
        PathSet, Policy, Role,
        lifecycle::{self, Mark, PathState, RecordFact},
    },
    store::{
        AuditFilter, HoldRow, RecordChange, RecordRow, Store, StoreError, SubjectRow, WriteOp,
    },
};

/// The audit method of a sweep's purge of some paths, and of a crypto-shred.
pub const PURGE_METHOD: &str = "kluis.retention/Purge";
pub const SHRED_METHOD: &str = "kluis.retention/Shred";
/// How the sweeper appears in the audit trail.
pub const SWEEPER_CALLER: &str = "kluis-retention";
/// Attempts of one record or hold change when other changes of the subject get there first.
const CONFLICT_ATTEMPTS: u32 = 20;
/// Most subjects listed by name in a report section (the counts are complete).
pub const REPORT_SAMPLE: usize = 100;

/// How the engine behaves; from the configuration.
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    /// How far in the future a close event's `at` may lie (clock skew between systems).
    pub close_tolerance: Duration,
    /// How often the background sweeper looks for due subjects at the latest; None: switched off.
    pub sweep_interval: Option<Duration>,
    /// Subjects per second the background sweeper purges at most (0: no limit).
    pub sweep_rate: u32,
    /// Subjects per sweep batch (one group commit).
    pub sweep_batch: u32,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        Self {
            close_tolerance: Duration::from_secs(300),
            sweep_interval: Some(Duration::from_secs(60)),
            sweep_rate: 2500,
            sweep_batch: 250,
        }
    }
}

/// A record with the time its retention runs out (closed records only).
#[derive(Debug, Clone)]
pub struct RecordView {
    pub row: RecordRow,
    pub until_us: Option<i64>,
    pub held: bool,
}

/// One stored path of a subject and what keeps it.
#[derive(Debug, Clone)]
pub struct PathView {
    pub path: FieldPath,
    pub state: PathState,
    /// Open records whose purpose grants the path.
    pub kept_by: Vec<(String, String)>,
    /// Purposes whose closed records' retention keeps the path.
    pub retained_for: Vec<String>,
}

/// A subject's retention as `GetRetention` shows it.
#[derive(Debug, Clone)]
pub struct SubjectRetention {
    pub subject: Uuid,
    pub paths: Vec<PathView>,
    pub records: Vec<RecordView>,
    pub holds: Vec<HoldRow>,
    /// When the next path becomes due (None: nothing will on its own).
    pub next_due_us: Option<i64>,
}

/// What a sweep did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub subjects_visited: u64,
    /// Subjects some paths of which were purged (not shredded).
    pub subjects_purged: u64,
    pub subjects_shredded: u64,
    /// Paths purged per path, shredded subjects' paths included.
    pub paths: BTreeMap<String, u64>,
    /// Subjects that changed between planning and purging: left for the next sweep.
    pub skipped: u64,
    /// Subjects whose purge failed (logged): left for the next sweep.
    pub failed: u64,
}

/// How one sweep runs.
#[derive(Debug, Clone, Copy)]
pub struct SweepOptions {
    pub dry_run: bool,
    /// Subjects per second at most (0: no limit).
    pub rate: u32,
    pub batch: u32,
    /// Subjects at most (0: every due subject).
    pub limit: u64,
}

/// Counts for the privacy officer.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub now_us: i64,
    pub due_within_days: u32,
    /// (purpose, path) → subjects with that path due by the horizon.
    pub due: BTreeMap<(String, String), u64>,
    pub due_subjects: u64,
    pub purged_within_days: u32,
    pub purged_subjects: u64,
    pub shredded_subjects: u64,
    pub purged_paths: BTreeMap<String, u64>,
    pub subjects_without_records: u64,
    pub subjects_without_records_sample: Vec<Uuid>,
    /// Path → subjects storing it without any record that ever granted it.
    pub paths_without_basis: BTreeMap<String, u64>,
    pub subjects_with_unbased_paths: u64,
    pub subjects_with_unbased_paths_sample: Vec<Uuid>,
    pub holds: Vec<HoldRow>,
}

/// Where a hold applies.
#[derive(Debug, Clone)]
pub enum HoldTarget {
    Subject(Uuid),
    Record { purpose: String, reference: String },
}

/// A subject's state as a change is planned against it.
struct State {
    row: SubjectRow,
    records: Vec<RecordRow>,
    holds: Vec<HoldRow>,
}

/// What a planned change does: nothing (an idempotent repeat), or write.
enum Step<T> {
    Done(T),
    Write(Box<Planned<T>>),
}

/// A change to write, the records and holds it leads to, and the answer once written.
struct Planned<T> {
    change: RecordChange,
    records: Vec<RecordRow>,
    holds: Vec<HoldRow>,
    detail: String,
    answer: T,
}

/// The outcome of visiting one due subject.
enum Visit {
    Nothing,
    Purged(PathSet),
    Shredded(PathSet),
    Skipped,
    Failed,
}

pub struct Retention {
    store: Store,
    policy: Arc<Policy>,
    clock: Clock,
    trail: Arc<AuditTrail>,
    settings: RetentionSettings,
    wake: Notify,
}

impl Retention {
    pub fn new(
        store: Store,
        policy: Arc<Policy>,
        clock: Clock,
        trail: Arc<AuditTrail>,
        settings: RetentionSettings,
    ) -> Self {
        Self {
            store,
            policy,
            clock,
            trail,
            settings,
            wake: Notify::new(),
        }
    }

    pub fn settings(&self) -> &RetentionSettings {
        &self.settings
    }

    /// Opens the record `(purpose, reference)` of `subject`. Repeating it is a no-op answered with
    /// the record (`false`); the same reference for another subject is `AlreadyExists`; a closed
    /// record is not reopened (`FailedPrecondition`).
    pub async fn open(
        &self,
        access: &Access,
        subject: Uuid,
        purpose: &str,
        reference: &str,
        draft: &mut Draft,
    ) -> Result<(RecordRow, bool), DomainError> {
        draft.subject(subject);
        let purpose = self.record_purpose(access, purpose)?;
        let reference = parse_reference(reference)?;
        draft.event.detail = format!("open={purpose}/{reference}");
        let by = access.caller.id.clone();
        self.change(subject, draft, |state| {
            if let Some(existing) = state
                .records
                .iter()
                .find(|r| r.purpose == purpose && r.reference == reference)
            {
                return match existing.closed_at {
                    None => Ok(Step::Done((existing.clone(), false))),
                    Some(at) => Err(DomainError::FailedPrecondition(format!(
                        "processing record {purpose}/{reference} was closed at {at} µs: a closed \
                         record is not reopened; open a new one with its own reference"
                    ))),
                };
            }
            let row = RecordRow {
                purpose: purpose.clone(),
                reference: reference.clone(),
                subject,
                opened_at: self.clock.now_us(),
                opened_by: by.clone(),
                closed_at: None,
                close_event: None,
                closed_by: None,
            };
            let mut records = state.records.clone();
            records.push(row.clone());
            Ok(Step::Write(Box::new(Planned {
                change: RecordChange::Open {
                    purpose: purpose.clone(),
                    reference: reference.clone(),
                    at: row.opened_at,
                    by: by.clone(),
                },
                records,
                holds: state.holds.clone(),
                detail: format!("open={purpose}/{reference}"),
                answer: (row, true),
            })))
        })
        .await
        .map_err(|e| self.record_taken(e, &purpose, &reference))
    }

    /// Closes the record `(purpose, reference)` with the purpose's close event at `at` (default
    /// now; at most the close tolerance in the future), starting its retention clock. Closing a
    /// closed record again is a no-op answered with the record (`false`). Paths that are due at once
    /// (a retention of zero) are purged before the answer.
    pub async fn close(
        &self,
        access: &Access,
        purpose: &str,
        reference: &str,
        event: &str,
        at: Option<i64>,
        draft: &mut Draft,
    ) -> Result<(RecordView, bool), DomainError> {
        let purpose = self.record_purpose(access, purpose)?;
        let reference = parse_reference(reference)?;
        let def = self
            .policy
            .purpose(&purpose)
            .and_then(|p| p.retention.as_ref())
            .ok_or_else(|| {
                DomainError::Internal(format!("purpose {purpose} lost its retention"))
            })?;
        if event.trim() != def.close_event {
            return Err(DomainError::invalid(
                "event",
                format!(
                    "purpose {purpose} closes with event {}, not the event given",
                    def.close_event
                ),
            ));
        }
        let now = self.clock.now_us();
        let tolerance = i64::try_from(self.settings.close_tolerance.as_micros()).unwrap_or(0);
        let at = at.unwrap_or(now);
        if at > now.saturating_add(tolerance) {
            return Err(DomainError::invalid(
                "at",
                format!(
                    "lies more than {} s in the future",
                    self.settings.close_tolerance.as_secs()
                ),
            ));
        }
        let record = self
            .store
            .processing_record(&purpose, &reference)
            .await?
            .ok_or(DomainError::NotFoundNamed {
                what: "processing record",
            })?;
        let subject = record.subject;
        draft.subject(subject);
        draft.event.detail = format!("close={purpose}/{reference}");
        let by = access.caller.id.clone();
        let event = def.close_event.clone();
        let (view, changed) = self
            .change(subject, draft, |state| {
                let Some(existing) = state
                    .records
                    .iter()
                    .find(|r| r.purpose == purpose && r.reference == reference)
                else {
                    return Err(DomainError::NotFoundNamed {
                        what: "processing record",
                    });
                };
                if existing.closed_at.is_some() {
                    return Ok(Step::Done((
                        self.record_view(existing, &state.holds),
                        false,
                    )));
                }
                let mut closed = existing.clone();
                closed.closed_at = Some(at);
                closed.close_event = Some(event.clone());
                closed.closed_by = Some(by.clone());
                let records = state
                    .records
                    .iter()
                    .map(|r| {
                        if r.purpose == purpose && r.reference == reference {
                            closed.clone()
                        } else {
                            r.clone()
                        }
                    })
                    .collect();
                Ok(Step::Write(Box::new(Planned {
                    change: RecordChange::Close {
                        purpose: purpose.clone(),
                        reference: reference.clone(),
                        event: event.clone(),
                        at,
                        by: by.clone(),
                    },
                    records,
                    holds: state.holds.clone(),
                    detail: format!("close={purpose}/{reference}"),
                    answer: (self.record_view(&closed, &state.holds), true),
                })))
            })
            .await?;
        if changed {
            // What is due at once (a retention of zero) goes now, not at the next sweep; if this
            // fails the sweeper finds it due.
            if let Visit::Failed = self.visit(subject, self.clock.now_us(), false).await {
                tracing::warn!(subject = %subject, "purge after close failed; left to the sweeper");
            }
        }
        Ok((view, changed))
    }

    /// A subject's paths and what keeps each, its records and holds. Operators only.
    pub async fn status(
        &self,
        access: &Access,
        subject: Uuid,
        draft: &mut Draft,
    ) -> Result<SubjectRetention, DomainError> {
        access.caller.require_operator("GetRetention")?;
        draft.subject(subject);
        let state = self.load(subject).await?;
        let mark = self.derive(&state.records, &state.holds)?;
        let record = SealedRecord::decode_blob(&state.row.record)
            .map_err(|e| DomainError::Internal(format!("subject {subject} record: {e}")))?;
        let now = self.clock.now_us();
        let paths = record
            .paths()
            .iter()
            .map(|path| PathView {
                path,
                state: mark.state(path, now),
                kept_by: state
                    .records
                    .iter()
                    .filter(|r| r.closed_at.is_none() && self.grants(&r.purpose, path))
                    .map(|r| (r.purpose.clone(), r.reference.clone()))
                    .collect(),
                retained_for: mark
                    .groups
                    .iter()
                    .filter(|g| {
                        g.paths.contains(path)
                            && !mark.open.contains(path)
                            && (g.until_us > now || g.held)
                    })
                    .map(|g| g.purpose.clone())
                    .collect(),
            })
            .collect();
        let records = state
            .records
            .iter()
            .map(|r| self.record_view(r, &state.holds))
            .collect();
        Ok(SubjectRetention {
            subject,
            paths,
            records,
            holds: state.holds,
            next_due_us: mark.next_due_after(now.saturating_sub(1)),
        })
    }

    /// Places a legal hold on a subject or one record. Operators only; `reason` is a case reference.
    pub async fn place_hold(
        &self,
        access: &Access,
        target: HoldTarget,
        reason: &str,
        draft: &mut Draft,
    ) -> Result<HoldRow, DomainError> {
        access.caller.require_operator("PlaceHold")?;
        let reason = parse_case(reason, "reason")?;
        let (subject, purpose, reference) = match target {
            HoldTarget::Subject(id) => (id, None, None),
            HoldTarget::Record { purpose, reference } => {
                let reference = parse_reference(&reference)?;
                let record = self
                    .store
                    .processing_record(&purpose, &reference)
                    .await?
                    .ok_or(DomainError::NotFoundNamed {
                        what: "processing record",
                    })?;
                (record.subject, Some(purpose), Some(reference))
            }
        };
        draft.subject(subject);
        let hold = HoldRow {
            id: Uuid::new_v4().to_string(),
            subject,
            purpose,
            reference,
            reason,
            placed_at: self.clock.now_us(),
            placed_by: access.caller.id.clone(),
            released_at: None,
            released_by: None,
            release_reason: None,
        };
        let detail = format!("hold={} {}", hold.id, hold_scope(&hold));
        draft.event.detail = detail.clone();
        self.change(subject, draft, |state| {
            let mut holds = state.holds.clone();
            holds.push(hold.clone());
            Ok(Step::Write(Box::new(Planned {
                change: RecordChange::PlaceHold(hold.clone()),
                records: state.records.clone(),
                holds,
                detail: detail.clone(),
                answer: hold.clone(),
            })))
        })
        .await
    }

    /// Releases a hold in force; what it held is purged by the next sweep if due. Operators only.
    pub async fn release_hold(
        &self,
        access: &Access,
        id: &str,
        reason: &str,
        draft: &mut Draft,
    ) -> Result<HoldRow, DomainError> {
        access.caller.require_operator("ReleaseHold")?;
        let reason = parse_case(reason, "reason")?;
        let hold = self
            .store
            .legal_hold(id.trim())
            .await?
            .ok_or(DomainError::NotFoundNamed { what: "hold" })?;
        draft.subject(hold.subject);
        if hold.released_at.is_some() {
            return Ok(hold);
        }
        let at = self.clock.now_us();
        let by = access.caller.id.clone();
        let detail = format!("release={}", hold.id);
        draft.event.detail = detail.clone();
        let released = self
            .change(hold.subject, draft, |state| {
                let Some(current) = state.holds.iter().find(|h| h.id == hold.id) else {
                    return Err(DomainError::NotFoundNamed { what: "hold" });
                };
                if current.released_at.is_some() {
                    return Ok(Step::Done(current.clone()));
                }
                let mut released = current.clone();
                released.released_at = Some(at);
                released.released_by = Some(by.clone());
                released.release_reason = Some(reason.clone());
                let holds = state
                    .holds
                    .iter()
                    .map(|h| {
                        if h.id == hold.id {
                            released.clone()
                        } else {
                            h.clone()
                        }
                    })
                    .collect();
                Ok(Step::Write(Box::new(Planned {
                    change: RecordChange::ReleaseHold {
                        id: hold.id.clone(),
                        at,
                        by: by.clone(),
                        reason: reason.clone(),
                    },
                    records: state.records.clone(),
                    holds,
                    detail: detail.clone(),
                    answer: released,
                })))
            })
            .await?;
        Ok(released)
    }

    /// Due, purged, unbased and held, for the privacy officer. Operators only.
    pub async fn report(
        &self,
        access: &Access,
        due_within_days: u32,
        purged_within_days: u32,
        draft: &mut Draft,
    ) -> Result<Report, DomainError> {
        access.caller.require_operator("RetentionReport")?;
        let now = self.clock.now_us();
        let day = 86_400_000_000i64;
        let horizon = now.saturating_add(i64::from(due_within_days) * day);
        let mut report = Report {
            now_us: now,
            due_within_days,
            purged_within_days,
            ..Report::default()
        };
        // Due by the horizon: subjects whose first due time lies before it.
        let mut after = None;
        loop {
            let page = self
                .store
                .marked_subjects(Some(horizon), after, 1000)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for s in &page {
                let Some(mark) = decode_mark(s.retention.as_deref())? else {
                    continue;
                };
                let stored = stored_paths(&s.record)?;
                let mut any = false;
                for path in stored.iter() {
                    if let PathState::Due { held: false, .. } = mark.state(path, horizon) {
                        any = true;
                        for g in mark.groups.iter().filter(|g| g.paths.contains(path)) {
                            *report
                                .due
                                .entry((g.purpose.clone(), path.as_str().to_owned()))
                                .or_default() += 1;
                        }
                    }
                }
                report.due_subjects += u64::from(any);
            }
        }
        // Purged: from the audit trail.
        let since = now.saturating_sub(i64::from(purged_within_days) * day);
        for method in [PURGE_METHOD, SHRED_METHOD] {
            let filter = AuditFilter {
                method: Some(method.to_owned()),
                from_us: Some(since),
                ..AuditFilter::default()
            };
            let mut after = 0;
            loop {
                let page = self
                    .trail
                    .query(&filter, after, 1000)
                    .await
                    .map_err(|e| DomainError::Unavailable(format!("audit trail: {e}")))?;
                let Some((last, _)) = page.last() else { break };
                after = *last;
                for (_, event) in &page {
                    if method == PURGE_METHOD {
                        report.purged_subjects += 1;
                    } else {
                        report.shredded_subjects += 1;
                    }
                    for path in &event.written {
                        *report.purged_paths.entry(path.clone()).or_default() += 1;
                    }
                }
            }
        }
        // No basis recorded: subjects without records, and paths no record ever granted.
        let mut after = None;
        loop {
            let page = self.store.all_subjects(after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for s in &page {
                // A hold alone stores a state too: without records all the same.
                let mark = decode_mark(s.retention.as_deref())?
                    .filter(|m| m.any_open || !m.groups.is_empty());
                match mark {
                    None => {
                        report.subjects_without_records += 1;
                        if report.subjects_without_records_sample.len() < REPORT_SAMPLE {
                            report.subjects_without_records_sample.push(s.id);
                        }
                    }
                    Some(mark) => {
                        let unbased = mark.no_basis(stored_paths(&s.record)?);
                        if !unbased.is_empty() {
                            report.subjects_with_unbased_paths += 1;
                            if report.subjects_with_unbased_paths_sample.len() < REPORT_SAMPLE {
                                report.subjects_with_unbased_paths_sample.push(s.id);
                            }
                            for path in unbased.iter() {
                                *report
                                    .paths_without_basis
                                    .entry(path.as_str().to_owned())
                                    .or_default() += 1;
                            }
                        }
                    }
                }
            }
        }
        report.holds = self.store.active_holds(1000).await?;
        draft.event.detail = format!("due_subjects={}", report.due_subjects);
        Ok(report)
    }

    /// Erases every due path of every due subject, in batches (each batch's purges go to the
    /// group committer together, each atomic with its audit event), at most `rate` subjects per
    /// second. Dry: plans only.
    pub async fn sweep(&self, options: SweepOptions) -> Result<SweepStats, DomainError> {
        let now = self.clock.now_us();
        let batch = options.batch.clamp(1, 1000);
        let started = Instant::now();
        let mut stats = SweepStats::default();
        let mut after = None;
        loop {
            let want = if options.limit == 0 {
                batch
            } else {
                let left = options.limit.saturating_sub(stats.subjects_visited);
                u32::try_from(left.min(u64::from(batch))).unwrap_or(batch)
            };
            if want == 0 {
                break;
            }
            let due = self.store.retention_due(now, after, want).await?;
            let Some(&last) = due.last() else { break };
            after = Some(last);
            let visits = futures_util::future::join_all(
                due.iter()
                    .map(|(_, id)| self.visit(*id, now, options.dry_run)),
            )
            .await;
            for visit in visits {
                stats.subjects_visited += 1;
                match visit {
                    Visit::Nothing => {}
                    Visit::Purged(paths) => {
                        stats.subjects_purged += 1;
                        count_paths(&mut stats.paths, paths);
                    }
                    Visit::Shredded(paths) => {
                        stats.subjects_shredded += 1;
                        count_paths(&mut stats.paths, paths);
                    }
                    Visit::Skipped => stats.skipped += 1,
                    Visit::Failed => stats.failed += 1,
                }
            }
            if options.rate > 0 {
                let target = Duration::from_secs_f64(
                    stats.subjects_visited as f64 / f64::from(options.rate),
                );
                if let Some(wait) = target.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        // Every subject a sweep visits had a due path when it was listed.
        if options.limit == 0 {
            metrics::gauge!("kluis_retention_due_subjects").set(stats.subjects_visited as f64);
        }
        if !options.dry_run {
            metrics::counter!("kluis_retention_purged_subjects_total")
                .increment(stats.subjects_purged);
            metrics::counter!("kluis_retention_shredded_subjects_total")
                .increment(stats.subjects_shredded);
            metrics::counter!("kluis_retention_purged_paths_total")
                .increment(stats.paths.values().sum());
        }
        if stats.subjects_visited > 0 {
            tracing::info!(
                dry_run = options.dry_run,
                visited = stats.subjects_visited,
                purged = stats.subjects_purged,
                shredded = stats.subjects_shredded,
                skipped = stats.skipped,
                failed = stats.failed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "retention sweep"
            );
        }
        Ok(stats)
    }

    /// Runs the background sweeper: at every interval, and as soon as a path falls due.
    pub fn spawn_sweeper(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let interval = self.settings.sweep_interval?;
        let engine = self.clone();
        Some(tokio::spawn(async move {
            loop {
                let options = SweepOptions {
                    dry_run: false,
                    rate: engine.settings.sweep_rate,
                    batch: engine.settings.sweep_batch,
                    limit: 0,
                };
                if let Err(e) = engine.sweep(options).await {
                    tracing::warn!(error = %e, "retention sweep failed; retried at the next interval");
                }
                let mut wait = interval;
                match engine.store.earliest_retention_due().await {
                    Ok(Some(due)) => {
                        let until = due.saturating_sub(engine.clock.now_us()).max(0);
                        wait = wait.min(Duration::from_micros(until.unsigned_abs()));
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "retention: next due time unknown"),
                }
                tokio::select! {
                    () = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
                    () = engine.wake.notified() => {}
                }
            }
        }))
    }

    // ---- internals ------------------------------------------------------------------------

    /// Plans and writes one change compare-and-set; re-plans when the subject's records or holds
    /// changed meanwhile.
    async fn change<T, F>(
        &self,
        subject: Uuid,
        draft: &mut Draft,
        plan: F,
    ) -> Result<T, DomainError>
    where
        F: Fn(&State) -> Result<Step<T>, DomainError>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let state = self.load(subject).await?;
            let Planned {
                change,
                records,
                holds,
                detail,
                answer,
            } = match plan(&state)? {
                Step::Done(answer) => return Ok(answer),
                Step::Write(planned) => *planned,
            };
            let mark = self.derive(&records, &holds)?;
            let due = mark.first_due_us();
            draft.event.detail = detail;
            let op = WriteOp::RetentionChange {
                subject,
                expected_version: state.row.retention_version,
                mark: mark.encode(),
                due,
                change,
            };
            match self.store.write_audited(op, draft.committed_record()).await {
                Ok(_) => {
                    draft.committed = true;
                    if due.is_some() {
                        self.wake.notify_one();
                    }
                    return Ok(answer);
                }
                Err(StoreError::VersionMismatch { .. }) if attempts < CONFLICT_ATTEMPTS => {}
                Err(StoreError::VersionMismatch { .. }) => {
                    return Err(DomainError::Unavailable(format!(
                        "subject {subject} changed concurrently during {attempts} attempts; retry"
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn load(&self, subject: Uuid) -> Result<State, DomainError> {
        let row = self
            .store
            .subject(subject)
            .await?
            .ok_or(DomainError::NotFound)?;
        let records = self.store.processing_records(subject).await?;
        let holds = self.store.legal_holds(subject).await?;
        Ok(State {
            row,
            records,
            holds,
        })
    }

    fn derive(&self, records: &[RecordRow], holds: &[HoldRow]) -> Result<Mark, DomainError> {
        derive_mark(&self.policy, records, holds)
    }

    /// A subject's row, processing records and holds, as a change is planned against them.
    pub(crate) async fn subject_state(
        &self,
        subject: Uuid,
    ) -> Result<(SubjectRow, Vec<RecordRow>, Vec<HoldRow>), DomainError> {
        let state = self.load(subject).await?;
        Ok((state.row, state.records, state.holds))
    }

    /// Wakes the background sweeper (a change made something due).
    pub(crate) fn wake_sweeper(&self) {
        self.wake.notify_one();
    }
}

/// The retention state (`Mark`) of a subject's records and the holds in force.
pub(crate) fn derive_mark(
    policy: &Policy,
    records: &[RecordRow],
    holds: &[HoldRow],
) -> Result<Mark, DomainError> {
    {
        let active: Vec<&HoldRow> = holds.iter().filter(|h| h.released_at.is_none()).collect();
        let facts: Vec<RecordFact<'_>> = records
            .iter()
            .map(|r| RecordFact {
                purpose: &r.purpose,
                closed_at_us: r.closed_at,
                held: active.iter().any(|h| {
                    h.purpose.as_deref() == Some(r.purpose.as_str())
                        && h.reference.as_deref() == Some(r.reference.as_str())
                }),
            })
            .collect();
        let subject_held = active.iter().any(|h| h.purpose.is_none());
        lifecycle::derive(policy, &facts, subject_held)
            .map_err(|e| DomainError::Internal(e.to_string()))
    }
}

impl Retention {
    fn record_view(&self, r: &RecordRow, holds: &[HoldRow]) -> RecordView {
        let keep_for = self
            .policy
            .purpose(&r.purpose)
            .and_then(|p| p.retention.as_ref())
            .map(|ret| ret.keep_for);
        RecordView {
            row: r.clone(),
            until_us: r.closed_at.zip(keep_for).map(|(c, k)| k.after(c)),
            held: holds.iter().any(|h| {
                h.released_at.is_none()
                    && h.purpose.as_deref() == Some(r.purpose.as_str())
                    && h.reference.as_deref() == Some(r.reference.as_str())
            }),
        }
    }

    fn grants(&self, purpose: &str, path: FieldPath) -> bool {
        self.policy
            .purpose(purpose)
            .is_some_and(|p| p.paths.contains(path))
    }

    /// The purpose of a record a caller asks to open or close: one with a retention rule, that
    /// the caller acts under (operators, handling a subject's request, any).
    fn record_purpose(&self, access: &Access, purpose: &str) -> Result<String, DomainError> {
        let purpose = purpose.trim();
        let def = self
            .policy
            .purpose(purpose)
            .ok_or_else(|| DomainError::invalid("purpose", "unknown purpose"))?;
        if def.retention.is_none() {
            let with: Vec<&str> = self
                .policy
                .purposes()
                .filter(|p| p.retention.is_some())
                .map(|p| p.name.as_str())
                .collect();
            return Err(DomainError::invalid(
                "purpose",
                format!(
                    "purpose {purpose} keeps nothing alive on its own and has no processing records \
                     (records are for: {})",
                    with.join(", ")
                ),
            ));
        }
        let role = access.caller.role;
        if role == Role::Operator {
            return Ok(def.name.clone());
        }
        if self.policy.grant(role, purpose).is_none() {
            return Err(DomainError::PermissionDenied(format!(
                "role {role} may not use purpose {purpose}"
            )));
        }
        if access.purpose != purpose {
            return Err(DomainError::invalid(
                "purpose",
                format!(
                    "a record of purpose {purpose} is opened and closed under that purpose \
                     (x-kluis-purpose: {purpose})"
                ),
            ));
        }
        Ok(def.name.clone())
    }

    fn record_taken(&self, e: DomainError, purpose: &str, reference: &str) -> DomainError {
        match e {
            DomainError::AlreadyExists { .. } => DomainError::AlreadyExists {
                path: format!("processing record {purpose}/{reference}"),
            },
            other => other,
        }
    }

    /// Purges what is due of one subject at `now` (or shreds it), or just moves its due time on.
    async fn visit(&self, id: Uuid, now: i64, dry_run: bool) -> Visit {
        match self.try_visit(id, now, dry_run).await {
            Ok(v) => v,
            Err(DomainError::Aborted { .. }) | Err(DomainError::NotFound) => Visit::Skipped,
            Err(e) => {
                tracing::warn!(subject = %id, error = %e, "retention purge failed");
                Visit::Failed
            }
        }
    }

    async fn try_visit(&self, id: Uuid, now: i64, dry_run: bool) -> Result<Visit, DomainError> {
        // A batch's visits run in one task: their reads are coalesced, not inline one by one.
        let Some(row) = self.store.subject_coalesced(id).await? else {
            return Ok(Visit::Nothing);
        };
        let Some(mark) = decode_mark(row.retention.as_deref())? else {
            return Ok(Visit::Nothing);
        };
        let mut record = SealedRecord::decode_blob(&row.record)
            .map_err(|e| DomainError::Internal(format!("subject {id} record: {e}")))?;
        let stored = record.paths();
        let due = mark.purgeable(stored, now);
        let remaining = stored.difference(due);
        if mark.shreddable(remaining) {
            if !dry_run {
                let op = WriteOp::Shred {
                    id,
                    read_version: row.version,
                    retention_version: row.retention_version,
                    at: now,
                };
                self.store
                    .write_audited(op, self.sweep_event(SHRED_METHOD, id, due, &mark, now))
                    .await?;
                tracing::info!(subject = %id, paths = due.len(), "subject crypto-shredded: nothing keeps it");
            }
            return Ok(Visit::Shredded(due));
        }
        let next = mark.next_due_after(now);
        if due.is_empty() {
            if !dry_run {
                let op = WriteOp::RetentionChange {
                    subject: id,
                    expected_version: row.retention_version,
                    mark: mark.encode(),
                    due: next,
                    change: RecordChange::Reschedule,
                };
                self.store.write(op).await?;
            }
            return Ok(Visit::Nothing);
        }
        if !dry_run {
            for path in due.iter() {
                record.clear(path);
            }
            let op = WriteOp::Purge {
                id,
                read_version: row.version,
                retention_version: row.retention_version,
                record: record.to_blob(),
                updated_at: now,
                remove_index_paths: due
                    .iter()
                    .filter(|p| p.index().is_some())
                    .map(FieldPath::as_str)
                    .collect(),
                mark: mark.encode(),
                due: next,
            };
            self.store
                .write_audited(op, self.sweep_event(PURGE_METHOD, id, due, &mark, now))
                .await?;
        }
        Ok(Visit::Purged(due))
    }

    /// The audit event of a purge: the sweeper, the subject, the paths erased (as written) and
    /// the purposes whose retention ran out.
    fn sweep_event(
        &self,
        method: &str,
        id: Uuid,
        paths: PathSet,
        mark: &Mark,
        now: i64,
    ) -> crate::store::AuditRecord {
        let mut expired: Vec<&str> = mark
            .groups
            .iter()
            .filter(|g| !g.paths.intersection(paths).is_empty())
            .map(|g| g.purpose.as_str())
            .collect();
        expired.dedup();
        let mut draft = Draft::new(AuditEvent {
            at_us: now,
            method: method.to_owned(),
            caller: SWEEPER_CALLER.to_owned(),
            role: "system".to_owned(),
            policy_version: self.trail.policy_version().to_owned(),
            outcome: OK.to_owned(),
            detail: format!("retention-ended={}", expired.join(",")),
            ..AuditEvent::default()
        });
        draft.subject(id);
        draft.written(paths);
        draft.committed_record()
    }
}

fn count_paths(into: &mut BTreeMap<String, u64>, paths: PathSet) {
    for p in paths.iter() {
        *into.entry(p.as_str().to_owned()).or_default() += 1;
    }
}

fn decode_mark(bytes: Option<&[u8]>) -> Result<Option<Mark>, DomainError> {
    bytes
        .map(|b| {
            Mark::decode(b).map_err(|e| DomainError::Internal(format!("retention state: {e}")))
        })
        .transpose()
}

fn stored_paths(record: &[u8]) -> Result<PathSet, DomainError> {
    SealedRecord::decode_blob(record)
        .map(|r| r.paths())
        .map_err(|e| DomainError::Internal(format!("sealed record: {e}")))
}

fn hold_scope(hold: &HoldRow) -> String {
    match (&hold.purpose, &hold.reference) {
        (Some(p), Some(r)) => format!("record={p}/{r}"),
        _ => "subject".to_owned(),
    }
}

/// A hold's reason: a case or ticket reference, like `x-kluis-reason` (never free text).
fn parse_case(text: &str, field: &str) -> Result<String, DomainError> {
    super::access::parse_reason(text).map_err(|_| {
        DomainError::invalid(
            field,
            "a case or ticket reference: a letter or digit, then letters, digits and . _ : # / - \
             (64 at most, no spaces)",
        )
    })
}
