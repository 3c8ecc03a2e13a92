//! The subject vault: create, read, update, find, batch-read and erase subjects, sealing every leaf
//! under the subject's own data key.

use std::{collections::BTreeMap, sync::Arc};

use uuid::Uuid;

use super::{
    DomainError, FieldChanges, FieldPath, FieldValue, StoredField, Violation,
    access::Access,
    call::Draft,
    keys::Keys,
    paths::IndexKind,
    record::{RecordError, RecordRef, SealedRecord, index_key, new_subject_id},
    values,
};
use crate::{
    clock::Clock,
    crypto::{CryptoError, FieldCipher, SecretKey, WrappedKey},
    policy::{
        Objection, PathSet, Policy,
        lifecycle::{Mark, PathState},
        mask_text,
    },
    store::{IndexEntry, Store, StoreError, SubjectRow, WriteOp, WriteOutcome},
};

/// Most ids one BatchGetSubjects call may ask for.
pub const MAX_BATCH_GET: usize = 100;
/// Entries the portal activity log keeps: the newest, older ones drop off as new ones come.
pub const MAX_ACTIVITY_ENTRIES: usize = 1000;
/// Attempts of one activity append when other writes to the subject get there first.
const APPEND_ATTEMPTS: u32 = 20;
/// Most ids one FindSubjects call returns.
pub const MAX_FIND_RESULTS: u32 = 1000;
/// How long an update without `expected_version` keeps retrying when other writes to the same
/// subject get there first (each round one of the competing writers wins).
const UPDATE_RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// A subject as read: the leaves asked for that are stored, with their provenance.
#[derive(Debug, Clone)]
pub struct SubjectView {
    pub id: Uuid,
    pub version: u64,
    pub created_at_us: i64,
    pub updated_at_us: i64,
    pub fields: BTreeMap<FieldPath, StoredField>,
}

/// A subject as one caller may see it under its purpose: the readable leaves in `view`, the
/// masked ones apart (never in `view`), and the stored paths it may not see.
#[derive(Debug, Clone)]
pub struct Shown {
    pub view: SubjectView,
    pub masked: Vec<(FieldPath, String)>,
    pub withheld: PathSet,
}

/// An equality lookup: a blind-indexed path and its value, parsed and normalised at the edge.
#[derive(Clone)]
pub struct LookupKey {
    pub path: FieldPath,
    pub value: String,
}

/// The vault service of one instance.
pub struct Vault {
    pub(super) store: Store,
    pub(super) keys: Arc<Keys>,
    pub(super) policy: Arc<Policy>,
    pub(super) clock: Clock,
}

impl Vault {
    pub fn new(store: Store, keys: Arc<Keys>, policy: Arc<Policy>, clock: Clock) -> Self {
        Self {
            store,
            keys,
            policy,
            clock,
        }
    }

    /// The paths of a subject that do not exist for this caller: those its retention state keeps
    /// only for a legal retention the caller's role and purpose may not read (DESIGN.md §2).
    pub(super) fn hidden(
        &self,
        access: &Access,
        retention: Option<&[u8]>,
    ) -> Result<PathSet, DomainError> {
        let Some(bytes) = retention else {
            return Ok(PathSet::EMPTY);
        };
        let mark = Mark::decode(bytes)
            .map_err(|e| DomainError::Internal(format!("retention state: {e}")))?;
        Ok(mark.hidden(
            &self.policy,
            access.caller.role,
            &access.purpose,
            self.clock.now_us(),
        ))
    }

    /// Opens what the caller may see of a row: `NotFound` when retention hides every stored path
    /// the caller could otherwise see (to it the subject is gone).
    fn open_visible(
        &self,
        access: &Access,
        row: &SubjectRow,
        wanted: PathSet,
        draft: &mut Draft,
    ) -> Result<Shown, DomainError> {
        let hidden = self.hidden(access, row.retention.as_deref())?;
        let (view, stored) = self.open_row(row, wanted.difference(hidden))?;
        let visible = stored.difference(hidden);
        if !stored.intersection(hidden).is_empty()
            && visible.intersection(access.grant.visible()).is_empty()
        {
            return Err(DomainError::NotFound);
        }
        let withheld = access.withheld(visible);
        draft.withheld(withheld);
        let shown = self.show(access, view, wanted.difference(hidden), draft);
        Ok(Shown { withheld, ..shown })
    }

    /// Creates a subject holding `fields` (every path inside the caller's write grant); returns
    /// what the caller may see of it (version 1).
    pub async fn create(
        &self,
        access: &Access,
        mut fields: BTreeMap<FieldPath, FieldValue>,
        source: Option<String>,
        draft: &mut Draft,
    ) -> Result<Shown, DomainError> {
        access.check_write(fields.keys().copied(), draft)?;
        access.require_reason_for_values()?;
        let mut changes: FieldChanges = fields.iter().map(|(p, v)| (*p, Some(v.clone()))).collect();
        normalise_postal_codes(&mut changes, &BTreeMap::new())?;
        for (path, change) in changes {
            if let Some(value) = change {
                fields.insert(path, value);
            }
        }
        let source = source.unwrap_or_else(|| access.caller.name.clone());
        let now = self.clock.now_us();
        let id = new_subject_id();
        self.check_unique_under_old_index_keys(id, &fields).await?;
        let dek_id = Uuid::new_v4();
        let dek = SecretKey::random()?;
        let wrapped = self.keys.keyring().wrap_dek(id, dek_id, &dek)?;
        let cipher = FieldCipher::new(&dek, id, dek_id)?;
        let mut record = SealedRecord::default();
        let mut index = Vec::new();
        for (path, value) in &fields {
            record.set(&cipher, *path, value, now, &source)?;
            if let Some(entry) = self.index_entry(*path, value) {
                index.push(entry);
            }
        }
        let row = SubjectRow {
            id,
            dek_id,
            kek_version: wrapped.wrapping_version,
            wrapped_dek: wrapped.bytes,
            record: record.to_blob(),
            version: 1,
            created_at: now,
            updated_at: now,
            retention: None,
            retention_version: 0,
            restricted_at: None,
        };
        let fields: BTreeMap<FieldPath, StoredField> = fields
            .into_iter()
            .map(|(p, value)| {
                let stored = StoredField {
                    value,
                    updated_at_us: now,
                    source: source.clone(),
                };
                (p, stored)
            })
            .collect();
        let view = SubjectView {
            id,
            version: 1,
            created_at_us: now,
            updated_at_us: now,
            fields,
        };
        draft.subject(id);
        draft.written(record.paths());
        let shown = self.show(access, view, PathSet::all(), draft);
        match self
            .store
            .write_audited(WriteOp::Create { row, index }, draft.committed_record())
            .await
        {
            Ok(_) => {}
            Err(e @ StoreError::StaleKeyring(_)) => {
                // A KEK retired since this instance last reloaded: reload, the caller retries.
                if let Err(reload) = self.keys.refresh().await {
                    tracing::warn!(error = %reload, "keyring reload failed");
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
        draft.committed = true;
        Ok(shown)
    }

    /// Reads what the caller may see of a subject, limited to `asked` when given.
    pub async fn get(
        &self,
        access: &Access,
        id: Uuid,
        asked: &[FieldPath],
        draft: &mut Draft,
    ) -> Result<Shown, DomainError> {
        let wanted = access.readable(asked, draft)?;
        access.require_reason_for_values()?;
        draft.subject(id);
        let row = self.store.subject(id).await?.ok_or(DomainError::NotFound)?;
        if let Some(refusal) = self.unusable(access, &[&row]).await?.remove(&id) {
            return Err(refusal);
        }
        self.ensure_keks([&row]).await;
        self.open_visible(access, &row, wanted, draft)
    }

    /// Reads several subjects; one result per id, in the order asked, each found or not.
    pub async fn batch_get(
        &self,
        access: &Access,
        ids: &[Uuid],
        asked: &[FieldPath],
        draft: &mut Draft,
    ) -> Result<Vec<(Uuid, Result<Shown, DomainError>)>, DomainError> {
        if ids.len() > MAX_BATCH_GET {
            return Err(DomainError::invalid(
                "ids",
                format!("at most {MAX_BATCH_GET} ids per call"),
            ));
        }
        let wanted = access.readable(asked, draft)?;
        access.require_reason_for_values()?;
        let rows = self.store.subjects(ids).await?;
        let found: Vec<&SubjectRow> = rows.values().filter_map(|r| r.as_ref().ok()).collect();
        let mut unusable = self.unusable(access, &found).await?;
        for id in ids {
            draft.subject(*id);
        }
        self.ensure_keks(rows.values().filter_map(|r| r.as_ref().ok()))
            .await;
        Ok(ids
            .iter()
            .map(|id| {
                let result = match rows.get(id) {
                    None => Err(DomainError::NotFound),
                    Some(Err(e)) => Err(DomainError::from(e.clone())),
                    Some(Ok(_)) if unusable.contains_key(id) => {
                        Err(unusable.remove(id).unwrap_or(DomainError::NotFound))
                    }
                    Some(Ok(row)) => self.open_visible(access, row, wanted, draft),
                };
                (*id, result)
            })
            .collect())
    }

    /// Subjects whose indexed value at `key.path` equals `key.value` (at most
    /// [`MAX_FIND_RESULTS`]); the path must be one the caller may see. Under an opt-out purpose,
    /// subjects who objected are never returned.
    pub async fn find(
        &self,
        access: &Access,
        key: &LookupKey,
        draft: &mut Draft,
    ) -> Result<Vec<Uuid>, DomainError> {
        // A lookup confirms the whole value: only a path the caller may read is searchable (a
        // masked IBAN is not).
        if !access.grant.read.contains(key.path) {
            return Err(DomainError::PermissionDenied(format!(
                "purpose {} does not let role {} look subjects up by {}",
                access.purpose,
                access.caller.role,
                key.path.as_str()
            )));
        }
        draft.event.detail = format!("lookup={}", key.path.as_str());
        let found = self
            .find_indexed(key.path, &key.value, MAX_FIND_RESULTS)
            .await?;
        // A subject whose matched path retention hides from the caller is not there for it.
        // Nor is one under a restriction of processing, one who objected, or (consent-based
        // purposes) one without consent.
        let unrestricted = exempt_from_restriction(&access.purpose);
        let mut ids = Vec::with_capacity(found.len());
        for f in found {
            if (!f.restricted || unrestricted)
                && !self
                    .hidden(access, f.retention.as_deref())?
                    .contains(key.path)
            {
                ids.push(f.id);
            }
        }
        let refused = self.refused_by_subject(access, &ids).await?;
        ids.retain(|id| !refused.contains(id));
        for id in &ids {
            draft.subject(*id);
        }
        Ok(ids)
    }

    /// Applies `changes` (set or clear per leaf, every path inside the caller's write grant) and
    /// returns what the caller may see of the subject afterwards.
    pub async fn update(
        &self,
        access: &Access,
        id: Uuid,
        changes: FieldChanges,
        expected_version: Option<u64>,
        source: Option<String>,
        draft: &mut Draft,
    ) -> Result<Shown, DomainError> {
        access.check_write(changes.keys().copied(), draft)?;
        access.require_reason_for_values()?;
        draft.subject(id);
        let source = source.unwrap_or_else(|| access.caller.name.clone());
        let deadline = std::time::Instant::now() + UPDATE_RETRY_WINDOW;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let row = self.store.subject(id).await?.ok_or(DomainError::NotFound)?;
            if attempts == 1
                && let Some(refusal) = self.unusable(access, &[&row]).await?.remove(&id)
            {
                return Err(refusal);
            }
            if let Some(expected) = expected_version
                && expected != row.version
            {
                return Err(DomainError::Aborted {
                    expected,
                    actual: row.version,
                });
            }
            self.ensure_keks([&row]).await;
            let cipher = self.cipher(&row)?;
            let mut record =
                SealedRecord::decode_blob(&row.record).map_err(|e| data_loss(id, e))?;
            let hidden = self.hidden(access, row.retention.as_deref())?;
            check_not_hidden(access, id, &changes, record.paths(), hidden)?;
            let mut changes = changes.clone();
            let stored = record
                .open(&cipher, POSTAL_DEPENDENCIES)
                .map_err(|e| data_loss(id, e))?;
            normalise_postal_codes(&mut changes, &stored)?;
            // Normalising may rewrite a postal code the caller did not send (its country changed):
            // that is still a write of the caller, so it must be inside the grant too.
            access.check_write(changes.keys().copied(), draft)?;

            let now = self.clock.now_us();
            let mut replace_index_paths = Vec::new();
            let mut add_index = Vec::new();
            for (path, change) in &changes {
                match change {
                    Some(value) => record.set(&cipher, *path, value, now, &source)?,
                    None => record.clear(*path),
                }
                if path.index().is_some() {
                    replace_index_paths.push(path.as_str());
                    if let Some(entry) = change.as_ref().and_then(|v| self.index_entry(*path, v)) {
                        add_index.push(entry);
                    }
                }
            }
            let set: BTreeMap<FieldPath, FieldValue> = changes
                .iter()
                .filter_map(|(p, v)| v.clone().map(|v| (*p, v)))
                .collect();
            self.check_unique_under_old_index_keys(id, &set).await?;
            let op = WriteOp::Update {
                id,
                read_version: row.version,
                record: record.to_blob(),
                updated_at: now,
                replace_index_paths,
                add_index,
                retention_due: written_due(row.retention.as_deref(), &changes, now)?,
            };
            // The committed event lists what this attempt writes and what the answer shows.
            let mut attempt = draft.clone();
            attempt.written(PathSet::from_paths(changes.keys().copied()));
            // Leaves that do not open are left out of the answer (and logged); a read reports
            // them as DATA_LOSS. The write does not depend on them.
            let fields = record.open_readable(&cipher, FieldPath::ALL, |path| {
                tracing::error!(subject = %id, path, "stored data failed authentication");
            });
            let view = SubjectView {
                id,
                version: row.version + 1,
                created_at_us: row.created_at,
                updated_at_us: now,
                fields,
            };
            let everything = access.grant.visible().difference(hidden);
            let shown = self.show(access, view, everything, &mut attempt);
            let withheld = access.withheld(record.paths().difference(hidden));
            attempt.withheld(withheld);
            match self
                .store
                .write_audited(op, attempt.committed_record())
                .await
            {
                Ok(WriteOutcome::Updated { version }) => {
                    attempt.committed = true;
                    *draft = attempt;
                    let mut shown = Shown { withheld, ..shown };
                    shown.view.version = version;
                    return Ok(shown);
                }
                Ok(other) => {
                    return Err(DomainError::Internal(format!("update answered {other:?}")));
                }
                Err(StoreError::VersionMismatch { actual }) => {
                    if let Some(expected) = expected_version {
                        return Err(DomainError::Aborted { expected, actual });
                    }
                    if std::time::Instant::now() > deadline {
                        return Err(DomainError::Unavailable(format!(
                            "subject {id} changed concurrently during {attempts} attempts; retry"
                        )));
                    }
                    // Jitter, so the competing writers do not line up again in the next batch.
                    let jitter_us =
                        crate::crypto::random_bytes::<1>().map_or(0, |b| u64::from(b[0]) * 4);
                    tokio::time::sleep(std::time::Duration::from_micros(jitter_us)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Erases a subject at once: DEK, ciphertexts, index entries and objections in one
    /// transaction with its audit event. Operators only.
    pub async fn erase(
        &self,
        access: &Access,
        id: Uuid,
        draft: &mut Draft,
    ) -> Result<i64, DomainError> {
        access.caller.require_operator("EraseSubject")?;
        // Erasing removes every path: only a purpose that lets the role write them all.
        if access.grant.write != PathSet::all() {
            draft.event.detail = "denied=erasure".into();
            return Err(DomainError::PermissionDenied(format!(
                "erasure needs a purpose that lets role {} write every path (subject-request); \
                 purpose {} does not",
                access.caller.role, access.purpose
            )));
        }
        draft.subject(id);
        // What a legal obligation keeps is not erased outright: RequestErasure erases the rest
        // and signs a receipt for what stays.
        let row = self.store.subject(id).await?.ok_or(DomainError::NotFound)?;
        let stored = SealedRecord::decode_blob(&row.record)
            .map_err(|e| data_loss(id, e))?
            .paths();
        let records = self.store.processing_records(id).await?;
        let holds = self.store.legal_holds(id).await?;
        let now = self.clock.now_us();
        let kept = super::rights::legally_kept(&self.policy, &records, &holds, stored, now)?;
        if !kept.is_empty() {
            draft.event.detail = "denied=legal-retention".into();
            let paths: Vec<&str> = kept.iter().map(|p| p.as_str()).collect();
            return Err(DomainError::FailedPrecondition(format!(
                "subject {id}: a legal obligation keeps {} (use RightsService.RequestErasure, \
                 which erases the rest and signs a receipt)",
                paths.join(", ")
            )));
        }
        draft.event.detail = "erased".into();
        let at = self.clock.now_us();
        self.store
            .write_audited(WriteOp::Erase { id, at }, draft.committed_record())
            .await?;
        draft.committed = true;
        tracing::info!(subject = %id, "subject erased");
        Ok(at)
    }

    /// The subjects of `rows` that may not be used under the caller's purpose, each with its
    /// refusal (`FailedPrecondition` naming the reason): a restriction of processing in force
    /// (unless the purpose is exempt), an objection against an opt-out purpose, or no consent for
    /// a consent-based one.
    pub(super) async fn unusable(
        &self,
        access: &Access,
        rows: &[&SubjectRow],
    ) -> Result<BTreeMap<Uuid, DomainError>, DomainError> {
        let mut out = BTreeMap::new();
        if !exempt_from_restriction(&access.purpose) {
            for row in rows {
                if let Some(since) = row.restricted_at {
                    out.insert(
                        row.id,
                        DomainError::FailedPrecondition(format!(
                            "processing of subject {} is restricted (GDPR art. 18) since {since} µs; \
                             only purposes {} may read it",
                            row.id,
                            UNRESTRICTED_PURPOSES.join(" and ")
                        )),
                    );
                }
            }
        }
        let ids: Vec<Uuid> = rows
            .iter()
            .map(|r| r.id)
            .filter(|id| !out.contains_key(id))
            .collect();
        for id in self.refused_by_subject(access, &ids).await? {
            out.insert(id, refused_by_subject_error(access));
        }
        Ok(out)
    }

    /// Those of `ids` whose own choice excludes the caller's purpose: objected to an opt-out
    /// purpose, or no consent in force for a consent-based one.
    pub(super) async fn refused_by_subject(
        &self,
        access: &Access,
        ids: &[Uuid],
    ) -> Result<std::collections::HashSet<Uuid>, DomainError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        Ok(match access.objection {
            Objection::OptOut => self.store.objected_among(&access.purpose, ids).await?,
            Objection::ConsentBased => {
                let consented = self.store.consented_among(&access.purpose, ids).await?;
                ids.iter()
                    .copied()
                    .filter(|id| !consented.contains(id))
                    .collect()
            }
            Objection::NotObjectable => Default::default(),
        })
    }

    /// Appends `entry` to the subject's portal activity log (the newest
    /// [`MAX_ACTIVITY_ENTRIES`] are kept), as an update of `activity_log` under the caller's
    /// purpose with every check an update has. Returns the new version and the entries kept.
    pub async fn record_activity(
        &self,
        access: &Access,
        id: Uuid,
        entry: super::ActivityRecord,
        draft: &mut Draft,
    ) -> Result<(u64, usize), DomainError> {
        let path = FieldPath::ActivityLog;
        access.check_write([path], draft)?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let row = self.store.subject(id).await?.ok_or(DomainError::NotFound)?;
            self.ensure_keks([&row]).await;
            let (view, _) = self.open_row(&row, PathSet::from_paths([path]))?;
            let mut log = match view.fields.get(&path).map(|f| &f.value) {
                Some(FieldValue::Activity(list)) => list.clone(),
                _ => Vec::new(),
            };
            log.push(entry.clone());
            if log.len() > MAX_ACTIVITY_ENTRIES {
                log.drain(..log.len() - MAX_ACTIVITY_ENTRIES);
            }
            let kept = log.len();
            let changes: FieldChanges = [(path, Some(FieldValue::Activity(log)))]
                .into_iter()
                .collect();
            draft.event.detail = "activity-appended".into();
            match self
                .update(access, id, changes, Some(row.version), None, draft)
                .await
            {
                Ok(shown) => return Ok((shown.view.version, kept)),
                Err(DomainError::Aborted { .. }) if attempts < APPEND_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Splits a view for the caller: readable leaves stay, masked ones move apart masked.
    fn show(
        &self,
        access: &Access,
        mut view: SubjectView,
        wanted: PathSet,
        draft: &mut Draft,
    ) -> Shown {
        let stored = PathSet::from_paths(view.fields.keys().copied());
        let vis = access.visibility(stored, wanted);
        let mut masked = Vec::new();
        // In place: a caller who reads every leaf (the usual case) keeps the map as it is.
        view.fields.retain(|&path, field| {
            if vis.read.contains(path) {
                return true;
            }
            if vis.masked.contains(path) {
                masked.push((path, mask_value(path, &field.value)));
            }
            false
        });
        draft.read(vis.read);
        draft.masked(vis.masked);
        Shown {
            view,
            masked,
            withheld: vis.withheld,
        }
    }

    /// The subjects whose blind index at `path` matches `value`, under the active index key and
    /// every older one still loaded (a rotation in progress: the re-index job has not moved every
    /// subject yet), in id order, at most `limit`.
    pub(super) async fn find_indexed(
        &self,
        path: FieldPath,
        value: &str,
        limit: u32,
    ) -> Result<Vec<crate::store::Found>, DomainError> {
        let digests = self
            .keys
            .keyring()
            .blind_indexes(path.as_str(), &index_key(path, value));
        if let [(_, digest)] = digests.as_slice() {
            return Ok(self.store.find(path.as_str(), digest, limit).await?);
        }
        let digests: Vec<[u8; 32]> = digests.into_iter().map(|(_, d)| d).collect();
        Ok(self.store.find_any(path.as_str(), &digests, limit).await?)
    }

    /// While older blind-index keys are still consulted, a unique path (the username) written
    /// under the active key must not match another subject's entry under an older one: the
    /// unique index only compares entries of one version. (A subject the re-index job moves
    /// meanwhile meets the unique index under the active version instead.)
    async fn check_unique_under_old_index_keys(
        &self,
        id: Uuid,
        fields: &BTreeMap<FieldPath, FieldValue>,
    ) -> Result<(), DomainError> {
        let ring = self.keys.keyring();
        for (path, value) in fields {
            if path.index() != Some(IndexKind::Unique) {
                continue;
            }
            let Some(text) = value.as_text() else {
                continue;
            };
            let digests = ring.blind_indexes(path.as_str(), &index_key(*path, text));
            for (_, digest) in digests.iter().skip(1) {
                let found = self.store.find(path.as_str(), digest, 2).await?;
                if found.iter().any(|f| f.id != id) {
                    return Err(DomainError::AlreadyExists {
                        path: path.as_str().to_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Moves up to `limit` subjects whose blind-index entries are under an older index key to the
    /// active one (each compare-and-set on the subject's version; a subject changed meanwhile is
    /// left to the next batch); how many it moved, or `None` when none was left.
    pub async fn reindex_batch(&self, limit: u32) -> Result<Option<u64>, DomainError> {
        let active = self.keys.keyring().index_version();
        let ids = self.store.index_stale(active, limit.max(1)).await?;
        if ids.is_empty() {
            return Ok(None);
        }
        let indexed = PathSet::from_paths(
            FieldPath::ALL
                .iter()
                .copied()
                .filter(|p| p.index().is_some()),
        );
        let rows = self.store.subjects(&ids).await?;
        let mut ops = Vec::with_capacity(rows.len());
        for (id, row) in rows {
            let row = match row {
                Ok(row) => row,
                Err(e) => {
                    tracing::error!(subject = %id, error = %e, "unreadable row; not re-indexed");
                    continue;
                }
            };
            self.ensure_keks([&row]).await;
            let view = match self.open_row(&row, indexed) {
                Ok((view, _)) => view,
                Err(e) => {
                    tracing::error!(subject = %id, error = %e, "indexed values do not open; not re-indexed");
                    continue;
                }
            };
            let entries = view
                .fields
                .iter()
                .filter_map(|(p, f)| self.index_entry(*p, &f.value))
                .collect();
            ops.push(WriteOp::Reindex {
                id,
                read_version: row.version,
                entries,
            });
        }
        // One write per subject, committed together by the group committer.
        let ids: Vec<Uuid> = ops
            .iter()
            .filter_map(|op| match op {
                WriteOp::Reindex { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let results =
            futures_util::future::join_all(ops.into_iter().map(|op| self.store.write(op))).await;
        let mut moved = 0;
        for (id, result) in ids.into_iter().zip(results) {
            match result {
                Ok(_) => moved += 1,
                Err(StoreError::VersionMismatch { .. }) => {}
                // Another subject holds the same username under the active key (two subjects
                // took it under different versions): left for an operator, the rest goes on.
                Err(StoreError::Duplicate { path }) => {
                    tracing::error!(subject = %id, path, "unique value held by another subject under the new index key; not re-indexed");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Some(moved))
    }

    /// Re-indexes until no subject is left under an older index key, at most `rate` subjects per
    /// second (0: no limit); how many it moved. Appends one audit event when it moved any.
    pub async fn reindex_all(&self, rate: u32, batch: u32) -> Result<u64, DomainError> {
        let started = tokio::time::Instant::now();
        let mut total = 0u64;
        let mut idle_batches = 0;
        while let Some(moved) = self.reindex_batch(batch).await? {
            total += moved;
            // Every subject of a batch changed meanwhile (busy subjects): try again shortly.
            idle_batches = if moved == 0 { idle_batches + 1 } else { 0 };
            if idle_batches > 100 {
                return Err(DomainError::Unavailable(
                    "re-index makes no progress".into(),
                ));
            }
            if rate > 0 {
                let due =
                    started + std::time::Duration::from_secs_f64(total as f64 / f64::from(rate));
                tokio::time::sleep_until(due).await;
            }
        }
        if total > 0 {
            self.keys
                .record_job_event("keys.reindex", crate::domain::keys::KIND_BLIND_INDEX, total)
                .await?;
        }
        Ok(total)
    }

    /// Runs the re-index job after every blind-index key rotation (and once at start, finishing
    /// one a crash interrupted), unless the job is switched off; the application stops it at
    /// shutdown.
    pub fn spawn_reindexer(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let settings = self.keys.settings().clone();
        if settings.rewrap_rate == 0 {
            return None;
        }
        let weak = Arc::downgrade(self);
        Some(tokio::spawn(async move {
            loop {
                let Some(vault) = weak.upgrade() else { return };
                if let Err(e) = vault
                    .reindex_all(settings.rewrap_rate, settings.rewrap_batch)
                    .await
                {
                    tracing::warn!(error = %e, "re-index failed; resumed at the next interval");
                }
                tokio::select! {
                    () = tokio::time::sleep(settings.refresh) => {}
                    () = vault.keys.reindex_requested() => {}
                }
            }
        }))
    }

    /// Reloads the keyring first if a row's data key is under a KEK version this instance has not
    /// loaded (another instance rotated since the last reload), so no read fails for that.
    pub(super) async fn ensure_keks<'a>(&self, rows: impl IntoIterator<Item = &'a SubjectRow>) {
        let ring = self.keys.keyring();
        let missing = rows
            .into_iter()
            .map(|row| row.kek_version)
            .find(|v| !ring.has_kek(*v));
        if let Some(version) = missing
            && let Err(e) = self.keys.load_kek(version).await
        {
            tracing::warn!(error = %e, "keyring reload failed");
        }
    }

    fn cipher(&self, row: &SubjectRow) -> Result<FieldCipher, DomainError> {
        let wrapped = WrappedKey {
            wrapping_version: row.kek_version,
            bytes: row.wrapped_dek.clone(),
        };
        let dek = self
            .keys
            .keyring()
            .unwrap_dek(row.id, row.dek_id, &wrapped)
            .map_err(|e| match e {
                // A KEK this instance has not loaded yet (another instance rotated a moment ago)
                // is a keyring problem, not tampering: reload, and let the caller retry.
                CryptoError::UnknownKeyVersion { version, .. } => {
                    self.keys.request_refresh();
                    DomainError::Unavailable(format!(
                        "subject {}: data key under kek v{version}, which this instance has not \
                         loaded yet; retry",
                        row.id
                    ))
                }
                _ => data_loss(row.id, RecordError::Crypto(e)),
            })?;
        Ok(FieldCipher::new(&dek, row.id, row.dek_id)?)
    }

    /// Opens the leaves in `paths`; also returns every path the record holds.
    pub(super) fn open_row(
        &self,
        row: &SubjectRow,
        paths: PathSet,
    ) -> Result<(SubjectView, PathSet), DomainError> {
        let cipher = self.cipher(row)?;
        let paths: Vec<FieldPath> = paths.iter().collect();
        let record = RecordRef::decode(&row.record).map_err(|e| data_loss(row.id, e))?;
        let fields = record
            .open(&cipher, &paths)
            .map_err(|e| data_loss(row.id, e))?;
        let view = SubjectView {
            id: row.id,
            version: row.version,
            created_at_us: row.created_at,
            updated_at_us: row.updated_at,
            fields,
        };
        Ok((view, record.paths()))
    }

    fn index_entry(&self, path: FieldPath, value: &FieldValue) -> Option<IndexEntry> {
        let _kind: IndexKind = path.index()?;
        let text = value.as_text()?;
        let (key_version, digest) = self
            .keys
            .keyring()
            .blind_index(path.as_str(), &index_key(path, text));
        Some(IndexEntry {
            path: path.as_str(),
            key_version,
            digest,
        })
    }
}

/// An update may not touch what retention hides from the caller: `NotFound` when it hides every
/// stored path, else `FailedPrecondition` naming the path (a legally retained value is never
/// overwritten by a caller that may not even read it).
fn check_not_hidden(
    access: &Access,
    id: Uuid,
    changes: &FieldChanges,
    stored: PathSet,
    hidden: PathSet,
) -> Result<(), DomainError> {
    if hidden.is_empty() {
        return Ok(());
    }
    if !stored.intersection(hidden).is_empty()
        && stored
            .difference(hidden)
            .intersection(access.grant.visible())
            .is_empty()
    {
        return Err(DomainError::NotFound);
    }
    if let Some(path) = changes.keys().find(|p| hidden.contains(**p)) {
        return Err(DomainError::FailedPrecondition(format!(
            "subject {id}: {} is kept only for a legal retention and cannot be changed under purpose {}",
            path.as_str(),
            access.purpose
        )));
    }
    Ok(())
}

/// `Some(now)` when the update stores a path that is already due (every record granting it past
/// its retention, no hold): the sweeper, which would not visit the subject again on its own,
/// erases it at its next sweep (DESIGN.md §2).
fn written_due(
    retention: Option<&[u8]>,
    changes: &FieldChanges,
    now: i64,
) -> Result<Option<i64>, DomainError> {
    let Some(bytes) = retention else {
        return Ok(None);
    };
    let mark =
        Mark::decode(bytes).map_err(|e| DomainError::Internal(format!("retention state: {e}")))?;
    let due = changes.iter().any(|(path, change)| {
        change.is_some() && matches!(mark.state(*path, now), PathState::Due { held: false, .. })
    });
    Ok(due.then_some(now))
}

/// Purposes a restriction of processing (GDPR art. 18) does not stop: handling the subject's own
/// request, and a demand the law makes.
pub const UNRESTRICTED_PURPOSES: [&str; 2] = ["subject-request", "legal-demand"];

/// Whether reads under `purpose` go on while a subject's processing is restricted.
pub fn exempt_from_restriction(purpose: &str) -> bool {
    UNRESTRICTED_PURPOSES.contains(&purpose)
}

/// A masked value: text through the policy's masks, other leaves as a marker only.
fn mask_value(path: FieldPath, value: &FieldValue) -> String {
    match value {
        FieldValue::Text(text) => mask_text(path, text),
        FieldValue::Enum(_) => "***".to_owned(),
        FieldValue::IpAddresses(list) => format!("*** ({} entries)", list.len()),
        FieldValue::Activity(list) => format!("*** ({} entries)", list.len()),
    }
}

/// Logs and maps a record that failed to open. Ids and paths only.
fn data_loss(subject: Uuid, e: RecordError) -> DomainError {
    let path = match &e {
        RecordError::Field(p) => Some(p.clone()),
        _ => None,
    };
    tracing::error!(subject = %subject, path = path.as_deref().unwrap_or("-"), error = %e, "stored data failed authentication");
    DomainError::DataLoss { subject, path }
}

const POSTAL_DEPENDENCIES: &[FieldPath] = &[
    FieldPath::AddressPostalCode,
    FieldPath::AddressCountry,
    FieldPath::BillingAddressPostalCode,
    FieldPath::BillingAddressCountry,
];

/// Checks each postal code against its address's country (Dutch form when NL) after the change,
/// normalising the written value. A country change that makes the stored postal code invalid is
/// refused naming the postal-code path.
fn normalise_postal_codes(
    changes: &mut FieldChanges,
    stored: &BTreeMap<FieldPath, StoredField>,
) -> Result<(), DomainError> {
    let mut violations = Vec::new();
    for (postal, country) in [
        (FieldPath::AddressPostalCode, FieldPath::AddressCountry),
        (
            FieldPath::BillingAddressPostalCode,
            FieldPath::BillingAddressCountry,
        ),
    ] {
        if !changes.contains_key(&postal) && !changes.contains_key(&country) {
            continue;
        }
        let country_now: Option<String> = match changes.get(&country) {
            Some(change) => change.as_ref().and_then(|v| v.as_text()).map(str::to_owned),
            None => stored
                .get(&country)
                .and_then(|f| f.value.as_text())
                .map(str::to_owned),
        };
        let postal_now: Option<String> = match changes.get(&postal) {
            Some(change) => change.as_ref().and_then(|v| v.as_text()).map(str::to_owned),
            None => stored
                .get(&postal)
                .and_then(|f| f.value.as_text())
                .map(str::to_owned),
        };
        let Some(code) = postal_now else { continue };
        match values::postal_code(&code, country_now.as_deref()) {
            // Written in its normal form, also when only the country changed.
            Ok(normalised) => {
                if changes.contains_key(&postal) || normalised != code {
                    changes.insert(postal, Some(FieldValue::Text(normalised)));
                }
            }
            Err(e) => violations.push(Violation::new(postal.as_str(), e)),
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(DomainError::InvalidArgument(violations))
    }
}

/// The refusal of a read under a purpose the subject objected to, or has not consented to.
fn refused_by_subject_error(access: &Access) -> DomainError {
    match access.objection {
        Objection::ConsentBased => DomainError::FailedPrecondition(format!(
            "the subject has no consent in force for purpose {}",
            access.purpose
        )),
        _ => DomainError::FailedPrecondition(format!(
            "the subject objected to purpose {}",
            access.purpose
        )),
    }
}
