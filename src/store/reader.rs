//! Read coalescing: concurrent point reads (a subject by id, a blind-index lookup) are drained into
//! one query per batch, the read-side twin of the group committer.
//!
//! Every query through sqlx costs a hand-off to the connection's worker thread and back; under load
//! that hand-off, not SQLite, was the ceiling (a profile of `get` showed a quarter of the server's
//! time in context switches). One query for up to [`MAX_BATCH`] waiting reads pays it once. A read
//! that finds no company waits for nobody: it is a batch of one.

use std::{collections::HashMap, sync::Arc};

use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::{
    Backend, Found, RawSubjectRow, StoreError, SubjectRow, on_pool, padded_len, uuid_from,
};

const MAX_BATCH: usize = 64;
/// Batches in flight at once per kind of read (each holds one pooled connection while it runs).
const WORKERS: usize = 3;

type SubjectReply = oneshot::Sender<Result<Option<SubjectRow>, StoreError>>;
type FindReply = oneshot::Sender<Result<Vec<Found>, StoreError>>;

struct FindRequest {
    path: &'static str,
    digest: [u8; 32],
    limit: u32,
    reply: FindReply,
}

pub(super) struct ReadCoalescer {
    subjects: mpsc::Sender<(Uuid, SubjectReply)>,
    finds: mpsc::Sender<FindRequest>,
}

impl ReadCoalescer {
    pub(super) fn start(backend: Backend) -> Self {
        let (subjects, subject_rx) = mpsc::channel(4096);
        let (finds, find_rx) = mpsc::channel(4096);
        let subject_rx = Arc::new(Mutex::new(subject_rx));
        let find_rx = Arc::new(Mutex::new(find_rx));
        for _ in 0..WORKERS {
            tokio::spawn(subject_worker(backend.clone(), subject_rx.clone()));
            tokio::spawn(find_worker(backend.clone(), find_rx.clone()));
        }
        Self { subjects, finds }
    }

    pub(super) async fn subject(&self, id: Uuid) -> Result<Option<SubjectRow>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.subjects
            .send((id, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    pub(super) async fn find(
        &self,
        path: &'static str,
        digest: [u8; 32],
        limit: u32,
    ) -> Result<Vec<Found>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let request = FindRequest {
            path,
            digest,
            limit,
            reply,
        };
        self.finds.send(request).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Pads a non-empty id list to [`padded_len`] by repeating the last id (`IN` ignores repeats), so
/// each connection prepares (and caches) a handful of statements instead of one per batch size.
fn pad_ids(ids: &mut Vec<Uuid>) {
    if let Some(&last) = ids.last() {
        ids.resize(padded_len(ids.len()), last);
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("reader stopped".into())
}

async fn subject_worker(backend: Backend, rx: Arc<Mutex<mpsc::Receiver<(Uuid, SubjectReply)>>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.lock().await.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let mut ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        pad_ids(&mut ids);
        match subjects_by_id(&backend, &ids).await {
            Ok(mut rows) => {
                for (id, reply) in batch.drain(..) {
                    let _ = reply.send(rows.get(&id).cloned().transpose());
                }
                rows.clear();
            }
            Err(e) => {
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// The rows of those `ids` that exist.
///
/// A row that cannot be converted is an error for its own id only; one with an unreadable id is
/// left out (its readers see "not found", and the conversion error is logged).
pub(super) async fn subjects_by_id(
    backend: &Backend,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Result<SubjectRow, StoreError>>, StoreError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let raws: Vec<RawSubjectRow> = on_pool!(backend, pool => {
        let mut q = sqlx::QueryBuilder::new(
            "SELECT s.id, k.dek_id, k.kek_version, k.wrapped_dek, s.record, s.version, s.created_at, \
             s.updated_at, s.retention, s.retention_version, s.restricted_at \
             FROM subjects s JOIN data_keys k ON k.subject_id = s.id WHERE s.id IN (",
        );
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(id.as_bytes().to_vec());
        }
        q.push(")");
        q.build_query_as::<RawSubjectRow>().fetch_all(pool).await
    })?;
    let mut out = HashMap::with_capacity(raws.len());
    for raw in raws {
        match uuid_from(&raw.id) {
            Ok(id) => {
                out.insert(id, SubjectRow::try_from(raw));
            }
            Err(e) => tracing::error!(error = %e, "subject row with an unreadable id"),
        }
    }
    Ok(out)
}

async fn find_worker(backend: Backend, rx: Arc<Mutex<mpsc::Receiver<FindRequest>>>) {
    let mut batch: Vec<FindRequest> = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.lock().await.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        match find_many(&backend, &batch).await {
            Ok(mut found) => {
                for (i, request) in batch.drain(..).enumerate() {
                    let _ = request.reply.send(Ok(found.remove(&i).unwrap_or_default()));
                }
            }
            Err(e) => {
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One query for every lookup of the batch: a UNION ALL of per-lookup subqueries, so each keeps
/// its own LIMIT. Returns the subjects (with their retention state) per request index.
async fn find_many(
    backend: &Backend,
    requests: &[FindRequest],
) -> Result<HashMap<usize, Vec<Found>>, StoreError> {
    type Row = (i64, Vec<u8>, Option<Vec<u8>>, Option<i64>);
    let Some(last) = requests.last() else {
        return Ok(HashMap::new());
    };
    let rows: Vec<Row> = on_pool!(backend, pool => {
        let mut q = sqlx::QueryBuilder::new("");
        // Padded to [`padded_len`] lookups like the id lists, each padding a repeat of the last
        // lookup with `LIMIT 0`, which returns at once, before reading anything (SQLite and
        // PostgreSQL alike): a connection caches 7 statements instead of one per batch size up
        // to 64.
        for i in 0..padded_len(requests.len()) {
            let (r, limit) = match requests.get(i) {
                Some(r) => (r, i64::from(r.limit)),
                None => (last, 0),
            };
            if i > 0 {
                q.push(" UNION ALL ");
            }
            q.push(format!(
                "SELECT k, subject_id, retention, restricted_at FROM (SELECT CAST({i} AS BIGINT) AS k, \
                 b.subject_id, s.retention, s.restricted_at FROM blind_index b JOIN subjects s ON s.id = b.subject_id WHERE b.path = CAST("
            ));
            // CAST, not a bare parameter: see the module docs of `store`.
            q.push_bind(r.path);
            q.push(" AS TEXT) AND b.digest = ");
            q.push_bind(r.digest.to_vec());
            q.push(" ORDER BY b.subject_id LIMIT ");
            q.push_bind(limit);
            q.push(format!(") AS t{i}"));
        }
        q.build_query_as::<Row>().fetch_all(pool).await
    })?;
    let mut out: HashMap<usize, Vec<Found>> = HashMap::new();
    for (k, id, retention, restricted_at) in rows {
        let k = usize::try_from(k).map_err(|_| StoreError::Corrupt("lookup index".into()))?;
        out.entry(k)
            .or_default()
            .push(Found::from_row(&id, retention, restricted_at)?);
    }
    for found in out.values_mut() {
        found.sort_unstable_by_key(|f| f.id);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::inline_reader::tests::store_with_lookups;

    #[tokio::test]
    async fn a_padded_batch_of_lookups_answers_each_with_its_own_rows_and_none_of_the_padding() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shared, other) = store_with_lookups(&dir).await;
        let lookup = |digest: u8, limit: u32| FindRequest {
            path: "contact.email",
            digest: [digest; 32],
            limit,
            reply: oneshot::channel().0,
        };
        // Three lookups, padded to four: the padding repeats the last (digest 1) with LIMIT 0.
        let requests = [lookup(1, 10), lookup(2, 10), lookup(1, 2)];
        assert_eq!(padded_len(requests.len()), 4);
        let found = find_many(&store.backend, &requests).await.unwrap();
        let ids = |k: usize| found[&k].iter().map(|f| f.id).collect::<Vec<_>>();
        let mut keys: Vec<usize> = found.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, vec![0, 1, 2]);
        assert_eq!(ids(0), shared);
        assert_eq!(ids(1), vec![other]);
        assert_eq!(ids(2), shared[..2]);
    }

    #[test]
    fn batch_sizes_round_up_to_powers_of_two() {
        let sizes: Vec<usize> = [1, 2, 3, 5, 17, 63, 64]
            .iter()
            .map(|n| padded_len(*n))
            .collect();
        assert_eq!(sizes, vec![1, 2, 4, 8, 32, 64, 64]);
        let mut ids = vec![Uuid::nil(), Uuid::max(), Uuid::from_u128(7)];
        pad_ids(&mut ids);
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[3], Uuid::from_u128(7));
    }
}
