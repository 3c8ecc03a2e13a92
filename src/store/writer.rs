//! Group commit: one writer task per instance drains concurrent subject writes into one transaction
//! per batch (DESIGN.md §5).
//!
//! Creates in a batch go in as one multi-row INSERT per table; if that statement fails (a duplicate
//! username), the batch falls back to one SAVEPOINT per request so a failing request never fails
//! its neighbours. Every request is answered only after its transaction has committed.
//!
//! Audit events ride along: an op's event is appended in the transaction that applies the op (and
//! only if it applied), an event without an op (a read, a refusal) in the next batch. The batch
//! links its events to the chain head it reads (and, on PostgreSQL, locks) at its end, so the
//! events of every instance form one linear chain and reads wait for one shared commit, not for
//! each other. On SQLite a batch of events alone (no op), or of a retention sweep's purges and
//! shreds, is committed by the direct appender ([`super::appender`]) in one hand-off instead of
//! through sqlx.

use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use std::sync::{Arc, OnceLock};

use super::{
    AuditRecord, Backend, ChainLinker, IndexEntry, StoreError, SubjectRow,
    appender::DirectAppender, on_pool, padded_len, uuid_from,
};

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
        /// Brings the subject's retention due time forward to this (a path written that is
        /// already past its retention: the next sweep erases it).
        retention_due: Option<i64>,
    },
    Erase {
        id: Uuid,
        at: i64,
    },
    /// Records the subject's objection against an opt-out purpose (kept as first recorded) and,
    /// when new, its entry in the consent history.
    Object(ConsentChange),
    /// Withdraws an objection, if there is one (with its history entry).
    WithdrawObjection(ConsentChange),
    /// Records consent for a consent-based purpose (kept as first granted), with history.
    GrantConsent(ConsentChange),
    /// Withdraws consent in force, if any (with its history entry).
    WithdrawConsent(ConsentChange),
    /// Stores the keyed hashes of freshly issued unsubscribe tokens: (hash, subject).
    IssueTokens {
        tokens: Vec<(Vec<u8>, Uuid)>,
        purpose: String,
        at: i64,
    },
    /// Redeems an unsubscribe token by its keyed hash: marks it redeemed and records the
    /// objection (route `unsubscribe-link`), each once. `NotFound` for a hash never issued.
    RedeemToken {
        hash: Vec<u8>,
        at: i64,
        caller: String,
        /// Tokens issued before this are no longer redeemable (`NotFound`).
        issued_after: i64,
    },
    /// Places a restriction of processing unless one is in force.
    Restrict {
        id: Uuid,
        restriction_id: String,
        reason: String,
        at: i64,
        by: String,
    },
    /// Lifts the restriction in force, if any.
    LiftRestriction {
        id: Uuid,
        at: i64,
        by: String,
    },
    /// Adds an entry to the disclosure register (the subject must exist).
    RecordDisclosure(super::DisclosureRow),
    /// Stores a signed erasure receipt.
    InsertReceipt(super::ReceiptRow),
    /// Sets a subject's password hash (the subject must exist).
    SetCredential {
        id: Uuid,
        hash: Redacted,
        at: i64,
    },
    /// Changes nothing; fails (`VersionMismatch`, `NotFound`) unless the subject is still at
    /// `version` and `retention_version` (a sequence planned on that state checks it held).
    Expect {
        id: Uuid,
        version: u64,
        retention_version: i64,
    },
    /// Ops applied in order in one savepoint, all or none (an erasure closes records, purges and
    /// stores its receipt). The outcome is the last op's. Not nested.
    Sequence(Vec<WriteOp>),
    /// A change of a subject's processing records or holds with the retention state derived from
    /// the result, applied only if the subject's `retention_version` is still `expected_version`.
    RetentionChange {
        subject: Uuid,
        expected_version: i64,
        mark: Vec<u8>,
        due: Option<i64>,
        change: RecordChange,
    },
    /// Removes due paths from a subject's record (and their index entries), if neither the subject
    /// (`read_version`) nor its records and holds (`retention_version`) changed since planned.
    Purge {
        id: Uuid,
        read_version: u64,
        retention_version: i64,
        record: Vec<u8>,
        updated_at: i64,
        remove_index_paths: Vec<&'static str>,
        mark: Vec<u8>,
        due: Option<i64>,
    },
    /// Crypto-shreds a subject nothing keeps any longer (same checks as `Purge`): its row with the
    /// wrapped data key, index entries, objections, records and released holds.
    Shred {
        id: Uuid,
        read_version: u64,
        retention_version: i64,
        at: i64,
    },
    /// A new caller and its token hash.
    InsertCaller(super::CallerRow),
    /// Sets a caller's `revoked_at` once.
    RevokeCaller {
        id: String,
        at: i64,
    },
    /// A new version of a key kind, wrapped under the root key; with `demote`, the kind's active
    /// version becomes decrypt-only in the same transaction. `Refused` if the version exists
    /// (another instance rotated first).
    AddKeyVersion {
        row: super::KeyRow,
        at: i64,
        demote: bool,
    },
    /// Retires a decrypt-only key version and destroys its wrapped bytes; a KEK only while no
    /// data key is wrapped under it. `Refused` naming the reason otherwise, `NotFound` for a
    /// version that never existed; retiring a retired version changes nothing.
    RetireKey {
        kind: String,
        version: u32,
        at: i64,
    },
    /// Data keys wrapped anew, each applied only if still under its old KEK version.
    Rewrap(Vec<super::Rewrapped>),
    /// Replaces every blind-index entry of a subject by `entries` (computed under the active
    /// index key), if the subject is still at `read_version`; `VersionMismatch` otherwise.
    Reindex {
        id: Uuid,
        read_version: u64,
        entries: Vec<IndexEntry>,
    },
    /// A new root-key version (its key-check value) and every key re-wrapped under it, each
    /// compare-and-set on the root version it was read under; `Refused` if anything moved.
    RotateRoot {
        version: u32,
        check: Vec<u8>,
        at: i64,
        rows: Vec<super::RewrappedKey>,
    },
    /// Marks a root-key version retired, only while no key is wrapped under it; `Refused` naming
    /// the reason otherwise, `NotFound` for an unknown version; a retired one stays as it was.
    RetireRoot {
        version: u32,
        at: i64,
    },
}

/// Text `Debug` does not print (a password hash in a [`WriteOp`]).
#[derive(Clone)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A change of a subject's objections or consents, as its history records it.
#[derive(Debug, Clone)]
pub struct ConsentChange {
    pub id: Uuid,
    pub purpose: String,
    pub route: String,
    pub at: i64,
    /// The caller id that made the change.
    pub caller: String,
}

/// The record or hold change a [`WriteOp::RetentionChange`] makes.
#[derive(Debug)]
pub enum RecordChange {
    /// A new record; `Duplicate` if `(purpose, reference)` exists.
    Open {
        purpose: String,
        reference: String,
        at: i64,
        by: String,
    },
    /// Closes an open record; `NotFound` if it is not open (any more).
    Close {
        purpose: String,
        reference: String,
        event: String,
        at: i64,
        by: String,
    },
    PlaceHold(super::HoldRow),
    /// Nothing but the new state and due time (a sweep found nothing due yet).
    Reschedule,
    /// Releases a hold in force; `NotFound` if it is not.
    ReleaseHold {
        id: String,
        at: i64,
        by: String,
        reason: String,
    },
}

/// What a committed write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Created,
    Updated {
        version: u64,
    },
    Erased,
    /// An objection was recorded (`false`: it already was), standing since `since`.
    Objected {
        new: bool,
        since: i64,
    },
    /// An objection was withdrawn (`false`: there was none).
    Withdrawn {
        existed: bool,
    },
    /// Consent was recorded (`false`: it already was in force), standing since `since`.
    ConsentGranted {
        new: bool,
        since: i64,
    },
    /// Consent was withdrawn (`false`: none was in force).
    ConsentWithdrawn {
        existed: bool,
    },
    TokensIssued,
    /// A token was redeemed (`already`: it had been before) for `purpose`.
    TokenRedeemed {
        already: bool,
        purpose: String,
    },
    /// The restriction in force (`new`: placed by this op).
    Restricted {
        new: bool,
        restriction_id: String,
        since: i64,
    },
    /// `false`: no restriction was in force.
    RestrictionLifted {
        existed: bool,
    },
    DisclosureRecorded,
    ReceiptStored,
    /// A record or hold changed; the subject's retention state is now at `version`.
    RetentionChanged {
        version: i64,
    },
    /// Due paths were removed; the subject is now at `version`.
    Purged {
        version: u64,
    },
    Shredded,
    CallerInserted,
    /// `false`: no such caller; revoking a revoked caller keeps its first time.
    CallerRevoked {
        found: bool,
    },
    /// An audit event without an op was appended.
    Recorded,
    KeyAdded,
    /// `false`: the version had been retired before.
    KeyRetired {
        now: bool,
    },
    /// How many data keys were re-wrapped (the others had changed or gone meanwhile).
    Rewrapped {
        count: u64,
    },
}

type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

/// One request to the writer: an op, its audit event, or both.
struct Job {
    op: Option<WriteOp>,
    audit: Option<AuditRecord>,
    reply: Reply,
}

pub(super) struct GroupCommitter {
    #[cfg(test)]
    direct: bool,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl GroupCommitter {
    /// Starts the writer task; `appender` (SQLite files only) takes the batches without ops.
    pub(super) fn start(
        backend: Backend,
        linker: Arc<OnceLock<Arc<dyn ChainLinker>>>,
        appender: Option<DirectAppender>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        #[cfg(test)]
        let direct = appender.is_some();
        let task = tokio::spawn(run(backend, linker, appender, rx));
        Self {
            #[cfg(test)]
            direct,
            tx: Mutex::new(Some(tx)),
            task: Mutex::new(Some(task)),
        }
    }

    pub(super) async fn submit(
        &self,
        op: Option<WriteOp>,
        audit: Option<AuditRecord>,
    ) -> Result<WriteOutcome, StoreError> {
        let sender = self
            .tx
            .lock()
            .await
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is shutting down".into()))?;
        let (reply, answer) = oneshot::channel();
        sender
            .send(Job { op, audit, reply })
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Whether batches of events alone go to the direct appender (tests).
    #[cfg(test)]
    pub(super) fn has_direct_appender(&self) -> bool {
        self.direct
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
pub(super) struct StoredIndexKey {
    pub(super) path: String,
    key_version: u32,
    pub(super) digest: Vec<u8>,
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
pub(super) fn encode_stored_keys(keys: &[StoredIndexKey]) -> Vec<u8> {
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

pub(super) fn decode_index_keys(mut bytes: &[u8]) -> Result<Vec<StoredIndexKey>, StoreError> {
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

/// The oldest blind-index key version among a subject's entries (`subjects.index_version`, which
/// the re-index job selects by); `None` without entries. Purges only remove entries, so they leave
/// it as it was: at worst too old, which costs one needless re-index.
fn oldest_index_version(keys: &[StoredIndexKey]) -> Option<i64> {
    keys.iter().map(|k| i64::from(k.key_version)).min()
}

/// Deletes one blind-index entry by its primary key.
macro_rules! delete_index_entry {
    ($conn:expr, $key:expr, $subject:expr) => {
        // CAST, not a bare parameter: see the module docs of `store`.
        sqlx::query("DELETE FROM blind_index WHERE path = CAST($1 AS TEXT) AND digest = $2 AND subject_id = $3")
            .bind($key.path.clone())
            .bind($key.digest.clone())
            .bind($subject.clone())
            .execute(&mut *$conn)
            .await
            .map(|_| ())
    };
}

/// Locks the row of KEK `version` until commit (a no-op update: PostgreSQL's row lock; SQLite's
/// writer lock already serialises) and checks it is not retired, so a data key is never written
/// under a KEK that a retirement committed or is committing; `Unavailable` otherwise (an instance
/// whose keyring is stale: it reloads and the caller retries).
macro_rules! lock_usable_kek {
    ($conn:expr, $version:expr) => {
        sqlx::query("UPDATE keys SET state = state WHERE kind = 'kek' AND version = $1 AND state <> 'retired'")
            .bind(i64::from($version))
            .execute(&mut *$conn)
            .await
            .map_err(StoreError::from)
            .and_then(|done| {
                if done.rows_affected() == 1 {
                    Ok(())
                } else {
                    Err(StoreError::StaleKeyring(format!(
                        "kek v{} is retired or unknown: this instance's keyring is stale; retry",
                        $version
                    )))
                }
            })
    };
}

/// Inserts one blind-index entry of a subject; a taken username is `Duplicate`.
macro_rules! insert_index_entry {
    ($conn:expr, $entry:expr, $subject:expr) => {
        sqlx::query(
            "INSERT INTO blind_index (path, digest, subject_id, key_version) VALUES ($1, $2, $3, $4)",
        )
        .bind($entry.path)
        .bind($entry.digest.to_vec())
        .bind($subject.clone())
        .bind(i64::from($entry.key_version))
        .execute(&mut *$conn)
        .await
        .map(|_| ())
        .map_err(unique_violation)
    };
}

/// `NotFound` unless the subject (by id bytes) exists.
macro_rules! require_subject {
    ($conn:expr, $idb:expr) => {
        sqlx::query_scalar::<_, Vec<u8>>("SELECT id FROM subjects WHERE id = $1")
            .bind($idb.clone())
            .fetch_optional(&mut *$conn)
            .await
            .map_err(StoreError::from)
            .and_then(|found| found.map(|_| ()).ok_or(StoreError::NotFound))
    };
}

/// Inserts subjects, their wrapped data keys and their index entries with one multi-row INSERT
/// per table.
macro_rules! bulk_create {
    ($conn:expr, $rows:expr) => {{
        async {
            let rows = $rows;
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO subjects (id, record, index_keys, index_version, version, created_at, updated_at) ",
            );
            q.push_values(rows.iter(), |mut b, (row, index)| {
                b.push_bind(row.id.as_bytes().to_vec())
                    .push_bind(row.record.clone())
                    .push_bind(encode_index_keys(index))
                    .push_bind(index.iter().map(|e| i64::from(e.key_version)).min())
                    .push_bind(row.version as i64)
                    .push_bind(row.created_at)
                    .push_bind(row.updated_at);
            });
            q.build().execute(&mut *$conn).await.map_err(unique_violation)?;
            let mut keks: Vec<u32> = rows.iter().map(|(row, _)| row.kek_version).collect();
            keks.sort_unstable();
            keks.dedup();
            for kek in keks {
                lock_usable_kek!($conn, kek)?;
            }
            let mut q = sqlx::QueryBuilder::new(
                "INSERT INTO data_keys (subject_id, dek_id, kek_version, wrapped_dek) ",
            );
            q.push_values(rows.iter(), |mut b, (row, _)| {
                b.push_bind(row.id.as_bytes().to_vec())
                    .push_bind(row.dek_id.as_bytes().to_vec())
                    .push_bind(i64::from(row.kek_version))
                    .push_bind(row.wrapped_dek.clone());
            });
            q.build().execute(&mut *$conn).await?;
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

/// The tables besides `subjects` whose rows name a subject and go when it is erased or shredded.
/// None holds a personal value; the audit trail keeps what happened (ids and paths). Erasure
/// receipts stay: they are the evidence of the erasure.
pub(super) const SUBJECT_TABLES: [&str; 10] = [
    // The wrapped data key: deleting it is what crypto-shreds the subject.
    "data_keys",
    "objections",
    "processing_records",
    "legal_holds",
    "consent_events",
    "consents",
    "unsubscribe_tokens",
    "restrictions",
    "disclosures",
    "credentials",
];

/// Deletes what refers to an erased or shredded subject (every table of [`SUBJECT_TABLES`]).
macro_rules! forget_subject {
    ($conn:expr, $idb:expr) => {
        async {
            for table in SUBJECT_TABLES {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE subject_id = $1"
                )))
                .bind($idb.clone())
                .execute(&mut *$conn)
                .await?;
            }
            Ok::<(), StoreError>(())
        }
        .await
    };
}

/// Appends an entry to the consent history for a [`ConsentChange`] with `action`.
macro_rules! consent_event {
    ($conn:expr, $change:expr, $action:expr) => {
        sqlx::query(
            "INSERT INTO consent_events (subject_id, purpose, action, route, at_us, caller) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind($change.id.as_bytes().to_vec())
        .bind($change.purpose.clone())
        .bind($action)
        .bind($change.route.clone())
        .bind($change.at)
        .bind($change.caller.clone())
        .execute(&mut *$conn)
        .await
        .map(|_| ())
    };
}

/// Records the objection a [`ConsentChange`] makes (kept as first made; a history entry when
/// new) and ends a consent in force for the purpose (with its history entry): reads under a
/// consent-based purpose follow the consent, so an objection that left it would change nothing.
/// Whether the objection is new.
macro_rules! record_objection {
    ($conn:expr, $change:expr) => {
        async {
            let idb = $change.id.as_bytes().to_vec();
            let done = sqlx::query(
                "INSERT INTO objections (subject_id, purpose, route, created_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (subject_id, purpose) DO NOTHING",
            )
            .bind(idb.clone())
            .bind($change.purpose.clone())
            .bind($change.route.clone())
            .bind($change.at)
            .execute(&mut *$conn)
            .await?;
            let new = done.rows_affected() == 1;
            if new {
                consent_event!($conn, $change, "object")?;
            }
            let ended = sqlx::query("DELETE FROM consents WHERE subject_id = $1 AND purpose = $2")
                .bind(idb)
                .bind($change.purpose.clone())
                .execute(&mut *$conn)
                .await?;
            if ended.rows_affected() == 1 {
                consent_event!($conn, $change, "withdraw-consent")?;
            }
            Ok::<bool, StoreError>(new)
        }
        .await
    };
}

/// Why a compare-and-set on a subject matched no row: it is gone (`NotFound`) or changed
/// (`VersionMismatch` with its retention version).
macro_rules! retention_conflict {
    ($conn:expr, $idb:expr) => {
        match sqlx::query_scalar::<_, i64>("SELECT retention_version FROM subjects WHERE id = $1")
            .bind($idb.clone())
            .fetch_optional(&mut *$conn)
            .await
        {
            Ok(Some(v)) => StoreError::VersionMismatch {
                actual: v.max(0) as u64,
            },
            Ok(None) => StoreError::NotFound,
            Err(e) => StoreError::from(e),
        }
    };
}

/// The subject id of a padding row: the nil UUID, which no subject has (ids are random v4/v7),
/// and padding rows also carry version -1, which no row has either.
const PAD_ID: [u8; 16] = [0; 16];

/// `rows` followed by `None`s up to [`padded_len`].
fn padded<T: Copy>(rows: &[T]) -> impl Iterator<Item = Option<T>> + '_ {
    let pad = padded_len(rows.len()) - rows.len();
    rows.iter()
        .copied()
        .map(Some)
        .chain(std::iter::repeat_n(None, pad))
}

/// Applies the `Purge` and `Shred` ops at `indexes` of `ops` with one statement per table, each
/// compare-and-set on the subject's version and retention version; the ids that applied. Every
/// statement is padded to [`padded_len`] rows with rows that match nothing.
macro_rules! bulk_sweep {
    ($conn:expr, $ops:expr, $indexes:expr) => {{
        async {
            let mut purges = Vec::new();
            let mut shreds = Vec::new();
            for &i in $indexes.iter() {
                match $ops[i] {
                    Some(op @ WriteOp::Purge { .. }) => purges.push(op),
                    Some(op @ WriteOp::Shred { .. }) => shreds.push(op),
                    _ => {}
                }
            }
            let mut applied: std::collections::HashSet<Uuid> = std::collections::HashSet::new();
            // Index entries to delete: (path, digest, subject id).
            let mut gone: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
            if !purges.is_empty() {
                let mut q = sqlx::QueryBuilder::new(
                    "UPDATE subjects SET record = v.column2, version = version + 1, updated_at = v.column3, \
                     retention = v.column4, retention_due = v.column5, retention_version = retention_version + 1 \
                     FROM (",
                );
                q.push_values(padded(&purges), |mut b, op| match op {
                    Some(WriteOp::Purge { id, read_version, retention_version, record, updated_at, mark, due, .. }) => {
                        b.push_bind(id.as_bytes().to_vec())
                            .push_bind(record.clone())
                            .push_bind(*updated_at)
                            .push_bind(mark.clone())
                            .push_bind(*due)
                            .push_bind(*read_version as i64)
                            .push_bind(*retention_version);
                    }
                    _ => {
                        b.push_bind(PAD_ID.to_vec())
                            .push_bind(Vec::<u8>::new())
                            .push_bind(0_i64)
                            .push_bind(Vec::<u8>::new())
                            .push_bind(None::<i64>)
                            .push_bind(-1_i64)
                            .push_bind(-1_i64);
                    }
                });
                q.push(
                    ") AS v WHERE subjects.id = v.column1 AND subjects.version = v.column6 \
                     AND subjects.retention_version = v.column7 RETURNING id, index_keys",
                );
                let rows: Vec<(Vec<u8>, Vec<u8>)> = q.build_query_as().fetch_all(&mut *$conn).await?;
                // New index_keys of the subjects that lost indexed paths.
                let mut rekeyed: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
                for (idb, keys) in rows {
                    let id = uuid_from(&idb)?;
                    applied.insert(id);
                    let remove = purges.iter().find_map(|op| match op {
                        WriteOp::Purge { id: pid, remove_index_paths, .. } if *pid == id => Some(remove_index_paths),
                        _ => None,
                    });
                    let Some(remove) = remove.filter(|r| !r.is_empty()) else { continue };
                    let (removed, kept): (Vec<StoredIndexKey>, Vec<StoredIndexKey>) = decode_index_keys(&keys)?
                        .into_iter()
                        .partition(|k| remove.contains(&k.path.as_str()));
                    if removed.is_empty() {
                        continue;
                    }
                    gone.extend(removed.into_iter().map(|k| (k.path, k.digest, idb.clone())));
                    rekeyed.push((idb, encode_stored_keys(&kept)));
                }
                if !rekeyed.is_empty() {
                    let mut q = sqlx::QueryBuilder::new("UPDATE subjects SET index_keys = v.column2 FROM (");
                    let rows: Vec<&(Vec<u8>, Vec<u8>)> = rekeyed.iter().collect();
                    q.push_values(padded(&rows), |mut b, row| match row {
                        Some((idb, keys)) => {
                            b.push_bind(idb.clone()).push_bind(keys.clone());
                        }
                        None => {
                            b.push_bind(PAD_ID.to_vec()).push_bind(Vec::<u8>::new());
                        }
                    });
                    q.push(") AS v WHERE subjects.id = v.column1");
                    q.build().execute(&mut *$conn).await?;
                }
            }
            if !shreds.is_empty() {
                let mut q = sqlx::QueryBuilder::new(
                    "DELETE FROM subjects WHERE (id, version, retention_version) IN (",
                );
                q.push_values(padded(&shreds), |mut b, op| match op {
                    Some(WriteOp::Shred { id, read_version, retention_version, .. }) => {
                        b.push_bind(id.as_bytes().to_vec())
                            .push_bind(*read_version as i64)
                            .push_bind(*retention_version);
                    }
                    _ => {
                        b.push_bind(PAD_ID.to_vec()).push_bind(-1_i64).push_bind(-1_i64);
                    }
                });
                q.push(") RETURNING id, index_keys");
                let rows: Vec<(Vec<u8>, Vec<u8>)> = q.build_query_as().fetch_all(&mut *$conn).await?;
                let mut shredded: Vec<(Vec<u8>, i64)> = Vec::new();
                for (idb, keys) in rows {
                    let id = uuid_from(&idb)?;
                    applied.insert(id);
                    for k in decode_index_keys(&keys)? {
                        gone.push((k.path, k.digest, idb.clone()));
                    }
                    let at = shreds.iter().find_map(|op| match op {
                        WriteOp::Shred { id: sid, at, .. } if *sid == id => Some(*at),
                        _ => None,
                    }).unwrap_or_default();
                    shredded.push((idb, at));
                }
                if !shredded.is_empty() {
                    let rows: Vec<&(Vec<u8>, i64)> = shredded.iter().collect();
                    let mut q = sqlx::QueryBuilder::new(
                        "INSERT INTO erased_subjects (id, erased_at) SELECT v.column1, v.column2 FROM (",
                    );
                    q.push_values(padded(&rows), |mut b, row| match row {
                        Some((idb, at)) => {
                            b.push_bind(idb.clone()).push_bind(*at);
                        }
                        None => {
                            b.push_bind(PAD_ID.to_vec()).push_bind(0_i64);
                        }
                    });
                    q.push(") AS v WHERE v.column1 <> ");
                    q.push_bind(PAD_ID.to_vec());
                    q.build().execute(&mut *$conn).await?;
                    for table in SUBJECT_TABLES {
                        let mut q = sqlx::QueryBuilder::new(format!("DELETE FROM {table} WHERE subject_id IN ("));
                        let mut list = q.separated(", ");
                        for row in padded(&rows) {
                            list.push_bind(row.map_or_else(|| PAD_ID.to_vec(), |(idb, _)| idb.clone()));
                        }
                        q.push(")");
                        q.build().execute(&mut *$conn).await?;
                    }
                }
            }
            if !gone.is_empty() {
                // An OR of primary-key matches: SQLite searches the key per term, whereas a
                // row-value IN over a VALUES list made it scan the whole index.
                for chunk in gone.chunks(256) {
                    let mut q = sqlx::QueryBuilder::new("DELETE FROM blind_index WHERE ");
                    let rows: Vec<&(String, Vec<u8>, Vec<u8>)> = chunk.iter().collect();
                    for (n, row) in padded(&rows).enumerate() {
                        let (path, digest, idb) = row.map_or_else(
                            || (String::new(), Vec::new(), PAD_ID.to_vec()),
                            |(p, d, i)| (p.clone(), d.clone(), i.clone()),
                        );
                        if n > 0 {
                            q.push(" OR ");
                        }
                        // CAST, not a bare parameter: see the module docs of `store`.
                        q.push("(path = CAST(");
                        q.push_bind(path);
                        q.push(" AS TEXT) AND digest = ");
                        q.push_bind(digest);
                        q.push(" AND subject_id = ");
                        q.push_bind(idb);
                        q.push(")");
                    }
                    q.build().execute(&mut *$conn).await?;
                }
            }
            Ok::<_, StoreError>(applied)
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
                    retention_due,
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
                        sqlx::query("UPDATE subjects SET index_keys = $1, index_version = $3 WHERE id = $2")
                            .bind(encode_stored_keys(&kept))
                            .bind(idb.clone())
                            .bind(oldest_index_version(&kept))
                            .execute(&mut *$conn)
                            .await?;
                    }
                    for e in add_index {
                        insert_index_entry!($conn, e, &idb)?;
                    }
                    if let Some(due) = retention_due {
                        sqlx::query(
                            "UPDATE subjects SET retention_due = $1 \
                             WHERE id = $2 AND (retention_due IS NULL OR retention_due > $1)",
                        )
                        .bind(*due)
                        .bind(idb.clone())
                        .execute(&mut *$conn)
                        .await?;
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
                        .bind(idb.clone())
                        .bind(*at)
                        .execute(&mut *$conn)
                        .await?;
                    forget_subject!($conn, idb)?;
                    Ok(WriteOutcome::Erased)
                }
                WriteOp::RetentionChange { subject, expected_version, mark, due, change } => {
                    let idb = subject.as_bytes().to_vec();
                    let done = sqlx::query(
                        "UPDATE subjects SET retention = $1, retention_due = $2, \
                         retention_version = retention_version + 1 WHERE id = $3 AND retention_version = $4",
                    )
                    .bind(mark.clone())
                    .bind(*due)
                    .bind(idb.clone())
                    .bind(*expected_version)
                    .execute(&mut *$conn)
                    .await?;
                    if done.rows_affected() != 1 {
                        return Err(retention_conflict!($conn, idb));
                    }
                    match change {
                        RecordChange::Open { purpose, reference, at, by } => {
                            let done = sqlx::query(
                                "INSERT INTO processing_records (purpose, reference, subject_id, opened_at, opened_by) \
                                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (purpose, reference) DO NOTHING",
                            )
                            .bind(purpose.clone())
                            .bind(reference.clone())
                            .bind(idb.clone())
                            .bind(*at)
                            .bind(by.clone())
                            .execute(&mut *$conn)
                            .await?;
                            if done.rows_affected() != 1 {
                                return Err(StoreError::Duplicate { path: "processing record".into() });
                            }
                        }
                        RecordChange::Close { purpose, reference, event, at, by } => {
                            let done = sqlx::query(
                                "UPDATE processing_records SET closed_at = $1, close_event = $2, closed_by = $3 \
                                 WHERE purpose = $4 AND reference = $5 AND subject_id = $6 AND closed_at IS NULL",
                            )
                            .bind(*at)
                            .bind(event.clone())
                            .bind(by.clone())
                            .bind(purpose.clone())
                            .bind(reference.clone())
                            .bind(idb.clone())
                            .execute(&mut *$conn)
                            .await?;
                            if done.rows_affected() != 1 {
                                return Err(StoreError::NotFound);
                            }
                        }
                        RecordChange::PlaceHold(hold) => {
                            sqlx::query(
                                "INSERT INTO legal_holds (id, subject_id, purpose, reference, reason, placed_at, placed_by) \
                                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                            )
                            .bind(hold.id.clone())
                            .bind(idb.clone())
                            .bind(hold.purpose.clone())
                            .bind(hold.reference.clone())
                            .bind(hold.reason.clone())
                            .bind(hold.placed_at)
                            .bind(hold.placed_by.clone())
                            .execute(&mut *$conn)
                            .await?;
                        }
                        RecordChange::Reschedule => {}
                        RecordChange::ReleaseHold { id, at, by, reason } => {
                            let done = sqlx::query(
                                "UPDATE legal_holds SET released_at = $1, released_by = $2, release_reason = $3 \
                                 WHERE id = $4 AND subject_id = $5 AND released_at IS NULL",
                            )
                            .bind(*at)
                            .bind(by.clone())
                            .bind(reason.clone())
                            .bind(id.clone())
                            .bind(idb.clone())
                            .execute(&mut *$conn)
                            .await?;
                            if done.rows_affected() != 1 {
                                return Err(StoreError::NotFound);
                            }
                        }
                    }
                    Ok(WriteOutcome::RetentionChanged { version: expected_version + 1 })
                }
                WriteOp::Purge { id, read_version, retention_version, record, updated_at, remove_index_paths, mark, due } => {
                    let idb = id.as_bytes().to_vec();
                    let done = sqlx::query(
                        "UPDATE subjects SET record = $1, version = version + 1, updated_at = $2, retention = $3, \
                         retention_due = $4, retention_version = retention_version + 1 \
                         WHERE id = $5 AND version = $6 AND retention_version = $7",
                    )
                    .bind(record.clone())
                    .bind(*updated_at)
                    .bind(mark.clone())
                    .bind(*due)
                    .bind(idb.clone())
                    .bind(*read_version as i64)
                    .bind(*retention_version)
                    .execute(&mut *$conn)
                    .await?;
                    if done.rows_affected() != 1 {
                        return Err(retention_conflict!($conn, idb));
                    }
                    if !remove_index_paths.is_empty() {
                        let keys: Vec<u8> = sqlx::query_scalar("SELECT index_keys FROM subjects WHERE id = $1")
                            .bind(idb.clone())
                            .fetch_one(&mut *$conn)
                            .await?;
                        let (removed, kept): (Vec<StoredIndexKey>, Vec<StoredIndexKey>) = decode_index_keys(&keys)?
                            .into_iter()
                            .partition(|k| remove_index_paths.contains(&k.path.as_str()));
                        for old in removed {
                            delete_index_entry!($conn, &old, &idb)?;
                        }
                        sqlx::query("UPDATE subjects SET index_keys = $1 WHERE id = $2")
                            .bind(encode_stored_keys(&kept))
                            .bind(idb.clone())
                            .execute(&mut *$conn)
                            .await?;
                    }
                    Ok(WriteOutcome::Purged { version: read_version + 1 })
                }
                WriteOp::Shred { id, read_version, retention_version, at } => {
                    let idb = id.as_bytes().to_vec();
                    let keys: Vec<u8> = match sqlx::query_scalar(
                        "DELETE FROM subjects WHERE id = $1 AND version = $2 AND retention_version = $3 \
                         RETURNING index_keys",
                    )
                    .bind(idb.clone())
                    .bind(*read_version as i64)
                    .bind(*retention_version)
                    .fetch_optional(&mut *$conn)
                    .await?
                    {
                        Some(keys) => keys,
                        None => return Err(retention_conflict!($conn, idb)),
                    };
                    for old in decode_index_keys(&keys)? {
                        delete_index_entry!($conn, &old, &idb)?;
                    }
                    sqlx::query("INSERT INTO erased_subjects (id, erased_at) VALUES ($1, $2)")
                        .bind(idb.clone())
                        .bind(*at)
                        .execute(&mut *$conn)
                        .await?;
                    forget_subject!($conn, idb)?;
                    Ok(WriteOutcome::Shredded)
                }
                WriteOp::Object(c) => {
                    let idb = c.id.as_bytes().to_vec();
                    require_subject!($conn, idb)?;
                    let new = record_objection!($conn, c)?;
                    // The objection stands from when it was first made.
                    let since: i64 = sqlx::query_scalar(
                        "SELECT created_at FROM objections WHERE subject_id = $1 AND purpose = $2",
                    )
                    .bind(idb)
                    .bind(c.purpose.clone())
                    .fetch_one(&mut *$conn)
                    .await?;
                    Ok(WriteOutcome::Objected { new, since })
                }
                WriteOp::WithdrawObjection(c) => {
                    let idb = c.id.as_bytes().to_vec();
                    require_subject!($conn, idb)?;
                    let done = sqlx::query("DELETE FROM objections WHERE subject_id = $1 AND purpose = $2")
                        .bind(idb)
                        .bind(c.purpose.clone())
                        .execute(&mut *$conn)
                        .await?;
                    let existed = done.rows_affected() == 1;
                    if existed {
                        consent_event!($conn, c, "withdraw-objection")?;
                    }
                    Ok(WriteOutcome::Withdrawn { existed })
                }
                WriteOp::GrantConsent(c) => {
                    let idb = c.id.as_bytes().to_vec();
                    require_subject!($conn, idb)?;
                    let done = sqlx::query(
                        "INSERT INTO consents (subject_id, purpose, route, granted_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (subject_id, purpose) DO NOTHING",
                    )
                    .bind(idb.clone())
                    .bind(c.purpose.clone())
                    .bind(c.route.clone())
                    .bind(c.at)
                    .execute(&mut *$conn)
                    .await?;
                    let new = done.rows_affected() == 1;
                    if new {
                        consent_event!($conn, c, "grant")?;
                    }
                    // A consent given now supersedes an objection made before: the subject's
                    // latest choice stands, and the history shows both.
                    let lifted = sqlx::query("DELETE FROM objections WHERE subject_id = $1 AND purpose = $2")
                        .bind(idb.clone())
                        .bind(c.purpose.clone())
                        .execute(&mut *$conn)
                        .await?;
                    if lifted.rows_affected() == 1 {
                        consent_event!($conn, c, "withdraw-objection")?;
                    }
                    let since: i64 = sqlx::query_scalar(
                        "SELECT granted_at FROM consents WHERE subject_id = $1 AND purpose = $2",
                    )
                    .bind(idb)
                    .bind(c.purpose.clone())
                    .fetch_one(&mut *$conn)
                    .await?;
                    Ok(WriteOutcome::ConsentGranted { new, since })
                }
                WriteOp::WithdrawConsent(c) => {
                    let idb = c.id.as_bytes().to_vec();
                    require_subject!($conn, idb)?;
                    let done = sqlx::query("DELETE FROM consents WHERE subject_id = $1 AND purpose = $2")
                        .bind(idb)
                        .bind(c.purpose.clone())
                        .execute(&mut *$conn)
                        .await?;
                    let existed = done.rows_affected() == 1;
                    if existed {
                        consent_event!($conn, c, "withdraw-consent")?;
                    }
                    Ok(WriteOutcome::ConsentWithdrawn { existed })
                }
                WriteOp::IssueTokens { tokens, purpose, at } => {
                    for chunk in tokens.chunks(200) {
                        let mut q = sqlx::QueryBuilder::new(
                            "INSERT INTO unsubscribe_tokens (token_hash, subject_id, purpose, issued_at) ",
                        );
                        q.push_values(chunk.iter(), |mut b, (hash, id)| {
                            b.push_bind(hash.clone())
                                .push_bind(id.as_bytes().to_vec())
                                .push_bind(purpose.clone())
                                .push_bind(*at);
                        });
                        q.build().execute(&mut *$conn).await?;
                    }
                    Ok(WriteOutcome::TokensIssued)
                }
                WriteOp::RedeemToken { hash, at, caller, issued_after } => {
                    let found: Option<(Vec<u8>, String, Option<i64>)> = sqlx::query_as(
                        "SELECT subject_id, purpose, redeemed_at FROM unsubscribe_tokens \
                         WHERE token_hash = $1 AND issued_at >= $2",
                    )
                    .bind(hash.clone())
                    .bind(*issued_after)
                    .fetch_optional(&mut *$conn)
                    .await?;
                    let (idb, purpose, redeemed_at) = found.ok_or(StoreError::NotFound)?;
                    if redeemed_at.is_some() {
                        return Ok(WriteOutcome::TokenRedeemed { already: true, purpose });
                    }
                    sqlx::query("UPDATE unsubscribe_tokens SET redeemed_at = $1 WHERE token_hash = $2")
                        .bind(*at)
                        .bind(hash.clone())
                        .execute(&mut *$conn)
                        .await?;
                    let c = ConsentChange {
                        id: uuid_from(&idb)?,
                        purpose: purpose.clone(),
                        route: "unsubscribe-link".into(),
                        at: *at,
                        caller: caller.clone(),
                    };
                    record_objection!($conn, c)?;
                    Ok(WriteOutcome::TokenRedeemed { already: false, purpose })
                }
                WriteOp::Restrict { id, restriction_id, reason, at, by } => {
                    let idb = id.as_bytes().to_vec();
                    let current: Option<Option<i64>> =
                        sqlx::query_scalar("SELECT restricted_at FROM subjects WHERE id = $1")
                            .bind(idb.clone())
                            .fetch_optional(&mut *$conn)
                            .await?;
                    match current.ok_or(StoreError::NotFound)? {
                        Some(since) => {
                            let existing: String = sqlx::query_scalar(
                                "SELECT id FROM restrictions WHERE subject_id = $1 AND lifted_at IS NULL \
                                 ORDER BY placed_at DESC LIMIT 1",
                            )
                            .bind(idb)
                            .fetch_one(&mut *$conn)
                            .await?;
                            Ok(WriteOutcome::Restricted { new: false, restriction_id: existing, since })
                        }
                        None => {
                            sqlx::query(
                                "INSERT INTO restrictions (id, subject_id, reason, placed_at, placed_by) \
                                 VALUES ($1, $2, $3, $4, $5)",
                            )
                            .bind(restriction_id.clone())
                            .bind(idb.clone())
                            .bind(reason.clone())
                            .bind(*at)
                            .bind(by.clone())
                            .execute(&mut *$conn)
                            .await?;
                            sqlx::query("UPDATE subjects SET restricted_at = $1 WHERE id = $2")
                                .bind(*at)
                                .bind(idb)
                                .execute(&mut *$conn)
                                .await?;
                            Ok(WriteOutcome::Restricted { new: true, restriction_id: restriction_id.clone(), since: *at })
                        }
                    }
                }
                WriteOp::LiftRestriction { id, at, by } => {
                    let idb = id.as_bytes().to_vec();
                    require_subject!($conn, idb)?;
                    let done = sqlx::query(
                        "UPDATE restrictions SET lifted_at = $1, lifted_by = $2 WHERE subject_id = $3 AND lifted_at IS NULL",
                    )
                    .bind(*at)
                    .bind(by.clone())
                    .bind(idb.clone())
                    .execute(&mut *$conn)
                    .await?;
                    sqlx::query("UPDATE subjects SET restricted_at = NULL WHERE id = $1")
                        .bind(idb)
                        .execute(&mut *$conn)
                        .await?;
                    Ok(WriteOutcome::RestrictionLifted { existed: done.rows_affected() > 0 })
                }
                WriteOp::RecordDisclosure(d) => {
                    let idb = d.subject.as_bytes().to_vec();
                    require_subject!($conn, idb)?;
                    sqlx::query(
                        "INSERT INTO disclosures (id, subject_id, recipient, purpose, legal_basis, paths, reference, \
                         disclosed_at, recorded_at, recorded_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    )
                    .bind(d.id.clone())
                    .bind(idb)
                    .bind(d.recipient.clone())
                    .bind(d.purpose.clone())
                    .bind(d.legal_basis.clone())
                    .bind(d.paths.join(","))
                    .bind(d.reference.clone())
                    .bind(d.disclosed_at)
                    .bind(d.recorded_at)
                    .bind(d.recorded_by.clone())
                    .execute(&mut *$conn)
                    .await?;
                    Ok(WriteOutcome::DisclosureRecorded)
                }
                WriteOp::InsertReceipt(r) => {
                    sqlx::query(
                        "INSERT INTO erasure_receipts (id, subject_id, issued_at, receipt, signature) VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(r.id.clone())
                    .bind(r.subject.as_bytes().to_vec())
                    .bind(r.issued_at)
                    .bind(r.receipt.clone())
                    .bind(r.signature.clone())
                    .execute(&mut *$conn)
                    .await?;
                    Ok(WriteOutcome::ReceiptStored)
                }
                WriteOp::SetCredential { id, hash, at } => {
                    let idb = id.as_bytes().to_vec();
                    require_subject!($conn, idb)?;
                    sqlx::query(
                        "INSERT INTO credentials (subject_id, hash, updated_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (subject_id) DO UPDATE SET hash = excluded.hash, updated_at = excluded.updated_at",
                    )
                    .bind(idb)
                    .bind(hash.0.clone())
                    .bind(*at)
                    .execute(&mut *$conn)
                    .await?;
                    Ok(WriteOutcome::Recorded)
                }
                WriteOp::Expect { id, version, retention_version } => {
                    let idb = id.as_bytes().to_vec();
                    let found: Option<i64> = sqlx::query_scalar(
                        "SELECT version FROM subjects WHERE id = $1 AND version = $2 AND retention_version = $3",
                    )
                    .bind(idb.clone())
                    .bind(*version as i64)
                    .bind(*retention_version)
                    .fetch_optional(&mut *$conn)
                    .await?;
                    match found {
                        Some(_) => Ok(WriteOutcome::Recorded),
                        None => Err(retention_conflict!($conn, idb)),
                    }
                }
                WriteOp::Sequence(_) => Err(StoreError::Database("a sequence of writes cannot be nested".into())),
                WriteOp::InsertCaller(row) => {
                    sqlx::query(
                        "INSERT INTO callers (id, name, role, secret_hash, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(row.id.clone())
                    .bind(row.name.clone())
                    .bind(row.role.clone())
                    .bind(row.secret_hash.clone())
                    .bind(row.created_at)
                    .bind(row.revoked_at)
                    .execute(&mut *$conn)
                    .await?;
                    Ok(WriteOutcome::CallerInserted)
                }
                WriteOp::RevokeCaller { id, at } => {
                    sqlx::query("UPDATE callers SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                        .bind(*at)
                        .bind(id.clone())
                        .execute(&mut *$conn)
                        .await?;
                    let found: Option<String> = sqlx::query_scalar("SELECT id FROM callers WHERE id = $1")
                        .bind(id.clone())
                        .fetch_optional(&mut *$conn)
                        .await?;
                    // An unknown caller is an error, so the op (and its event) does not apply.
                    found.ok_or(StoreError::NotFound)?;
                    Ok(WriteOutcome::CallerRevoked { found: true })
                }
                WriteOp::AddKeyVersion { row, at, demote } => {
                    let root_usable: Option<i64> = sqlx::query_scalar(
                        "SELECT version FROM root_key_checks WHERE version = $1 AND retired_at IS NULL",
                    )
                    .bind(row.root_version)
                    .fetch_optional(&mut *$conn)
                    .await?;
                    if root_usable.is_none() {
                        return Err(StoreError::StaleKeyring(format!(
                            "root key v{} is retired or unknown: this instance's root keys are stale; retry",
                            row.root_version
                        )));
                    }
                    if *demote {
                        sqlx::query("UPDATE keys SET state = 'decrypt-only' WHERE kind = $1 AND state = 'active'")
                            .bind(row.kind.clone())
                            .execute(&mut *$conn)
                            .await?;
                    }
                    let added = sqlx::query(
                        "INSERT INTO keys (kind, version, state, root_version, wrapped, created_at) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (kind, version) DO NOTHING",
                    )
                    .bind(row.kind.clone())
                    .bind(row.version)
                    .bind(row.state.clone())
                    .bind(row.root_version)
                    .bind(row.wrapped.clone())
                    .bind(*at)
                    .execute(&mut *$conn)
                    .await?
                    .rows_affected();
                    if added == 0 {
                        return Err(StoreError::Refused(format!(
                            "{} version {} was created meanwhile (a concurrent rotation); try again",
                            row.kind, row.version
                        )));
                    }
                    Ok(WriteOutcome::KeyAdded)
                }
                WriteOp::RetireKey { kind, version, at } => {
                    // Lock the key's row first (PostgreSQL): a create that locked it to write a
                    // data key under it commits before the counts below are taken, each in a
                    // snapshot of its own; one that comes later finds it retired.
                    sqlx::query("UPDATE keys SET state = state WHERE kind = $1 AND version = $2")
                        .bind(kind.clone())
                        .bind(i64::from(*version))
                        .execute(&mut *$conn)
                        .await?;
                    let retired = sqlx::query(
                        "UPDATE keys SET state = 'retired', wrapped = $3, retired_at = $4 \
                         WHERE kind = $1 AND version = $2 AND state = 'decrypt-only' \
                         AND ($1 <> 'kek' OR NOT EXISTS (SELECT 1 FROM data_keys WHERE kek_version = $2)) \
                         AND ($1 <> 'blind-index' OR NOT EXISTS (SELECT 1 FROM subjects WHERE index_version <= $2))",
                    )
                    .bind(kind.clone())
                    .bind(i64::from(*version))
                    .bind(Vec::<u8>::new())
                    .bind(*at)
                    .execute(&mut *$conn)
                    .await?
                    .rows_affected();
                    if retired > 0 {
                        return Ok(WriteOutcome::KeyRetired { now: true });
                    }
                    let state: Option<String> = sqlx::query_scalar("SELECT state FROM keys WHERE kind = $1 AND version = $2")
                        .bind(kind.clone())
                        .bind(i64::from(*version))
                        .fetch_optional(&mut *$conn)
                        .await?;
                    match state.as_deref() {
                        None => Err(StoreError::NotFound),
                        Some("retired") => Ok(WriteOutcome::KeyRetired { now: false }),
                        Some("active") => Err(StoreError::Refused(format!(
                            "{kind} v{version} is the active version: rotate first, then retire it"
                        ))),
                        Some(_) if kind == "blind-index" => {
                            let in_use: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM subjects WHERE index_version <= $1")
                                .bind(i64::from(*version))
                                .fetch_one(&mut *$conn)
                                .await?;
                            Err(StoreError::Refused(format!(
                                "{in_use} subjects may still have blind-index entries under {kind} v{version} or older: \
                                 retire it once the re-index job has moved them (see KeyStatus)"
                            )))
                        }
                        Some(_) => {
                            let in_use: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM data_keys WHERE kek_version = $1")
                                .bind(i64::from(*version))
                                .fetch_one(&mut *$conn)
                                .await?;
                            Err(StoreError::Refused(format!(
                                "{in_use} data keys are still wrapped under {kind} v{version}: \
                                 retire it once the re-wrap job has moved them (see KeyStatus)"
                            )))
                        }
                    }
                }
                WriteOp::RotateRoot { version, check, at, rows } => {
                    let added = sqlx::query(
                        "INSERT INTO root_key_checks (version, check_value, created_at) VALUES ($1, $2, $3) \
                         ON CONFLICT (version) DO NOTHING",
                    )
                    .bind(i64::from(*version))
                    .bind(check.clone())
                    .bind(*at)
                    .execute(&mut *$conn)
                    .await?
                    .rows_affected();
                    if added == 0 {
                        return Err(StoreError::Refused(format!(
                            "root key v{version} was registered meanwhile (a concurrent rotation); try again"
                        )));
                    }
                    for row in rows {
                        let moved = sqlx::query(
                            "UPDATE keys SET root_version = $1, wrapped = $2 \
                             WHERE kind = $3 AND version = $4 AND root_version = $5 AND state <> 'retired'",
                        )
                        .bind(i64::from(*version))
                        .bind(row.wrapped.clone())
                        .bind(row.kind.clone())
                        .bind(row.version)
                        .bind(row.old_root)
                        .execute(&mut *$conn)
                        .await?
                        .rows_affected();
                        if moved == 0 {
                            return Err(StoreError::Refused(format!(
                                "{} v{} changed during the root-key rotation; try again",
                                row.kind, row.version
                            )));
                        }
                    }
                    Ok(WriteOutcome::KeyAdded)
                }
                WriteOp::RetireRoot { version, at } => {
                    let retired = sqlx::query(
                        "UPDATE root_key_checks SET retired_at = $2 WHERE version = $1 AND retired_at IS NULL \
                         AND NOT EXISTS (SELECT 1 FROM keys WHERE root_version = $1 AND state <> 'retired')",
                    )
                    .bind(i64::from(*version))
                    .bind(*at)
                    .execute(&mut *$conn)
                    .await?
                    .rows_affected();
                    if retired > 0 {
                        return Ok(WriteOutcome::KeyRetired { now: true });
                    }
                    let state: Option<Option<i64>> = sqlx::query_scalar("SELECT retired_at FROM root_key_checks WHERE version = $1")
                        .bind(i64::from(*version))
                        .fetch_optional(&mut *$conn)
                        .await?;
                    match state {
                        None => Err(StoreError::NotFound),
                        Some(Some(_)) => Ok(WriteOutcome::KeyRetired { now: false }),
                        Some(None) => {
                            let in_use: i64 = sqlx::query_scalar(
                                "SELECT COUNT(*) FROM keys WHERE root_version = $1 AND state <> 'retired'",
                            )
                            .bind(i64::from(*version))
                            .fetch_one(&mut *$conn)
                            .await?;
                            Err(StoreError::Refused(format!(
                                "{in_use} keys are still wrapped under root key v{version}: rotate the root key first"
                            )))
                        }
                    }
                }
                WriteOp::Reindex { id, read_version, entries } => {
                    let idb = id.as_bytes().to_vec();
                    // A no-op update first: on PostgreSQL it locks the row until commit, so an
                    // update or erasure of the subject waits for (or wins over) the re-index
                    // instead of interleaving with it.
                    let keys: Option<Vec<u8>> = sqlx::query_scalar(
                        "UPDATE subjects SET version = version WHERE id = $1 AND version = $2 RETURNING index_keys",
                    )
                    .bind(idb.clone())
                    .bind(*read_version as i64)
                    .fetch_optional(&mut *$conn)
                    .await?;
                    let Some(keys) = keys else {
                        return Err(StoreError::VersionMismatch { actual: 0 });
                    };
                    for old in decode_index_keys(&keys)? {
                        delete_index_entry!($conn, &old, &idb)?;
                    }
                    for e in entries {
                        insert_index_entry!($conn, e, &idb)?;
                    }
                    let stored: Vec<StoredIndexKey> = entries.iter().map(StoredIndexKey::from).collect();
                    sqlx::query("UPDATE subjects SET index_keys = $1, index_version = $2 WHERE id = $3")
                        .bind(encode_stored_keys(&stored))
                        .bind(oldest_index_version(&stored))
                        .bind(idb)
                        .execute(&mut *$conn)
                        .await?;
                    Ok(WriteOutcome::Recorded)
                }
                WriteOp::Rewrap(rows) => {
                    let mut targets: Vec<u32> = rows.iter().map(|r| r.new_version).collect();
                    targets.sort_unstable();
                    targets.dedup();
                    for kek in targets {
                        lock_usable_kek!($conn, kek)?;
                    }
                    let mut count = 0;
                    for chunk in rows.chunks(1000) {
                        let mut q = sqlx::QueryBuilder::new(
                            "UPDATE data_keys SET kek_version = v.column2, wrapped_dek = v.column3 FROM (",
                        );
                        q.push_values(chunk.iter(), |mut b, r| {
                            b.push_bind(r.id.as_bytes().to_vec())
                                .push_bind(i64::from(r.new_version))
                                .push_bind(r.wrapped.clone())
                                .push_bind(i64::from(r.old_version));
                        });
                        q.push(") AS v WHERE data_keys.subject_id = v.column1 AND data_keys.kek_version = v.column4");
                        count += q.build().execute(&mut *$conn).await?.rows_affected();
                    }
                    Ok(WriteOutcome::Rewrapped { count })
                }
            }
        }
        .await
    }};
}

async fn run(
    backend: Backend,
    linker: Arc<OnceLock<Arc<dyn ChainLinker>>>,
    appender: Option<DirectAppender>,
    mut rx: mpsc::Receiver<Job>,
) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let mut jobs = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            jobs.push((job.op, job.audit));
            replies.push(job.reply);
        }
        let results = commit_batch(&backend, linker.get(), appender.as_ref(), jobs).await;
        for (reply, result) in replies.into_iter().zip(results) {
            // A submitter that went away (cancelled request) no longer needs its answer; the write
            // is committed all the same, as it would be had the answer been lost on the wire.
            let _ = reply.send(result);
        }
    }
    if let Some(appender) = appender {
        appender.close().await;
    }
}

/// Appends `events` through the direct appender while holding the pool's one writing connection:
/// whoever else writes meanwhile (a checkpoint, a key or caller change) queues for that connection
/// instead of meeting this transaction at SQLite's lock, whose busy handler sleeps in steps of up
/// to 100 ms (unheld, 0.6 % of commits under closed-loop `get` took 25–100 ms).
async fn append_direct(
    backend: &Backend,
    appender: &DirectAppender,
    events: Vec<AuditRecord>,
    linker: Arc<dyn ChainLinker>,
) -> Result<(), StoreError> {
    let _writing = hold_writing_connection(backend).await?;
    appender.append(events, linker).await
}

/// SQLite: the pool's one writing connection, held (until dropped) while the direct appender's
/// thread runs a transaction, so whoever else in this process writes waits for it instead of
/// meeting that transaction at SQLite's lock. PostgreSQL: nothing to hold.
async fn hold_writing_connection(
    backend: &Backend,
) -> Result<Option<sqlx::pool::PoolConnection<sqlx::Sqlite>>, StoreError> {
    Ok(match backend {
        Backend::Sqlite(pool) => Some(pool.acquire().await?),
        Backend::Postgres(_) => None,
    })
}

/// Whether the direct appender can apply `op` (a sweep's purge or shred, or no op).
fn is_sweep_or_none(op: &Option<WriteOp>) -> bool {
    matches!(
        op,
        None | Some(WriteOp::Purge { .. } | WriteOp::Shred { .. })
    )
}

/// Applies a batch of a sweep's purges and shreds (and events alone beside them) through the
/// direct appender, holding the pool's writing connection like [`append_direct`]: one hand-off
/// for the whole transaction instead of one per statement, so the batch holds SQLite's write
/// lock (and the reads' events queued behind it) for its work, not for waits on a busy CPU.
async fn sweep_direct(
    backend: &Backend,
    appender: &DirectAppender,
    jobs: Vec<(Option<WriteOp>, Option<AuditRecord>)>,
    linker: Arc<dyn ChainLinker>,
) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
    let _writing = hold_writing_connection(backend).await?;
    appender.sweep(jobs, linker).await
}

/// An event with its sequence number and link.
pub(super) type Linked<'a> = (i64, &'a AuditRecord, [u8; 32]);

/// Links `events` to the chain after the head (`head_seq`, `head_mac`): each with its sequence
/// number and link, and the link of the last one (the new head).
pub(super) fn link_events<'a>(
    linker: &dyn ChainLinker,
    head_seq: i64,
    head_mac: &[u8],
    events: &[&'a AuditRecord],
) -> Result<(Vec<Linked<'a>>, [u8; 32]), StoreError> {
    let mut prev: [u8; 32] = head_mac
        .try_into()
        .map_err(|_| StoreError::Corrupt("audit_head.mac".into()))?;
    let mut linked = Vec::with_capacity(events.len());
    for (n, event) in events.iter().enumerate() {
        let seq = head_seq + 1 + n as i64;
        let mac = linker.link(seq, &prev, &event.body);
        linked.push((seq, *event, mac));
        prev = mac;
    }
    Ok((linked, prev))
}

type Jobs = [(Option<WriteOp>, Option<AuditRecord>)];

/// Commits `jobs` in one transaction; one result per job, in order. A batch of events alone goes
/// to the direct appender when there is one.
async fn commit_batch(
    backend: &Backend,
    linker: Option<&Arc<dyn ChainLinker>>,
    appender: Option<&DirectAppender>,
    jobs: Vec<(Option<WriteOp>, Option<AuditRecord>)>,
) -> Vec<Result<WriteOutcome, StoreError>> {
    let started = std::time::Instant::now();
    let audited = jobs.iter().filter(|(_, audit)| audit.is_some()).count();
    let batch = jobs.len();
    let committed = match (appender, linker) {
        (Some(appender), Some(linker)) if jobs.iter().all(|(op, _)| op.is_none()) => {
            let events = jobs.into_iter().filter_map(|(_, audit)| audit).collect();
            append_direct(backend, appender, events, linker.clone())
                .await
                .map(|()| vec![Ok(WriteOutcome::Recorded); batch])
        }
        (Some(appender), Some(linker)) if jobs.iter().all(|(op, _)| is_sweep_or_none(op)) => {
            sweep_direct(backend, appender, jobs, linker.clone()).await
        }
        _ => try_commit_batch(backend, linker.map(|l| &**l), &jobs).await,
    };
    metrics::histogram!("kluis_commit_batch_size").record(batch as f64);
    metrics::histogram!("kluis_audit_batch_size").record(audited as f64);
    metrics::histogram!("kluis_commit_duration_seconds").record(started.elapsed().as_secs_f64());
    match committed {
        Ok(results) => {
            tracing::trace!(
                batch,
                elapsed_us = started.elapsed().as_micros() as u64,
                "batch committed"
            );
            results
        }
        Err(e) => {
            tracing::error!(error = %e, batch, "group commit failed; batch refused");
            (0..batch)
                .map(|_| Err(StoreError::Unavailable(format!("commit failed: {e}"))))
                .collect()
        }
    }
}

async fn try_commit_batch(
    backend: &Backend,
    linker: Option<&dyn ChainLinker>,
    jobs: &Jobs,
) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
    let head_sql = match backend {
        Backend::Sqlite(_) => "SELECT seq, mac FROM audit_head WHERE id = 1",
        // The row lock is the chain's one ordering point across instances; held from here to commit.
        Backend::Postgres(_) => "SELECT seq, mac FROM audit_head WHERE id = 1 FOR UPDATE",
    };
    let ops: Vec<Option<&WriteOp>> = jobs.iter().map(|(op, _)| op.as_ref()).collect();
    // SQLite: take the write lock up front. A deferred transaction that reads the chain head
    // first could not upgrade to a writer after another process (a second instance, the CLI)
    // committed in between (SQLITE_BUSY_SNAPSHOT, which no busy timeout retries).
    let begin = match backend {
        Backend::Sqlite(_) => "BEGIN IMMEDIATE",
        Backend::Postgres(_) => "BEGIN",
    };
    on_pool!(backend, pool => {
        let mut tx = pool.begin_with(begin).await?;
        let mut results: Vec<Option<Result<WriteOutcome, StoreError>>> = ops
            .iter()
            .map(|op| if op.is_none() { Some(Ok(WriteOutcome::Recorded)) } else { None })
            .collect();

        // Fast path: every create of the batch in one statement per table.
        let creates: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| matches!(op, Some(WriteOp::Create { .. })).then_some(i))
            .collect();
        let mut creates_done = false;
        if creates.len() > 1 {
            sqlx::query("SAVEPOINT bulk").execute(&mut *tx).await?;
            let rows: Vec<(&SubjectRow, &[IndexEntry])> = creates
                .iter()
                .filter_map(|&i| match ops[i] {
                    Some(WriteOp::Create { row, index }) => Some((row, index.as_slice())),
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

        // Fast path: a sweep's purges and shreds, a few statements per batch instead of several
        // per subject; each still applies only if its subject did not change since planned.
        let sweeps: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter_map(|(i, op)| matches!(op, Some(WriteOp::Purge { .. } | WriteOp::Shred { .. })).then_some(i))
            .collect();
        let mut sweeps_done = false;
        if sweeps.len() > 1 {
            sqlx::query("SAVEPOINT bulk").execute(&mut *tx).await?;
            match bulk_sweep!(&mut *tx, &ops, &sweeps) {
                Ok(applied) => {
                    sqlx::query("RELEASE SAVEPOINT bulk").execute(&mut *tx).await?;
                    for &i in &sweeps {
                        results[i] = Some(match ops[i] {
                            Some(WriteOp::Purge { id, read_version, .. }) if applied.contains(id) => {
                                Ok(WriteOutcome::Purged { version: read_version + 1 })
                            }
                            Some(WriteOp::Shred { id, .. }) if applied.contains(id) => Ok(WriteOutcome::Shredded),
                            // Changed (or gone) since planned: the next sweep plans it again.
                            _ => Err(StoreError::VersionMismatch { actual: 0 }),
                        });
                    }
                    sweeps_done = true;
                }
                Err(e) => {
                    // Nothing of a sweep conflicts on insert, so this is a fault, not a race: the
                    // ops still apply one by one below, only slower.
                    tracing::warn!(error = %e, ops = sweeps.len(), "bulk sweep statements failed; applying one by one");
                    sqlx::query("ROLLBACK TO SAVEPOINT bulk").execute(&mut *tx).await?;
                    sqlx::query("RELEASE SAVEPOINT bulk").execute(&mut *tx).await?;
                }
            }
        }

        for (i, op) in ops.iter().enumerate() {
            let Some(op) = op else { continue };
            if creates_done && matches!(op, WriteOp::Create { .. }) {
                continue;
            }
            if sweeps_done && matches!(op, WriteOp::Purge { .. } | WriteOp::Shred { .. }) {
                continue;
            }
            sqlx::query("SAVEPOINT one").execute(&mut *tx).await?;
            let steps: &[WriteOp] = match op {
                WriteOp::Sequence(steps) => steps,
                one => std::slice::from_ref(one),
            };
            let mut outcome = Err(StoreError::Database("an empty sequence of writes".into()));
            for step in steps {
                outcome = apply_one!(&mut *tx, step);
                if outcome.is_err() {
                    break;
                }
            }
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
        // The events of the jobs that applied (and of those without an op), in job order.
        let events: Vec<&AuditRecord> = jobs
            .iter()
            .zip(&results)
            .filter(|(_, r)| matches!(r, Some(Ok(_))))
            .filter_map(|((_, audit), _)| audit.as_ref())
            .collect();
        if !events.is_empty() {
            let linker = linker.ok_or_else(|| StoreError::Unavailable("audit chain key not loaded".into()))?;
            let (head_seq, head_mac): (i64, Vec<u8>) = sqlx::query_as(head_sql).fetch_one(&mut *tx).await?;
            let (linked, prev) = link_events(linker, head_seq, &head_mac, &events)?;
            for chunk in linked.chunks(256) {
                let mut q = sqlx::QueryBuilder::new(
                    "INSERT INTO audit_events (seq, at_us, caller, purpose, method, outcome, subjects, body, mac) ",
                );
                q.push_values(chunk.iter(), |mut b, (seq, e, mac)| {
                    b.push_bind(*seq)
                        .push_bind(e.at_us)
                        .push_bind(e.caller.clone())
                        .push_bind(e.purpose.clone())
                        .push_bind(e.method.clone())
                        .push_bind(e.outcome.clone())
                        .push_bind(super::audit::subjects_column(&e.subjects))
                        .push_bind(e.body.clone())
                        .push_bind(mac.to_vec());
                });
                q.build().execute(&mut *tx).await?;
            }
            sqlx::query("UPDATE audit_head SET seq = $1, mac = $2 WHERE id = 1")
                .bind(head_seq + linked.len() as i64)
                .bind(prev.to_vec())
                .execute(&mut *tx)
                .await?;
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

    #[test]
    fn bulk_statements_take_one_of_thirteen_sizes_up_to_a_batch() {
        let sizes: std::collections::BTreeSet<usize> = (1..=256).map(padded_len).collect();
        assert_eq!(
            sizes.into_iter().collect::<Vec<_>>(),
            vec![1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256]
        );
        assert!((1..=256).all(|n| padded_len(n) >= n && padded_len(n) - n < 32));
        let rows: Vec<Option<u8>> = padded(&[1u8, 2, 3]).collect();
        assert_eq!(rows, vec![Some(1), Some(2), Some(3), None]);
    }

    /// Six subjects (versions 1 and 0), each with a `contact.email` index entry, and the KEK they
    /// are wrapped under.
    async fn six_subjects(pool: &sqlx::SqlitePool, ids: &[Uuid]) {
        let rows: Vec<(SubjectRow, Vec<IndexEntry>)> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let row = SubjectRow {
                    id: *id,
                    dek_id: Uuid::new_v4(),
                    kek_version: 1,
                    wrapped_dek: vec![1],
                    record: vec![n as u8],
                    version: 1,
                    created_at: 1,
                    updated_at: 1,
                    retention: None,
                    retention_version: 0,
                    restricted_at: None,
                };
                let index = vec![IndexEntry {
                    path: "contact.email",
                    key_version: 1,
                    digest: [n as u8; 32],
                }];
                (row, index)
            })
            .collect();
        let rows: Vec<(&SubjectRow, &[IndexEntry])> =
            rows.iter().map(|(r, i)| (r, i.as_slice())).collect();
        sqlx::query(
            "INSERT INTO keys (kind, version, state, root_version, wrapped, created_at) \
             VALUES ('kek', 1, 'active', 1, x'00', 1)",
        )
        .execute(pool)
        .await
        .unwrap();
        let mut tx = pool.begin().await.unwrap();
        bulk_create!(&mut *tx, &rows).unwrap();
        tx.commit().await.unwrap();
    }

    /// A sweep's batch: purges and shreds, one of each planned on a version that moved on, a
    /// purge that removes no index entry, and an event alone.
    fn sweep_jobs(ids: &[Uuid]) -> Vec<(Option<WriteOp>, Option<AuditRecord>)> {
        let purge = |id: Uuid, read_version: u64, remove: Vec<&'static str>| WriteOp::Purge {
            id,
            read_version,
            retention_version: 0,
            record: vec![99],
            updated_at: 2,
            remove_index_paths: remove,
            mark: vec![7],
            due: Some(9),
        };
        let shred = |id: Uuid, retention_version: i64| WriteOp::Shred {
            id,
            read_version: 1,
            retention_version,
            at: 3,
        };
        let event = |n: usize, id: Uuid| AuditRecord {
            at_us: n as i64,
            caller: "sweeper".into(),
            purpose: String::new(),
            method: "sweep".into(),
            outcome: "OK".into(),
            subjects: vec![id],
            body: format!("event {n}").into_bytes(),
        };
        vec![
            (
                Some(purge(ids[0], 1, vec!["contact.email"])),
                Some(event(0, ids[0])),
            ),
            (
                Some(purge(ids[1], 7, vec!["contact.email"])),
                Some(event(1, ids[1])),
            ),
            (Some(shred(ids[2], 0)), Some(event(2, ids[2]))),
            (Some(shred(ids[3], 5)), Some(event(3, ids[3]))),
            (None, Some(event(4, ids[5]))),
            (Some(purge(ids[4], 1, vec![])), Some(event(5, ids[4]))),
        ]
    }

    /// Everything a sweep touches, in a comparable form (data key ids aside: they are random).
    async fn sweep_state(pool: &sqlx::SqlitePool) -> Vec<String> {
        let mut state = Vec::new();
        for sql in [
            "SELECT hex(id) || ' ' || hex(record) || ' ' || version || ' ' || retention_version \
             || ' ' || hex(retention) || ' ' || ifnull(retention_due, '-') || ' ' || hex(index_keys) \
             FROM subjects ORDER BY id",
            "SELECT path || ' ' || hex(digest) || ' ' || hex(subject_id) FROM blind_index ORDER BY 1",
            "SELECT hex(id) || ' ' || erased_at FROM erased_subjects ORDER BY id",
            "SELECT hex(subject_id) FROM data_keys ORDER BY subject_id",
            "SELECT seq || ' ' || hex(body) || ' ' || hex(mac) FROM audit_events ORDER BY seq",
            "SELECT seq || ' ' || hex(mac) FROM audit_head",
        ] {
            let rows: Vec<String> = sqlx::query_scalar(sql).fetch_all(pool).await.unwrap();
            state.push(rows.join("\n"));
        }
        state
    }

    /// The direct appender's sweep transaction (one hand-off) applies a batch exactly as the sqlx
    /// path does: the same outcomes, rows, index entries, erasures and linked events.
    #[tokio::test]
    async fn a_sweep_batch_through_the_direct_appender_leaves_what_the_sqlx_path_leaves() {
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        let linker: Arc<dyn ChainLinker> = Arc::new(crate::store::appender::tests::TestLinker);
        let mut outcomes = Vec::new();
        let mut states = Vec::new();
        for direct in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("k.db");
            let store = crate::store::Store::open(&format!("sqlite://{}", file.display()))
                .await
                .unwrap();
            store.migrate().await.unwrap();
            let Backend::Sqlite(pool) = &store.write_backend else {
                panic!("a SQLite store")
            };
            six_subjects(pool, &ids).await;
            let results = if direct {
                let appender = DirectAppender::open(&file).unwrap().unwrap();
                let results = sweep_direct(
                    &store.write_backend,
                    &appender,
                    sweep_jobs(&ids),
                    linker.clone(),
                )
                .await
                .unwrap();
                appender.close().await;
                results
            } else {
                try_commit_batch(&store.write_backend, Some(&*linker), &sweep_jobs(&ids))
                    .await
                    .unwrap()
            };
            outcomes.push(format!("{results:?}"));
            states.push(sweep_state(pool).await);
            store.close().await;
        }
        assert_eq!(
            outcomes[0],
            "[Ok(Purged { version: 2 }), Err(VersionMismatch { actual: 0 }), Ok(Shredded), \
             Err(VersionMismatch { actual: 0 }), Ok(Recorded), Ok(Purged { version: 2 })]"
        );
        assert_eq!(outcomes[0], outcomes[1], "same outcomes on both paths");
        assert_eq!(states[0], states[1], "same database on both paths");
        assert_eq!(
            states[0][4].lines().count(),
            4,
            "events of the four jobs that applied (or had no op), none of the two that did not"
        );
        assert_eq!(
            states[0][1].lines().count(),
            4,
            "index entries left: the unpurged, the not-applied purge, the not-applied shred, the purge that kept them"
        );
    }

    /// The bulk path itself (not the one-by-one fallback a failing bulk statement falls back to):
    /// padded to 4 purges and 4 shreds, it applies exactly the 2 purges and 3 shreds given.
    #[tokio::test]
    async fn a_padded_bulk_sweep_applies_exactly_its_own_purges_and_shreds() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            crate::store::Store::open(&format!("sqlite://{}", dir.path().join("k.db").display()))
                .await
                .unwrap();
        store.migrate().await.unwrap();
        let Backend::Sqlite(pool) = &store.write_backend else {
            panic!("a SQLite store")
        };
        let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
        six_subjects(pool, &ids).await;
        let purge = |id: Uuid| WriteOp::Purge {
            id,
            read_version: 1,
            retention_version: 0,
            record: vec![99],
            updated_at: 2,
            remove_index_paths: vec!["contact.email"],
            mark: vec![],
            due: None,
        };
        let shred = |id: Uuid| WriteOp::Shred {
            id,
            read_version: 1,
            retention_version: 0,
            at: 3,
        };
        // The last subject is left alone.
        let ops = [
            purge(ids[0]),
            purge(ids[1]),
            shred(ids[2]),
            shred(ids[3]),
            shred(ids[4]),
        ];
        let ops: Vec<Option<&WriteOp>> = ops.iter().map(Some).collect();
        let mut tx = pool.begin().await.unwrap();
        let applied = bulk_sweep!(&mut *tx, &ops, &[0, 1, 2, 3, 4]).unwrap();
        tx.commit().await.unwrap();
        assert_eq!(applied, ids[..5].iter().copied().collect());

        let erased: Vec<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT id, erased_at FROM erased_subjects ORDER BY id")
                .fetch_all(pool)
                .await
                .unwrap();
        let mut shredded: Vec<(Vec<u8>, i64)> = ids[2..5]
            .iter()
            .map(|id| (id.as_bytes().to_vec(), 3))
            .collect();
        shredded.sort();
        assert_eq!(erased, shredded, "no padding row among the erased");
        let left: Vec<(Vec<u8>, Vec<u8>, i64)> =
            sqlx::query_as("SELECT id, record, version FROM subjects ORDER BY id")
                .fetch_all(pool)
                .await
                .unwrap();
        let mut expected = vec![
            (ids[0].as_bytes().to_vec(), vec![99], 2),
            (ids[1].as_bytes().to_vec(), vec![99], 2),
            (ids[5].as_bytes().to_vec(), vec![5], 1),
        ];
        expected.sort();
        assert_eq!(left, expected);
        let index: Vec<(Vec<u8>,)> = sqlx::query_as("SELECT subject_id FROM blind_index")
            .fetch_all(pool)
            .await
            .unwrap();
        assert_eq!(
            index,
            vec![(ids[5].as_bytes().to_vec(),)],
            "the purged and shredded entries are gone"
        );
        let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM data_keys")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(keys, 3, "the shredded subjects' data keys are gone");
        store.close().await;
    }
}
