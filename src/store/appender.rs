//! SQLite only: a batch of audit events without a write op (the events of reads and refusals) is
//! appended by a thread of its own over one direct connection (rusqlite), the whole transaction in
//! one hand-off; so is a batch of a retention sweep's purges and shreds with their events.
//!
//! Through sqlx every statement is a round trip to the connection's worker thread, and `BEGIN` and
//! `COMMIT` wait for an acknowledgement as well: a batch of reads' events took seven hand-offs, each
//! waiting for a CPU that the request handlers (and, in the benchmark, the client) keep busy. Under
//! closed-loop `get` the writer was busy 94 % of the time at 3.3 ms per batch of 16 events while
//! its SQLite thread used a fifth of a core, and the CPUs stood 13–19 % idle: the audit append,
//! not the work, set the pace.
//!
//! A sweep's batch went through sqlx too: under closed-loop `get` each of its statements waited
//! for a CPU while it held SQLite's write lock, and the reads' events queued behind it. Here its
//! statements run one subject at a time on prepared statements, without a hand-off each.
//!
//! The audit indexer's transaction (the next events into `audit_subjects`) runs here as well:
//! through sqlx it held SQLite's write lock for five statements' round trips, 20–22 % of the time
//! under closed-loop `get`, and every read's event waited behind it.
//!
//! The group committer still decides the order. It hands a batch here only when every op in it
//! is a purge or a shred (or there is none), and holds the sqlx pool's one writing connection
//! until the answer, as the indexer does for its run, so nothing else of this process (a
//! checkpoint, a key or caller change) meets this connection at SQLite's lock; another process (a
//! second instance, the CLI) is ordered by that lock and the busy timeout, as before. The
//! transaction is the one the sqlx path runs: `BEGIN IMMEDIATE`, apply the ops that still hold,
//! read the chain head, insert the linked events, move the head, commit (synchronous = FULL:
//! durable before the answer).

use std::{
    path::Path,
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{
    AuditRecord, ChainLinker, SQLITE_BUSY_TIMEOUT, StoreError, WriteOp, WriteOutcome,
    audit::{INDEX_BATCH, follows_mark, index_run, subjects_column},
    writer::{SUBJECT_TABLES, StoredIndexKey, decode_index_keys, encode_stored_keys, link_events},
};

/// A group commit's jobs: each an optional write op and its optional event.
type Jobs = Vec<(Option<WriteOp>, Option<AuditRecord>)>;
/// One result per job, in job order; `Err` for the whole batch if its transaction failed.
type JobResults = Result<Vec<Result<WriteOutcome, StoreError>>, StoreError>;

/// What the thread is handed: one transaction's work.
enum Work {
    /// Events alone, appended after the chain head.
    Events {
        events: Vec<AuditRecord>,
        linker: Arc<dyn ChainLinker>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// A retention sweep's purges and shreds (and events alone beside them): each op applied
    /// only if its subject did not change since planned, then the events of those that applied.
    Sweep {
        jobs: Jobs,
        linker: Arc<dyn ChainLinker>,
        reply: oneshot::Sender<JobResults>,
    },
    /// One run of the audit indexer: the next events after its mark into `audit_subjects`.
    Index {
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
}

/// The direct appender: a connection on its own thread, fed one transaction at a time. Shared
/// by the group committer (events, sweeps) and the store (the audit indexer).
pub(super) struct DirectAppender {
    jobs: Mutex<Option<mpsc::Sender<Work>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl DirectAppender {
    /// Opens the connection to the database file at `path` (which exists and is migrated or about
    /// to be) and starts its thread. `None` for an in-memory database, which a second connection
    /// would not share: its events go through sqlx.
    pub(super) fn open(path: &Path) -> Result<Option<Self>, StoreError> {
        if !super::is_database_file(path) {
            return Ok(None);
        }
        let conn = connect(path)?;
        let (jobs, rx) = mpsc::channel::<Work>();
        let thread = std::thread::Builder::new()
            .name("kluis-audit".into())
            .spawn(move || serve(conn, rx))
            .map_err(|e| StoreError::Unavailable(format!("audit appender thread: {e}")))?;
        Ok(Some(Self {
            jobs: Mutex::new(Some(jobs)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Appends `events` after the chain head in one durable transaction.
    pub(super) async fn append(
        &self,
        events: Vec<AuditRecord>,
        linker: Arc<dyn ChainLinker>,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.hand_off(Work::Events {
            events,
            linker,
            reply,
        })?;
        answer.await.map_err(|_| stopped())?
    }

    /// Applies a sweep's purges and shreds (every op of `jobs` is one, or none) with the events
    /// of those that applied and of the jobs without an op, in one durable transaction. A purge or
    /// shred whose subject changed since planned is not applied (`VersionMismatch`), as on the
    /// sqlx path; any other failure refuses the whole batch.
    pub(super) async fn sweep(&self, jobs: Jobs, linker: Arc<dyn ChainLinker>) -> JobResults {
        let (reply, answer) = oneshot::channel();
        self.hand_off(Work::Sweep {
            jobs,
            linker,
            reply,
        })?;
        answer.await.map_err(|_| stopped())?
    }

    /// Indexes the next events after the indexer's mark into `audit_subjects` and moves the mark,
    /// in one transaction (the statements of the sqlx path,
    /// [`super::Store::index_audit_subjects`]); returns how many events were indexed.
    pub(super) async fn index(&self) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.hand_off(Work::Index { reply })?;
        answer.await.map_err(|_| stopped())?
    }

    fn hand_off(&self, work: Work) -> Result<(), StoreError> {
        self.jobs
            .lock()
            .map_err(|_| stopped())?
            .as_ref()
            .ok_or_else(stopped)?
            .send(work)
            .map_err(|_| stopped())
    }

    /// Takes no more work, lets the thread finish what it holds, then closes its connection.
    pub(super) async fn close(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread
            && tokio::task::spawn_blocking(move || thread.join())
                .await
                .is_err()
        {
            tracing::warn!("audit appender thread did not stop cleanly");
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("audit appender stopped".into())
}

/// The connection, set up like the sqlx pools' (`Store::open`): durable commits, the same busy
/// timeout, no checkpoint inside a commit (the background checkpointer does them).
fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -4096)?;
    let synchronous: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
    if synchronous != 2 {
        return Err(StoreError::Unavailable(format!(
            "audit appender connection has synchronous = {synchronous}, not FULL"
        )));
    }
    Ok(conn)
}

fn serve(mut conn: Connection, jobs: mpsc::Receiver<Work>) {
    for work in jobs {
        // A caller that went away no longer needs the answer; the work is committed.
        match work {
            Work::Events {
                events,
                linker,
                reply,
            } => {
                let _ = reply.send(append(&mut conn, &*linker, &events));
            }
            Work::Sweep {
                jobs,
                linker,
                reply,
            } => {
                let _ = reply.send(sweep(&mut conn, &*linker, &jobs));
            }
            Work::Index { reply } => {
                let _ = reply.send(index(&mut conn));
            }
        }
    }
}

fn append(
    conn: &mut Connection,
    linker: &dyn ChainLinker,
    events: &[AuditRecord],
) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let events: Vec<&AuditRecord> = events.iter().collect();
    append_linked(&tx, linker, &events)?;
    tx.commit()?;
    Ok(())
}

/// The sweep transaction of [`DirectAppender::sweep`]: the statements of the sqlx path's
/// `Purge` and `Shred`, one subject at a time (prepared once, no hand-off per statement).
fn sweep(conn: &mut Connection, linker: &dyn ChainLinker, jobs: &Jobs) -> JobResults {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut results = Vec::with_capacity(jobs.len());
    for (op, _) in jobs {
        results.push(match op {
            None => Ok(WriteOutcome::Recorded),
            Some(op) => apply_sweep_op(&tx, op)?,
        });
    }
    let events: Vec<&AuditRecord> = jobs
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .filter_map(|((_, audit), _)| audit.as_ref())
        .collect();
    if !events.is_empty() {
        append_linked(&tx, linker, &events)?;
    }
    tx.commit()?;
    Ok(results)
}

/// The indexer's transaction of [`DirectAppender::index`]: read the mark and the events after
/// it, index the gap-free run ([`index_run`]), move the mark; nothing when there is no run.
fn index(conn: &mut Connection) -> Result<u64, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mark: i64 = tx.query_row(
        "SELECT indexed_seq FROM audit_index_state WHERE id = 1",
        [],
        |r| r.get(0),
    )?;
    let rows: Vec<(i64, String)> = tx
        .prepare_cached(
            "SELECT seq, subjects FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?
        .query_map(params![mark, INDEX_BATCH], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let oldest = if follows_mark(mark, &rows) {
        None
    } else {
        tx.query_row("SELECT MIN(seq) FROM audit_events", [], |r| r.get(0))?
    };
    let Some(run) = index_run(mark, oldest, &rows) else {
        return Ok(0);
    };
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO audit_subjects (subject_id, seq) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        for (id, seq) in &run.entries {
            insert.execute(params![id.as_bytes().as_slice(), seq])?;
        }
    }
    tx.prepare_cached("UPDATE audit_index_state SET indexed_seq = ?1 WHERE id = 1")?
        .execute(params![run.last])?;
    tx.commit()?;
    Ok(run.events)
}

/// Applies one purge or shred if its subject is still at the planned versions; the inner `Err`
/// (`VersionMismatch`) if it changed or went, the outer one for a failed statement.
fn apply_sweep_op(
    tx: &rusqlite::Transaction<'_>,
    op: &WriteOp,
) -> Result<Result<WriteOutcome, StoreError>, StoreError> {
    let changed = || Err(StoreError::VersionMismatch { actual: 0 });
    match op {
        WriteOp::Purge {
            id,
            read_version,
            retention_version,
            record,
            updated_at,
            remove_index_paths,
            mark,
            due,
        } => {
            let idb = id.as_bytes().as_slice();
            let keys: Option<Vec<u8>> = tx
                .prepare_cached(
                    "UPDATE subjects SET record = ?1, version = version + 1, updated_at = ?2, \
                     retention = ?3, retention_due = ?4, retention_version = retention_version + 1 \
                     WHERE id = ?5 AND version = ?6 AND retention_version = ?7 RETURNING index_keys",
                )?
                .query_row(
                    params![
                        record,
                        updated_at,
                        mark,
                        due,
                        idb,
                        *read_version as i64,
                        retention_version
                    ],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(keys) = keys else {
                return Ok(changed());
            };
            if !remove_index_paths.is_empty() {
                let (removed, kept): (Vec<StoredIndexKey>, Vec<StoredIndexKey>) =
                    decode_index_keys(&keys)?
                        .into_iter()
                        .partition(|k| remove_index_paths.contains(&k.path.as_str()));
                if !removed.is_empty() {
                    delete_index_entries(tx, &removed, idb)?;
                    tx.prepare_cached("UPDATE subjects SET index_keys = ?1 WHERE id = ?2")?
                        .execute(params![encode_stored_keys(&kept), idb])?;
                }
            }
            Ok(Ok(WriteOutcome::Purged {
                version: read_version + 1,
            }))
        }
        WriteOp::Shred {
            id,
            read_version,
            retention_version,
            at,
        } => {
            let idb = id.as_bytes().as_slice();
            let keys: Option<Vec<u8>> = tx
                .prepare_cached(
                    "DELETE FROM subjects WHERE id = ?1 AND version = ?2 AND retention_version = ?3 \
                     RETURNING index_keys",
                )?
                .query_row(
                    params![idb, *read_version as i64, retention_version],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(keys) = keys else {
                return Ok(changed());
            };
            delete_index_entries(tx, &decode_index_keys(&keys)?, idb)?;
            tx.prepare_cached("INSERT INTO erased_subjects (id, erased_at) VALUES (?1, ?2)")?
                .execute(params![idb, at])?;
            for table in SUBJECT_TABLES {
                tx.prepare_cached(&format!("DELETE FROM {table} WHERE subject_id = ?1"))?
                    .execute(params![idb])?;
            }
            Ok(Ok(WriteOutcome::Shredded))
        }
        _ => Err(StoreError::Database(
            "the direct appender applies only a sweep's purges and shreds".into(),
        )),
    }
}

fn delete_index_entries(
    tx: &rusqlite::Transaction<'_>,
    keys: &[StoredIndexKey],
    subject: &[u8],
) -> Result<(), StoreError> {
    let mut delete = tx.prepare_cached(
        "DELETE FROM blind_index WHERE path = ?1 AND digest = ?2 AND subject_id = ?3",
    )?;
    for key in keys {
        delete.execute(params![key.path, key.digest, subject])?;
    }
    Ok(())
}

/// Links `events` after the chain head and inserts them, moving the head, inside `tx`.
fn append_linked(
    tx: &rusqlite::Transaction<'_>,
    linker: &dyn ChainLinker,
    events: &[&AuditRecord],
) -> Result<(), StoreError> {
    let (head_seq, head_mac): (i64, Vec<u8>) =
        tx.query_row("SELECT seq, mac FROM audit_head WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let (linked, head) = link_events(linker, head_seq, &head_mac, events)?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO audit_events (seq, at_us, caller, purpose, method, outcome, subjects, body, mac) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for (seq, e, mac) in &linked {
            insert.execute(params![
                seq,
                e.at_us,
                e.caller,
                e.purpose,
                e.method,
                e.outcome,
                subjects_column(&e.subjects),
                e.body,
                mac.as_slice(),
            ])?;
        }
        tx.prepare_cached("UPDATE audit_head SET seq = ?1, mac = ?2 WHERE id = 1")?
            .execute(params![head_seq + linked.len() as i64, head.as_slice()])?;
    }
    Ok(())
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            // Codes only: SQLite's message may quote what a statement touched.
            rusqlite::Error::SqliteFailure(failure, _) => {
                let code = failure.extended_code.to_string();
                if super::transient(&code) {
                    StoreError::Unavailable(format!("database code {code}"))
                } else {
                    StoreError::Database(format!("code {code}"))
                }
            }
            _ => StoreError::Database(e.to_string()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) mod tests {
    use sha2::{Digest, Sha256};
    use uuid::Uuid;

    use super::*;
    use crate::store::{CallerRow, Store};

    /// A stand-in for the keyed HMAC: any function of (seq, prev, body) shows whether each event
    /// was linked to the one stored before it.
    pub(crate) struct TestLinker;

    impl ChainLinker for TestLinker {
        fn link(&self, seq: i64, prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
            let digest = Sha256::new()
                .chain_update(seq.to_be_bytes())
                .chain_update(prev)
                .chain_update(body)
                .finalize();
            let mut mac = [0; 32];
            mac.copy_from_slice(&digest);
            mac
        }
    }

    fn event(n: usize) -> AuditRecord {
        AuditRecord {
            at_us: n as i64,
            caller: "test".into(),
            purpose: "account".into(),
            method: format!("/test/{n}"),
            outcome: "OK".into(),
            subjects: vec![Uuid::new_v4()],
            body: format!("event {n}").into_bytes(),
        }
    }

    /// A write op whose event rides in the sqlx transaction that applies it.
    fn insert_caller(n: usize) -> WriteOp {
        WriteOp::InsertCaller(CallerRow {
            id: format!("caller-{n}"),
            name: format!("caller {n}"),
            role: "operator".into(),
            secret_hash: vec![n as u8; 32],
            created_at: 1,
            revoked_at: None,
        })
    }

    async fn open(dir: &Path) -> Store {
        let store = Store::open(&format!("sqlite://{}", dir.join("k.db").display()))
            .await
            .unwrap();
        store.set_chain_linker(Arc::new(TestLinker));
        store
    }

    /// Every stored event, checked link by link from the zero head; returns their bodies.
    async fn linked_bodies(store: &Store) -> Vec<String> {
        let crate::store::Backend::Sqlite(pool) = &store.backend else {
            panic!("a SQLite store")
        };
        let rows: Vec<(i64, Vec<u8>, Vec<u8>)> =
            sqlx::query_as("SELECT seq, body, mac FROM audit_events ORDER BY seq")
                .fetch_all(pool)
                .await
                .unwrap();
        let mut prev = [0; 32];
        for (n, (seq, body, mac)) in rows.iter().enumerate() {
            assert_eq!(*seq, n as i64 + 1, "no gap and no repeat");
            let expected = TestLinker.link(*seq, &prev, body);
            assert_eq!(mac.as_slice(), expected.as_slice(), "link of event {seq}");
            prev = expected;
        }
        let (head_seq, head_mac): (i64, Vec<u8>) =
            sqlx::query_as("SELECT seq, mac FROM audit_head WHERE id = 1")
                .fetch_one(pool)
                .await
                .unwrap();
        assert_eq!(head_seq, rows.len() as i64, "head at the last event");
        assert_eq!(
            head_mac.as_slice(),
            prev.as_slice(),
            "head holds the last link"
        );
        rows.into_iter()
            .map(|(_, body, _)| String::from_utf8(body).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn events_alone_and_events_of_writes_continue_one_chain_across_both_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        assert!(
            store.writer.has_direct_appender(),
            "a SQLite file gets the direct appender"
        );
        // One job per batch (each awaited): events alone (direct appender) and an op's event
        // (sqlx) take turns, so each path must start from the head the other one left.
        for n in 0..6 {
            if n % 2 == 0 {
                store.record(event(n)).await.unwrap();
            } else {
                let outcome = store
                    .writer
                    .submit(Some(insert_caller(n)), Some(event(n)))
                    .await
                    .unwrap();
                assert!(matches!(outcome, WriteOutcome::CallerInserted));
            }
        }
        let expected: Vec<String> = (0..6).map(|n| format!("event {n}")).collect();
        assert_eq!(linked_bodies(&store).await, expected);

        // Then many at once, mixed, in batches of whatever size the writer drains.
        let store = Arc::new(store);
        let mut tasks = Vec::new();
        for n in 6..206 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                if n % 5 == 0 {
                    store
                        .writer
                        .submit(Some(insert_caller(n)), Some(event(n)))
                        .await
                        .map(|_| ())
                } else {
                    store.record(event(n)).await
                }
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let mut bodies = linked_bodies(&store).await;
        assert_eq!(bodies.len(), 206);
        bodies.sort();
        let mut expected: Vec<String> = (0..206).map(|n| format!("event {n}")).collect();
        expected.sort();
        assert_eq!(bodies, expected, "every event stored once");
        store.close().await;
    }

    #[tokio::test]
    async fn a_failing_direct_append_stores_nothing_and_moves_no_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).await;
        store.record(event(0)).await.unwrap();
        let crate::store::Backend::Sqlite(pool) = &store.write_backend else {
            panic!("a SQLite store")
        };
        sqlx::query(
            "CREATE TRIGGER refuse_second BEFORE INSERT ON audit_events WHEN NEW.seq = 3 \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(pool)
        .await
        .unwrap();
        // Events 1 and 2 go in one batch with it: the batch fails whole.
        let direct = DirectAppender::open(&dir.path().join("k.db"))
            .unwrap()
            .unwrap();
        let refused = direct
            .append(vec![event(1), event(2)], Arc::new(TestLinker))
            .await
            .unwrap_err();
        assert!(matches!(refused, StoreError::Database(_)), "{refused:?}");
        assert!(!refused.to_string().contains("refused"), "codes only");
        direct.close().await;
        assert_eq!(linked_bodies(&store).await, vec!["event 0".to_owned()]);
        // The writer's own appender goes on from the unchanged head.
        store.record(event(3)).await.unwrap();
        assert_eq!(
            linked_bodies(&store).await,
            vec!["event 0".to_owned(), "event 3".to_owned()]
        );
        store.close().await;
    }

    /// What one store's indexer did: each run's count, then the index rows and the mark.
    async fn index_runs(store: &Store) -> (Vec<u64>, Vec<String>) {
        let crate::store::Backend::Sqlite(pool) = &store.write_backend else {
            panic!("a SQLite store")
        };
        let mut counts = vec![store.index_audit_subjects().await.unwrap()];
        for deletion in [
            // An event missing in the middle (tampering): the run stops before it, and stays so.
            "DELETE FROM audit_events WHERE seq = 700",
            // Everything before a point pruned: the run resumes at the oldest event left.
            "DELETE FROM audit_events WHERE seq < 1000",
        ] {
            sqlx::query(deletion).execute(pool).await.unwrap();
            counts.push(store.index_audit_subjects().await.unwrap());
            counts.push(store.index_audit_subjects().await.unwrap());
        }
        let mut rows: Vec<String> = sqlx::query_scalar(
            "SELECT hex(subject_id) || ' ' || seq FROM audit_subjects ORDER BY subject_id, seq",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let mark: i64 = sqlx::query_scalar("SELECT indexed_seq FROM audit_index_state")
            .fetch_one(pool)
            .await
            .unwrap();
        rows.push(format!("mark {mark}"));
        (counts, rows)
    }

    /// The indexer's run on the appender's thread takes in exactly what the sqlx transaction
    /// does: the same entries (several subjects per event, one subject in many events), the same
    /// stop before a missing event and resumption after pruning, the same mark.
    #[tokio::test]
    async fn the_indexer_on_the_appenders_thread_indexes_what_the_sqlx_path_indexes() {
        let subjects: Vec<Uuid> = (0..40).map(|n| Uuid::from_u128(n * 7919 + 1)).collect();
        let mut outcomes = Vec::new();
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut store = open(dir.path()).await;
            assert!(
                store.appender.is_some(),
                "a SQLite file gets the direct appender"
            );
            if !direct {
                store.appender = None;
            }
            for n in 0..1200usize {
                let mut e = event(n);
                e.subjects = vec![subjects[n % 40], subjects[(n * 3) % 40]];
                store.record(e).await.unwrap();
            }
            outcomes.push(index_runs(&store).await);
            store.close().await;
        }
        let (counts, rows) = &outcomes[0];
        assert_eq!(
            counts,
            &[500, 199, 0, 201, 0],
            "a full batch, the run up to the gap at 700, stopped, then 1000..=1200"
        );
        // 40 subjects: event n names n % 40 and 3n % 40 (the same one when n % 20 == 0).
        let entries = |range: std::ops::RangeInclusive<usize>| {
            range
                .map(|n| if n % 20 == 0 { 1 } else { 2 })
                .sum::<usize>()
        };
        let seqs = |r: std::ops::RangeInclusive<usize>| entries(r.start() - 1..=r.end() - 1);
        assert_eq!(
            rows.len(),
            seqs(1..=699) + seqs(1000..=1200) + 1,
            "each (subject, event) once, for the events indexed"
        );
        assert_eq!(rows.last().unwrap(), "mark 1200");
        assert_eq!(
            outcomes[0], outcomes[1],
            "the same runs and rows on both paths"
        );
    }

    #[test]
    fn an_in_memory_database_has_no_direct_appender() {
        assert!(
            DirectAppender::open(Path::new(":memory:"))
                .unwrap()
                .is_none()
        );
        assert!(DirectAppender::open(Path::new("")).unwrap().is_none());
    }
}
