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
//! The group committer still decides the order. It hands a batch here only when every op in it
//! is a purge or a shred (or there is none), and holds the sqlx pool's one writing connection
//! until the answer, so nothing else of this process (a checkpoint, a key or caller change) meets
//! this connection at SQLite's lock; another process (a second instance, the CLI) is ordered by
//! that lock and the busy timeout, as before. The transaction is the one the sqlx path runs:
//! `BEGIN IMMEDIATE`, apply the ops that still hold, read the chain head, insert the linked
//! events, move the head, commit (synchronous = FULL: durable before the answer).

use std::{
    path::Path,
    sync::{Arc, mpsc},
    thread::JoinHandle,
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{
    AuditRecord, ChainLinker, SQLITE_BUSY_TIMEOUT, StoreError, WriteOp, WriteOutcome,
    audit::subjects_column,
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
}

/// The direct appender: a connection on its own thread, fed one transaction at a time, by the
/// group committer (events, sweeps).
pub(super) struct DirectAppender {
    jobs: Option<mpsc::Sender<Work>>,
    thread: Option<JoinHandle<()>>,
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
            jobs: Some(jobs),
            thread: Some(thread),
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

    fn hand_off(&self, work: Work) -> Result<(), StoreError> {
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(work)
            .map_err(|_| stopped())
    }

    /// Takes no more work, lets the thread finish what it holds, then closes its connection.
    pub(super) async fn close(mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take()
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
    let (head_seq, head_mac): (i64, Vec<u8>) = tx
        .prepare_cached("SELECT seq, mac FROM audit_head WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
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

    pub(crate) fn event(n: usize) -> AuditRecord {
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
