//! SQLite only: a subject's row by id, and a blind-index lookup, read on the calling thread over a
//! direct connection (rusqlite) taken from a small idle list, instead of being handed to the read
//! coalescer and sqlx's connection threads.
//!
//! A point read by primary key is a few B-tree pages from the operating system's page cache: tens
//! of microseconds, less than the hand-offs it replaces (tokio task → coalescer → sqlx's worker
//! thread → back), each of which waits for a CPU under load. It blocks the calling worker for that
//! long and no longer: the read runs in autocommit, so it holds no lock and stays inside the WAL
//! only for the statement, and WAL readers never wait for the writer. A database file evicted from
//! the page cache would make these reads wait for the disk on a runtime worker; kluis's database is
//! small enough to stay cached on a serving machine. A lookup reads one more index entry and
//! subject row per match, so one matching many subjects (at most its limit) blocks that much longer.
//!
//! Each connection is opened read-only and caches its prepared statement. Connections are opened
//! when no idle one is left and kept up to [`MAX_IDLE`]; at most as many are in use as threads read
//! at once. An in-memory database has no inline reader (a second connection would not share it).

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use uuid::Uuid;

use super::{Found, RawSubjectRow, SQLITE_BUSY_TIMEOUT, StoreError, SubjectRow};

/// Idle connections kept for the next read (about one per runtime worker and blocking thread).
const MAX_IDLE: usize = 4;

/// Pages each connection caches: as many as SQLite allocates in one block when a cache first
/// fills (`SQLITE_DEFAULT_PCACHE_INITSZ`; each connection has a cache of its own, see
/// `.cargo/config.toml`), so that a read never allocates a page. Every commit of the main file
/// empties the cache before the next read, so a larger one held only a few reads' worth of pages,
/// allocated one by one with `malloc` and freed at every commit: 4 % of the server's time under
/// closed-loop `get`, mostly the C heap growing again. A point read touches about eight pages
/// (three B-trees); the cache keeps the upper ones, which every read visits.
const CACHE_PAGES: i64 = 20;

const SUBJECT_BY_ID: &str = "SELECT s.id, k.dek_id, k.kek_version, k.wrapped_dek, s.record, \
     s.version, s.created_at, s.updated_at, s.retention, s.retention_version, s.restricted_at \
     FROM subjects s JOIN data_keys k ON k.subject_id = s.id WHERE s.id = ?1";

/// The cast: see the module docs of `store`.
const FIND_BY_DIGEST: &str = "SELECT b.subject_id, s.retention, s.restricted_at \
     FROM blind_index b JOIN subjects s ON s.id = b.subject_id \
     WHERE b.path = CAST(?1 AS TEXT) AND b.digest = ?2 ORDER BY b.subject_id LIMIT ?3";

/// Read-only connections to one database file, used one per read.
pub(super) struct InlineReader {
    path: PathBuf,
    /// `None` once closed ([`InlineReader::close`]).
    idle: Mutex<Option<Vec<Connection>>>,
}

impl InlineReader {
    /// An inline reader of the database file at `path`; `None` for an in-memory database.
    /// Connections are opened on first use, after the migrations.
    pub(super) fn new(path: &Path) -> Option<Self> {
        if !super::is_database_file(path) {
            return None;
        }
        Some(Self {
            path: path.to_path_buf(),
            idle: Mutex::new(Some(Vec::new())),
        })
    }

    /// The subject's row, or `None` when no subject has that id.
    pub(super) fn subject(&self, id: Uuid) -> Result<Option<SubjectRow>, StoreError> {
        self.read(|conn| read_subject(conn, id))?
            .map(SubjectRow::try_from)
            .transpose()
    }

    /// The subjects whose blind index at `path` equals `digest`, at most `limit`, in id order
    /// (what the read coalescer's lookups return).
    pub(super) fn find(
        &self,
        path: &str,
        digest: &[u8; 32],
        limit: u32,
    ) -> Result<Vec<Found>, StoreError> {
        let rows = self.read(|conn| {
            let mut statement = conn.prepare_cached(FIND_BY_DIGEST)?;
            let rows = statement
                .query_map(
                    rusqlite::params![path, digest.as_slice(), i64::from(limit)],
                    |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get(1)?,
                            r.get::<_, Option<i64>>(2)?,
                        ))
                    },
                )?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(id, retention, restricted_at)| Found::from_row(&id, retention, restricted_at))
            .collect()
    }

    /// Runs `read` on an idle connection (or a new one), which goes back to the idle list after.
    fn read<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = self.lock().as_mut().map(Vec::pop).ok_or_else(closed)?;
        let conn = match idle {
            Some(conn) => conn,
            None => connect(&self.path)?,
        };
        let result = read(&conn);
        // A connection whose read failed is dropped, not reused: the next read opens a fresh one.
        if result.is_ok()
            && let Some(idle) = self.lock().as_mut()
            && idle.len() < MAX_IDLE
        {
            idle.push(conn);
        }
        result
    }

    /// Closes the idle connections; reads after this fail (a read under way finishes, and its
    /// connection is closed then).
    pub(super) fn close(&self) {
        self.lock().take();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<Connection>>> {
        // The list holds connections only; a panic elsewhere leaves it usable.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.lock().as_ref().map_or(0, Vec::len)
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("store closed".into())
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    conn.pragma_update(None, "cache_size", CACHE_PAGES)?;
    Ok(conn)
}

fn read_subject(conn: &Connection, id: Uuid) -> Result<Option<RawSubjectRow>, StoreError> {
    let mut statement = conn.prepare_cached(SUBJECT_BY_ID)?;
    let raw = statement
        .query_row([id.as_bytes().as_slice()], |r| {
            Ok(RawSubjectRow {
                id: r.get(0)?,
                dek_id: r.get(1)?,
                kek_version: r.get(2)?,
                wrapped_dek: r.get(3)?,
                record: r.get(4)?,
                version: r.get(5)?,
                created_at: r.get(6)?,
                updated_at: r.get(7)?,
                retention: r.get(8)?,
                retention_version: r.get(9)?,
                restricted_at: r.get(10)?,
            })
        })
        .optional()?;
    Ok(raw)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(super) mod tests {
    use super::*;
    use crate::store::Store;

    async fn store_in(dir: &tempfile::TempDir) -> (Store, PathBuf) {
        let path = dir.path().join("kluis.db");
        let store = Store::open(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        (store, path)
    }

    /// An inline reader of a new, migrated database in `dir`, and the database's path.
    async fn reader_in(dir: &tempfile::TempDir) -> (InlineReader, PathBuf) {
        let (_, path) = store_in(dir).await;
        (InlineReader::new(&path).unwrap(), path)
    }

    /// A subject under KEK v1 (whose key row the create checks for), with `index`.
    async fn insert_subject(store: &Store, index: Vec<crate::store::IndexEntry>) -> Uuid {
        let super::super::Backend::Sqlite(pool) = &store.write_backend else {
            panic!("a SQLite store")
        };
        sqlx::query(
            "INSERT INTO keys (kind, version, state, root_version, wrapped, created_at) \
             VALUES ('kek', 1, 'active', 1, x'00', 1) ON CONFLICT DO NOTHING",
        )
        .execute(pool)
        .await
        .unwrap();
        let id = Uuid::new_v4();
        let row = SubjectRow {
            id,
            dek_id: Uuid::new_v4(),
            kek_version: 1,
            wrapped_dek: vec![7; 60],
            record: vec![9; 1500],
            version: 1,
            created_at: 1_000,
            updated_at: 2_000,
            retention: Some(vec![1, 2, 3]),
            retention_version: 4,
            restricted_at: Some(3_000),
        };
        store
            .write(crate::store::WriteOp::Create { row, index })
            .await
            .unwrap();
        id
    }

    #[tokio::test]
    async fn an_inline_read_returns_the_row_the_coalescer_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_in(&dir).await;
        let id = insert_subject(&store, vec![]).await;
        let inline = store.inline.as_ref().expect("a file database reads inline");
        let direct = inline.subject(id).unwrap().expect("the subject exists");
        let coalesced = store.reader.subject(id).await.unwrap().unwrap();
        assert_eq!(direct, coalesced);
        assert_eq!(inline.subject(Uuid::new_v4()).unwrap(), None);
    }

    /// A store with three subjects under digest 1 at `contact.email` (returned in id order) and
    /// one under digest 2.
    pub(in crate::store) async fn store_with_lookups(
        dir: &tempfile::TempDir,
    ) -> (Store, Vec<Uuid>, Uuid) {
        let (store, _) = store_in(dir).await;
        let entry = |digest: u8| crate::store::IndexEntry {
            path: "contact.email",
            key_version: 1,
            digest: [digest; 32],
        };
        let mut shared = Vec::new();
        for _ in 0..3 {
            shared.push(insert_subject(&store, vec![entry(1)]).await);
        }
        shared.sort();
        let other = insert_subject(&store, vec![entry(2)]).await;
        (store, shared, other)
    }

    #[tokio::test]
    async fn an_inline_lookup_returns_what_the_coalescer_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (store, shared, other) = store_with_lookups(&dir).await;
        let inline = store.inline.as_ref().expect("a file database reads inline");
        for (digest, limit) in [(1, 2), (1, 10), (2, 10), (3, 10)] {
            let direct = inline.find("contact.email", &[digest; 32], limit).unwrap();
            let coalesced = store
                .reader
                .find("contact.email", [digest; 32], limit)
                .await
                .unwrap();
            assert_eq!(direct, coalesced, "digest {digest}, limit {limit}");
        }
        let ids = |found: Vec<Found>| found.into_iter().map(|f| f.id).collect::<Vec<_>>();
        let all = inline.find("contact.email", &[1; 32], 10).unwrap();
        for found in &all {
            let row = inline.subject(found.id).unwrap().unwrap();
            assert_eq!(found.retention, row.retention);
            assert_eq!(found.restricted, row.restricted_at.is_some());
        }
        assert_eq!(ids(all), shared);
        assert_eq!(
            ids(inline.find("contact.email", &[1; 32], 2).unwrap()),
            shared[..2]
        );
        assert_eq!(
            ids(inline.find("contact.email", &[2; 32], 10).unwrap()),
            vec![other]
        );
        assert!(
            inline
                .find("contact.phone", &[1; 32], 10)
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_closed_reader_keeps_no_connection_and_refuses_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, _) = reader_in(&dir).await;
        assert_eq!(reader.subject(Uuid::new_v4()).unwrap(), None);
        assert_eq!(reader.idle_count(), 1);
        reader.close();
        assert_eq!(reader.idle_count(), 0);
        let refused = reader.subject(Uuid::new_v4()).unwrap_err();
        assert!(matches!(refused, StoreError::Unavailable(_)), "{refused:?}");
        assert!(reader.find("contact.email", &[0; 32], 1).is_err());
        assert_eq!(reader.idle_count(), 0);
    }

    #[tokio::test]
    async fn connections_are_reused_not_opened_per_read() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, _) = reader_in(&dir).await;
        for _ in 0..50 {
            assert_eq!(reader.subject(Uuid::new_v4()).unwrap(), None);
        }
        assert_eq!(reader.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_failed_read_reports_the_code_only_and_drops_its_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (reader, path) = reader_in(&dir).await;
        assert_eq!(reader.subject(Uuid::new_v4()).unwrap(), None);
        // A table the statement needs is gone: SQLite's message would name it.
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA foreign_keys = OFF; DROP TABLE data_keys;")
            .unwrap();
        let error = reader.subject(Uuid::new_v4()).unwrap_err().to_string();
        assert!(error.contains("code"), "{error}");
        assert!(!error.contains("data_keys"), "{error}");
        assert_eq!(reader.idle_count(), 0);
    }

    /// `.cargo/config.toml` builds SQLite without `SQLITE_ENABLE_MEMORY_MANAGEMENT`: with it,
    /// every connection's page cache sits behind one process-wide mutex and [`CACHE_PAGES`]
    /// would not come in one block.
    #[test]
    fn sqlite_gives_each_connection_a_page_cache_of_its_own() {
        let conn = Connection::open_in_memory().unwrap();
        let mut statement = conn.prepare("PRAGMA compile_options").unwrap();
        let options: Vec<String> = statement
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
    }

    #[test]
    fn an_in_memory_database_has_no_inline_reader() {
        assert!(InlineReader::new(Path::new(":memory:")).is_none());
        assert!(InlineReader::new(Path::new("")).is_none());
    }
}
