//! Opening the keyring at start-up: check the root key, then load (or create) the KEKs and service
//! keys wrapped under it. Concurrent first starts of several instances agree on one set of keys.

use std::collections::BTreeMap;

use subtle::ConstantTimeEq;

use super::now_us;
use crate::{
    crypto::{CryptoError, Keyring, RootKey, SecretKey, WrappedKey, key_check_value},
    store::{KeyRow, Store, StoreError},
};

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
pub async fn open_rights_keys(store: &Store, root: &RootKey) -> Result<RightsKeys, KeyringError> {
    Ok(RightsKeys {
        token_mac: newest(
            load_or_create(store, root, KIND_TOKEN_MAC).await?,
            KIND_TOKEN_MAC,
        )?,
        receipt_seed: newest(
            load_or_create(store, root, KIND_RECEIPT).await?,
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
pub async fn open_audit_keys(store: &Store, root: &RootKey) -> Result<AuditKeys, KeyringError> {
    Ok(AuditKeys {
        chain: newest(
            load_or_create(store, root, KIND_AUDIT_CHAIN).await?,
            KIND_AUDIT_CHAIN,
        )?,
        checkpoint_seed: newest(
            load_or_create(store, root, KIND_AUDIT_CHECKPOINT).await?,
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
    #[error("no active {0} key in the database")]
    NoActiveKey(&'static str),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("crypto: {0}")]
    Crypto(#[from] CryptoError),
}

/// Verifies `root` against the database and returns the unwrapped keyring.
pub async fn open_keyring(store: &Store, root: &RootKey) -> Result<Keyring, KeyringError> {
    let check = key_check_value(root);
    let stored = match store.key_check(root.version()).await? {
        Some(stored) => stored,
        // Only a database with no root key at all takes a new one; a key of another version is
        // refused here rather than given a check value of its own (rotation will be a command).
        None if !store.has_key_checks().await? => {
            store
                .init_key_check(root.version(), &check, now_us())
                .await?
        }
        None => return Err(KeyringError::WrongRootKey),
    };
    if !bool::from(stored.as_slice().ct_eq(&check)) {
        return Err(KeyringError::WrongRootKey);
    }
    let keks = load_or_create(store, root, KIND_KEK).await?;
    let indexes = load_or_create(store, root, KIND_BLIND_INDEX).await?;
    let active_kek = keks
        .iter()
        .filter(|(_, (state, _))| state == "active")
        .map(|(v, _)| *v)
        .max()
        .ok_or(KeyringError::NoActiveKey(KIND_KEK))?;
    let (index_version, (_, index_key)) = indexes
        .into_iter()
        .filter(|(_, (state, _))| state == "active")
        .max_by_key(|(v, _)| *v)
        .ok_or(KeyringError::NoActiveKey(KIND_BLIND_INDEX))?;
    let keks = keks
        .into_iter()
        .filter(|(_, (state, _))| state != "retired")
        .map(|(v, (_, k))| (v, k))
        .collect();
    Ok(Keyring::new(keks, active_kek, index_version, index_key)?)
}

async fn load_or_create(
    store: &Store,
    root: &RootKey,
    kind: &'static str,
) -> Result<BTreeMap<u32, (String, SecretKey)>, KeyringError> {
    let mut rows = store.keys(kind).await?;
    if rows.is_empty() {
        let key = SecretKey::random()?;
        let wrapped = root.wrap(kind, 1, &key)?;
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
    for row in rows {
        let version =
            u32::try_from(row.version).map_err(|_| StoreError::Corrupt("key version".into()))?;
        let wrapped = WrappedKey {
            wrapping_version: u32::try_from(row.root_version)
                .map_err(|_| StoreError::Corrupt("root version".into()))?,
            bytes: row.wrapped,
        };
        let key = root.unwrap(kind, version, &wrapped)?;
        out.insert(version, (row.state, key));
    }
    Ok(out)
}
