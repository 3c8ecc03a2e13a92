//! Where the root key comes from: a key file, an environment variable, or an operator passphrase
//! that unseals a sealed key file — behind one trait, so an external KMS plugs in the same way.
//!
//! A source supplies every root-key version it holds (several during a root-key rotation), keeps a
//! new version when the root key is rotated, and destroys an old one when it is retired.
//!
//! An external KMS (AWS KMS, HashiCorp Vault's transit engine, a PKCS#11 HSM) implements
//! [`KeySource`] by keeping each root-key version only as a ciphertext of the KMS (AWS
//! `GenerateDataKey`/`Decrypt`, Vault `transit/datakey/plaintext` and `transit/decrypt`, PKCS#11
//! `C_WrapKey`/`C_UnwrapKey`): `load` asks the KMS to decrypt the stored ciphertexts, `add` asks it
//! for a new data key and stores only the ciphertext, `remove` deletes the ciphertext (and, for a
//! KMS key of its own, schedules the key's deletion). The plaintext root key then exists only in
//! kluis's memory, as with every other source.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use zeroize::Zeroizing;

use crate::crypto::{PasswordParams, RootKey, SealedRootKey};

/// What can go wrong with a key source; messages name the source, never key material.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeySourceError(pub String);

/// A supplier of root-key versions (see the module documentation).
pub trait KeySource: Send + Sync {
    /// What the source is, for logs and errors: a path or a variable name.
    fn describe(&self) -> String;
    /// Whether the source holds no key yet (a first start on an empty database creates one).
    fn is_empty(&self) -> Result<bool, KeySourceError>;
    /// Every root-key version the source supplies now.
    fn load(&self) -> Result<Vec<RootKey>, KeySourceError>;
    /// Keeps a new version (root-key rotation), beside the ones it holds.
    fn add(&self, key: &RootKey) -> Result<(), KeySourceError>;
    /// Destroys a version for good (root-key retirement).
    fn remove(&self, version: u32) -> Result<(), KeySourceError>;
}

/// The key file: one `kluis-root-key v<N> <64 hex digits>` line per version, readable by its
/// owner only — a file group or others can read is refused.
pub struct KeyFile {
    path: PathBuf,
}

impl KeyFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn read(&self) -> Result<Zeroizing<String>, KeySourceError> {
        let meta = fs::metadata(&self.path)
            .map_err(|e| KeySourceError(format!("{}: {e}", self.path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeySourceError(format!(
                "{} is readable by group or others (mode {:o}); a root key file must be private: \
                 chmod 600 {}",
                self.path.display(),
                meta.permissions().mode() & 0o777,
                self.path.display()
            )));
        }
        fs::read_to_string(&self.path)
            .map(Zeroizing::new)
            .map_err(|e| KeySourceError(format!("{}: {e}", self.path.display())))
    }

    fn write(&self, keys: &[RootKey]) -> Result<(), KeySourceError> {
        let mut text = Zeroizing::new(String::new());
        for key in keys {
            text.push_str(&key.to_file_contents());
        }
        write_private_atomically(&self.path, text.as_bytes())
            .map_err(|e| KeySourceError(format!("{}: {e}", self.path.display())))
    }
}

impl KeySource for KeyFile {
    fn describe(&self) -> String {
        format!("key file {}", self.path.display())
    }

    fn is_empty(&self) -> Result<bool, KeySourceError> {
        Ok(!self.path.exists())
    }

    fn load(&self) -> Result<Vec<RootKey>, KeySourceError> {
        RootKey::parse_all(&self.read()?)
            .map_err(|e| KeySourceError(format!("{}: {e}", self.path.display())))
    }

    fn add(&self, key: &RootKey) -> Result<(), KeySourceError> {
        let _lock = ChangeLock::take(&self.path)?;
        let mut keys = if self.path.exists() {
            self.load()?
        } else {
            Vec::new()
        };
        if keys.iter().any(|k| k.version() == key.version()) {
            return Err(KeySourceError(format!(
                "{} already holds root key v{}",
                self.path.display(),
                key.version()
            )));
        }
        keys.push(key.clone());
        self.write(&keys)
    }

    fn remove(&self, version: u32) -> Result<(), KeySourceError> {
        let _lock = ChangeLock::take(&self.path)?;
        let keys: Vec<RootKey> = self
            .load()?
            .into_iter()
            .filter(|k| k.version() != version)
            .collect();
        self.write(&keys)
    }
}

/// `KLUIS_ROOT_KEY`: one key line per version. Read-only: kluis cannot change a variable of
/// its environment, so a rotation with this source is refused (use a key file or a passphrase,
/// or put the new line in the variable's secret store and restart).
pub struct EnvKey {
    name: &'static str,
    value: Zeroizing<String>,
}

impl EnvKey {
    pub fn new(name: &'static str, value: Zeroizing<String>) -> Self {
        Self { name, value }
    }

    fn read_only(&self) -> KeySourceError {
        KeySourceError(format!(
            "{} cannot be changed by kluis: rotate the root key with a key file or a passphrase \
             source, or set {} to the key lines yourself and restart",
            self.name, self.name
        ))
    }
}

impl KeySource for EnvKey {
    fn describe(&self) -> String {
        format!("environment variable {}", self.name)
    }

    fn is_empty(&self) -> Result<bool, KeySourceError> {
        Ok(false)
    }

    fn load(&self) -> Result<Vec<RootKey>, KeySourceError> {
        RootKey::parse_all(&self.value).map_err(|e| KeySourceError(format!("{}: {e}", self.name)))
    }

    fn add(&self, _key: &RootKey) -> Result<(), KeySourceError> {
        Err(self.read_only())
    }

    fn remove(&self, _version: u32) -> Result<(), KeySourceError> {
        Err(self.read_only())
    }
}

/// A sealed key file unsealed with an operator passphrase: each root-key version sealed
/// (AES-256-GCM) under a key Argon2id derives from the passphrase, with its salt and parameters on
/// its line. A wrong passphrase stops start-up; the file alone reveals nothing.
pub struct Passphrase {
    path: PathBuf,
    passphrase: Zeroizing<Vec<u8>>,
    params: PasswordParams,
}

/// Argon2id for the passphrase: run once at start, so costlier than for portal passwords.
pub const PASSPHRASE_PARAMS: PasswordParams = PasswordParams {
    m_kib: 65_536,
    t: 3,
    p: 1,
};

/// Passphrases shorter than this are refused (an offline guess costs one Argon2id run).
pub const MIN_PASSPHRASE_CHARS: usize = 16;

impl Passphrase {
    pub fn new(
        path: PathBuf,
        passphrase: Zeroizing<Vec<u8>>,
        params: PasswordParams,
    ) -> Result<Self, KeySourceError> {
        let chars = String::from_utf8_lossy(&passphrase).chars().count();
        if chars < MIN_PASSPHRASE_CHARS {
            return Err(KeySourceError(format!(
                "the root-key passphrase has {chars} characters; at least {MIN_PASSPHRASE_CHARS} \
                 are needed"
            )));
        }
        Ok(Self {
            path,
            passphrase,
            params,
        })
    }

    fn sealed(&self) -> Result<Vec<SealedRootKey>, KeySourceError> {
        let text = fs::read_to_string(&self.path)
            .map_err(|e| KeySourceError(format!("{}: {e}", self.path.display())))?;
        SealedRootKey::parse_all(&text)
            .map_err(|e| KeySourceError(format!("{}: {e}", self.path.display())))
    }

    fn write(&self, sealed: &[SealedRootKey]) -> Result<(), KeySourceError> {
        let text: String = sealed.iter().map(SealedRootKey::to_line).collect();
        write_private_atomically(&self.path, text.as_bytes())
            .map_err(|e| KeySourceError(format!("{}: {e}", self.path.display())))
    }
}

impl KeySource for Passphrase {
    fn describe(&self) -> String {
        format!("sealed key file {} (passphrase)", self.path.display())
    }

    fn is_empty(&self) -> Result<bool, KeySourceError> {
        Ok(!self.path.exists())
    }

    fn load(&self) -> Result<Vec<RootKey>, KeySourceError> {
        self.sealed()?
            .iter()
            .map(|s| {
                s.unseal(&self.passphrase).map_err(|_| {
                    KeySourceError(format!(
                        "the passphrase does not unseal root key v{} in {}: wrong passphrase, or \
                         the file was altered",
                        s.version,
                        self.path.display()
                    ))
                })
            })
            .collect()
    }

    fn add(&self, key: &RootKey) -> Result<(), KeySourceError> {
        let _lock = ChangeLock::take(&self.path)?;
        let mut sealed = if self.path.exists() {
            // Every existing version must unseal with this passphrase before one is added.
            self.load()?;
            self.sealed()?
        } else {
            Vec::new()
        };
        if sealed.iter().any(|s| s.version == key.version()) {
            return Err(KeySourceError(format!(
                "{} already holds root key v{}",
                self.path.display(),
                key.version()
            )));
        }
        sealed.push(
            key.seal_with_passphrase(&self.passphrase, self.params)
                .map_err(|e| KeySourceError(format!("sealing the root key: {e}")))?,
        );
        self.write(&sealed)
    }

    fn remove(&self, version: u32) -> Result<(), KeySourceError> {
        let _lock = ChangeLock::take(&self.path)?;
        let kept: Vec<SealedRootKey> = self
            .sealed()?
            .into_iter()
            .filter(|s| s.version != version)
            .collect();
        self.write(&kept)
    }
}

/// Held while a key file is changed (`<file>.lock`, created exclusively), so two rotations at once
/// cannot each add a version the other then overwrites. Removed when dropped.
struct ChangeLock(PathBuf);

impl ChangeLock {
    fn take(file: &Path) -> Result<Self, KeySourceError> {
        let lock = file.with_extension("lock");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock)
            .map_err(|e| {
                KeySourceError(format!(
                    "{}: {e}: another root-key change is running (if none is, remove the file)",
                    lock.display()
                ))
            })?;
        Ok(Self(lock))
    }
}

impl Drop for ChangeLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Replaces `path` by a file readable by its owner only: written beside it, synced, renamed, and
/// the directory synced, so the file is either the old one or the whole new one.
pub fn write_private_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("kluis-keysource-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_key_file_readable_by_others_is_refused() {
        let path = dir().join("root.key");
        let source = KeyFile::new(path.clone());
        assert!(source.is_empty().unwrap());
        source.add(&RootKey::generate().unwrap()).unwrap();
        assert_eq!(source.load().unwrap().len(), 1);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = source.load().unwrap_err().to_string();
        assert!(err.contains("readable by group or others"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn a_key_file_keeps_versions_added_and_loses_those_removed() {
        let source = KeyFile::new(dir().join("root.key"));
        source.add(&RootKey::generate_version(1).unwrap()).unwrap();
        source.add(&RootKey::generate_version(2).unwrap()).unwrap();
        assert!(source.add(&RootKey::generate_version(2).unwrap()).is_err());
        let versions = |s: &KeyFile| {
            s.load()
                .unwrap()
                .iter()
                .map(RootKey::version)
                .collect::<Vec<_>>()
        };
        assert_eq!(versions(&source), [1, 2]);
        source.remove(1).unwrap();
        assert_eq!(versions(&source), [2]);
    }

    #[test]
    fn a_wrong_passphrase_unseals_nothing_and_says_so() {
        let path = dir().join("root.key.sealed");
        let cheap = PasswordParams {
            m_kib: 8,
            t: 1,
            p: 1,
        };
        let right = Passphrase::new(
            path.clone(),
            Zeroizing::new(b"a long operator passphrase".to_vec()),
            cheap,
        )
        .unwrap();
        right.add(&RootKey::generate().unwrap()).unwrap();
        assert_eq!(right.load().unwrap()[0].version(), 1);
        let wrong = Passphrase::new(
            path.clone(),
            Zeroizing::new(b"a long operator passphrasE".to_vec()),
            cheap,
        )
        .unwrap();
        let err = wrong.load().unwrap_err().to_string();
        assert!(err.contains("wrong passphrase"), "{err}");
        assert!(
            wrong.add(&RootKey::generate_version(2).unwrap()).is_err(),
            "no version added under another passphrase"
        );
        assert!(Passphrase::new(path, Zeroizing::new(b"short".to_vec()), cheap).is_err());
    }

    #[test]
    fn the_environment_source_cannot_be_rotated() {
        let root = RootKey::generate().unwrap();
        let source = EnvKey::new("KLUIS_ROOT_KEY", root.to_file_contents());
        assert_eq!(source.load().unwrap()[0].version(), 1);
        assert!(source.add(&RootKey::generate_version(2).unwrap()).is_err());
    }
}
