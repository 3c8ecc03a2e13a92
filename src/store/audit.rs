//! Audit-trail and objection rows: the event type the writer appends, reading the chain back in
//! order for verification and queries, checkpoints, pruning, and objections. The chain's links are
//! computed above the store ([`ChainLinker`]); the store only keeps the order.

use std::collections::HashSet;

use uuid::Uuid;

use super::{Store, StoreError, on_pool, uuid_from};

/// An audit event ready to append: the exact bytes the chain covers, and the columns queries use.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub at_us: i64,
    pub caller: String,
    pub purpose: String,
    pub method: String,
    pub outcome: String,
    pub subjects: Vec<Uuid>,
    pub body: Vec<u8>,
}

/// Computes an event's link from its position, the previous link and its stored bytes (the keyed
/// HMAC of the audit module); called by the writer inside the appending transaction.
pub trait ChainLinker: Send + Sync {
    fn link(&self, seq: i64, prev: &[u8; 32], body: &[u8]) -> [u8; 32];
}

/// An event as stored. `subjects` is the column as written (split at commas), not parsed: a
/// tampered column must reach the verifier, not fail the read.
#[derive(Debug, Clone)]
pub struct StoredAuditEvent {
    pub seq: i64,
    pub at_us: i64,
    pub caller: String,
    pub purpose: String,
    pub method: String,
    pub outcome: String,
    pub subjects: Vec<String>,
    pub body: Vec<u8>,
    pub mac: Vec<u8>,
}

/// Which events a query wants; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub subject: Option<Uuid>,
    pub caller: Option<String>,
    pub purpose: Option<String>,
    pub method: Option<String>,
    pub outcome: Option<String>,
    pub from_us: Option<i64>,
    pub to_us: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    at_us: i64,
    caller: String,
    purpose: String,
    method: String,
    outcome: String,
    subjects: String,
    body: Vec<u8>,
    mac: Vec<u8>,
}

/// Most events the sqlx path's indexer takes into `audit_subjects` per transaction: small enough
/// that the transaction holds the (SQLite in memory: only) write connection for a few
/// milliseconds at a time. A SQLite file's index writer takes more ([`super::audit_index`]).
pub(super) const INDEX_BATCH: i64 = 500;

/// What one run of the audit indexer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexedRun {
    /// Events taken into the index.
    pub events: u64,
    /// The run stopped at its limit, not at the end of the trail: more may be waiting.
    pub full: bool,
}

impl IndexedRun {
    /// `run`, made of `read` events read after the mark; `limited` when the read stopped at a
    /// limit. A run cut short by a gap in the trail is not full: the events after the gap wait
    /// (see [`index_run`]).
    pub(super) fn after(run: &IndexRun, read: usize, limited: bool) -> Self {
        Self {
            events: run.events,
            full: limited && run.events == read as u64,
        }
    }
}

/// A prune's deletion of the events up to and including `$1` (both paths of `prune_audit`).
const PRUNE_EVENTS: &str = "DELETE FROM audit_events WHERE seq <= $1";

/// What one run of the indexer takes in: how many events, the last one's seq (the new mark), and
/// their (subject, seq) entries, sorted (so one B-tree page takes many) and without repeats.
pub(super) struct IndexRun {
    pub(super) events: u64,
    pub(super) last: i64,
    pub(super) entries: Vec<(Uuid, i64)>,
}

/// Whether `rows` (the events after `mark`, in order) start right after it; if not, the indexer
/// asks for the oldest event left before deciding ([`index_run`]).
pub(super) fn follows_mark(mark: i64, rows: &[(i64, String)]) -> bool {
    rows.first().is_none_or(|(seq, _)| *seq == mark + 1)
}

/// The run of `rows` the indexer may take in: only a gap-free run is indexed, so a missing event
/// (deleted, which verification reports) is never stepped over. A gap before the first row is
/// allowed only where pruning removed everything before it (`oldest`, the smallest seq left, is
/// the first row's). `None`: nothing to index now.
pub(super) fn index_run(
    mark: i64,
    oldest: Option<i64>,
    rows: &[(i64, String)],
) -> Option<IndexRun> {
    let first = rows.first()?.0;
    if first != mark + 1 && oldest != Some(first) {
        return None;
    }
    let run = rows
        .iter()
        .enumerate()
        .take_while(|(i, (seq, _))| *seq == first + *i as i64)
        .count();
    let rows = &rows[..run];
    let last = rows.last()?.0;
    let mut entries: Vec<(Uuid, i64)> = rows
        .iter()
        .flat_map(|(seq, subjects)| {
            parse_subjects(*seq, subjects)
                .into_iter()
                .map(|id| (id, *seq))
        })
        .collect();
    entries.sort_unstable();
    entries.dedup();
    Some(IndexRun {
        events: run as u64,
        last,
        entries,
    })
}

/// The `subjects` column: canonical ids, comma-separated.
pub(super) fn subjects_column(ids: &[Uuid]) -> String {
    ids.iter()
        .map(Uuid::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The ids of a `subjects` column; an entry that is not an id (a tampered row, which verification
/// reports) is left out of the index rather than stopping it.
fn parse_subjects(seq: i64, column: &str) -> Vec<Uuid> {
    column
        .split(',')
        .filter(|s| !s.is_empty())
        .filter_map(|s| match Uuid::parse_str(s) {
            Ok(id) => Some(id),
            Err(_) => {
                tracing::error!(
                    seq,
                    "audit_events.subjects holds something that is not a subject id"
                );
                None
            }
        })
        .collect()
}

impl Store {
    /// Events with `seq > after`, in order, at most `limit`, each with the subjects it names.
    pub async fn audit_page(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<StoredAuditEvent>, StoreError> {
        self.audit_query(&AuditFilter::default(), after, limit)
            .await
    }

    /// Events matching `filter` with `seq > after`, in order, at most `limit`. A subject filter
    /// uses `audit_subjects` up to the indexer's mark and the `subjects` column after it.
    pub async fn audit_query(
        &self,
        filter: &AuditFilter,
        after: i64,
        limit: u32,
    ) -> Result<Vec<StoredAuditEvent>, StoreError> {
        let mut n = 1;
        let mut conds = vec![format!("e.seq > ${n}")];
        if filter.subject.is_some() {
            // $2: the id's bytes (indexed part), $3: its text (the tail not indexed yet).
            conds.push(
                "((e.seq <= (SELECT indexed_seq FROM audit_index_state WHERE id = 1) \
                   AND e.seq IN (SELECT seq FROM audit_subjects WHERE subject_id = $2)) \
                  OR (e.seq > (SELECT indexed_seq FROM audit_index_state WHERE id = 1) \
                   AND e.subjects LIKE $3))"
                    .to_owned(),
            );
            n += 2;
        }
        let texts = [
            ("caller", &filter.caller),
            ("purpose", &filter.purpose),
            ("method", &filter.method),
            ("outcome", &filter.outcome),
        ];
        for (column, value) in &texts {
            if value.is_some() {
                n += 1;
                conds.push(format!("e.{column} = ${n}"));
            }
        }
        if filter.from_us.is_some() {
            n += 1;
            conds.push(format!("e.at_us >= ${n}"));
        }
        if filter.to_us.is_some() {
            n += 1;
            conds.push(format!("e.at_us < ${n}"));
        }
        n += 1;
        let sql = format!(
            "SELECT e.seq, e.at_us, e.caller, e.purpose, e.method, e.outcome, e.subjects, e.body, e.mac \
             FROM audit_events e WHERE {} ORDER BY e.seq LIMIT ${n}",
            conds.join(" AND ")
        );
        let rows: Vec<EventRow> = on_pool!(&self.backend, pool => {
            let mut q = sqlx::query_as::<_, EventRow>(
                // Built above from fixed column names and numbered placeholders only.
                sqlx::AssertSqlSafe(sql.clone()),
            )
            .bind(after);
            if let Some(s) = filter.subject {
                q = q.bind(s.as_bytes().to_vec()).bind(format!("%{s}%"));
            }
            for (_, value) in &texts {
                if let Some(v) = value {
                    q = q.bind(v.clone());
                }
            }
            if let Some(v) = filter.from_us {
                q = q.bind(v);
            }
            if let Some(v) = filter.to_us {
                q = q.bind(v);
            }
            q.bind(i64::from(limit)).fetch_all(pool).await
        })?;
        Ok(rows
            .into_iter()
            .map(|r| StoredAuditEvent {
                subjects: r
                    .subjects
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                seq: r.seq,
                at_us: r.at_us,
                caller: r.caller,
                purpose: r.purpose,
                method: r.method,
                outcome: r.outcome,
                body: r.body,
                mac: r.mac,
            })
            .collect())
    }

    /// How many events one run of the indexer took ([`Store::index_audit_run`]); tests.
    #[cfg(test)]
    pub(crate) async fn index_audit_subjects(&self) -> Result<u64, StoreError> {
        Ok(self.index_audit_run().await?.events)
    }

    /// Runs of the indexer until one is not full (everything appended so far is indexed, or a
    /// gap stops it); how many events they indexed. Each run commits on its own, so an error
    /// keeps the runs before it.
    pub async fn index_audit_backlog(&self) -> Result<u64, StoreError> {
        let mut events = 0;
        loop {
            let run = self.index_audit_run().await?;
            events += run.events;
            if !run.full {
                return Ok(events);
            }
        }
    }

    /// One run of the indexer: takes the next events after its mark into `audit_subjects`
    /// (sorted, so one B-tree page takes many entries) and moves the mark, in one transaction;
    /// how many events it indexed and whether it stopped at its limit. Instances racing here
    /// index the same rows idempotently.
    ///
    /// A SQLite file's index is a file of its own with a writer of its own
    /// ([`super::audit_index`]), so a run never holds the main file's write lock, for which every
    /// read's audit event waits. Elsewhere the run is this sqlx transaction.
    pub(crate) async fn index_audit_run(&self) -> Result<IndexedRun, StoreError> {
        if let Some(index) = &self.audit_index {
            return index.index().await;
        }
        let (begin, mark_sql) = match &self.write_backend {
            super::Backend::Sqlite(_) => (
                "BEGIN IMMEDIATE",
                "SELECT indexed_seq FROM audit_index_state WHERE id = 1",
            ),
            super::Backend::Postgres(_) => (
                "BEGIN",
                "SELECT indexed_seq FROM audit_index_state WHERE id = 1 FOR UPDATE",
            ),
        };
        on_pool!(&self.write_backend, pool => {
            let mut tx = pool.begin_with(begin).await?;
            let mark: i64 = sqlx::query_scalar(mark_sql).fetch_one(&mut *tx).await?;
            let rows: Vec<(i64, String)> = sqlx::query_as(
                "SELECT seq, subjects FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(mark).bind(INDEX_BATCH).fetch_all(&mut *tx).await?;
            let oldest: Option<i64> = if follows_mark(mark, &rows) {
                None
            } else {
                sqlx::query_scalar("SELECT MIN(seq) FROM audit_events").fetch_one(&mut *tx).await?
            };
            let Some(run) = index_run(mark, oldest, &rows) else {
                return Ok(IndexedRun::default());
            };
            for chunk in run.entries.chunks(1000) {
                let mut q = sqlx::QueryBuilder::new("INSERT INTO audit_subjects (subject_id, seq) ");
                q.push_values(chunk.iter(), |mut b, (id, seq)| {
                    b.push_bind(id.as_bytes().to_vec()).push_bind(*seq);
                });
                q.push(" ON CONFLICT DO NOTHING");
                q.build().execute(&mut *tx).await?;
            }
            sqlx::query("UPDATE audit_index_state SET indexed_seq = $1 WHERE id = 1")
                .bind(run.last).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(IndexedRun::after(&run, rows.len(), rows.len() as i64 >= INDEX_BATCH))
        })
    }

    /// How far the per-subject index is complete.
    pub async fn audit_indexed_seq(&self) -> Result<i64, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT indexed_seq FROM audit_index_state WHERE id = 1").fetch_one(pool).await)?)
    }

    /// The per-subject index rows with `lo <= seq <= hi`, as (seq, subject id text), in order.
    pub async fn audit_index_rows(
        &self,
        lo: i64,
        hi: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let rows: Vec<(i64, Vec<u8>)> = on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT seq, subject_id FROM audit_subjects WHERE seq >= $1 AND seq <= $2 ORDER BY seq, subject_id")
            .bind(lo).bind(hi).fetch_all(pool).await)?;
        Ok(rows
            .into_iter()
            .map(|(seq, id)| {
                let text =
                    Uuid::from_slice(&id).map_or_else(|_| hex::encode(&id), |u| u.to_string());
                (seq, text)
            })
            .collect())
    }

    /// The chain head: the last appended seq and its link.
    pub async fn audit_head(&self) -> Result<(i64, Vec<u8>), StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT seq, mac FROM audit_head WHERE id = 1").fetch_one(pool).await)?)
    }

    /// The link of the event at `seq`, if it is stored.
    pub async fn audit_link(&self, seq: i64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT mac FROM audit_events WHERE seq = $1").bind(seq).fetch_optional(pool).await)?)
    }

    /// Stores a signed checkpoint (its JSON form); a second one for the same seq is ignored.
    pub async fn insert_audit_checkpoint(&self, seq: i64, json: &str) -> Result<(), StoreError> {
        let json = json.to_owned();
        on_pool!(&self.write_backend, pool => sqlx::query(
            "INSERT INTO audit_checkpoints (seq, checkpoint) VALUES ($1, $2) ON CONFLICT (seq) DO NOTHING")
            .bind(seq).bind(json).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// The newest checkpoint stored in the database (seq and JSON).
    pub async fn latest_audit_checkpoint(&self) -> Result<Option<(i64, String)>, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT seq, checkpoint FROM audit_checkpoints ORDER BY seq DESC LIMIT 1")
            .fetch_optional(pool).await)?)
    }

    /// Every checkpoint stored in the database (JSON), oldest first.
    pub async fn audit_checkpoints(&self) -> Result<Vec<(i64, String)>, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_as(
            "SELECT seq, checkpoint FROM audit_checkpoints ORDER BY seq").fetch_all(pool).await)?)
    }

    /// Deletes the events up to and including `seq` (and their subject index rows); the caller
    /// makes sure a checkpoint at `seq` anchors what remains. Returns the number deleted.
    pub async fn prune_audit(&self, seq: i64) -> Result<u64, StoreError> {
        if let (Some(index), super::Backend::Sqlite(pool)) =
            (&self.audit_index, &self.write_backend)
        {
            // The index file is another database: its entries go after the events. An entry left
            // by a failure in between names an event no query finds any more, and the next prune
            // deletes it; the events are pruned either way.
            let done = sqlx::query(PRUNE_EVENTS).bind(seq).execute(pool).await?;
            if let Err(e) = index.prune(seq).await {
                tracing::warn!(error = %e, seq, "entries of pruned audit events left in the audit index");
            }
            return Ok(done.rows_affected());
        }
        on_pool!(&self.write_backend, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM audit_subjects WHERE seq <= $1").bind(seq).execute(&mut *tx).await?;
            let done = sqlx::query(PRUNE_EVENTS).bind(seq).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(done.rows_affected())
        })
    }

    /// The newest stored event at or before `at_us`, by seq (for pruning by age).
    pub async fn audit_last_seq_before(&self, at_us: i64) -> Result<Option<i64>, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT MAX(seq) FROM audit_events WHERE at_us < $1").bind(at_us).fetch_one(pool).await)?)
    }

    // ---- objections -------------------------------------------------------------------------

    /// Whether the subject objected to `purpose`.
    pub async fn objected(&self, subject: Uuid, purpose: &str) -> Result<bool, StoreError> {
        let purpose = purpose.to_owned();
        let found: Option<String> = on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT purpose FROM objections WHERE subject_id = $1 AND purpose = $2")
            .bind(subject.as_bytes().to_vec()).bind(purpose).fetch_optional(pool).await)?;
        Ok(found.is_some())
    }

    /// Those of `ids` that objected to `purpose`.
    pub async fn objected_among(
        &self,
        purpose: &str,
        ids: &[Uuid],
    ) -> Result<HashSet<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let mut out = HashSet::new();
        for chunk in ids.chunks(500) {
            let rows: Vec<Vec<u8>> = on_pool!(&self.backend, pool => {
                let mut q = sqlx::QueryBuilder::new("SELECT subject_id FROM objections WHERE purpose = ");
                q.push_bind(purpose.to_owned());
                q.push(" AND subject_id IN (");
                let mut sep = q.separated(", ");
                for id in chunk {
                    sep.push_bind(id.as_bytes().to_vec());
                }
                q.push(")");
                q.build_query_scalar().fetch_all(pool).await
            })?;
            for id in rows {
                out.insert(uuid_from(&id)?);
            }
        }
        Ok(out)
    }
}
