//! Processing records, legal holds and the subjects' stored retention state: the reads the
//! retention engine plans from (its writes go through the group committer, compare-and-set on
//! `subjects.retention_version`).

use uuid::Uuid;

use super::{Store, StoreError, on_pool, uuid_from};

/// A processing record (subject, purpose, reference) as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRow {
    pub purpose: String,
    pub reference: String,
    pub subject: Uuid,
    pub opened_at: i64,
    /// Caller id.
    pub opened_by: String,
    pub closed_at: Option<i64>,
    pub close_event: Option<String>,
    pub closed_by: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RawRecordRow {
    purpose: String,
    reference: String,
    subject_id: Vec<u8>,
    opened_at: i64,
    opened_by: String,
    closed_at: Option<i64>,
    close_event: Option<String>,
    closed_by: Option<String>,
}

impl TryFrom<RawRecordRow> for RecordRow {
    type Error = StoreError;
    fn try_from(r: RawRecordRow) -> Result<Self, StoreError> {
        Ok(RecordRow {
            purpose: r.purpose,
            reference: r.reference,
            subject: uuid_from(&r.subject_id)?,
            opened_at: r.opened_at,
            opened_by: r.opened_by,
            closed_at: r.closed_at,
            close_event: r.close_event,
            closed_by: r.closed_by,
        })
    }
}

/// A legal hold on a subject (`purpose` and `reference` None) or on one of its records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRow {
    pub id: String,
    pub subject: Uuid,
    pub purpose: Option<String>,
    pub reference: Option<String>,
    /// A case or ticket reference, never free text about the person.
    pub reason: String,
    pub placed_at: i64,
    pub placed_by: String,
    pub released_at: Option<i64>,
    pub released_by: Option<String>,
    pub release_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RawHoldRow {
    id: String,
    subject_id: Vec<u8>,
    purpose: Option<String>,
    reference: Option<String>,
    reason: String,
    placed_at: i64,
    placed_by: String,
    released_at: Option<i64>,
    released_by: Option<String>,
    release_reason: Option<String>,
}

impl TryFrom<RawHoldRow> for HoldRow {
    type Error = StoreError;
    fn try_from(r: RawHoldRow) -> Result<Self, StoreError> {
        Ok(HoldRow {
            id: r.id,
            subject: uuid_from(&r.subject_id)?,
            purpose: r.purpose,
            reference: r.reference,
            reason: r.reason,
            placed_at: r.placed_at,
            placed_by: r.placed_by,
            released_at: r.released_at,
            released_by: r.released_by,
            release_reason: r.release_reason,
        })
    }
}

/// A subject's stored retention state and sealed record (paths only are read from it).
#[derive(Debug, Clone)]
pub struct MarkedSubject {
    pub id: Uuid,
    pub retention: Option<Vec<u8>>,
    pub record: Vec<u8>,
}

const RECORD_COLUMNS: &str =
    "purpose, reference, subject_id, opened_at, opened_by, closed_at, close_event, closed_by";
const HOLD_COLUMNS: &str = "id, subject_id, purpose, reference, reason, placed_at, placed_by, \
     released_at, released_by, release_reason";

fn records(raws: Vec<RawRecordRow>) -> Result<Vec<RecordRow>, StoreError> {
    raws.into_iter().map(RecordRow::try_from).collect()
}

fn holds(raws: Vec<RawHoldRow>) -> Result<Vec<HoldRow>, StoreError> {
    raws.into_iter().map(HoldRow::try_from).collect()
}

impl Store {
    /// Every processing record of a subject, oldest first.
    pub async fn processing_records(&self, subject: Uuid) -> Result<Vec<RecordRow>, StoreError> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM processing_records WHERE subject_id = $1 \
             ORDER BY opened_at, purpose, reference"
        );
        let idb = subject.as_bytes().to_vec();
        records(
            on_pool!(&self.backend, pool => sqlx::query_as::<_, RawRecordRow>(sqlx::AssertSqlSafe(sql.clone()))
            .bind(idb).fetch_all(pool).await)?,
        )
    }

    /// The record `(purpose, reference)`, if there is one.
    pub async fn processing_record(
        &self,
        purpose: &str,
        reference: &str,
    ) -> Result<Option<RecordRow>, StoreError> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM processing_records WHERE purpose = $1 AND reference = $2"
        );
        let (purpose, reference) = (purpose.to_owned(), reference.to_owned());
        on_pool!(&self.backend, pool => sqlx::query_as::<_, RawRecordRow>(sqlx::AssertSqlSafe(sql.clone()))
            .bind(purpose).bind(reference).fetch_optional(pool).await)?
        .map(RecordRow::try_from)
        .transpose()
    }

    /// Every hold of a subject, released ones included, oldest first.
    pub async fn legal_holds(&self, subject: Uuid) -> Result<Vec<HoldRow>, StoreError> {
        let sql = format!(
            "SELECT {HOLD_COLUMNS} FROM legal_holds WHERE subject_id = $1 ORDER BY placed_at, id"
        );
        let idb = subject.as_bytes().to_vec();
        holds(
            on_pool!(&self.backend, pool => sqlx::query_as::<_, RawHoldRow>(sqlx::AssertSqlSafe(sql.clone()))
            .bind(idb).fetch_all(pool).await)?,
        )
    }

    /// One hold by id.
    pub async fn legal_hold(&self, id: &str) -> Result<Option<HoldRow>, StoreError> {
        let sql = format!("SELECT {HOLD_COLUMNS} FROM legal_holds WHERE id = $1");
        let id = id.to_owned();
        on_pool!(&self.backend, pool => sqlx::query_as::<_, RawHoldRow>(sqlx::AssertSqlSafe(sql.clone()))
            .bind(id).fetch_optional(pool).await)?
        .map(HoldRow::try_from)
        .transpose()
    }

    /// Holds in force (not released), oldest first, at most `limit`.
    pub async fn active_holds(&self, limit: u32) -> Result<Vec<HoldRow>, StoreError> {
        let sql = format!(
            "SELECT {HOLD_COLUMNS} FROM legal_holds WHERE released_at IS NULL \
             ORDER BY placed_at, id LIMIT $1"
        );
        holds(
            on_pool!(&self.backend, pool => sqlx::query_as::<_, RawHoldRow>(sqlx::AssertSqlSafe(sql.clone()))
            .bind(i64::from(limit)).fetch_all(pool).await)?,
        )
    }

    /// Subjects with a path due at or before `now_us`, in (due time, id) order after `after`, at
    /// most `limit`; each with its due time, so the next page starts after the last one.
    pub async fn retention_due(
        &self,
        now_us: i64,
        after: Option<(i64, Uuid)>,
        limit: u32,
    ) -> Result<Vec<(i64, Uuid)>, StoreError> {
        let (after_due, after_id) = after.map_or((i64::MIN, Vec::new()), |(t, id)| {
            (t, id.as_bytes().to_vec())
        });
        let rows: Vec<(i64, Vec<u8>)> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT retention_due, id FROM subjects WHERE retention_due IS NOT NULL \
             AND retention_due <= $1 AND (retention_due, id) > ($2, $3) \
             ORDER BY retention_due, id LIMIT $4")
            .bind(now_us).bind(after_due).bind(after_id).bind(i64::from(limit)).fetch_all(pool).await)?;
        rows.iter().map(|(t, b)| Ok((*t, uuid_from(b)?))).collect()
    }

    /// The earliest time a path of any subject becomes due, if any will.
    pub async fn earliest_retention_due(&self) -> Result<Option<i64>, StoreError> {
        Ok(
            on_pool!(&self.backend, pool => sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MIN(retention_due) FROM subjects WHERE retention_due IS NOT NULL")
            .fetch_one(pool).await)?,
        )
    }

    /// Subjects that have records (or had), after `after` in id order, at most `limit`; with
    /// `due_by`, only those whose first due time is at or before it.
    pub async fn marked_subjects(
        &self,
        due_by: Option<i64>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<MarkedSubject>, StoreError> {
        self.subjects_page(true, due_by, after, limit).await
    }

    /// Every subject (records or not), after `after` in id order, at most `limit`.
    pub async fn all_subjects(
        &self,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<MarkedSubject>, StoreError> {
        self.subjects_page(false, None, after, limit).await
    }

    async fn subjects_page(
        &self,
        marked_only: bool,
        due_by: Option<i64>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<MarkedSubject>, StoreError> {
        let mut sql = String::from("SELECT id, retention, record FROM subjects WHERE id > $1");
        if marked_only {
            sql.push_str(" AND retention IS NOT NULL");
        }
        if due_by.is_some() {
            sql.push_str(" AND retention_due IS NOT NULL AND retention_due <= $3");
        }
        sql.push_str(" ORDER BY id LIMIT $2");
        let after = after.map_or_else(Vec::new, |id| id.as_bytes().to_vec());
        type Row = (Vec<u8>, Option<Vec<u8>>, Vec<u8>);
        let rows: Vec<Row> = on_pool!(&self.backend, pool => {
            let q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(after).bind(i64::from(limit));
            match due_by {
                Some(t) => q.bind(t).fetch_all(pool).await,
                None => q.fetch_all(pool).await,
            }
        })?;
        rows.into_iter()
            .map(|(id, retention, record)| {
                Ok(MarkedSubject {
                    id: uuid_from(&id)?,
                    retention,
                    record,
                })
            })
            .collect()
    }

    /// How many subjects have never had a processing record.
    pub async fn count_subjects_without_records(&self) -> Result<i64, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT COUNT(*) FROM subjects WHERE retention IS NULL")
            .fetch_one(pool).await)?)
    }
}
