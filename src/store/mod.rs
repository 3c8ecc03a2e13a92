//! Persistence behind one `Store` type with a SQLite and a PostgreSQL backend (sqlx, runtime
//! queries). Rows hold only ciphertexts, wrapped keys, HMAC digests and metadata — never plaintext.
//!
//! Reads go straight to the pool, except a subject by id and a blind-index lookup on a SQLite
//! file, read on the calling thread over a direct connection ([`inline_reader`]); subject writes
//! go through the group committer ([`writer`]), which drains concurrent requests into one
//! transaction per batch.
//!
//! Blind-index paths are compared as `path = CAST($n AS TEXT)`, never `path = $n`. SQLite checks
//! a bare `path = $n` against the partial index `blind_index_unique_username` (`WHERE path =
//! 'account.username'`) by the parameter's bound value, so the plan depends on that value and the
//! statement expires at every rebind: it was prepared again at every execution (a profiled sweep
//! spent 6 % of the server's time in `sqlite3Reprepare`, most of it on its bulk index delete).
//! A cast is no bare parameter; the primary key (path, digest, subject_id) still serves the lookup.

mod appender;
mod audit;
mod audit_index;
mod inline_reader;
mod keys;
mod reader;
mod retention;
mod rights;
mod writer;

use std::{
    str::FromStr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use sqlx::{
    Pool, Postgres, Sqlite,
    postgres::{PgConnectOptions, PgPoolOptions},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use uuid::Uuid;

pub use audit::{AuditFilter, AuditRecord, ChainLinker, IndexedRun, StoredAuditEvent};
pub use audit_index::index_file as audit_index_file;
pub use keys::{DekRow, KeyVersionRow, Rewrapped, RewrappedKey, RootCheckRow};
pub use retention::{HoldRow, MarkedSubject, RecordRow};
pub use rights::{ConsentEventRow, DisclosureRow, ReceiptRow, RestrictionRow};
pub use writer::{ConsentChange, RecordChange, Redacted, WriteOp, WriteOutcome};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// What can go wrong in the store. Messages carry ids and table names, never values.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A unique blind index (`account.username`) already holds the value.
    #[error("unique index {path} already holds this value")]
    Duplicate { path: String },
    /// Optimistic concurrency: the row changed since it was read.
    #[error("stored version is {actual}")]
    VersionMismatch { actual: u64 },
    /// The database cannot be reached or refused the transaction.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A row that cannot be what kluis wrote (wrong length, negative version, …).
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("migration failed: {0}")]
    Migrate(String),
    /// The write is not allowed in the stored state (a key version still in use); the text
    /// names the reason and may be shown.
    #[error("{0}")]
    Refused(String),
    /// The write used a key version the database has retired: the instance's keyring is stale
    /// (it reloads; the caller may retry).
    #[error("{0}")]
    StaleKeyring(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            // Busy/locked SQLite, and PostgreSQL's serialization failures, deadlocks, lost
            // connections, shutdowns and exhausted resources: try again later.
            sqlx::Error::Database(db) if db.code().is_some_and(|c| transient(&c)) => {
                StoreError::Unavailable(format!(
                    "database code {}",
                    db.code().as_deref().unwrap_or("?")
                ))
            }
            // Database messages may quote values (e.g. a key in a constraint violation); keep
            // only the code and the constraint name.
            sqlx::Error::Database(db) => StoreError::Database(format!(
                "code {} constraint {}",
                db.code().as_deref().unwrap_or("?"),
                db.constraint().unwrap_or("-")
            )),
            _ => StoreError::Database(e.to_string()),
        }
    }
}

/// Whether a database error code means "not now" rather than "never": SQLite BUSY (5) and LOCKED
/// (6) with their extended codes, I/O and full-disk errors; PostgreSQL classes 08 (connection),
/// 40 (transaction rollback: serialization, deadlock), 53 (resources), 57 (operator intervention).
fn transient(code: &str) -> bool {
    match code.parse::<i64>() {
        Ok(sqlite) => matches!(sqlite & 0xff, 5 | 6 | 10 | 13),
        Err(_) => ["08", "40", "53", "57"]
            .iter()
            .any(|class| code.starts_with(class)),
    }
}

/// A subject's row: the wrapped data key and the sealed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectRow {
    pub id: Uuid,
    pub dek_id: Uuid,
    pub kek_version: u32,
    pub wrapped_dek: Vec<u8>,
    pub record: Vec<u8>,
    pub version: u64,
    pub created_at: i64,
    pub updated_at: i64,
    /// The subject's derived retention state (`policy::lifecycle::Mark`), None without records.
    pub retention: Option<Vec<u8>>,
    /// Bumped by every change of the subject's records and holds (compare-and-set).
    pub retention_version: i64,
    /// Since when a restriction of processing (GDPR art. 18) is in force; None: not restricted.
    pub restricted_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct RawSubjectRow {
    id: Vec<u8>,
    dek_id: Vec<u8>,
    kek_version: i64,
    wrapped_dek: Vec<u8>,
    record: Vec<u8>,
    version: i64,
    created_at: i64,
    updated_at: i64,
    retention: Option<Vec<u8>>,
    retention_version: i64,
    restricted_at: Option<i64>,
}

impl TryFrom<RawSubjectRow> for SubjectRow {
    type Error = StoreError;
    fn try_from(r: RawSubjectRow) -> Result<Self, StoreError> {
        Ok(SubjectRow {
            id: uuid_from(&r.id)?,
            dek_id: uuid_from(&r.dek_id)?,
            kek_version: u32::try_from(r.kek_version)
                .map_err(|_| StoreError::Corrupt("kek_version".into()))?,
            wrapped_dek: r.wrapped_dek,
            record: r.record,
            version: u64::try_from(r.version).map_err(|_| StoreError::Corrupt("version".into()))?,
            created_at: r.created_at,
            updated_at: r.updated_at,
            retention: r.retention,
            retention_version: r.retention_version,
            restricted_at: r.restricted_at,
        })
    }
}

/// Whether a SQLite path names a database file that a second connection of this process shares
/// (not an in-memory database, nor a `file:` URI the direct connections do not parse).
fn is_database_file(path: &std::path::Path) -> bool {
    let name = path.as_os_str();
    // sqlx names an in-memory database `file:sqlx-in-memory-N`: a prefix of the text, not a
    // path component (`Path::starts_with` compares components).
    !(name.is_empty() || name == ":memory:" || name.to_string_lossy().starts_with("file:"))
}

/// How long a SQLite statement waits for a lock another connection holds.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the WAL is copied back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// Every how many checkpoints one starts the WAL over (see [`checkpoint_loop`]): once a second.
const WAL_RESTART_EVERY: u64 = 4;
/// How long a WAL restart waits for the writer's transaction and for readers still inside the
/// WAL before it gives up until next time; meanwhile commits wait, so it is short.
const WAL_RESTART_WAIT: Duration = Duration::from_millis(50);
/// The size the WAL file is cut back to when it starts over (SQLite's `journal_size_limit`):
/// 64 MiB, about a second of writes under full load.
const WAL_SIZE_LIMIT: &str = "67108864";

/// Copies committed WAL frames into the database file from a reader connection, so the writer's
/// commits never stop to checkpoint. PASSIVE never blocks readers or the writer. Ends when the
/// pool is closed.
///
/// Every [`WAL_RESTART_EVERY`]th round is a RESTART checkpoint instead, which also starts the WAL
/// over from its beginning. Under steady reads and writes passive checkpoints alone never catch up
/// with the head at a moment no reader is inside the WAL, so SQLite never starts it over and keeps
/// appending: the file grew by about 60 MB/s under a 10,000 get/s load, every new frame a freshly
/// allocated, zero-filled page in the kernel. A RESTART holds off the writer while it copies what
/// the last passive round left and waits (at most [`WAL_RESTART_WAIT`]) for readers to leave the
/// WAL; if they do not, it gives up until next time.
async fn checkpoint_loop(pool: Pool<Sqlite>) {
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 1u64.. {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        let result = if round % WAL_RESTART_EVERY == 0 {
            restart_wal(&pool).await
        } else {
            sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA main.wal_checkpoint(PASSIVE)")
                .fetch_one(&pool)
                .await
        };
        match result {
            Ok((busy, log, done)) => tracing::trace!(busy, log, done, round, "checkpoint"),
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }
}

/// A RESTART checkpoint that waits for locks at most [`WAL_RESTART_WAIT`].
async fn restart_wal(pool: &Pool<Sqlite>) -> Result<(i64, i64, i64), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    // Built from a number only.
    let wait =
        |d: Duration| sqlx::AssertSqlSafe(format!("PRAGMA busy_timeout = {}", d.as_millis()));
    sqlx::query(wait(WAL_RESTART_WAIT))
        .execute(&mut *conn)
        .await?;
    let result = sqlx::query_as("PRAGMA main.wal_checkpoint(RESTART)")
        .fetch_one(&mut *conn)
        .await;
    if let Err(e) = sqlx::query(wait(SQLITE_BUSY_TIMEOUT))
        .execute(&mut *conn)
        .await
    {
        // Never leave a pooled connection with the short wait: a fresh one gets the usual one.
        conn.close().await.ok();
        return Err(e);
    }
    result
}

/// Creates the SQLite file readable by its owner only (SQLite gives its -wal and -shm files the
/// same mode); an existing file is left as it is.
fn create_private_file(path: &std::path::Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !is_database_file(path) || path.exists() {
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(|_| ())
        .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", path.display())))
}

/// The rows a statement of `n` rows (or ids) is padded to: a power of two up to 32, then a multiple
/// of 32. Its text then takes one of a few forms, each prepared once per connection and cached,
/// instead of one per batch size (re-preparing a sweep's varying bulk statements was 14 % of the
/// writer's time in a profile of a full-speed sweep). Used by the read coalescer and the sweep's
/// bulk statements.
fn padded_len(n: usize) -> usize {
    if n <= 32 {
        n.max(1).next_power_of_two()
    } else {
        n.div_ceil(32) * 32
    }
}

fn uuid_from(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|_| StoreError::Corrupt("uuid column".into()))
}

/// A subject a lookup found, with its retention state (reads hide what it restricts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: Uuid,
    pub retention: Option<Vec<u8>>,
    /// A restriction of processing is in force (reads under ordinary purposes skip it).
    pub restricted: bool,
}

impl Found {
    /// From a lookup's row: the subject id's bytes, its retention state, and when it was
    /// restricted, if it is.
    fn from_row(
        id: &[u8],
        retention: Option<Vec<u8>>,
        restricted_at: Option<i64>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            id: uuid_from(id)?,
            retention,
            restricted: restricted_at.is_some(),
        })
    }
}

/// One blind-index entry of a subject.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub path: &'static str,
    pub key_version: u32,
    pub digest: [u8; 32],
}

/// A key wrapped under the root key, as stored in `keys`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub kind: String,
    pub version: i64,
    pub state: String,
    pub root_version: i64,
    pub wrapped: Vec<u8>,
}

/// A caller and its token hash, as stored in `callers`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallerRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub secret_hash: Vec<u8>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Clone)]
pub(crate) enum Backend {
    Sqlite(Pool<Sqlite>),
    Postgres(Pool<Postgres>),
}

/// Runs `$body` with `$pool` bound to the backend's pool; the body is compiled once per backend,
/// so each sees its own sqlx database type and placeholders (`$1` works in both).
macro_rules! on_pool {
    ($backend:expr, $pool:ident => $body:expr) => {
        match $backend {
            $crate::store::Backend::Sqlite($pool) => $body,
            $crate::store::Backend::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// The database, shared by every request of an instance.
#[derive(Clone)]
pub struct Store {
    /// Reads.
    backend: Backend,
    /// Writes outside the group committer (keys, callers) and migrations; for SQLite the pool of
    /// the one writing connection, for PostgreSQL the same pool as reads.
    write_backend: Backend,
    writer: Arc<writer::GroupCommitter>,
    reader: Arc<reader::ReadCoalescer>,
    /// SQLite files: a subject by id is read on the calling thread ([`inline_reader`]).
    inline: Option<Arc<inline_reader::InlineReader>>,
    /// SQLite files: the writer of the audit index's own file ([`audit_index`]).
    audit_index: Option<Arc<audit_index::IndexWriter>>,
    /// Links audit events into the chain; set once the keyring is open.
    linker: Arc<OnceLock<Arc<dyn ChainLinker>>>,
}

/// How an opened store is configured, for diagnostics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    pub backend: &'static str,
    /// SQLite's `PRAGMA synchronous` as read back from a pooled connection (2 = FULL).
    pub sqlite_synchronous: Option<i64>,
    pub sqlite_journal_mode: Option<String>,
}

impl Store {
    /// Opens (creating a SQLite file if missing) and migrates the database at `url`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let (backend, write_backend, appender, inline, audit_index) = if url.starts_with("sqlite:")
        {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::Url(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                // Every acknowledged write survives power loss.
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .pragma("journal_size_limit", WAL_SIZE_LIMIT)
                // Statement journals (savepoints) in memory, not in temp files.
                .pragma("temp_store", "memory");
            create_private_file(options.get_filename())?;
            let file = options.get_filename().to_path_buf();
            // The per-subject audit index, in a database of its own ([`audit_index`]): a file's
            // has a writer of its own and is attached to the readers only (a writing connection
            // attaching it would take its lock in every `BEGIN IMMEDIATE`); an in-memory one is
            // attached to both pools and written through sqlx.
            let index_location = audit_index::Location::for_main(&file);
            let (audit_index, attach_to_writer) = match &index_location {
                // Opened first: its errors name the file (a pool's attach failing would only
                // time out).
                audit_index::Location::File(path) => (
                    Some(Arc::new(audit_index::IndexWriter::open(path, &file)?)),
                    None,
                ),
                audit_index::Location::Memory(_) => (None, Some(index_location.clone())),
            };
            // Readers and the one writer get pools of their own: WAL lets them run side by side,
            // and the writer's larger page cache holds the B-tree pages creates keep touching
            // (with 8 MiB instead of 16, seeding 100,000 subjects ran a fifth slower). A commit
            // by the audit appender empties it, so it serves runs of writes, not writes among
            // reads. The pool does not ping a local file before every use (a whole worker round
            // trip per query); sqlx still pings each connection returned to the pool.
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(move |conn, _| {
                    let index = attach_to_writer.clone();
                    Box::pin(async move {
                        match index {
                            Some(index) => index.attach(conn).await,
                            None => Ok(()),
                        }
                    })
                })
                .connect_with(
                    options
                        .clone()
                        .pragma("cache_size", "-16384")
                        // Checkpoints run in the background (below), not inside a commit.
                        .pragma("wal_autocheckpoint", "0"),
                )
                .await?;
            let read = SqlitePoolOptions::new()
                .max_connections(4)
                .min_connections(1)
                .test_before_acquire(false)
                .acquire_timeout(Duration::from_secs(10))
                .after_connect(move |conn, _| {
                    let index = index_location.clone();
                    Box::pin(async move { index.attach(conn).await })
                })
                .connect_with(options.pragma("cache_size", "-4096"))
                .await?;
            tokio::spawn(checkpoint_loop(read.clone()));
            let appender = appender::DirectAppender::open(&file)?;
            let inline = inline_reader::InlineReader::new(&file).map(Arc::new);
            (
                Backend::Sqlite(read),
                Backend::Sqlite(write),
                appender,
                inline,
                audit_index,
            )
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            let options =
                PgConnectOptions::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
            let pool = PgPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await?;
            (
                Backend::Postgres(pool.clone()),
                Backend::Postgres(pool),
                None,
                None,
                None,
            )
        } else {
            return Err(StoreError::Url(
                "expected sqlite://… or postgres://…".into(),
            ));
        };
        let linker = Arc::new(OnceLock::new());
        let store = Self {
            writer: Arc::new(writer::GroupCommitter::start(
                write_backend.clone(),
                linker.clone(),
                appender,
            )),
            linker,
            reader: Arc::new(reader::ReadCoalescer::start(backend.clone())),
            inline,
            audit_index,
            backend,
            write_backend,
        };
        store.migrate().await?;
        if let Some(index) = &store.audit_index {
            index.forget_if_foreign().await?;
        }
        Ok(store)
    }

    /// Applies the pending migrations of the backend's dialect (idempotent).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.write_backend {
            Backend::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await,
            Backend::Postgres(pool) => POSTGRES_MIGRATIONS.run(pool).await,
        }
        .map_err(|e| StoreError::Migrate(e.to_string()))
    }

    /// Commits the queued writes and stops the group committer (and the direct appender with
    /// it): writes through it fail after this. [`Store::close`] does it too.
    pub async fn finish_writes(&self) {
        self.writer.shutdown().await;
    }

    /// Closes the pools and every connection of its own (the inline readers', the audit index
    /// writer's) after the queued writes have been committed; the database's files are then no
    /// longer open, and every later use of the store fails. The read-write pool closes last, so
    /// that the main file's last connection can checkpoint its WAL.
    pub async fn close(&self) {
        self.finish_writes().await;
        if let Some(inline) = &self.inline {
            inline.close();
        }
        if let Some(index) = &self.audit_index {
            index.close().await;
        }
        on_pool!(&self.backend, pool => pool.close().await);
        on_pool!(&self.write_backend, pool => pool.close().await);
    }

    /// Open and idle connections per pool: `reads` and `writes` (SQLite's one writing
    /// connection), or `shared` (PostgreSQL's one pool).
    pub fn pool_use(&self) -> Vec<(&'static str, u32, usize)> {
        match (&self.backend, &self.write_backend) {
            (Backend::Postgres(pool), _) => vec![("shared", pool.size(), pool.num_idle())],
            (Backend::Sqlite(reads), Backend::Sqlite(writes)) => vec![
                ("reads", reads.size(), reads.num_idle()),
                ("writes", writes.size(), writes.num_idle()),
            ],
            (Backend::Sqlite(reads), Backend::Postgres(_)) => {
                vec![("reads", reads.size(), reads.num_idle())]
            }
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Reads the durability settings back from a pooled connection.
    pub async fn durability(&self) -> Result<Durability, StoreError> {
        match &self.backend {
            Backend::Sqlite(pool) => {
                let mut conn = pool.acquire().await?;
                let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                    .fetch_one(&mut *conn)
                    .await?;
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(Durability {
                    backend: "sqlite",
                    sqlite_synchronous: Some(sync),
                    sqlite_journal_mode: Some(mode),
                })
            }
            Backend::Postgres(_) => Ok(Durability {
                backend: "postgres",
                sqlite_synchronous: None,
                sqlite_journal_mode: None,
            }),
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(&self.backend, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    // ---- keys -------------------------------------------------------------------------------

    /// The stored key-check value of a root-key version.
    pub async fn key_check(&self, root_version: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let v = i64::from(root_version);
        Ok(on_pool!(&self.backend, pool =>
            sqlx::query_scalar("SELECT check_value FROM root_key_checks WHERE version = $1")
                .bind(v)
                .fetch_optional(pool)
                .await)?)
    }

    /// Whether any root key was ever registered in this database.
    pub async fn has_key_checks(&self) -> Result<bool, StoreError> {
        let n: i64 = on_pool!(&self.backend, pool => sqlx::query_scalar("SELECT COUNT(*) FROM root_key_checks")
            .fetch_one(pool).await)?;
        Ok(n > 0)
    }

    /// Stores a key-check value unless one exists; returns the one that is stored afterwards, so two
    /// instances starting at once agree.
    pub async fn init_key_check(
        &self,
        root_version: u32,
        check: &[u8],
        now: i64,
    ) -> Result<Vec<u8>, StoreError> {
        let v = i64::from(root_version);
        on_pool!(&self.write_backend, pool => sqlx::query(
            "INSERT INTO root_key_checks (version, check_value, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (version) DO NOTHING")
            .bind(v).bind(check.to_vec()).bind(now).execute(pool).await.map(|_| ()))?;
        self.key_check(root_version)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Every stored key of `kind`, newest version first.
    pub async fn keys(&self, kind: &str) -> Result<Vec<KeyRow>, StoreError> {
        let kind = kind.to_owned();
        Ok(on_pool!(&self.backend, pool => sqlx::query_as::<_, KeyRow>(
            "SELECT kind, version, state, root_version, wrapped FROM keys WHERE kind = $1 ORDER BY version DESC")
            .bind(kind).fetch_all(pool).await)?)
    }

    /// Inserts a key unless that kind and version exist (concurrent first starts agree on one).
    pub async fn insert_key_if_absent(&self, row: &KeyRow, now: i64) -> Result<(), StoreError> {
        let row = row.clone();
        on_pool!(&self.write_backend, pool => sqlx::query(
            "INSERT INTO keys (kind, version, state, root_version, wrapped, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (kind, version) DO NOTHING")
            .bind(row.kind.clone()).bind(row.version).bind(row.state.clone()).bind(row.root_version)
            .bind(row.wrapped.clone()).bind(now).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    // ---- subjects ---------------------------------------------------------------------------

    /// One subject's row: read inline from a SQLite file ([`inline_reader`]), else coalesced
    /// with concurrent calls into one query ([`reader`]).
    pub async fn subject(&self, id: Uuid) -> Result<Option<SubjectRow>, StoreError> {
        if let Some(inline) = &self.inline {
            return inline.subject(id);
        }
        self.reader.subject(id).await
    }

    /// One subject's row, always through the read coalescer: for background work that reads many
    /// subjects at once (the sweep visits a whole batch in one task), which must not hold a runtime
    /// thread for one inline read after another.
    pub async fn subject_coalesced(&self, id: Uuid) -> Result<Option<SubjectRow>, StoreError> {
        self.reader.subject(id).await
    }

    /// The rows of those `ids` that exist, each converted on its own (a damaged row is an error
    /// for its id only).
    pub async fn subjects(
        &self,
        ids: &[Uuid],
    ) -> Result<std::collections::HashMap<Uuid, Result<SubjectRow, StoreError>>, StoreError> {
        reader::subjects_by_id(&self.backend, ids).await
    }

    /// Subjects whose blind index at `path` equals `digest`, at most `limit`, in id order: read
    /// inline from a SQLite file, else coalesced with concurrent lookups into one query.
    pub async fn find(
        &self,
        path: &'static str,
        digest: &[u8; 32],
        limit: u32,
    ) -> Result<Vec<Found>, StoreError> {
        if let Some(inline) = &self.inline {
            return inline.find(path, digest, limit);
        }
        self.reader.find(path, *digest, limit).await
    }

    /// When the subject was erased, if it was.
    pub async fn erased_at(&self, id: Uuid) -> Result<Option<i64>, StoreError> {
        Ok(on_pool!(&self.backend, pool => sqlx::query_scalar(
            "SELECT erased_at FROM erased_subjects WHERE id = $1")
            .bind(id.as_bytes().to_vec()).fetch_optional(pool).await)?)
    }

    /// Queues a subject write for the group committer and waits until it is durable (or refused).
    pub async fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        self.writer.submit(Some(op), None).await
    }

    /// Queues a subject write with the audit event that records it: both commit in one
    /// transaction, or neither does. The event is appended only if the op applied.
    pub async fn write_audited(
        &self,
        op: WriteOp,
        event: AuditRecord,
    ) -> Result<WriteOutcome, StoreError> {
        self.writer.submit(Some(op), Some(event)).await
    }

    /// Appends an audit event and waits until it is durable.
    pub async fn record(&self, event: AuditRecord) -> Result<(), StoreError> {
        self.writer.submit(None, Some(event)).await.map(|_| ())
    }

    /// Sets the function that links audit events into the chain (once, after the keyring opened).
    pub fn set_chain_linker(&self, linker: Arc<dyn ChainLinker>) {
        let _ = self.linker.set(linker);
    }

    // ---- callers ----------------------------------------------------------------------------

    pub async fn insert_caller(&self, row: &CallerRow) -> Result<(), StoreError> {
        let row = row.clone();
        on_pool!(&self.write_backend, pool => sqlx::query(
            "INSERT INTO callers (id, name, role, secret_hash, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(row.id.clone()).bind(row.name.clone()).bind(row.role.clone()).bind(row.secret_hash.clone())
            .bind(row.created_at).bind(row.revoked_at).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn caller(&self, id: &str) -> Result<Option<CallerRow>, StoreError> {
        let id = id.to_owned();
        Ok(
            on_pool!(&self.backend, pool => sqlx::query_as::<_, CallerRow>(
            "SELECT id, name, role, secret_hash, created_at, revoked_at FROM callers WHERE id = $1")
            .bind(id).fetch_optional(pool).await)?,
        )
    }

    pub async fn callers(&self) -> Result<Vec<CallerRow>, StoreError> {
        Ok(
            on_pool!(&self.backend, pool => sqlx::query_as::<_, CallerRow>(
            "SELECT id, name, role, secret_hash, created_at, revoked_at FROM callers ORDER BY created_at, id")
            .fetch_all(pool).await)?,
        )
    }

    pub async fn count_callers(&self) -> Result<i64, StoreError> {
        Ok(
            on_pool!(&self.backend, pool => sqlx::query_scalar("SELECT COUNT(*) FROM callers")
            .fetch_one(pool).await)?,
        )
    }

    /// Sets `revoked_at` once; revoking a revoked caller keeps the first time.
    pub async fn revoke_caller(&self, id: &str, now: i64) -> Result<Option<CallerRow>, StoreError> {
        let id_owned = id.to_owned();
        on_pool!(&self.write_backend, pool => sqlx::query(
            "UPDATE callers SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now).bind(id_owned).execute(pool).await.map(|_| ()))?;
        self.caller(id).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sqlx::{Connection, sqlite::SqliteConnection};

    fn options(dir: &std::path::Path) -> SqliteConnectOptions {
        SqliteConnectOptions::new()
            .filename(dir.join("t.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .pragma("wal_autocheckpoint", "0")
    }

    /// One connection, so every statement below runs on the one `restart_wal` used.
    async fn pool_with_frames(dir: &std::path::Path) -> Pool<Sqlite> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options(dir))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (v BLOB)")
            .execute(&pool)
            .await
            .unwrap();
        insert(&pool, 20).await;
        pool
    }

    async fn insert(pool: &Pool<Sqlite>, rows: usize) {
        for _ in 0..rows {
            sqlx::query("INSERT INTO t (v) VALUES (zeroblob(4000))")
                .execute(pool)
                .await
                .unwrap();
        }
    }

    /// The WAL header's checkpoint sequence number, which SQLite advances each time the WAL
    /// starts over from its beginning (https://sqlite.org/fileformat.html#the_write_ahead_log).
    fn wal_restarts(dir: &std::path::Path) -> u32 {
        let wal = std::fs::read(dir.join("t.db-wal")).unwrap();
        u32::from_be_bytes(wal[12..16].try_into().unwrap())
    }

    async fn busy_timeout_ms(pool: &Pool<Sqlite>) -> i64 {
        sqlx::query_scalar("PRAGMA busy_timeout")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[test]
    fn an_in_memory_database_as_sqlx_names_it_is_not_a_file() {
        for name in [":memory:", "", "file:sqlx-in-memory-3", "file:x.db?mode=ro"] {
            assert!(!is_database_file(std::path::Path::new(name)), "{name}");
        }
        assert!(is_database_file(std::path::Path::new(
            "/var/lib/kluis/kluis.db"
        )));
        assert!(is_database_file(std::path::Path::new("kluis.db")));
    }

    #[tokio::test]
    async fn after_a_restart_checkpoint_the_next_commit_writes_the_wal_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_with_frames(dir.path()).await;
        let before = wal_restarts(dir.path());
        let (busy, log, done) = restart_wal(&pool).await.unwrap();
        assert_eq!((busy, done), (0, log), "every frame copied back");
        insert(&pool, 1).await;
        assert_eq!(wal_restarts(dir.path()), before + 1);
        assert_eq!(busy_timeout_ms(&pool).await, 10_000, "the usual wait again");
    }

    #[tokio::test]
    async fn a_restart_checkpoint_gives_up_soon_while_a_reader_stays_inside_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_with_frames(dir.path()).await;
        // A reader whose snapshot is older than the WAL's head keeps it from starting over.
        let mut reader = SqliteConnection::connect_with(&options(dir.path()))
            .await
            .unwrap();
        let mut snapshot = reader.begin().await.unwrap();
        let _: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut *snapshot)
            .await
            .unwrap();
        insert(&pool, 5).await;
        let before = wal_restarts(dir.path());
        let started = std::time::Instant::now();
        let (busy, _, _) = restart_wal(&pool).await.unwrap();
        assert_eq!(busy, 1, "the restart could not finish");
        assert!(
            started.elapsed() < SQLITE_BUSY_TIMEOUT / 2,
            "it gave up after its own short wait, not the usual one: {:?}",
            started.elapsed()
        );
        assert_eq!(busy_timeout_ms(&pool).await, 10_000, "the usual wait again");
        insert(&pool, 1).await;
        assert_eq!(
            wal_restarts(dir.path()),
            before,
            "the WAL went on where it was"
        );
        snapshot.rollback().await.unwrap();
    }
}
