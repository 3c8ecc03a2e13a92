//! The root key, the key-check value, and the keyring of key-encryption and service keys.
//!
//! The root key never leaves memory; every other key is stored in the database wrapped under it
//! (KEKs and service keys) or under a KEK (subjects' data keys).

use std::collections::BTreeMap;

use uuid::Uuid;
use zeroize::Zeroizing;

use super::{CryptoError, Sealed, SecretKey, hmac_sha256, open, seal};

const KEY_FILE_TAG: &str = "kluis-root-key";

/// The versioned 256-bit root key.
#[derive(Debug, Clone)]
pub struct RootKey {
    version: u32,
    key: SecretKey,
}

/// A key sealed under another key, with the version of the key that sealed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub wrapping_version: u32,
    pub bytes: Vec<u8>,
}

/// The value stored in the database that tells whether a root key is the right one.
pub type KeyCheck = [u8; 32];

impl RootKey {
    /// A fresh version-1 root key.
    pub fn generate() -> Result<Self, CryptoError> {
        Ok(Self {
            version: 1,
            key: SecretKey::random()?,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Parses `kluis-root-key v<version> <64 hex digits>` (the key file and `KLUIS_ROOT_KEY`).
    /// Bare 64 hex digits are taken as version 1.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (version, hex_key) = match words.as_slice() {
            [tag, version, hex_key] if *tag == KEY_FILE_TAG => {
                let version = version
                    .strip_prefix('v')
                    .and_then(|v| v.parse::<u32>().ok())
                    .filter(|v| *v > 0)
                    .ok_or(CryptoError::MalformedKey("the version is not v1, v2, …"))?;
                (version, *hex_key)
            }
            [hex_key] => (1, *hex_key),
            _ => {
                return Err(CryptoError::MalformedKey(
                    "expected `kluis-root-key v1 <64 hex digits>`",
                ));
            }
        };
        let bytes = Zeroizing::new(
            hex::decode(hex_key).map_err(|_| CryptoError::MalformedKey("the key is not hex"))?,
        );
        Ok(Self {
            version,
            key: SecretKey::from_slice(&bytes)?,
        })
    }

    /// The key file's contents, as [`RootKey::parse`] reads them.
    pub fn to_file_contents(&self) -> Zeroizing<String> {
        let hex_key = Zeroizing::new(hex::encode(self.key.expose()));
        Zeroizing::new(format!(
            "{KEY_FILE_TAG} v{} {}\n",
            self.version,
            hex_key.as_str()
        ))
    }

    fn aad(&self, kind: &str, version: u32) -> Vec<u8> {
        format!("kluis.root.v{}/{kind}/v{version}", self.version).into_bytes()
    }

    /// Wraps a KEK or service key of `kind` and `version` under this root key.
    pub fn wrap(
        &self,
        kind: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<WrappedKey, CryptoError> {
        let sealed = seal(&self.key, &self.aad(kind, version), key.expose())?;
        Ok(WrappedKey {
            wrapping_version: self.version,
            bytes: sealed.to_bytes(),
        })
    }

    /// Unwraps what [`RootKey::wrap`] made for the same kind and version.
    pub fn unwrap(
        &self,
        kind: &str,
        version: u32,
        wrapped: &WrappedKey,
    ) -> Result<SecretKey, CryptoError> {
        if wrapped.wrapping_version != self.version {
            return Err(CryptoError::UnknownKeyVersion {
                kind: "root",
                version: wrapped.wrapping_version,
            });
        }
        let plain = open(
            &self.key,
            &self.aad(kind, version),
            &Sealed::from_bytes(&wrapped.bytes)?,
        )?;
        SecretKey::from_slice(&plain)
    }
}

/// The key-check value of a root key: an HMAC over a fixed label, so it reveals nothing of the key.
pub fn key_check_value(root: &RootKey) -> KeyCheck {
    hmac_sha256(
        &root.key,
        &[b"kluis key-check", &root.version.to_be_bytes()],
    )
}

/// The unwrapped keys a running instance works with.
#[derive(Debug)]
pub struct Keyring {
    keks: BTreeMap<u32, SecretKey>,
    active_kek: u32,
    index_key_version: u32,
    index_key: SecretKey,
}

impl Keyring {
    /// Builds the keyring; `active_kek` must be one of `keks`.
    pub fn new(
        keks: BTreeMap<u32, SecretKey>,
        active_kek: u32,
        index_key_version: u32,
        index_key: SecretKey,
    ) -> Result<Self, CryptoError> {
        if !keks.contains_key(&active_kek) {
            return Err(CryptoError::UnknownKeyVersion {
                kind: "kek",
                version: active_kek,
            });
        }
        Ok(Self {
            keks,
            active_kek,
            index_key_version,
            index_key,
        })
    }

    fn dek_aad(subject: Uuid, dek_id: Uuid) -> Vec<u8> {
        let mut aad = b"kluis.dek".to_vec();
        aad.extend_from_slice(subject.as_bytes());
        aad.extend_from_slice(dek_id.as_bytes());
        aad
    }

    /// Wraps a subject's data key under the active KEK.
    pub fn wrap_dek(
        &self,
        subject: Uuid,
        dek_id: Uuid,
        dek: &SecretKey,
    ) -> Result<WrappedKey, CryptoError> {
        let kek = self.kek(self.active_kek)?;
        let sealed = seal(kek, &Self::dek_aad(subject, dek_id), dek.expose())?;
        Ok(WrappedKey {
            wrapping_version: self.active_kek,
            bytes: sealed.to_bytes(),
        })
    }

    /// Unwraps a subject's data key under the KEK version that wrapped it.
    pub fn unwrap_dek(
        &self,
        subject: Uuid,
        dek_id: Uuid,
        wrapped: &WrappedKey,
    ) -> Result<SecretKey, CryptoError> {
        let kek = self.kek(wrapped.wrapping_version)?;
        let plain = open(
            kek,
            &Self::dek_aad(subject, dek_id),
            &Sealed::from_bytes(&wrapped.bytes)?,
        )?;
        SecretKey::from_slice(&plain)
    }

    /// The KEK version new data keys are wrapped under.
    pub fn active_kek(&self) -> u32 {
        self.active_kek
    }

    /// Whether this keyring holds KEK `version` (a newer one may exist that it has not loaded).
    pub fn has_kek(&self, version: u32) -> bool {
        self.keks.contains_key(&version)
    }

    fn kek(&self, version: u32) -> Result<&SecretKey, CryptoError> {
        self.keks
            .get(&version)
            .ok_or(CryptoError::UnknownKeyVersion {
                kind: "kek",
                version,
            })
    }

    /// The blind index of a normalised value at `path`: HMAC-SHA256 under the blind-index key, with
    /// the path bound in so equal values at different paths do not match.
    pub fn blind_index(&self, path: &str, normalized: &str) -> (u32, [u8; 32]) {
        (
            self.index_key_version,
            hmac_sha256(&self.index_key, &[path.as_bytes(), normalized.as_bytes()]),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn root_key_file_round_trips() {
        let root = RootKey::generate().unwrap();
        let again = RootKey::parse(&root.to_file_contents()).unwrap();
        assert_eq!(key_check_value(&root), key_check_value(&again));
    }

    #[test]
    fn another_root_key_has_another_check_value_and_cannot_unwrap() {
        let (a, b) = (RootKey::generate().unwrap(), RootKey::generate().unwrap());
        assert_ne!(key_check_value(&a), key_check_value(&b));
        let kek = SecretKey::random().unwrap();
        let wrapped = a.wrap("kek", 1, &kek).unwrap();
        assert!(b.unwrap("kek", 1, &wrapped).is_err());
        assert!(
            a.unwrap("kek", 2, &wrapped).is_err(),
            "bound to kind and version"
        );
        assert!(a.unwrap("kek", 1, &wrapped).is_ok());
    }

    #[test]
    fn malformed_key_files_are_refused() {
        for text in ["", "kluis-root-key v1 zz", "kluis-root-key x1 00", "00ff"] {
            assert!(RootKey::parse(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn dek_is_bound_to_its_subject() {
        let mut keks = BTreeMap::new();
        keks.insert(1, SecretKey::random().unwrap());
        let ring = Keyring::new(keks, 1, 1, SecretKey::random().unwrap()).unwrap();
        let (s, d) = (Uuid::new_v4(), Uuid::new_v4());
        let dek = SecretKey::random().unwrap();
        let wrapped = ring.wrap_dek(s, d, &dek).unwrap();
        assert_eq!(
            ring.unwrap_dek(s, d, &wrapped).unwrap().expose(),
            dek.expose()
        );
        assert!(ring.unwrap_dek(Uuid::new_v4(), d, &wrapped).is_err());
    }

    #[test]
    fn blind_index_depends_on_path() {
        let mut keks = BTreeMap::new();
        keks.insert(1, SecretKey::random().unwrap());
        let ring = Keyring::new(keks, 1, 1, SecretKey::random().unwrap()).unwrap();
        assert_ne!(
            ring.blind_index("contact.email", "x").1,
            ring.blind_index("account.username", "x").1
        );
        assert_eq!(
            ring.blind_index("contact.email", "x"),
            ring.blind_index("contact.email", "x")
        );
    }
}
