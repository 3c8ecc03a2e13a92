//! The keyring of a running instance: opened at start-up (the root key checked, the KEKs and
//! service keys loaded or created; concurrent first starts agree on one set), reloaded when another
//! instance adds a version, and rotated: new KEK versions, the background job that re-wraps every
//! data key under the active KEK, retirement of versions nothing uses any more, and `KeyStatus`.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use super::{DomainError, call::Draft, now_us};
use crate::{
    audit::AuditEvent,
    crypto::{CryptoError, Keyring, RootKey, RootKeys, SecretKey, WrappedKey, key_check_value},
    keysource::KeySource,
    store::{
        KeyRow, KeyVersionRow, Rewrapped, RootCheckRow, Store, StoreError, WriteOp, WriteOutcome,
    },
};

/// The caller named in the audit events of the re-wrap job.
pub const REWRAP_CALLER: &str = "kluis-keys";

pub const KIND_KEK: &str = "kek";
pub const KIND_BLIND_INDEX: &str = "blind-index";
pub const KIND_AUDIT_CHAIN: &str = "audit-chain";
pub const KIND_AUDIT_CHECKPOINT: &str = "audit-checkpoint";
pub const KIND_TOKEN_MAC: &str = "token-mac";
pub const KIND_RECEIPT: &str = "receipt-signing";

/// The service keys of the rights and consent services (DESIGN.md §4): the MAC key of
/// unsubscribe handles and the seed of the Ed25519 key that signs erasure receipts.
pub struct RightsKeys {
    pub token_mac: SecretKey,
    pub receipt_seed: SecretKey,
}

/// Loads (or, on first use, creates) the rights keys. Call after [`open_keyring`] checked the root key.
pub async fn open_rights_keys(store: &Store, roots: &RootKeys) -> Result<RightsKeys, KeyringError> {
    Ok(RightsKeys {
        token_mac: newest(
            load_or_create(store, roots, KIND_TOKEN_MAC).await?,
            KIND_TOKEN_MAC,
        )?,
        receipt_seed: newest(
            load_or_create(store, roots, KIND_RECEIPT).await?,
            KIND_RECEIPT,
        )?,
    })
}

/// The newest version of a service key.
fn newest(
    mut keys: BTreeMap<u32, (String, SecretKey)>,
    kind: &'static str,
) -> Result<SecretKey, KeyringError> {
    keys.pop_last()
        .map(|(_, (_, key))| key)
        .ok_or(KeyringError::NoActiveKey(kind))
}

/// The audit trail's service keys (DESIGN.md §4): the chain's HMAC key and the seed of the Ed25519
/// key that signs checkpoints. Random, stored wrapped under the root key, never derived from a KEK.
pub struct AuditKeys {
    pub chain: SecretKey,
    pub checkpoint_seed: SecretKey,
}

/// Loads (or, on first use, creates) the audit keys. Call after [`open_keyring`] checked the root key.
pub async fn open_audit_keys(store: &Store, roots: &RootKeys) -> Result<AuditKeys, KeyringError> {
    Ok(AuditKeys {
        chain: newest(
            load_or_create(store, roots, KIND_AUDIT_CHAIN).await?,
            KIND_AUDIT_CHAIN,
        )?,
        checkpoint_seed: newest(
            load_or_create(store, roots, KIND_AUDIT_CHECKPOINT).await?,
            KIND_AUDIT_CHECKPOINT,
        )?,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error(
        "the root key does not match this database (its key-check value differs): \
         start kluis with the key file or KLUIS_ROOT_KEY this database was created with"
    )]
    WrongRootKey,
    #[error(
        "root key v{version} was retired in this database; start kluis with the root key it \
         needs now ({needed})"
    )]
    RetiredRootKey { version: u32, needed: String },
    #[error("the key source: {0}")]
    Source(String),
    #[error("no active {0} key in the database")]
    NoActiveKey(&'static str),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
}

/// Verifies the root keys against the database and returns the unwrapped keyring.
pub async fn open_keyring(store: &Store, roots: &RootKeys) -> Result<Keyring, KeyringError> {
    check_roots(store, roots).await?;
    load_keyring(store, roots).await
}

/// Refuses root keys unless one of them is a version the database knows, not retired, with the
/// same key-check value; a supplied version whose check value differs is refused outright. A
/// database without any takes the newest supplied version's. A supplied version the database does
/// not know yet (a rotation that stopped between the key source and the database) is ignored.
async fn check_roots(store: &Store, roots: &RootKeys) -> Result<(), KeyringError> {
    let newest = roots.newest().ok_or(KeyringError::WrongRootKey)?;
    if !store.has_key_checks().await? {
        let check = key_check_value(newest);
        let stored = store
            .init_key_check(newest.version(), &check, now_us())
            .await?;
        return if bool::from(stored.as_slice().ct_eq(&check)) {
            Ok(())
        } else {
            Err(KeyringError::WrongRootKey)
        };
    }
    let known = store.root_checks().await?;
    let mut usable = false;
    let mut retired = None;
    for root in roots.iter() {
        let Some(stored) = store.key_check(root.version()).await? else {
            continue;
        };
        if !bool::from(stored.as_slice().ct_eq(&key_check_value(root))) {
            return Err(KeyringError::WrongRootKey);
        }
        match known
            .iter()
            .find(|r| r.version == i64::from(root.version()))
            .and_then(|r| r.retired_at)
        {
            Some(_) => retired = Some(root.version()),
            None => usable = true,
        }
    }
    match (usable, retired) {
        (true, _) => Ok(()),
        (false, Some(version)) => Err(KeyringError::RetiredRootKey {
            version,
            needed: known
                .iter()
                .filter(|r| r.retired_at.is_none())
                .map(|r| format!("v{}", r.version))
                .collect::<Vec<_>>()
                .join(", "),
        }),
        (false, None) => Err(KeyringError::WrongRootKey),
    }
}

/// The KEKs (all but retired ones) and the active blind-index key, unwrapped.
async fn load_keyring(store: &Store, roots: &RootKeys) -> Result<Keyring, KeyringError> {
    let keks = load_or_create(store, roots, KIND_KEK).await?;
    let indexes = load_or_create(store, roots, KIND_BLIND_INDEX).await?;
    let active_kek = keks
        .iter()
        .filter(|(_, (state, _))| state == "active")
        .map(|(v, _)| *v)
        .max()
        .ok_or(KeyringError::NoActiveKey(KIND_KEK))?;
    let index_version = indexes
        .iter()
        .filter(|(_, (state, _))| state == "active")
        .map(|(v, _)| *v)
        .max()
        .ok_or(KeyringError::NoActiveKey(KIND_BLIND_INDEX))?;
    // load_or_create leaves retired versions out: the rest are consulted by lookups.
    let mut index_keys: BTreeMap<u32, SecretKey> =
        indexes.into_iter().map(|(v, (_, k))| (v, k)).collect();
    let index_key = index_keys
        .remove(&index_version)
        .ok_or(KeyringError::NoActiveKey(KIND_BLIND_INDEX))?;
    let keks = keks
        .into_iter()
        .filter(|(_, (state, _))| state != "retired")
        .map(|(v, (_, k))| (v, k))
        .collect();
    Ok(Keyring::new(keks, active_kek, index_version, index_key)?.with_old_index_keys(index_keys))
}

async fn load_or_create(
    store: &Store,
    roots: &RootKeys,
    kind: &'static str,
) -> Result<BTreeMap<u32, (String, SecretKey)>, KeyringError> {
    let mut rows = store.keys(kind).await?;
    if rows.is_empty() {
        let key = SecretKey::random()?;
        let wrapped = roots.wrap(kind, 1, &key)?;
        let row = KeyRow {
            kind: kind.to_owned(),
            version: 1,
            state: "active".into(),
            root_version: i64::from(wrapped.wrapping_version),
            wrapped: wrapped.bytes,
        };
        store.insert_key_if_absent(&row, now_us()).await?;
        rows = store.keys(kind).await?;
    }
    let mut out = BTreeMap::new();
    // A retired version's wrapped bytes are destroyed; there is nothing to unwrap.
    for row in rows.into_iter().filter(|r| r.state != "retired") {
        let version =
            u32::try_from(row.version).map_err(|_| StoreError::Corrupt("key version".into()))?;
        let wrapped = WrappedKey {
            wrapping_version: u32::try_from(row.root_version)
                .map_err(|_| StoreError::Corrupt("root version".into()))?,
            bytes: row.wrapped,
        };
        let key = roots.unwrap(kind, version, &wrapped)?;
        out.insert(version, (row.state, key));
    }
    Ok(out)
}

/// How the keys of an instance are kept current and rotated.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// How often the instance reloads the keyring, picking up versions another instance (or
    /// `kluis keys …`) added; also the least time a demoted KEK stays before it may be retired.
    pub refresh: Duration,
    /// Data keys re-wrapped per second at most by the background job; 0 switches the job off.
    pub rewrap_rate: u32,
    /// Data keys per re-wrap batch (one transaction).
    pub rewrap_batch: u32,
}

impl Default for KeySettings {
    fn default() -> Self {
        Self {
            refresh: Duration::from_secs(5),
            rewrap_rate: 20_000,
            rewrap_batch: 500,
        }
    }
}

/// A key version as `KeyStatus` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyVersionInfo {
    pub kind: String,
    pub version: u32,
    /// `active`, `decrypt-only` or `retired`.
    pub state: String,
    /// The root-key version it is wrapped under (meaningless once retired).
    pub root_version: u32,
    pub created_at_us: i64,
    pub retired_at_us: Option<i64>,
    /// KEKs: the data keys wrapped under this version.
    pub data_keys: Option<u64>,
    /// Blind-index keys: the subjects whose oldest entry is under this version.
    pub indexed_subjects: Option<u64>,
}

/// A root-key version the database knows by its key-check value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootVersionInfo {
    pub version: u32,
    pub created_at_us: i64,
    pub retired_at_us: Option<i64>,
}

/// The key versions a database backup taken at `at_us` depends on: its data keys are wrapped
/// under those KEKs, its blind indexes computed under those index keys, and its copy of them
/// wrapped under those root keys. Once every one is retired, the backup's erased subjects are
/// undecryptable and unmatchable (DESIGN.md §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupDependencies {
    pub at_us: i64,
    pub roots: Vec<RootVersionInfo>,
    pub keys: Vec<KeyVersionInfo>,
    /// Every version listed is retired.
    pub unrecoverable: bool,
}

/// What `KeyStatus` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub roots: Vec<RootVersionInfo>,
    /// Every key version of every kind (no key material).
    pub keys: Vec<KeyVersionInfo>,
    pub active_kek: u32,
    /// Data keys still wrapped under an older KEK than the active one.
    pub rewrap_pending: u64,
    pub active_index: u32,
    /// Subjects with blind-index entries under an older index key than the active one.
    pub reindex_pending: u64,
    pub backup: Option<BackupDependencies>,
}

/// The key kinds a backup's erased subjects depend on (the others protect no personal data).
const ERASURE_KINDS: [&str; 2] = [KIND_KEK, KIND_BLIND_INDEX];

/// The keys of one instance: the root keys (kept in memory to load versions added later) and their
/// source, the current keyring, and the jobs that keep it current and re-wrap data keys.
pub struct Keys {
    store: Store,
    roots: RwLock<RootKeys>,
    /// Asked again when the database names a root-key version this instance does not hold (a
    /// root-key rotation elsewhere); `None` in tests that hand the keys in.
    source: Option<Arc<dyn KeySource>>,
    current: RwLock<Arc<Keyring>>,
    settings: KeySettings,
    policy_version: String,
    /// Wakes the re-wrap job (after a rotation).
    rewrap_wake: Notify,
    /// Wakes the refresher (a data key under a KEK this instance has not loaded).
    refresh_wake: Notify,
    /// Wakes the re-index job (after a blind-index key rotation).
    reindex_wake: Notify,
    /// One reload at a time when reads meet a KEK version not loaded yet.
    loading: tokio::sync::Mutex<()>,
    /// One refresh at a time, loading and installing together: otherwise a periodic refresh
    /// that read the keys just before a rotation committed could install its older keyring after
    /// the rotation's own refresh, and new data keys would be wrapped under the demoted KEK.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("active_kek", &self.keyring().active_kek())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Checks the root keys against the database and loads the keyring.
    pub async fn open(
        store: Store,
        roots: RootKeys,
        source: Option<Arc<dyn KeySource>>,
        settings: KeySettings,
        policy_version: String,
    ) -> Result<Arc<Self>, KeyringError> {
        let keyring = open_keyring(&store, &roots).await?;
        Ok(Arc::new(Self {
            store,
            roots: RwLock::new(roots),
            source,
            current: RwLock::new(Arc::new(keyring)),
            settings,
            policy_version,
            rewrap_wake: Notify::new(),
            refresh_wake: Notify::new(),
            reindex_wake: Notify::new(),
            loading: tokio::sync::Mutex::new(()),
            refreshing: tokio::sync::Mutex::new(()),
        }))
    }

    /// The keyring as last loaded.
    pub fn keyring(&self) -> Arc<Keyring> {
        match self.current.read() {
            Ok(ring) => ring.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The root keys as last loaded.
    pub fn roots(&self) -> RootKeys {
        match self.roots.read() {
            Ok(roots) => roots.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_roots(&self, roots: RootKeys) {
        match self.roots.write() {
            Ok(mut current) => *current = roots,
            Err(poisoned) => *poisoned.into_inner() = roots,
        }
    }

    /// Reloads the keyring from the database (versions added or retired meanwhile); when a key
    /// is wrapped under a root-key version this instance does not hold, asks the key source again.
    pub async fn refresh(&self) -> Result<(), KeyringError> {
        let _one = self.refreshing.lock().await;
        let ring = match load_keyring(&self.store, &self.roots()).await {
            Err(KeyringError::Crypto(CryptoError::UnknownKeyVersion { kind: "root", .. }))
                if self.source.is_some() =>
            {
                self.reload_roots()?;
                load_keyring(&self.store, &self.roots()).await?
            }
            other => other?,
        };
        let ring = Arc::new(ring);
        match self.current.write() {
            Ok(mut current) => *current = ring,
            Err(poisoned) => *poisoned.into_inner() = ring,
        }
        Ok(())
    }

    /// Reads the root keys from the source again.
    fn reload_roots(&self) -> Result<(), KeyringError> {
        let Some(source) = &self.source else {
            return Ok(());
        };
        let keys = source
            .load()
            .map_err(|e| KeyringError::Source(e.to_string()))?;
        self.set_roots(RootKeys::new(keys));
        Ok(())
    }

    /// Rotates the root key: the source keeps a new version, and every key in the database (KEKs
    /// and service keys, not retired) is re-wrapped under it in one transaction with the call's
    /// audit event. The old version stays usable until [`Keys::retire_root`]. Returns the new version.
    pub async fn rotate_root(&self, draft: &mut Draft) -> Result<u32, DomainError> {
        let source = self.source.clone().ok_or_else(|| {
            DomainError::FailedPrecondition("no key source to keep a new root key in".into())
        })?;
        self.reload_roots().map_err(keyring_error)?;
        let roots = self.roots();
        let newest_known = self
            .store
            .root_checks()
            .await?
            .iter()
            .map(|r| r.version)
            .max()
            .unwrap_or(0);
        let held = roots.versions().max().map_or(0, i64::from);
        let version = u32::try_from(newest_known.max(held) + 1)
            .map_err(|_| DomainError::Internal("root-key versions exhausted".into()))?;
        draft.event.detail = format!("kind=root version={version}");
        let new = RootKey::generate_version(version)?;
        // The source first: a crash after this leaves an unused version, never a database whose
        // keys are wrapped under a root key nobody holds.
        source
            .add(&new)
            .map_err(|e| DomainError::FailedPrecondition(e.to_string()))?;
        let mut rows = Vec::new();
        for row in self.store.key_versions().await? {
            if row.state == "retired" {
                continue;
            }
            let stored = self
                .store
                .keys(&row.kind)
                .await?
                .into_iter()
                .find(|k| k.version == row.version)
                .ok_or(DomainError::NotFoundNamed { what: "key" })?;
            let key_version = version_of(row.version, "key version")?;
            let old = WrappedKey {
                wrapping_version: version_of(stored.root_version, "root version")?,
                bytes: stored.wrapped,
            };
            let key = roots.unwrap(&row.kind, key_version, &old)?;
            let wrapped = new.wrap(&row.kind, key_version, &key)?;
            rows.push(crate::store::RewrappedKey {
                kind: row.kind,
                version: row.version,
                old_root: i64::from(old.wrapping_version),
                wrapped: wrapped.bytes,
            });
        }
        let op = WriteOp::RotateRoot {
            version,
            check: key_check_value(&new).to_vec(),
            at: now_us(),
            rows,
        };
        self.store
            .write_audited(op, draft.committed_record())
            .await?;
        draft.committed = true;
        self.reload_roots().map_err(keyring_error)?;
        self.refresh().await.map_err(keyring_error)?;
        tracing::info!(version, "root key rotated; every key re-wrapped under it");
        Ok(version)
    }

    /// Retires a root-key version: the database forgets it (no key is wrapped under it any
    /// more, which is checked in the same transaction) and the source destroys it. Refused for the
    /// newest version and for one still wrapping keys. Returns whether the source destroyed it
    /// (a read-only source leaves that to the operator, and the text says so).
    pub async fn retire_root(
        &self,
        version: u32,
        draft: &mut Draft,
    ) -> Result<String, DomainError> {
        draft.event.detail = format!("kind=root version={version}");
        let known = self.store.root_checks().await?;
        let Some(row) = known.iter().find(|r| r.version == i64::from(version)) else {
            return Err(DomainError::NotFoundNamed {
                what: "root-key version",
            });
        };
        if known.iter().all(|r| r.version <= row.version) {
            return Err(DomainError::FailedPrecondition(format!(
                "root key v{version} is the newest version: rotate the root key first"
            )));
        }
        // Instances that have not reloaded since the rotation may still wrap under it.
        if let Some(next) = known.iter().find(|r| r.version == row.version + 1) {
            let settled = next.created_at + micros(self.settings.refresh);
            let now = now_us();
            if now < settled {
                return Err(DomainError::FailedPrecondition(format!(
                    "root key v{version} was superseded less than the keyring refresh interval \
                     ago; retry in {} ms, once every instance has loaded v{}",
                    (settled - now) / 1000 + 1,
                    version + 1
                )));
            }
        }
        let op = WriteOp::RetireRoot {
            version,
            at: now_us(),
        };
        self.store
            .write_audited(op, draft.committed_record())
            .await?;
        draft.committed = true;
        let destroyed = match &self.source {
            Some(source) => match source.remove(version) {
                Ok(()) => format!(
                    "root key v{version} retired and removed from the {}",
                    source.describe()
                ),
                Err(e) => format!(
                    "root key v{version} retired in the database; remove it from the key source yourself ({e})"
                ),
            },
            None => format!("root key v{version} retired in the database"),
        };
        let remaining = RootKeys::new(
            self.roots()
                .iter()
                .filter(|k| k.version() != version)
                .cloned(),
        );
        self.set_roots(remaining);
        tracing::info!(version, "root key retired");
        Ok(destroyed)
    }

    /// Makes sure KEK `version` is loaded, reloading the keyring once if it is not (concurrent
    /// callers wait for one reload); a version that is still missing stays missing.
    pub async fn load_kek(&self, version: u32) -> Result<(), KeyringError> {
        if self.keyring().has_kek(version) {
            return Ok(());
        }
        let _one = self.loading.lock().await;
        if self.keyring().has_kek(version) {
            return Ok(());
        }
        self.refresh().await
    }

    /// Asks the refresher to reload now (a data key named a KEK this instance has not loaded).
    pub fn request_refresh(&self) {
        self.refresh_wake.notify_one();
    }

    /// Makes a new KEK version active at once (the previous one decrypt-only) and wakes the
    /// re-wrap job; returns the new version. The call's event commits with the change.
    pub async fn rotate_kek(&self, draft: &mut Draft) -> Result<u32, DomainError> {
        let version = self.rotate(KIND_KEK, draft).await?;
        self.rewrap_wake.notify_one();
        tracing::info!(kind = KIND_KEK, version, "KEK rotated; re-wrap job woken");
        Ok(version)
    }

    /// Makes a new blind-index key version active at once; lookups consult it and the older
    /// versions until the re-index job has moved every subject and the old version is retired.
    pub async fn rotate_index_key(&self, draft: &mut Draft) -> Result<u32, DomainError> {
        let version = self.rotate(KIND_BLIND_INDEX, draft).await?;
        self.reindex_wake.notify_one();
        tracing::info!(
            kind = KIND_BLIND_INDEX,
            version,
            "blind-index key rotated; re-index job woken"
        );
        Ok(version)
    }

    /// Waits until a blind-index key rotation asks the re-index job to run.
    pub async fn reindex_requested(&self) {
        self.reindex_wake.notified().await;
    }

    /// A new active version of `kind`, the active one demoted, with the call's event.
    async fn rotate(&self, kind: &'static str, draft: &mut Draft) -> Result<u32, DomainError> {
        let newest = self
            .store
            .keys(kind)
            .await?
            .iter()
            .map(|r| r.version)
            .max()
            .unwrap_or(0);
        let version = u32::try_from(newest + 1)
            .map_err(|_| DomainError::Internal(format!("{kind} versions exhausted")))?;
        let key = SecretKey::random()?;
        let wrapped = self.roots().wrap(kind, version, &key)?;
        drop(key);
        draft.event.detail = format!("kind={kind} version={version}");
        let row = KeyRow {
            kind: kind.to_owned(),
            version: i64::from(version),
            state: "active".into(),
            root_version: i64::from(wrapped.wrapping_version),
            wrapped: wrapped.bytes,
        };
        let op = WriteOp::AddKeyVersion {
            row,
            at: now_us(),
            demote: true,
        };
        self.store
            .write_audited(op, draft.committed_record())
            .await?;
        draft.committed = true;
        self.refresh().await.map_err(keyring_error)?;
        Ok(version)
    }

    /// Retires a decrypt-only KEK version and destroys its wrapped bytes: refused while it is
    /// active, while data keys are still wrapped under it, or within one refresh interval of its
    /// demotion (an instance that has not reloaded yet may still wrap new data keys under it).
    pub async fn retire_kek(&self, version: u32, draft: &mut Draft) -> Result<bool, DomainError> {
        self.retire(KIND_KEK, "KEK version", version, draft).await
    }

    /// Retires a blind-index key version no subject's entries use any more (the re-index job has
    /// moved them all), destroying it; refused otherwise, as for KEKs.
    pub async fn retire_index_key(
        &self,
        version: u32,
        draft: &mut Draft,
    ) -> Result<bool, DomainError> {
        self.retire(KIND_BLIND_INDEX, "blind-index key version", version, draft)
            .await
    }

    async fn retire(
        &self,
        kind: &'static str,
        what: &'static str,
        version: u32,
        draft: &mut Draft,
    ) -> Result<bool, DomainError> {
        draft.event.detail = format!("kind={kind} version={version}");
        let versions = self.store.key_versions().await?;
        let key = |v: u32| {
            versions
                .iter()
                .find(|r| r.kind == kind && r.version == i64::from(v))
        };
        if key(version).is_none() {
            return Err(DomainError::NotFoundNamed { what });
        }
        if let Some(next) = key(version + 1) {
            let settled = next.created_at + micros(self.settings.refresh);
            let now = now_us();
            if now < settled {
                return Err(DomainError::FailedPrecondition(format!(
                    "{kind} v{version} was demoted less than the keyring refresh interval ago; \
                     retry in {} ms, once every instance has loaded v{}",
                    (settled - now) / 1000 + 1,
                    version + 1
                )));
            }
        }
        let op = WriteOp::RetireKey {
            kind: kind.to_owned(),
            version,
            at: now_us(),
        };
        let now = match self.store.write_audited(op, draft.committed_record()).await {
            Ok(WriteOutcome::KeyRetired { now }) => now,
            Ok(other) => return Err(DomainError::Internal(format!("retire answered {other:?}"))),
            Err(StoreError::NotFound) => return Err(DomainError::NotFoundNamed { what }),
            Err(e) => return Err(e.into()),
        };
        draft.committed = true;
        self.refresh().await.map_err(keyring_error)?;
        tracing::info!(
            kind,
            version,
            "key version retired; its wrapped key destroyed"
        );
        Ok(now)
    }

    /// Every key version with its state, the data keys per KEK, and (given a time) what a backup
    /// taken then depends on.
    pub async fn status(&self, backup_at_us: Option<i64>) -> Result<KeyStatus, DomainError> {
        let counts: BTreeMap<u32, u64> = self.store.dek_counts().await?.into_iter().collect();
        let indexed: BTreeMap<u32, u64> = self.store.index_counts().await?.into_iter().collect();
        let roots = self
            .store
            .root_checks()
            .await?
            .into_iter()
            .map(root_info)
            .collect::<Result<Vec<_>, _>>()?;
        let keys = self
            .store
            .key_versions()
            .await?
            .into_iter()
            .map(|row| {
                let mut info = key_info(row)?;
                if info.kind == KIND_KEK {
                    info.data_keys = Some(counts.get(&info.version).copied().unwrap_or(0));
                }
                if info.kind == KIND_BLIND_INDEX {
                    info.indexed_subjects = Some(indexed.get(&info.version).copied().unwrap_or(0));
                }
                Ok(info)
            })
            .collect::<Result<Vec<_>, DomainError>>()?;
        let active_kek = keys
            .iter()
            .filter(|k| k.kind == KIND_KEK && k.state == "active")
            .map(|k| k.version)
            .max()
            .unwrap_or(0);
        let rewrap_pending = counts
            .iter()
            .filter(|(v, _)| **v < active_kek)
            .map(|(_, n)| n)
            .sum();
        let active_index = keys
            .iter()
            .filter(|k| k.kind == KIND_BLIND_INDEX && k.state == "active")
            .map(|k| k.version)
            .max()
            .unwrap_or(0);
        let reindex_pending = indexed
            .iter()
            .filter(|(v, _)| **v < active_index)
            .map(|(_, n)| n)
            .sum();
        let backup = backup_at_us.map(|at| backup_dependencies(at, &roots, &keys));
        Ok(KeyStatus {
            roots,
            keys,
            active_kek,
            rewrap_pending,
            active_index,
            reindex_pending,
            backup,
        })
    }

    /// Re-wraps up to one batch of data keys under the active KEK; how many it moved, or `None`
    /// when none was left. A data key another call changed meanwhile is left to the next batch.
    pub async fn rewrap_batch(&self) -> Result<Option<u64>, DomainError> {
        let ring = self.keyring();
        let active = ring.active_kek();
        let rows = self
            .store
            .deks_below(active, self.settings.rewrap_batch.max(1))
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut rewrapped = Vec::with_capacity(rows.len());
        for row in rows {
            let wrapped = WrappedKey {
                wrapping_version: row.kek_version,
                bytes: row.wrapped_dek,
            };
            let dek = match ring.unwrap_dek(row.id, row.dek_id, &wrapped) {
                Ok(dek) => dek,
                Err(CryptoError::UnknownKeyVersion { version, .. }) => {
                    return Err(DomainError::Internal(format!(
                        "subject {}: data key under kek v{version}, which is retired or unknown",
                        row.id
                    )));
                }
                Err(e) => {
                    tracing::error!(subject = %row.id, error = %e, "data key failed authentication; not re-wrapped");
                    continue;
                }
            };
            let new = ring.wrap_dek(row.id, row.dek_id, &dek)?;
            rewrapped.push(Rewrapped {
                id: row.id,
                old_version: row.kek_version,
                new_version: new.wrapping_version,
                wrapped: new.bytes,
            });
        }
        if rewrapped.is_empty() {
            return Err(DomainError::Internal(
                "no data key of the batch could be re-wrapped (see the log)".into(),
            ));
        }
        match self.store.write(WriteOp::Rewrap(rewrapped)).await? {
            WriteOutcome::Rewrapped { count } => Ok(Some(count)),
            other => Err(DomainError::Internal(format!("re-wrap answered {other:?}"))),
        }
    }

    /// Re-wraps data keys until none is left under an older KEK, at most `rate` per second
    /// (0: no limit); how many it moved. Appends one audit event when it moved any.
    pub async fn rewrap_all(&self, rate: u32) -> Result<u64, DomainError> {
        let started = tokio::time::Instant::now();
        let mut total = 0u64;
        while let Some(moved) = self.rewrap_batch().await? {
            total += moved;
            metrics::counter!("kluis_keys_rewrapped_total").increment(moved);
            if rate > 0 {
                let due = started + Duration::from_secs_f64(total as f64 / f64::from(rate));
                tokio::time::sleep_until(due).await;
            }
        }
        if total > 0 {
            let active = self.keyring().active_kek();
            self.record_job_event("keys.rewrap", KIND_KEK, total)
                .await?;
            tracing::info!(
                kek = active,
                rewrapped = total,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "every data key is under the active KEK"
            );
        }
        Ok(total)
    }

    /// The settings of the key jobs.
    pub fn settings(&self) -> &KeySettings {
        &self.settings
    }

    /// Appends the audit event of a key job that moved `count` subjects to the active version of
    /// `kind` (`keys.rewrap`, `keys.reindex`).
    pub async fn record_job_event(
        &self,
        method: &str,
        kind: &str,
        count: u64,
    ) -> Result<(), DomainError> {
        let active = if kind == KIND_KEK {
            self.keyring().active_kek()
        } else {
            self.keyring().index_version()
        };
        let event = AuditEvent {
            at_us: now_us(),
            method: method.to_owned(),
            caller: REWRAP_CALLER.to_owned(),
            role: "system".to_owned(),
            policy_version: self.policy_version.clone(),
            outcome: super::call::OK.to_owned(),
            detail: format!("kind={kind} version={active} moved={count}"),
            ..AuditEvent::default()
        };
        self.store
            .record(crate::audit::AuditTrail::record_of(&event))
            .await?;
        Ok(())
    }

    /// Starts the refresher (every `refresh`, or at once when asked) and, unless switched off,
    /// the re-wrap job; the application stops both at shutdown (their handles).
    pub fn spawn_jobs(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let weak = Arc::downgrade(self);
        let every = self.settings.refresh;
        let refresher = tokio::spawn(async move {
            loop {
                let Some(keys) = weak.upgrade() else { return };
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = keys.refresh_wake.notified() => {}
                }
                if let Err(e) = keys.refresh().await {
                    tracing::warn!(error = %e, "keyring reload failed; retried at the next interval");
                }
            }
        });
        if self.settings.rewrap_rate == 0 {
            return vec![refresher];
        }
        let weak = Arc::downgrade(self);
        let rewrapper = tokio::spawn(async move {
            loop {
                let Some(keys) = weak.upgrade() else { return };
                if let Err(e) = keys.rewrap_all(keys.settings.rewrap_rate).await {
                    tracing::warn!(error = %e, "KEK re-wrap failed; resumed at the next interval");
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = keys.rewrap_wake.notified() => {}
                }
            }
        });
        vec![refresher, rewrapper]
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn keyring_error(e: KeyringError) -> DomainError {
    match e {
        KeyringError::Store(e) => e.into(),
        other => DomainError::Internal(other.to_string()),
    }
}

fn version_of(v: i64, what: &str) -> Result<u32, DomainError> {
    u32::try_from(v).map_err(|_| DomainError::Internal(format!("corrupt {what}")))
}

fn root_info(row: RootCheckRow) -> Result<RootVersionInfo, DomainError> {
    Ok(RootVersionInfo {
        version: version_of(row.version, "root version")?,
        created_at_us: row.created_at,
        retired_at_us: row.retired_at,
    })
}

fn key_info(row: KeyVersionRow) -> Result<KeyVersionInfo, DomainError> {
    Ok(KeyVersionInfo {
        version: version_of(row.version, "key version")?,
        root_version: version_of(row.root_version, "root version")?,
        kind: row.kind,
        state: row.state,
        created_at_us: row.created_at,
        retired_at_us: row.retired_at,
        data_keys: None,
        indexed_subjects: None,
    })
}

/// The versions in existence at `at`: created by then and not retired before.
fn backup_dependencies(
    at: i64,
    roots: &[RootVersionInfo],
    keys: &[KeyVersionInfo],
) -> BackupDependencies {
    let alive_then =
        |created: i64, retired: Option<i64>| created <= at && retired.is_none_or(|r| r > at);
    let roots: Vec<RootVersionInfo> = roots
        .iter()
        .filter(|r| alive_then(r.created_at_us, r.retired_at_us))
        .cloned()
        .collect();
    let keys: Vec<KeyVersionInfo> = keys
        .iter()
        .filter(|k| ERASURE_KINDS.contains(&k.kind.as_str()))
        .filter(|k| alive_then(k.created_at_us, k.retired_at_us))
        .cloned()
        .collect();
    let unrecoverable = roots.iter().all(|r| r.retired_at_us.is_some())
        && keys.iter().all(|k| k.retired_at_us.is_some());
    BackupDependencies {
        at_us: at,
        roots,
        keys,
        unrecoverable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: &str, version: u32, created: i64, retired: Option<i64>) -> KeyVersionInfo {
        KeyVersionInfo {
            kind: kind.into(),
            version,
            state: if retired.is_some() {
                "retired"
            } else {
                "active"
            }
            .into(),
            root_version: 1,
            created_at_us: created,
            retired_at_us: retired,
            data_keys: None,
            indexed_subjects: None,
        }
    }

    #[test]
    fn a_backup_depends_on_the_versions_alive_when_it_was_taken() {
        let roots = [RootVersionInfo {
            version: 1,
            created_at_us: 0,
            retired_at_us: None,
        }];
        let keys = [
            key(KIND_KEK, 1, 0, Some(50)),
            key(KIND_KEK, 2, 40, None),
            key(KIND_KEK, 3, 200, None),
            key(KIND_BLIND_INDEX, 1, 0, None),
            key(KIND_AUDIT_CHAIN, 1, 0, None),
        ];
        let deps = backup_dependencies(45, &roots, &keys);
        let listed: Vec<(&str, u32)> = deps
            .keys
            .iter()
            .map(|k| (k.kind.as_str(), k.version))
            .collect();
        assert_eq!(
            listed,
            [(KIND_KEK, 1), (KIND_KEK, 2), (KIND_BLIND_INDEX, 1)],
            "KEK v3 came later; audit keys protect no personal data"
        );
        assert!(!deps.unrecoverable);
        let later = backup_dependencies(60, &roots, &keys);
        assert!(
            later
                .keys
                .iter()
                .all(|k| !(k.kind == KIND_KEK && k.version == 1))
        );
    }

    #[test]
    fn a_backup_is_unrecoverable_only_once_every_version_it_needs_is_retired() {
        let retired_root = [RootVersionInfo {
            version: 1,
            created_at_us: 0,
            retired_at_us: Some(100),
        }];
        let keys = [
            key(KIND_KEK, 1, 0, Some(90)),
            key(KIND_BLIND_INDEX, 1, 0, Some(95)),
        ];
        assert!(backup_dependencies(10, &retired_root, &keys).unrecoverable);
        let keys = [
            key(KIND_KEK, 1, 0, Some(90)),
            key(KIND_BLIND_INDEX, 1, 0, None),
        ];
        assert!(!backup_dependencies(10, &retired_root, &keys).unrecoverable);
    }
}
