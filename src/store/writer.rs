//! Group commit: one writer task per instance drains concurrent subject writes into one transaction
//! per batch (DESIGN.md §5).
//!
//! Creates in a batch go in as one multi-row INSERT per table; if that statement fails (a duplicate
//! username), the batch falls back to one SAVEPOINT per request so a failing request never fails
//! its neighbours. Every request is answered only after its transaction has committed.

use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::{Backend, IndexEntry, StoreError, SubjectRow, on_pool};

/// Largest number of requests committed in one transaction.
const MAX_BATCH: usize = 256;
/// Requests waiting for the writer before submitters wait for room.
const QUEUE: usize = 4096;

/// A write to one subject, committed atomically with everything it touches.
#[derive(Debug)]
pub enum WriteOp {
    Create {
        row: SubjectRow,
        index: Vec<IndexEntry>,
    },
    Update {
        id: Uuid,
        /// The version the new record was derived from; the write is refused if it moved on.
        read_version: u64,
        record: Vec<u8>,
        updated_at: i64,
        /// Indexed paths whose entries are replaced (deleted, then `add_index` inserted).
        replace_index_paths: Vec<&'static str>,
        add_index: Vec<IndexEntry>,
    },
    Erase {
        id: Uuid,
        at: i64,
    },
}

/// What a committed write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Created,
    Updated { version: u64 },
    Erased,
}

type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

pub(super) struct GroupCommitter {
    tx: Mutex<Option<mpsc::Sender<(WriteOp, Reply)>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl GroupCommitter {
    pub(super) fn start(backend: Backend) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(backend, rx));
        Self {
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        }
    }

    pub(super) async fn submit(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        let sender = self
            .tx
            .lock()
            .await
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is shutting down".into()))?;
        let (reply, answer) = oneshot::channel();
        sender
            .send((op, reply))
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Stops taking writes and waits until the queued ones are committed.
    pub(super) async fn shutdown(&self) {
        self.tx.lock().await.take();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

/// A violation of the unique username index is `Duplicate`; any other error (including a unique
/// violation elsewhere, which would be a bug) stays what it is.
fn unique_violation(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db)
            if db.is_unique_violation()
                && (db.constraint() == Some("blind_index_unique_username")
                    // SQLite names the columns, not the index: the primary key has subject_id too.
                    || (db.constraint().is_none()
                        && db.message().contains("blind_index.digest")
                        && !db.message().contains("subject_id"))) =>
        {
            StoreError::Duplicate {
                path: "account.username".into(),
            }
        }
        _ => StoreError::from(e),
    }
}

/// A subject's index entry as listed in `subjects.index_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StoredIndexKey {
    path: String,
    key_version: u32,
    digest: Vec<u8>,
}

impl From<&IndexEntry> for StoredIndexKey {
    fn from(e: &IndexEntry) -> Self {
        Self {
            path: e.path.to_owned(),
            key_version: e.key_version,
            digest: e.digest.to_vec(),
        }
    }
}

/// `index_keys`: per entry, path length (u8), path, key version (u32 BE), digest length (u8), digest.
fn encode_stored_keys(keys: &[StoredIndexKey]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.len() * 56);
    for k in keys {
        out.push(k.path.len() as u8);
        out.extend_from_slice(k.path.as_bytes());
        out.extend_from_slice(&k.key_version.to_be_bytes());
        out.push(k.digest.len() as u8);
        out.extend_from_slice(&k.digest);
    }
    out
}

fn encode_index_keys(entries: &[IndexEntry]) -> Vec<u8> {
    encode_stored_keys(&entries.iter().map(StoredIndexKey::from).collect::<Vec<_>>())
}

fn decode_index_keys(mut bytes: &[u8]) -> Result<Vec<StoredIndexKey>, StoreError> {
    let corrupt = || StoreError::Corrupt("subjects.index_keys".into());
    let take = |n: usize, bytes: &mut &[u8]| -> Result<Vec<u8>, StoreError> {
        if bytes.len() < n {
            return Err(corrupt());
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Ok(head.to_vec())
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let len = usize::from(take(1, &mut bytes)?[0]);
        let path = String::from_utf8(take(len, &mut bytes)?).map_err(|_| corrupt())?;
        let version: [u8; 4] = take(4, &mut bytes)?.try_into().map_err(|_| corrupt())?;
        let dlen = usize::from(take(1, &mut bytes)?[0]);
        let digest = take(dlen, &mut bytes)?;
        out.push(StoredIndexKey {
            path,
            key_version: u32::from_be_bytes(version),
            digest,
        });
    }
    Ok(out)
}

/// Deletes one blind-index entry by its primary key.
macro_rules! delete_index_entry {
    ($conn:expr, $key:expr, $subject:expr) => {
        sqlx::query("DELETE FROM blind_index WHERE path = $1 AND digest = $2 AND subject_id = $3")
            .bind($key.path.clone())
            .bind($key.digest.clone())
            .bind($subject.clone())
            .execute(&mut *$conn)
            .await
            .map(|_| ())
    };
}

/// Inserts subjects and their index entries with one multi-row INSERT per table.
macro_rules! bulk_create {
    ($conn:expr, $rows:expr) => {{
        async {
            let rows = $rows;
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO subjects (id, dek_id, kek_version, wrapped_dek, record, index_keys, version, created_at, updated_at) ",
            );
            q.push_values(rows.iter(), |mut b, (row, index)| {
                b.push_bind(row.id.as_bytes().to_vec())
                    .push_bind(row.dek_id.as_bytes().to_vec())
                    .push_bind(i64::from(row.kek_version))
                    .push_bind(row.wrapped_dek.clone())
                    .push_bind(row.record.clone())
                    .push_bind(encode_index_keys(index))
                    .push_bind(row.version as i64)
                    .push_bind(row.created_at)
                    .push_bind(row.updated_at);
            });
            q.build().execute(&mut *$conn).await.map_err(unique_violation)?;
            let entries: Vec<(Uuid, &IndexEntry)> = rows
                .iter()
                .flat_map(|(row, index)| index.iter().map(move |e| (row.id, e)))
                .collect();
            if !entries.is_empty() {
                let mut q = sqlx::QueryBuilder::new("INSERT INTO blind_index (path, digest, subject_id, key_version) ");
                q.push_values(entries.iter(), |mut b, (id, e)| {
                    b.push_bind(e.path)
                        .push_bind(e.digest.to_vec())
                        .push_bind(id.as_bytes().to_vec())
                        .push_bind(i64::from(e.key_version));
                });
                q.build().execute(&mut *$conn).await.map_err(unique_violation)?;
            }
            Ok::<(), StoreError>(())
        }
        .await
    }};
}

/// Applies one op inside the current savepoint.
macro_rules! apply_one {
    ($conn:expr, $op:expr) => {{
        async {
            match $op {
                WriteOp::Create { row, index } => {
                    bulk_create!($conn, &[(row, index.as_slice())])?;
                    Ok(WriteOutcome::Created)
                }
                WriteOp::Update {
                    id,
                    read_version,
                    record,
                    updated_at,
                    replace_index_paths,
                    add_index,
                } => {
                    let idb = id.as_bytes().to_vec();
                    // The version-checked UPDATE comes first: once it changed the row, this
                    // transaction holds it (PostgreSQL row lock; SQLite's single writer), so the
                    // index_keys read next are those of `read_version`, whatever other instances do.
                    let done = sqlx::query(
                        "UPDATE subjects SET record = $1, version = version + 1, updated_at = $2 \
                         WHERE id = $3 AND version = $4",
                    )
                    .bind(record.clone())
                    .bind(*updated_at)
                    .bind(idb.clone())
                    .bind(*read_version as i64)
                    .execute(&mut *$conn)
                    .await?;
                    if done.rows_affected() != 1 {
                        let actual: Option<i64> = sqlx::query_scalar("SELECT version FROM subjects WHERE id = $1")
                            .bind(idb.clone())
                            .fetch_optional(&mut *$conn)
                            .await?;
                        return Err(match actual {
                            Some(v) => StoreError::VersionMismatch { actual: v as u64 },
                            None => StoreError::NotFound,
                        });
                    }
                    if !replace_index_paths.is_empty() {
                        let keys: Vec<u8> = sqlx::query_scalar("SELECT index_keys FROM subjects WHERE id = $1")
                            .bind(idb.clone())
                            .fetch_one(&mut *$conn)
                            .await?;
                        let (replaced, mut kept): (Vec<StoredIndexKey>, Vec<StoredIndexKey>) = decode_index_keys(&keys)?
                            .into_iter()
                            .partition(|k| replace_index_paths.contains(&k.path.as_str()));
                        for old in replaced {
                            delete_index_entry!($conn, &old, &idb)?;
                        }
                        kept.extend(add_index.iter().map(StoredIndexKey::from));
                        sqlx::query("UPDATE subjects SET index_keys = $1 WHERE id = $2")
                            .bind(encode_stored_keys(&kept))
                            .bind(idb.clone())
                            .execute(&mut *$conn)
                            .await?;
                    }
                    for e in add_index {
                        sqlx::query("INSERT INTO blind_index (path, digest, subject_id, key_version) VALUES ($1, $2, $3, $4)")
                            .bind(e.path)
                            .bind(e.digest.to_vec())
                            .bind(idb.clone())
                            .bind(i64::from(e.key_version))
                            .execute(&mut *$conn)
                            .await
                            .map_err(unique_violation)?;
                    }
                    Ok(WriteOutcome::Updated { version: read_version + 1 })
                }
                WriteOp::Erase { id, at } => {
                    let idb = id.as_bytes().to_vec();
                    // RETURNING gives the index_keys of the row as deleted, under its lock: an
                    // update committed by another instance a moment earlier is included.
                    let keys: Vec<u8> = sqlx::query_scalar("DELETE FROM subjects WHERE id = $1 RETURNING index_keys")
                        .bind(idb.clone())
                        .fetch_optional(&mut *$conn)
                        .await?
                        .ok_or(StoreError::NotFound)?;
                    for old in decode_index_keys(&keys)? {
                        delete_index_entry!($conn, &old, &idb)?;
                    }
                    sqlx::query("INSERT INTO erased_subjects (id, erased_at) VALUES ($1, $2)")
                        .bind(idb)
                        .bind(*at)
                        .execute(&mut *$conn)
                        .await?;
                    Ok(WriteOutcome::Erased)
                }
            }
        }
        .await
    }};
}

async fn run(backend: Backend, mut rx: mpsc::Receiver<(WriteOp, Reply)>) {
    let mut batch: Vec<(WriteOp, Reply)> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (ops, replies): (Vec<WriteOp>, Vec<Reply>) = batch.drain(..).unzip();
        let results = commit_batch(&backend, &ops).await;
        for (reply, result) in replies.into_iter().zip(results) {
            // A submitter that went away (cancelled request) no longer needs its answer; the write
            // is committed all the same, as it would be had the answer been lost on the wire.
            let _ = reply.send(result);
        }
    }
}

/// Commits `ops` in one transaction; one result per op, in order.
async fn commit_batch(backend: &Backend, ops: &[WriteOp]) -> Vec<Result<WriteOutcome, StoreError>> {
    let started = std::time::Instant::now();
    match try_commit_batch(backend, ops).await {
        Ok(results) => {
            tracing::trace!(
                batch = ops.len(),
                elapsed_us = started.elapsed().as_micros() as u64,
                "batch committed"
            );
            results
        }
        Err(e) => {
            tracing::error!(error = %e, batch = ops.len(), "group commit failed; batch refused");
            ops.iter()
                .map(|_| Err(StoreError::Unavailable(format!("commit failed: {e}"))))
                .collect()
        }
    }
}

async fn try_commit_batch(
    backend: &Backend,
    ops: &[WriteOp],
) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
    on_pool!(backend, pool => {
        let mut tx = pool.begin().await?;
        let mut results: Vec<Option<Result<WriteOutcome, StoreError>>> = ops.iter().map(|_| None).collect();

        // Fast path: every create of the batch in one statement per table.
        let creates: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| matches!(op, WriteOp::Create { .. }).then_some(i))
            .collect();
        let mut creates_done = false;
        if creates.len() > 1 {
            sqlx::query("SAVEPOINT bulk").execute(&mut *tx).await?;
            let rows: Vec<(&SubjectRow, &[IndexEntry])> = creates
                .iter()
                .filter_map(|&i| match &ops[i] {
                    WriteOp::Create { row, index } => Some((row, index.as_slice())),
                    _ => None,
                })
                .collect();
            match bulk_create!(&mut *tx, &rows) {
                Ok(()) => {
                    sqlx::query("RELEASE SAVEPOINT bulk").execute(&mut *tx).await?;
                    for &i in &creates {
                        results[i] = Some(Ok(WriteOutcome::Created));
                    }
                    creates_done = true;
                }
                Err(_) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT bulk").execute(&mut *tx).await?;
                    sqlx::query("RELEASE SAVEPOINT bulk").execute(&mut *tx).await?;
                }
            }
        }

        for (i, op) in ops.iter().enumerate() {
            if creates_done && matches!(op, WriteOp::Create { .. }) {
                continue;
            }
            sqlx::query("SAVEPOINT one").execute(&mut *tx).await?;
            let outcome = apply_one!(&mut *tx, op);
            match outcome {
                Ok(done) => {
                    sqlx::query("RELEASE SAVEPOINT one").execute(&mut *tx).await?;
                    results[i] = Some(Ok(done));
                }
                Err(e) => {
                    sqlx::query("ROLLBACK TO SAVEPOINT one").execute(&mut *tx).await?;
                    sqlx::query("RELEASE SAVEPOINT one").execute(&mut *tx).await?;
                    results[i] = Some(Err(e));
                }
            }
        }
        let commit_started = std::time::Instant::now();
        tx.commit().await?;
        tracing::trace!(commit_us = commit_started.elapsed().as_micros() as u64, "commit");
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::Database("write not applied".into()))))
            .collect())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_round_trip() {
        let keys = vec![
            StoredIndexKey {
                path: "contact.email".into(),
                key_version: 1,
                digest: vec![7; 32],
            },
            StoredIndexKey {
                path: "account.username".into(),
                key_version: 3,
                digest: vec![9; 32],
            },
        ];
        assert_eq!(decode_index_keys(&encode_stored_keys(&keys)).unwrap(), keys);
        assert!(decode_index_keys(&[5, b'a']).is_err(), "truncated");
        assert!(decode_index_keys(&[]).unwrap().is_empty());
    }
}
