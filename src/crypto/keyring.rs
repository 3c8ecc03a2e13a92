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

    /// A fresh root key of `version` (root-key rotation makes the next version).
    pub fn generate_version(version: u32) -> Result<Self, CryptoError> {
        if version == 0 {
            return Err(CryptoError::MalformedKey("root-key versions start at 1"));
        }
        Ok(Self {
            version,
            key: SecretKey::random()?,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Parses one or more keys as [`RootKey::parse`] reads them, one per line (a key file or
    /// `KLUIS_ROOT_KEY` holding several versions during a root-key rotation). Blank lines and
    /// lines starting with `#` are skipped.
    pub fn parse_all(text: &str) -> Result<Vec<Self>, CryptoError> {
        let keys = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(Self::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(CryptoError::MalformedKey(
                "expected `kluis-root-key v1 <64 hex digits>`",
            ));
        }
        Ok(keys)
    }

    /// Seals this root key under a key derived from `passphrase` with Argon2id (the operator
    /// passphrase key source); the salt and parameters travel with the result.
    pub fn seal_with_passphrase(
        &self,
        passphrase: &[u8],
        params: super::PasswordParams,
    ) -> Result<SealedRootKey, CryptoError> {
        let salt = super::random_bytes::<16>()?;
        let kek = passphrase_key(passphrase, &salt, params)?;
        let sealed = seal(&kek, &sealed_aad(self.version), self.key.expose())?;
        Ok(SealedRootKey {
            version: self.version,
            params,
            salt: salt.to_vec(),
            sealed: sealed.to_bytes(),
        })
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

/// A root key sealed under an operator passphrase: one line of the sealed key file,
/// `kluis-sealed-root-key v<version> argon2id m=<KiB>,t=<passes>,p=<lanes> <salt hex> <sealed hex>`.
/// `Debug` leaves salt and ciphertext out (with them a passphrase could be guessed offline).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedRootKey {
    pub version: u32,
    pub params: super::PasswordParams,
    pub salt: Vec<u8>,
    pub sealed: Vec<u8>,
}

impl std::fmt::Debug for SealedRootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRootKey")
            .field("version", &self.version)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

const SEALED_TAG: &str = "kluis-sealed-root-key";

fn sealed_aad(version: u32) -> Vec<u8> {
    format!("kluis.sealed-root/v{version}").into_bytes()
}

/// The 256-bit key Argon2id derives from a passphrase and salt.
fn passphrase_key(
    passphrase: &[u8],
    salt: &[u8],
    params: super::PasswordParams,
) -> Result<SecretKey, CryptoError> {
    let mut out = Zeroizing::new([0u8; 32]);
    super::password::derive_key(params, passphrase, salt, out.as_mut())?;
    SecretKey::from_slice(out.as_ref())
}

impl SealedRootKey {
    /// The root key, if `passphrase` is the one it was sealed with: `Authentication` otherwise.
    pub fn unseal(&self, passphrase: &[u8]) -> Result<RootKey, CryptoError> {
        let kek = passphrase_key(passphrase, &self.salt, self.params)?;
        let plain = open(
            &kek,
            &sealed_aad(self.version),
            &Sealed::from_bytes(&self.sealed)?,
        )?;
        Ok(RootKey {
            version: self.version,
            key: SecretKey::from_slice(&plain)?,
        })
    }

    pub fn to_line(&self) -> String {
        format!(
            "{SEALED_TAG} v{} argon2id m={},t={},p={} {} {}\n",
            self.version,
            self.params.m_kib,
            self.params.t,
            self.params.p,
            hex::encode(&self.salt),
            hex::encode(&self.sealed)
        )
    }

    /// Parses every line of a sealed key file (blank and `#` lines skipped).
    pub fn parse_all(text: &str) -> Result<Vec<Self>, CryptoError> {
        let bad = || {
            CryptoError::MalformedKey(
                "expected `kluis-sealed-root-key v1 argon2id m=…,t=…,p=… <salt> <sealed>`",
            )
        };
        let mut out = Vec::new();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let words: Vec<&str> = line.split_whitespace().collect();
            let [tag, version, alg, params, salt, sealed] = words.as_slice() else {
                return Err(bad());
            };
            if *tag != SEALED_TAG || *alg != "argon2id" {
                return Err(bad());
            }
            let version = version
                .strip_prefix('v')
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|v| *v > 0)
                .ok_or_else(bad)?;
            let mut m_kib = None;
            let mut t = None;
            let mut p = None;
            for part in params.split(',') {
                let (name, value) = part.split_once('=').ok_or_else(bad)?;
                let value: u32 = value.parse().map_err(|_| bad())?;
                match name {
                    "m" => m_kib = Some(value),
                    "t" => t = Some(value),
                    "p" => p = Some(value),
                    _ => return Err(bad()),
                }
            }
            let params = super::PasswordParams {
                m_kib: m_kib.ok_or_else(bad)?,
                t: t.ok_or_else(bad)?,
                p: p.ok_or_else(bad)?,
            };
            out.push(Self {
                version,
                params,
                salt: hex::decode(salt).map_err(|_| bad())?,
                sealed: hex::decode(sealed).map_err(|_| bad())?,
            });
        }
        if out.is_empty() {
            return Err(bad());
        }
        Ok(out)
    }
}

/// The root-key versions an instance holds, by version.
#[derive(Debug, Clone, Default)]
pub struct RootKeys(BTreeMap<u32, RootKey>);

impl RootKeys {
    pub fn new(keys: impl IntoIterator<Item = RootKey>) -> Self {
        Self(keys.into_iter().map(|k| (k.version, k)).collect())
    }

    /// The newest version: what new and re-wrapped keys are wrapped under.
    pub fn newest(&self) -> Option<&RootKey> {
        self.0.values().next_back()
    }

    pub fn get(&self, version: u32) -> Option<&RootKey> {
        self.0.get(&version)
    }

    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.keys().copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = &RootKey> {
        self.0.values()
    }

    /// Unwraps under whichever version wrapped it.
    pub fn unwrap(
        &self,
        kind: &str,
        version: u32,
        wrapped: &WrappedKey,
    ) -> Result<SecretKey, CryptoError> {
        self.get(wrapped.wrapping_version)
            .ok_or(CryptoError::UnknownKeyVersion {
                kind: "root",
                version: wrapped.wrapping_version,
            })?
            .unwrap(kind, version, wrapped)
    }

    /// Wraps under the newest version.
    pub fn wrap(
        &self,
        kind: &str,
        version: u32,
        key: &SecretKey,
    ) -> Result<WrappedKey, CryptoError> {
        self.newest()
            .ok_or(CryptoError::MalformedKey("no root key"))?
            .wrap(kind, version, key)
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
    /// Older blind-index versions still consulted by lookups while the re-index job runs.
    old_index_keys: BTreeMap<u32, SecretKey>,
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
            old_index_keys: BTreeMap::new(),
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

    /// Adds older blind-index versions that lookups consult besides the active one (during a
    /// blind-index key rotation); the active version among them is ignored.
    pub fn with_old_index_keys(mut self, keys: BTreeMap<u32, SecretKey>) -> Self {
        self.old_index_keys = keys
            .into_iter()
            .filter(|(v, _)| *v != self.index_key_version)
            .collect();
        self
    }

    /// The blind-index version new entries are made under.
    pub fn index_version(&self) -> u32 {
        self.index_key_version
    }

    /// The blind indexes of a value under every version a lookup consults: the active one first,
    /// then the older ones still loaded (newest first).
    pub fn blind_indexes(&self, path: &str, normalized: &str) -> Vec<(u32, [u8; 32])> {
        let mut out = vec![self.blind_index(path, normalized)];
        out.extend(self.old_index_keys.iter().rev().map(|(v, key)| {
            (
                *v,
                hmac_sha256(key, &[path.as_bytes(), normalized.as_bytes()]),
            )
        }));
        out
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
    fn a_passphrase_unseals_its_root_key_and_a_wrong_one_does_not() {
        let root = RootKey::generate_version(3).unwrap();
        let params = crate::crypto::PasswordParams {
            m_kib: 8,
            t: 1,
            p: 1,
        };
        let sealed = root.seal_with_passphrase(b"correct horse", params).unwrap();
        let parsed = SealedRootKey::parse_all(&sealed.to_line()).unwrap();
        assert_eq!(parsed, std::slice::from_ref(&sealed));
        let opened = parsed[0].unseal(b"correct horse").unwrap();
        assert_eq!(opened.version(), 3);
        assert_eq!(key_check_value(&opened), key_check_value(&root));
        assert_eq!(
            sealed.unseal(b"correct horsf").unwrap_err(),
            CryptoError::Authentication
        );
        assert!(SealedRootKey::parse_all("kluis-sealed-root-key v1 argon2id m=8 00 00").is_err());
    }

    #[test]
    fn a_key_file_may_hold_several_versions_and_root_keys_unwrap_by_version() {
        let (a, b) = (
            RootKey::generate_version(1).unwrap(),
            RootKey::generate_version(2).unwrap(),
        );
        let text = format!(
            "# rotated\n{}\n{}",
            a.to_file_contents().as_str(),
            b.to_file_contents().as_str()
        );
        let roots = RootKeys::new(RootKey::parse_all(&text).unwrap());
        assert_eq!(roots.versions().collect::<Vec<_>>(), [1, 2]);
        let kek = SecretKey::random().unwrap();
        let under_a = a.wrap("kek", 1, &kek).unwrap();
        assert!(roots.unwrap("kek", 1, &under_a).is_ok());
        assert_eq!(roots.wrap("kek", 1, &kek).unwrap().wrapping_version, 2);
        let only_b = RootKeys::new([b]);
        assert!(matches!(
            only_b.unwrap("kek", 1, &under_a),
            Err(CryptoError::UnknownKeyVersion {
                kind: "root",
                version: 1
            })
        ));
    }

    #[test]
    fn debug_output_never_shows_key_material() {
        let root = RootKey::generate().unwrap();
        let hex_key = hex::encode(root.key.expose());
        let params = crate::crypto::PasswordParams {
            m_kib: 8,
            t: 1,
            p: 1,
        };
        let sealed = root.seal_with_passphrase(b"passphrase", params).unwrap();
        for shown in [
            format!("{root:?}"),
            format!("{:?}", RootKeys::new([root.clone()])),
            format!("{sealed:?}"),
        ] {
            assert!(!shown.contains(&hex_key), "{shown}");
            assert!(
                !shown.contains(&format!("{:?}", root.key.expose())),
                "{shown}"
            );
        }
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
