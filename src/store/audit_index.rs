//! SQLite: the per-subject index of the audit trail (`audit_subjects` and its mark,
//! `audit_index_state`) kept in a database of its own, attached to the read pool's connections as
//! `audit_index`, so that the indexer never takes the main database's write lock.
//!
//! In the main file every run of the indexer (up to 500 events, each entry at a random place in a
//! B-tree keyed by subject) held SQLite's one write lock for several milliseconds, first through
//! sqlx and then on the audit appender's thread; every read's audit event, and so every read,
//! waited behind it (about 1.3 % of commits took over 5 ms under a fixed 10,000 get/s, at the
//! indexer's run rate). Here the runs take the index file's lock only, on a connection of their
//! own that opens the main file read-only: the appender never meets them. The index's pages and
//! WAL frames stay out of the main file's WAL and checkpoints as well.
//!
//! The index is derived from the trail, so its file commits with `synchronous = NORMAL` (a power
//! loss may undo the last runs; the mark goes back with them and the runs are redone) and needs
//! no backup. It records the link of the event at its mark: when the main database is not the
//! one it was built from (a backup put back, the trail cut short), the link at the mark no longer
//! matches and the index is rebuilt from the start instead of naming events it never saw.
//!
//! A database given as `:memory:` or as a `file:` URI has no file beside it to put the index in:
//! its index lives in a shared in-memory database of the process, attached to both pools, and the
//! indexer runs through sqlx as on PostgreSQL.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::{
    SQLITE_BUSY_TIMEOUT, StoreError,
    audit::{IndexedRun, follows_mark, index_run},
};

/// Most events one run of the index file's writer takes in, in one transaction. Far more than
/// the sqlx path's [`super::audit::INDEX_BATCH`]: this transaction holds only the index file's
/// lock, which no read or append waits for, and its cost is the B-tree pages it dirties, each
/// written to the index's WAL once per commit however many entries it took. The entries land
/// at random places (one per event, keyed by subject), so a run of 500 dirtied about one page
/// per event; a run per tick (everything appended in the last 500 ms, up to this many or
/// [`FILE_INDEX_TEXT`]) writes each page it touches once for all of them.
pub(super) const FILE_INDEX_BATCH: i64 = 20_000;

/// Most text of `audit_events.subjects` one run holds, whatever its event count: an event may
/// name up to a lookup's limit of subjects (37 bytes each), so 20,000 of them could hold hundreds
/// of megabytes. A run stops after the event that reaches this (about 56,000 subject ids).
pub(super) const FILE_INDEX_TEXT: usize = 2 << 20;

/// The schema name the index is attached under.
const SCHEMA: &str = "audit_index";

/// The index's tables in schema `{s}`, created if missing, with the mark at the start.
/// `indexed_mac` is the link of the event at the mark (NULL at 0, and on the sqlx path);
/// `pruned_seq` the last seq whose entries a prune deleted (the file writer's only).
fn create_sql(s: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {s}.audit_subjects (
             subject_id BLOB    NOT NULL,
             seq        INTEGER NOT NULL,
             PRIMARY KEY (subject_id, seq)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS {s}.audit_index_state (
             id          INTEGER PRIMARY KEY CHECK (id = 1),
             indexed_seq INTEGER NOT NULL,
             indexed_mac BLOB,
             pruned_seq  INTEGER NOT NULL DEFAULT 0
         );
         INSERT OR IGNORE INTO {s}.audit_index_state (id, indexed_seq) VALUES (1, 0);"
    )
}

/// The file that holds the audit index of the SQLite database file `main`: its name with
/// `.audit-index` appended (`kluis.db` → `kluis.db.audit-index`).
pub fn index_file(main: &Path) -> PathBuf {
    let mut name = main.as_os_str().to_owned();
    name.push(".audit-index");
    PathBuf::from(name)
}

/// Where a SQLite store keeps its audit index.
#[derive(Debug, Clone)]
pub(super) enum Location {
    /// Beside the database file ([`index_file`]), written by an [`IndexWriter`].
    File(PathBuf),
    /// A shared in-memory database of this process (by its URI), written through sqlx.
    Memory(String),
}

impl Location {
    /// The index's place for the main database at `main` (as sqlx parsed it from the URL).
    pub(super) fn for_main(main: &Path) -> Self {
        if super::is_database_file(main) {
            Self::File(index_file(main))
        } else {
            Self::Memory(format!(
                "file:kluis-audit-index-{}?mode=memory&cache=shared",
                uuid::Uuid::new_v4().simple()
            ))
        }
    }

    /// Attaches the index to a sqlx connection as `audit_index` (creating its tables in memory;
    /// a file's tables are created by its writer, which opens before the pools).
    pub(super) async fn attach(
        &self,
        conn: &mut sqlx::SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        use sqlx::Executor;
        let target = match self {
            Self::File(path) => path.to_string_lossy().into_owned(),
            Self::Memory(uri) => uri.clone(),
        };
        // Attached before the query's schema names resolve, so bound, not formatted in.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ATTACH DATABASE $1 AS {SCHEMA}"
        )))
        .bind(target)
        .execute(&mut *conn)
        .await?;
        if let Self::Memory(_) = self {
            conn.execute(sqlx::AssertSqlSafe(create_sql(SCHEMA)))
                .await?;
        }
        Ok(())
    }
}

/// The index file's writer: one connection, whose main database is the index file and which
/// sees the trail through the main database file attached read-only as `trail`. `BEGIN
/// IMMEDIATE` takes a write lock on every database of a connection that is writable, so the main
/// file, read-only here, is only read.
pub(super) struct IndexWriter {
    /// `None` once closed ([`IndexWriter::close`]).
    conn: Arc<Mutex<Option<Connection>>>,
    /// Most events per run: [`FILE_INDEX_BATCH`] (tests set the sqlx path's, to compare runs).
    batch: i64,
}

impl IndexWriter {
    /// Opens (creating) the index file `index` beside the main database file `main`, and its
    /// tables; the main file's tables may not exist yet (they are read only at the first run).
    pub(super) fn open(index: &Path, main: &Path) -> Result<Self, StoreError> {
        super::create_private_file(index)?;
        // The file's name in the error: it is derived data an operator may delete and rebuild.
        Self::connect(index, main).map_err(|e| {
            StoreError::Unavailable(format!("audit index file {}: {e}", index.display()))
        })
    }

    fn connect(index: &Path, main: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open_with_flags(
            index,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "audit index file journal mode is {mode}, not WAL"
            )));
        }
        // Derived data: a power loss may undo the last runs, which are then done again.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "journal_size_limit", super::WAL_SIZE_LIMIT)?;
        conn.execute_batch(&create_sql("main"))?;
        conn.execute("ATTACH DATABASE ?1 AS trail", [read_only_uri(main)])?;
        Ok(Self {
            conn: Arc::new(Mutex::new(Some(conn))),
            batch: FILE_INDEX_BATCH,
        })
    }

    /// One run: the next events after the mark into the index, the mark moved (see
    /// [`super::Store::index_audit_run`]); how many events were indexed, and whether the run
    /// stopped at a limit.
    pub(super) async fn index(&self) -> Result<IndexedRun, StoreError> {
        let batch = self.batch;
        self.on_connection(move |conn| index(conn, batch)).await
    }

    /// Empties the index if it was not built from the trail it now sees (see [`checked_mark`]),
    /// so that no query uses it before the indexer's first run: called once the main database
    /// is migrated, before anything is served.
    pub(super) async fn forget_if_foreign(&self) -> Result<(), StoreError> {
        self.on_connection(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            checked_mark(&tx)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Deletes the entries of events up to and including `seq` (pruned from the trail), and
    /// records `seq` as pruned: a trail that still holds an event up to it is not the one the
    /// index was pruned with (a backup from before the prune, put back), and is indexed again.
    pub(super) async fn prune(&self, seq: i64) -> Result<(), StoreError> {
        self.on_connection(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute("DELETE FROM audit_subjects WHERE seq <= ?1", [seq])?;
            tx.execute(
                "UPDATE audit_index_state SET pruned_seq = MAX(pruned_seq, ?1) WHERE id = 1",
                [seq],
            )?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Closes the connection, once a run under way has finished; runs after this fail.
    pub(super) async fn close(&self) {
        let conn = self.conn.clone();
        // Off the async workers: a run under way holds the lock, and closing the file's last
        // connection checkpoints its WAL.
        let _ = tokio::task::spawn_blocking(move || {
            let closed = conn.lock().unwrap_or_else(PoisonError::into_inner).take();
            drop(closed);
        })
        .await;
    }

    async fn on_connection<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // The connection holds no state a panic elsewhere could leave half-changed.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            let conn = conn
                .as_mut()
                .ok_or_else(|| StoreError::Unavailable("audit index writer closed".into()))?;
            work(conn)
        })
        .await
        .map_err(|_| StoreError::Unavailable("audit index writer stopped".into()))?
    }
}

/// A `file:` URI opening `path` read-only (`%`, `?` and `#` escaped, as SQLite's URIs need).
fn read_only_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            c => uri.push(c),
        }
    }
    uri.push_str("?mode=ro");
    uri
}

/// The indexer's transaction: check that the index belongs to this trail (else start it over),
/// read the events after the mark, index the gap-free run ([`index_run`]), move the mark and
/// record the link at it; nothing when there is no run.
fn index(conn: &mut Connection, batch: i64) -> Result<IndexedRun, StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mark = checked_mark(&tx)?;
    let mut rows: Vec<(i64, String)> = Vec::new();
    let mut text = 0;
    {
        let mut select = tx.prepare_cached(
            "SELECT seq, subjects FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let mut found = select.query(params![mark, batch])?;
        while let Some(row) = found.next()? {
            let subjects: String = row.get(1)?;
            text += subjects.len();
            rows.push((row.get(0)?, subjects));
            if text >= FILE_INDEX_TEXT {
                break;
            }
        }
    }
    // Stopped by a limit rather than by the end of the trail: more may be waiting.
    let limited = i64::try_from(rows.len()).is_ok_and(|n| n >= batch) || text >= FILE_INDEX_TEXT;
    let oldest = if follows_mark(mark, &rows) {
        None
    } else {
        tx.query_row("SELECT MIN(seq) FROM audit_events", [], |r| r.get(0))?
    };
    let Some(run) = index_run(mark, oldest, &rows) else {
        tx.commit()?;
        return Ok(IndexedRun::default());
    };
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO audit_subjects (subject_id, seq) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        for (id, seq) in &run.entries {
            insert.execute(params![id.as_bytes().as_slice(), seq])?;
        }
    }
    let last_mac: Option<Vec<u8>> = tx
        .prepare_cached("SELECT mac FROM audit_events WHERE seq = ?1")?
        .query_row([run.last], |r| r.get(0))
        .optional()?;
    tx.prepare_cached(
        "UPDATE audit_index_state SET indexed_seq = ?1, indexed_mac = ?2 WHERE id = 1",
    )?
    .execute(params![run.last, last_mac])?;
    tx.commit()?;
    Ok(IndexedRun::after(&run, rows.len(), limited))
}

/// The index's mark, after making sure that the index belongs to the trail it sees: if not, it
/// is emptied (in `tx`) and the mark is 0.
fn checked_mark(tx: &rusqlite::Transaction<'_>) -> Result<i64, StoreError> {
    let (mark, mac, pruned): (i64, Option<Vec<u8>>, i64) = tx.query_row(
        "SELECT indexed_seq, indexed_mac, pruned_seq FROM audit_index_state WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if (mark == 0 && pruned == 0) || matches_trail(tx, mark, mac.as_deref(), pruned)? {
        return Ok(mark);
    }
    tracing::warn!(
        indexed_seq = mark,
        pruned_seq = pruned,
        "the audit index does not match the trail (a database put back from a backup, a trail \
         cut short, or the event at the index's mark missing): building it again"
    );
    tx.execute_batch(
        "DELETE FROM audit_subjects; \
         UPDATE audit_index_state SET indexed_seq = 0, indexed_mac = NULL, pruned_seq = 0 \
         WHERE id = 1",
    )?;
    Ok(0)
}

/// Whether the index built up to `mark` (its entries up to `pruned` deleted by prunes) belongs to
/// the trail it now sees: no event up to `pruned` is left (else the trail is older than the
/// prune), and the event at the mark has the link recorded with it or has been pruned (it is
/// before the oldest event left, and the head is past it). An event of another link at the mark,
/// or a head short of it, is another trail (or the same one put back from a backup).
fn matches_trail(
    tx: &rusqlite::Transaction<'_>,
    mark: i64,
    mac: Option<&[u8]>,
    pruned: i64,
) -> Result<bool, StoreError> {
    let oldest: Option<i64> =
        tx.query_row("SELECT MIN(seq) FROM audit_events", [], |r| r.get(0))?;
    if oldest.is_some_and(|oldest| oldest <= pruned) {
        return Ok(false);
    }
    if mark == 0 {
        return Ok(true);
    }
    let at_mark: Option<Vec<u8>> = tx
        .query_row("SELECT mac FROM audit_events WHERE seq = ?1", [mark], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(found) = at_mark {
        return Ok(mac == Some(found.as_slice()));
    }
    let head: i64 = tx.query_row("SELECT seq FROM audit_head WHERE id = 1", [], |r| r.get(0))?;
    Ok(head >= mark && oldest.is_none_or(|oldest| oldest > mark))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use uuid::Uuid;

    use super::*;
    use crate::store::{
        Backend, IndexedRun, Store,
        appender::tests::{TestLinker, event},
    };

    async fn open(url: &str) -> Store {
        let store = Store::open(url).await.unwrap();
        store.set_chain_linker(Arc::new(TestLinker));
        store
    }

    fn pools(store: &Store) -> (&sqlx::SqlitePool, &sqlx::SqlitePool) {
        let (Backend::Sqlite(write), Backend::Sqlite(read)) =
            (&store.write_backend, &store.backend)
        else {
            panic!("a SQLite store")
        };
        (write, read)
    }

    /// Records one event per subject list, in order; the events' bodies (and so their links)
    /// differ from every other call's, as real events' do (times, request ids).
    async fn record(store: &Store, subjects: &[Vec<Uuid>]) {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (n, ids) in subjects.iter().enumerate() {
            let mut e = event(n);
            e.body = format!("call {call} event {n}").into_bytes();
            e.subjects = ids.clone();
            store.record(e).await.unwrap();
        }
    }

    /// The index as the readers see it: its rows as "seq subject", then its mark.
    async fn index_rows(store: &Store) -> Vec<String> {
        let (_, read) = pools(store);
        let mut rows: Vec<String> = sqlx::query_scalar(
            "SELECT seq || ' ' || hex(subject_id) FROM audit_subjects ORDER BY seq, subject_id",
        )
        .fetch_all(read)
        .await
        .unwrap();
        let mark: i64 = sqlx::query_scalar("SELECT indexed_seq FROM audit_index_state")
            .fetch_one(read)
            .await
            .unwrap();
        rows.push(format!("mark {mark}"));
        rows
    }

    /// A backup as docs/operations.md takes it, while kluis runs (`VACUUM INTO`).
    async fn back_up(store: &Store, dir: &Path) -> PathBuf {
        let backup = dir.join("backup.db");
        sqlx::query("VACUUM INTO $1")
            .bind(backup.to_string_lossy().into_owned())
            .execute(pools(store).0)
            .await
            .unwrap();
        backup
    }

    /// The restore of docs/operations.md with kluis stopped: the database file back, its WAL
    /// files gone, the index file kept.
    fn restore(backup: &Path, main: &Path) {
        for leftover in ["-wal", "-shm"] {
            let mut name = main.as_os_str().to_owned();
            name.push(leftover);
            let _ = std::fs::remove_file(name);
        }
        std::fs::copy(backup, main).unwrap();
    }

    fn hex_id(id: Uuid) -> String {
        hex::encode_upper(id.as_bytes())
    }

    /// The index file's writer takes in exactly what the sqlx transaction does (an in-memory
    /// database's path): the same entries (several subjects per event, one subject in many
    /// events), the same stop before a missing event and resumption after pruning, the same mark.
    #[tokio::test]
    async fn the_index_files_writer_indexes_what_the_sqlx_path_indexes() {
        let subjects: Vec<Uuid> = (0..40).map(|n| Uuid::from_u128(n * 7919 + 1)).collect();
        let lists: Vec<Vec<Uuid>> = (0..1200usize)
            .map(|n| vec![subjects[n % 40], subjects[(n * 3) % 40]])
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let file = format!("sqlite://{}", dir.path().join("k.db").display());
        let mut outcomes = Vec::new();
        for url in [file.as_str(), "sqlite::memory:"] {
            let mut store = open(url).await;
            assert_eq!(
                store.audit_index.is_some(),
                url == file,
                "a file's index has a writer of its own"
            );
            if let Some(writer) = &mut store.audit_index {
                Arc::get_mut(writer).unwrap().batch = super::super::audit::INDEX_BATCH;
            }
            record(&store, &lists).await;
            let mut counts = vec![store.index_audit_subjects().await.unwrap()];
            let (write, _) = pools(&store);
            for deletion in [
                // An event missing in the middle (tampering): the run stops before it, and stays so.
                "DELETE FROM audit_events WHERE seq = 700",
                // Everything before a point pruned: the run resumes at the oldest event left.
                "DELETE FROM audit_events WHERE seq < 1000",
            ] {
                sqlx::query(deletion).execute(write).await.unwrap();
                counts.push(store.index_audit_subjects().await.unwrap());
                counts.push(store.index_audit_subjects().await.unwrap());
            }
            outcomes.push((counts, index_rows(&store).await));
            store.close().await;
        }
        let (counts, rows) = &outcomes[0];
        assert_eq!(
            counts,
            &[500, 199, 0, 201, 0],
            "a full batch, the run up to the gap at 700, stopped, then 1000..=1200"
        );
        // Event n (seq n + 1) names n % 40 and 3n % 40: the same one when n % 20 == 0.
        let entries = |seqs: std::ops::RangeInclusive<usize>| {
            seqs.map(|seq| if (seq - 1) % 20 == 0 { 1 } else { 2 })
                .sum::<usize>()
        };
        assert_eq!(
            rows.len(),
            entries(1..=699) + entries(1000..=1200) + 1,
            "each (subject, event) once, for the events indexed"
        );
        assert_eq!(rows.last().unwrap(), "mark 1200");
        assert_eq!(
            outcomes[0], outcomes[1],
            "the same runs and rows on both paths"
        );
        assert!(
            dir.path().join("k.db.audit-index").exists(),
            "the index file beside the database"
        );
    }

    /// The file's writer takes everything appended since its last run in one transaction (up to
    /// [`FILE_INDEX_BATCH`]), not the sqlx path's runs of 500: each index page it dirties is
    /// written once per run.
    #[tokio::test]
    async fn the_index_files_writer_takes_all_new_events_in_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&format!("sqlite://{}", dir.path().join("k.db").display())).await;
        let lists: Vec<Vec<Uuid>> = (0..1200u128)
            .map(|n| vec![Uuid::from_u128(n % 97 + 1)])
            .collect();
        record(&store, &lists).await;
        assert_eq!(
            store.index_audit_run().await.unwrap(),
            IndexedRun {
                events: 1200,
                full: false
            }
        );
        assert_eq!(store.index_audit_subjects().await.unwrap(), 0);
        let rows = index_rows(&store).await;
        assert_eq!(rows.len(), 1201, "one entry per event, then the mark");
        assert_eq!(rows.last().unwrap(), "mark 1200");
        store.close().await;
    }

    /// A run stops once the subject lists it holds reach [`FILE_INDEX_TEXT`], however few
    /// events that is (lookups name up to 1,000 subjects each), and the next run goes on from
    /// there: nothing is skipped or indexed twice.
    #[tokio::test]
    async fn a_run_of_events_naming_many_subjects_is_cut_by_their_size_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&format!("sqlite://{}", dir.path().join("k.db").display())).await;
        let many: Vec<Uuid> = (0..1000u128).map(|n| Uuid::from_u128(n + 1)).collect();
        // 37 bytes per id: 60 such events hold 2.2 MB of subject lists.
        let per_event = 1000 * 37 - 1;
        let events = 60;
        let first_run = FILE_INDEX_TEXT.div_ceil(per_event);
        assert!(first_run < events);
        record(&store, &vec![many.clone(); events]).await;
        let runs = [
            store.index_audit_run().await.unwrap(),
            store.index_audit_run().await.unwrap(),
            store.index_audit_run().await.unwrap(),
        ];
        let run = |events: usize, full| IndexedRun {
            events: events as u64,
            full,
        };
        assert_eq!(
            runs,
            [
                run(first_run, true),
                run(events - first_run, false),
                run(0, false)
            ],
            "the first run stops at the event that reaches the limit, saying more may wait; \
             the next takes the rest"
        );
        let rows = index_rows(&store).await;
        assert_eq!(rows.len(), events * 1000 + 1, "every (subject, event) once");
        assert_eq!(rows.last().unwrap(), &format!("mark {events}"));
        store.close().await;
    }

    /// The indexer's tick takes runs until one is not full, on both paths: runs of 500 through
    /// sqlx, runs cut by the size of their subject lists on a file; nothing is left for the next
    /// tick.
    #[tokio::test]
    async fn the_backlog_is_indexed_in_as_many_runs_as_it_takes() {
        let dir = tempfile::tempdir().unwrap();
        let file = format!("sqlite://{}", dir.path().join("k.db").display());
        let many: Vec<Uuid> = (0..1000u128).map(|n| Uuid::from_u128(n + 1)).collect();
        let mut lists = vec![many; 60];
        lists.extend((0..1200u128).map(|n| vec![Uuid::from_u128(n % 97 + 1)]));
        for url in [file.as_str(), "sqlite::memory:"] {
            let store = open(url).await;
            record(&store, &lists).await;
            assert_eq!(store.index_audit_backlog().await.unwrap(), 1260, "{url}");
            assert_eq!(
                index_rows(&store).await.last().unwrap(),
                "mark 1260",
                "{url}"
            );
            assert_eq!(store.index_audit_backlog().await.unwrap(), 0, "{url}");
            store.close().await;
        }
    }

    /// A database put back from a backup under a newer index: the index's mark is past the
    /// restored trail, whose next events get the seqs the index already lists with other
    /// subjects. The writer sees another link at its mark and builds the index again, so a query
    /// by subject never finds an event that named someone else.
    #[tokio::test]
    async fn an_index_newer_than_the_restored_database_is_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("k.db");
        let url = format!("sqlite://{}", main.display());
        let [before, lost, after] = [1u128, 2, 3].map(Uuid::from_u128);

        let store = open(&url).await;
        record(&store, &vec![vec![before]; 5]).await;
        let backup = back_up(&store, dir.path()).await;
        record(&store, &vec![vec![lost]; 5]).await;
        assert_eq!(store.index_audit_subjects().await.unwrap(), 10);
        store.close().await;
        drop(store);

        restore(&backup, &main);
        let store = open(&url).await;
        assert_eq!(
            index_rows(&store).await,
            ["mark 0"],
            "emptied at start, before any query could use it"
        );
        record(&store, &vec![vec![after]; 5]).await;
        assert_eq!(
            store.index_audit_subjects().await.unwrap(),
            10,
            "built again from the first event"
        );
        let rows = index_rows(&store).await;
        let expected: Vec<String> = (1..=10)
            .map(|seq| format!("{seq} {}", hex_id(if seq <= 5 { before } else { after })))
            .chain(["mark 10".to_owned()])
            .collect();
        assert_eq!(rows, expected, "no entry of the events the restore undid");
        // An index of this trail is kept: the next run goes on from its mark.
        record(&store, &[vec![after]]).await;
        assert_eq!(store.index_audit_subjects().await.unwrap(), 1);
        assert_eq!(index_rows(&store).await.len(), 12);
        store.close().await;
    }

    /// A backup taken before a prune, put back under the pruned index: the index's mark and the
    /// link there still match, but the trail holds events again whose entries the prune deleted.
    /// The index is emptied at start and built again, so a query by subject finds them.
    #[tokio::test]
    async fn an_index_pruned_after_the_backup_was_taken_is_built_again() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("k.db");
        let url = format!("sqlite://{}", main.display());
        let id = Uuid::from_u128(5);
        let store = open(&url).await;
        record(&store, &vec![vec![id]; 8]).await;
        assert_eq!(store.index_audit_subjects().await.unwrap(), 8);
        let backup = back_up(&store, dir.path()).await;
        assert_eq!(store.prune_audit(5).await.unwrap(), 5);
        store.close().await;
        drop(store);

        restore(&backup, &main);
        let store = open(&url).await;
        assert_eq!(index_rows(&store).await, ["mark 0"], "emptied at start");
        assert_eq!(store.index_audit_subjects().await.unwrap(), 8);
        let rows = index_rows(&store).await;
        assert_eq!(rows.len(), 9, "all eight events again: {rows:?}");
        store.close().await;
    }

    /// Pruning deletes the pruned events' entries from the index file too, and the index goes on
    /// from its mark (the event at the mark is gone, but the head is past it).
    #[tokio::test]
    async fn pruned_events_leave_the_index_file_and_indexing_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&format!("sqlite://{}", dir.path().join("k.db").display())).await;
        let id = Uuid::from_u128(9);
        record(&store, &vec![vec![id]; 8]).await;
        assert_eq!(store.index_audit_subjects().await.unwrap(), 8);
        assert_eq!(store.prune_audit(8).await.unwrap(), 8);
        assert_eq!(index_rows(&store).await, ["mark 8"]);
        record(&store, &vec![vec![id]; 2]).await;
        assert_eq!(store.index_audit_subjects().await.unwrap(), 2);
        assert_eq!(
            index_rows(&store).await,
            [
                format!("9 {}", hex_id(id)),
                format!("10 {}", hex_id(id)),
                "mark 10".to_owned()
            ]
        );
        store.close().await;
    }

    /// An index file that cannot be opened stops the store from opening, with the file named
    /// (it is derived data: the operator may delete it and start again, docs/operations.md).
    #[tokio::test]
    async fn an_unusable_index_file_is_named_in_the_error_and_deleting_it_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let index = dir.path().join("k.db.audit-index");
        std::fs::create_dir(&index).unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let Err(error) = Store::open(&url).await else {
            panic!("a directory in the index file's place must stop the store")
        };
        assert!(error.to_string().contains("k.db.audit-index"), "{error}");
        std::fs::remove_dir(&index).unwrap();
        let store = open(&url).await;
        record(&store, &[vec![Uuid::from_u128(1)]]).await;
        assert_eq!(store.index_audit_subjects().await.unwrap(), 1);
        store.close().await;
    }

    #[test]
    fn the_index_file_is_named_after_the_database_file_and_the_uri_escapes_the_path() {
        assert_eq!(
            index_file(Path::new("/var/lib/kluis/kluis.db")),
            Path::new("/var/lib/kluis/kluis.db.audit-index")
        );
        assert_eq!(
            read_only_uri(Path::new("/tmp/a%b?c#d.db")),
            "file:/tmp/a%25b%3fc%23d.db?mode=ro"
        );
        assert!(matches!(
            Location::for_main(Path::new(":memory:")),
            Location::Memory(_)
        ));
    }
}
